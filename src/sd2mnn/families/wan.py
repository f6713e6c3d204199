"""Wan2.1 text-to-video as MNN's Wan runtime runs it: a UMT5 text encoder, a 3D transformer stepped
by flow-match Euler, a causal 3D VAE decoder that turns latent frames into video frames.
WAN:n cites transformers/diffusion/engine/src/wan_diffusion.cpp of MNN 3.6.1, WANH:n its header
include/diffusion/wan_diffusion.hpp.

The runtime fixes the text length (512), the latent channels (16), the batch of two (CFG) and the
VAE's factors (8 in space, 4 in time); the frames, height and width are its command's arguments,
and the graphs are traced at one size, so a bundle runs only at the size it was exported at
(``WanDims``; read back from the graphs' shapes).

What the runtime does not do as diffusers' WanPipeline does, and the graphs sd2mnn exports do in
its place (sd2mnn.exporters.wan):

* its tokenizer adds no EOS (WAN:25, a kSingle MtokTokenizer without BOS/EOS ids) and feeds the
  text encoder the ids alone (WAN:158); diffusers appends ``</s>``, masks the padding and zeroes
  the padded embeddings. The text encoder's graph takes the runtime's ids and does the rest.
* the transformer gets the runtime's mask (``ids != 0``, WAN:152-156); diffusers' transformer
  takes none and attends to the zeroed padding. The graph multiplies the conditioning by the
  mask widened by the EOS position, which leaves diffusers' (already zeroed) conditioning as is.
"""
from __future__ import annotations

from dataclasses import dataclass

from sd2mnn.families.base import ComponentSpec, Family, PromptFormat, Recipe, SameSize, TensorShapes
from sd2mnn.families.stable_diffusion import _text_encoder_feeds, denoiser_inputs

TEXT_LENGTH = 512  # WANH:44 mMaxTextLen
LATENT_CHANNELS = 16  # WANH:49 mLatentChannels
SPATIAL_FACTOR = 8  # WAN:283 vaeScaleFactor
TEMPORAL_FACTOR = 4  # WAN:305 latentFrames = (frames + 3) / 4
PATCH = 2  # WAN:284 transformerPatchSize
GUIDANCE = 5.0  # wan_diffusion_demo's documented cfg_scale (transformers/diffusion/README.md)
VERIFY_PROMPTS = 3  # sd2mnn.verification.inputs.PROMPTS


@dataclass(frozen=True)
class WanDims:
    """The video a bundle draws; the defaults are those wan_diffusion_demo's documentation runs
    and MNN's exporter (wan_onnx_export.py) exports at."""

    frames: int = 9
    height: int = 256
    width: int = 256
    text_hidden: int = 4096  # UMT5-XXL's d_model

    @property
    def latent_frames(self) -> int:
        # WAN:305 (frames + 3) / 4 == diffusers' (frames - 1) // 4 + 1 for the 4n + 1 frames a VAE decodes.
        return (self.frames + TEMPORAL_FACTOR - 1) // TEMPORAL_FACTOR

    @property
    def latent(self) -> list[int]:
        return [1, LATENT_CHANNELS, self.latent_frames, self.height // SPATIAL_FACTOR, self.width // SPATIAL_FACTOR]


def text_encoder_tensors(dims: WanDims) -> TensorShapes:
    # WAN:139 input_ids _Input({2, 512}, int); WAN:88 output last_hidden_state, WAN:167 its
    # dim[1] the transformer's text length.
    return {"input_ids": ("int32", [2, TEXT_LENGTH]),
            "last_hidden_state": ("float32", [2, TEXT_LENGTH, dims.text_hidden])}


def transformer_tensors(dims: WanDims) -> TensorShapes:
    # WAN:96-97 the names; WAN:338 hidden_states = [latent, latent]; WAN:339-342 timestep
    # _Input({2}, float); WAN:152 the int32 [2, 512] mask; WAN:350 noise_pred split on axis 0.
    latents = [2, *dims.latent[1:]]
    return {"hidden_states": ("float32", latents), "timestep": ("float32", [2]),
            "encoder_hidden_states": ("float32", [2, TEXT_LENGTH, dims.text_hidden]),
            "encoder_attention_mask": ("int32", [2, TEXT_LENGTH]), "noise_pred": ("float32", latents)}


def vae_decoder_tensors(dims: WanDims) -> TensorShapes:
    # WAN:104 names; WAN:319 the [1, 16, T, h, w] latent; WAN:235-245 a rank-5 NCTHW output with
    # 3 channels, one frame per slice of axis 2 (WAN:247-262).
    return {"latent_sample": ("float32", dims.latent),
            "sample": ("float32", [1, 3, 1 + TEMPORAL_FACTOR * (dims.latent_frames - 1), dims.height, dims.width])}


def _runtime(shapes):
    """The runtime's own tensors: its fixed dims, the text width and the video's size (the demo's
    arguments, WAN:299-323) left free."""
    free = WanDims(frames=-4, height=-8, width=-8, text_hidden=-1)  # negative: what is free

    def tensors(length: int, hidden: int | None) -> TensorShapes:
        return {name: (dtype, [d if d >= 0 else None for d in shape]) for name, (dtype, shape) in shapes(free).items()}

    return tensors


# The feed makers run in verify only, which has numpy loaded.
def _transformer_feeds(shape, dtype, rng, ids, embeddings, cases):
    import numpy as np

    from sd2mnn.schedulers.flow_match import wan_timesteps

    steps = wan_timesteps(max(cases, 1))
    usable, inputs = denoiser_inputs(shape, rng, embeddings, steps, "hidden_states")
    feeds = []
    for i, (step, (latents, hidden)) in enumerate(zip(steps, inputs)):
        # WAN:152-156 the mask of the ids the conditioning came from: 1 where an id is not 0.
        mask = (ids[i % len(ids)] != 0) if usable and ids else np.ones(shape["encoder_attention_mask"], dtype=bool)
        feeds.append({"hidden_states": latents, "timestep": np.full(shape["timestep"], step, dtype=dtype["timestep"]),
                      "encoder_hidden_states": hidden,
                      "encoder_attention_mask": mask.astype(dtype["encoder_attention_mask"])})
    text = "the text encoder's conditioning and its ids' mask" if usable else "random conditioning, a mask of ones"
    return feeds, f"timesteps {', '.join(f'{s:.1f}' for s in steps)}; latents ~N(0,1); {text}"


def _vae_decoder_feeds(shape, dtype, rng, ids, embeddings, cases):
    import numpy as np

    # The graph de-normalises itself (latent * std + mean): it is fed the transformer's latents.
    feeds = [{"latent_sample": rng.standard_normal(shape["latent_sample"]).astype(np.float32)} for _ in range(cases)]
    return feeds, f"{cases} latents ~N(0,1)"


# WAN:87-114: the file names and tensor names Module::load is given, in load order.
COMPONENTS: dict[str, ComponentSpec] = {
    spec.name: spec
    for spec in (
        # UMT5-XXL is 5.7G parameters, the 1.3B transformer 5.7 GB in fp32: one external-data file each.
        ComponentSpec("text_encoder", ("input_ids",), ("last_hidden_state",), True,
                      _runtime(text_encoder_tensors), _text_encoder_feeds, VERIFY_PROMPTS, weights_file="weights.pb",
                      prompt_ids=True, conditioning_output="last_hidden_state", shapes=text_encoder_tensors,
                      zeroes_padding=True),
        ComponentSpec("transformer", ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
                      ("noise_pred",), True, _runtime(transformer_tensors), _transformer_feeds, 3,
                      weights_file="weights.pb", conditioned=True, shapes=transformer_tensors),
        ComponentSpec("vae_decoder", ("latent_sample",), ("sample",), True,
                      _runtime(vae_decoder_tensors), _vae_decoder_feeds, 2, shapes=vae_decoder_tensors,
                      export_atol=2e-3),
    )
}

# WAN:25 MtokTokenizer(kSingle): no BOS, no EOS; WAN:136-137 "" and the prompt cut or padded with
# 0 to 512 ids each. model_type: the demo passes none (wan_diffusion_demo.cpp); unused.
PROMPT = PromptFormat("wan-umt5", 0, -1, -1, TEXT_LENGTH, graph_eos_id=1)

# WAN:325-335 flow-match Euler, shift 3, float timesteps; WAN:345 CFG; the VAE graph de-normalises.
# diffusers' WanPipeline: UniPCMultistepScheduler (Wan2.1-T2V-1.3B-Diffusers' scheduler_config.json).
RECIPE = Recipe(scheduler="wan_flow_match_euler", guidance=GUIDANCE, latent_scale=1.0,
                latent_shape=tuple(WanDims().latent), image_size=WanDims().height, frames=WanDims().frames,
                frames_step=TEMPORAL_FACTOR, diffusers_scheduler="unipc_flow",
                diffusers_departure="MNN's runtime steps with flow-match Euler, diffusers' WanPipeline with UniPC")

# WAN:319 the VAE is fed the transformer's latents; WAN:167 the transformer the text encoder's states.
SAME_SIZES = (SameSize(("transformer", "hidden_states"), ("vae_decoder", "latent_sample"), (1, 2, 3, 4),
                       "latent channels, frames, height and width"),
              SameSize(("text_encoder", "last_hidden_state"), ("transformer", "encoder_hidden_states"), (2,),
                       "text width"))

CLASSES = {"text_encoder": (("transformers", "UMT5EncoderModel"),),
           "tokenizer": (("transformers", "T5TokenizerFast"), ("transformers", "T5Tokenizer"),
                         ("transformers", "AutoTokenizer")),
           "transformer": (("diffusers", "WanTransformer3DModel"),),
           "vae": (("diffusers", "AutoencoderKLWan"),)}

WAN = Family("wan", PROMPT, "Unigram", COMPONENTS, tuple(COMPONENTS), RECIPE, ("", "a cat walking in the snow"),
             denoiser="transformer", classes=CLASSES, pipelines=("WanPipeline",), title="Wan2.1 text-to-video",
             steps_module="sd2mnn.recipes.wan", exporter_module="sd2mnn.exporters.wan", fixed_widths=True,
             same_sizes=SAME_SIZES)
