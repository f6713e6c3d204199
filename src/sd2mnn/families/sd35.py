"""Stable Diffusion 3.5 Medium as MNN's SD3.5 runtime runs it: two CLIP text encoders (L and G),
an optional T5 encoder, an MMDiT transformer stepped by flow-match Euler, a 16-channel VAE decoder.

SD35:n cites transformers/diffusion/engine/src/diffusion_sd35.cpp of MNN 3.6.1 (identical at HEAD),
SD35H:n its header include/diffusion/diffusion_sd35.hpp.

The C++ fixes every width (768, 1280, 4096, 2048, 77 + 256 tokens, 16x128x128 latents); a model of
other widths cannot run there, but sd2mnn runs it at its own widths (``SD35Dims``), so tiny test
models keep the runtime's structure: the CLIP states concatenated and zero-padded to the
transformer's joint width, T5's appended on the sequence axis (zeros without T5), the pooled
projections concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from sd2mnn.families.base import (IMAGE_VAES, ComponentSpec, Family, PromptFormat, Recipe, SingleFileLayout,
                                  TensorShapes)
from sd2mnn.families.stable_diffusion import SD15, _text_encoder_feeds, denoiser_inputs

SCALING_FACTOR = 1.5305  # SD35:270
SHIFT_FACTOR = 0.0609  # SD35:271
VERIFY_PROMPTS = 3  # sd2mnn.verification.inputs.PROMPTS (each text encoder is fed one pair per prompt)


@dataclass(frozen=True)
class SD35Dims:
    """The widths and sizes the pipeline's tensors are made of; the defaults are the C++'s."""

    clip_l: int = 768  # text_encoder's hidden size (SD35:192)
    clip_l_embeds: int = 768  # its text_embeds (projection) width (SD35:193)
    clip_g: int = 1280  # text_encoder_2's hidden size (SD35:207)
    clip_g_embeds: int = 1280  # (SD35:208)
    t5: int = 4096  # text_encoder_3's hidden size (SD35:228 makes zeros this wide without it)
    joint: int = 4096  # the transformer's joint_attention_dim: CLIP states are padded to it (SD35:236)
    pooled: int = 2048  # pooled_projections: the two text_embeds concatenated (SD35:243)
    latent_channels: int = 16  # SD35:319
    latent_height: int = 128  # SD35:320
    latent_width: int = 128  # SD35:321
    image_height: int = 1024  # SD35:317
    image_width: int = 1024  # SD35:318
    clip_length: int = 77  # SD35H:60 mMaxTextLen
    t5_length: int = 256  # SD35H:61 mMaxTextLenT5

    @property
    def text_length(self) -> int:
        """Tokens the transformer attends to: CLIP's then T5's (SD35:240, 77 + 256)."""
        return self.clip_length + self.t5_length

    @classmethod
    def from_configs(cls, folder: str | Path) -> "SD35Dims":
        """The dims of a diffusers StableDiffusion3Pipeline folder, from its config.json files
        (text_encoder_3 may be absent: T5's width is then the transformer's joint width)."""
        from sd2mnn.core.files import read_json_object
        from sd2mnn.errors import InputError

        folder = Path(folder)

        def config(sub: str, required: bool = True) -> dict:
            path = folder / sub / "config.json"
            if not path.is_file():
                if not required:
                    return {}
                raise InputError(f"{path}: missing; an SD3 pipeline needs it (re-download the model)")
            return read_json_object(path)

        clip_l, clip_g = config("text_encoder"), config("text_encoder_2")
        t5, transformer, vae = config("text_encoder_3", required=False), config("transformer"), config("vae")
        try:
            factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
            size = transformer.get("sample_size", 128)
            height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            joint = int(transformer.get("joint_attention_dim", 4096))
            return cls(
                clip_l=int(clip_l["hidden_size"]), clip_l_embeds=int(clip_l.get("projection_dim", clip_l["hidden_size"])),
                clip_g=int(clip_g["hidden_size"]), clip_g_embeds=int(clip_g.get("projection_dim", clip_g["hidden_size"])),
                t5=int(t5.get("d_model", joint)), joint=joint,
                pooled=int(transformer.get("pooled_projection_dim", 2048)),
                latent_channels=int(transformer.get("in_channels", 16)),
                latent_height=height, latent_width=width,
                image_height=height * factor, image_width=width * factor,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{folder}: an SD3 config lacks or garbles {err}; re-download the model") from None

    @classmethod
    def from_tensors(cls, tensors: dict[str, TensorShapes]) -> "SD35Dims":
        """The dims read off models' tensors ({component: {name: (dtype, shape)}}, as ONNX or MNN
        files declare them); what no given component says keeps the C++'s value."""
        found: dict[str, int] = {}

        def dim(component: str, tensor: str, axis: int, *names: str) -> None:
            shape = (tensors.get(component) or {}).get(tensor, (None, None))[1]
            if shape and len(shape) > abs(axis) and isinstance(shape[axis], int) and shape[axis] > 0:
                for name in names:
                    found[name] = shape[axis]

        dim("text_encoder", "input_ids", 1, "clip_length")
        dim("text_encoder", "last_hidden_state", -1, "clip_l")
        dim("text_encoder", "text_embeds", -1, "clip_l_embeds")
        dim("text_encoder_2", "last_hidden_state", -1, "clip_g")
        dim("text_encoder_2", "text_embeds", -1, "clip_g_embeds")
        dim("text_encoder_3", "input_ids", 1, "t5_length")
        dim("text_encoder_3", "last_hidden_state", -1, "t5")
        dim("transformer", "encoder_hidden_states", -1, "joint")
        dim("transformer", "pooled_projections", -1, "pooled")
        dim("transformer", "hidden_states", 1, "latent_channels")
        dim("transformer", "hidden_states", 2, "latent_height")
        dim("transformer", "hidden_states", 3, "latent_width")
        dim("vae_decoder", "latent_sample", 1, "latent_channels")
        dim("vae_decoder", "latent_sample", 2, "latent_height")
        dim("vae_decoder", "latent_sample", 3, "latent_width")
        dim("vae_decoder", "sample", 2, "image_height")
        dim("vae_decoder", "sample", 3, "image_width")
        return cls(**found)

    def off_contract(self) -> list[str]:
        """What MNN's C++ would refuse or get wrong with models of these dims (empty: nothing)."""
        runtime = RUNTIME_DIMS
        issues = [f"{f.name} {getattr(self, f.name)} (MNN's runtime: {getattr(runtime, f.name)})"
                  for f in fields(self) if getattr(self, f.name) != getattr(runtime, f.name)]
        return issues


RUNTIME_DIMS = SD35Dims()


def _text_encoder_tensors(dims: SD35Dims, hidden: int, embeds: int) -> TensorShapes:
    # SD35:183 _Input({2, mMaxTextLen}, NCHW, int); SD35:132 outputs {"last_hidden_state", "text_embeds"}.
    return {"input_ids": ("int32", [2, dims.clip_length]),
            "last_hidden_state": ("float32", [2, dims.clip_length, hidden]),
            "text_embeds": ("float32", [2, embeds])}


def clip_l_tensors(dims: SD35Dims) -> TensorShapes:
    return _text_encoder_tensors(dims, dims.clip_l, dims.clip_l_embeds)


def clip_g_tensors(dims: SD35Dims) -> TensorShapes:
    # SD35:198 the same [2, 77] ids from tokenizer_2; SD35:135 the same output names.
    return _text_encoder_tensors(dims, dims.clip_g, dims.clip_g_embeds)


def t5_tensors(dims: SD35Dims) -> TensorShapes:
    # SD35:215 _Input({2, mMaxTextLenT5}, NCHW, int); SD35:138 outputs {"last_hidden_state"}.
    return {"input_ids": ("int32", [2, dims.t5_length]),
            "last_hidden_state": ("float32", [2, dims.t5_length, dims.t5])}


def transformer_tensors(dims: SD35Dims) -> TensorShapes:
    # SD35:140-141 names; SD35:348 hidden_states = [latent, latent]; SD35:240 the [2, 77+256, 4096]
    # conditioning; SD35:243 the [2, 2048] pooled projections; SD35:349 timestep _Const(t, {2}), a
    # float; SD35:354 out_hidden_states split in two on axis 0.
    latents = [2, dims.latent_channels, dims.latent_height, dims.latent_width]
    return {"hidden_states": ("float32", latents),
            "encoder_hidden_states": ("float32", [2, dims.text_length, dims.joint]),
            "pooled_projections": ("float32", [2, dims.pooled]),
            "timestep": ("float32", [2]),
            "out_hidden_states": ("float32", latents)}


def vae_decoder_tensors(dims: SD35Dims) -> TensorShapes:
    # SD35:334 the [1,16,128,128] latent; SD35:280-282 a [1,3,h,w] image (cvtColor needs 3 channels).
    return {"latent_sample": ("float32", [1, dims.latent_channels, dims.latent_height, dims.latent_width]),
            "sample": ("float32", [1, 3, dims.image_height, dims.image_width])}


def _runtime_vae_decoder_tensors(length: int, hidden: int | None) -> TensorShapes:
    # The runtime writes whatever size the decoder gives (SD35:280-282).
    tensors = vae_decoder_tensors(RUNTIME_DIMS)
    return {**tensors, "sample": ("float32", [1, 3, None, None])}


def _runtime(shapes):
    # The runtime's own tensors: its widths are fixed, whatever the model's are.
    return lambda length, hidden: shapes(RUNTIME_DIMS)


# The feed makers run in verify only, which has numpy loaded.
def _transformer_feeds(shape, dtype, rng, ids, embeddings, cases):
    import numpy as np

    from sd2mnn.schedulers.flow_match import sd35_timesteps

    # The runtime's timesteps of a `cases`-step run: 1000 first, then its shifted, truncated ones.
    steps = sd35_timesteps(max(cases, 1))
    feeds = []
    # SD35:348 hidden_states = [latent, latent]; SD35:349 the step's timestep for both.
    usable, inputs = denoiser_inputs(shape, rng, embeddings, steps, "hidden_states")
    for step, (latents, hidden) in zip(steps, inputs):
        feeds.append({"hidden_states": latents, "encoder_hidden_states": hidden,
                      "pooled_projections": rng.standard_normal(shape["pooled_projections"]).astype(np.float32),
                      "timestep": np.full(shape["timestep"], step, dtype=dtype["timestep"])})
    text = "the text encoders' conditioning" if usable else "random conditioning and pooled projections"
    return feeds, f"timesteps {', '.join(map(str, steps))}; latents ~N(0,1); {text}"


def _vae_decoder_feeds(shape, dtype, rng, ids, embeddings, cases):
    import numpy as np

    # SD35:273 the decoder's input is latent / 1.5305 + 0.0609.
    feeds = [{"latent_sample": (rng.standard_normal(shape["latent_sample"]) / SCALING_FACTOR + SHIFT_FACTOR)
              .astype(np.float32)} for _ in range(cases)]
    return feeds, f"{cases} latents ~N(0,1) / {SCALING_FACTOR} + {SHIFT_FACTOR}"


# SD35:123-145: the file names and tensor names Module::load is given, in load order.
COMPONENTS: dict[str, ComponentSpec] = {
    spec.name: spec
    for spec in (
        ComponentSpec("text_encoder", ("input_ids",), ("last_hidden_state", "text_embeds"), True,
                      _runtime(clip_l_tensors), _text_encoder_feeds, VERIFY_PROMPTS, weights_file="",
                      prompt_ids=True, conditioning_output="last_hidden_state", shapes=clip_l_tensors,
                      tokenizer="tokenizer"),
        # Over 2 GB at full size (CLIP-G 695M parameters, T5-XXL 4.7G, the MMDiT 2.5G): one
        # external-data file each.
        ComponentSpec("text_encoder_2", ("input_ids",), ("last_hidden_state", "text_embeds"), True,
                      _runtime(clip_g_tensors), _text_encoder_feeds, VERIFY_PROMPTS, weights_file="weights.pb",
                      prompt_ids=True, conditioning_output="last_hidden_state", shapes=clip_g_tensors,
                      tokenizer="tokenizer_2"),
        # SD35:150-151, SD35:228: the runtime goes on with zeros when T5 does not load.
        ComponentSpec("text_encoder_3", ("input_ids",), ("last_hidden_state",), True,
                      _runtime(t5_tensors), _text_encoder_feeds, VERIFY_PROMPTS, weights_file="weights.pb",
                      prompt_ids=True, conditioning_output="last_hidden_state", shapes=t5_tensors,
                      tokenizer="tokenizer_3", runtime_optional=True),
        ComponentSpec("transformer", ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
                      ("out_hidden_states",), True, _runtime(transformer_tensors), _transformer_feeds, 3,
                      weights_file="weights.pb", conditioned=True, shapes=transformer_tensors),
        ComponentSpec("vae_decoder", ("latent_sample",), ("sample",), True,
                      _runtime_vae_decoder_tensors, _vae_decoder_feeds, 2, picture_output="sample",
                      shapes=vae_decoder_tensors),
    )
}

RUNTIME_COMPONENTS = tuple(COMPONENTS)  # SD35:181, 196, 212, 342, 369: the order run() loads them

# SD35:42-44: MtokTokenizer(kPair, 49406, 49407) twice (the CLIPs: [uncond "", prompt]),
# MtokTokenizer(kSingle, -1, 1) for T5 (no BOS, EOS 1; SD35:214-223 encodes "" and the prompt
# one by one). The CLIPs' format is SD1.5's, the very object (a text length names one format).
# model_type: diffusion_sd35_demo passes STABLE_DIFFUSION_1_5 as a placeholder
# (diffusion_sd35_demo.cpp:60-62); the class never reads it.
CLIP_FORMAT = SD15.prompt
T5_FORMAT = PromptFormat("sd35-t5", 0, -1, 1, RUNTIME_DIMS.t5_length)
TOKENIZERS = {"tokenizer": CLIP_FORMAT, "tokenizer_2": CLIP_FORMAT, "tokenizer_3": T5_FORMAT}

# SD35:298-310 flow-match Euler with shift 3 (sd2mnn.schedulers.flow_match); SD35:340 CFG 5.0;
# SD35:270-273 latent * (1 / 1.5305) + 0.0609 (floats); SD35:317-321 1024x1024, 16x128x128.
RECIPE = Recipe(scheduler="flow_match_euler", guidance=5.0, latent_scale=1 / SCALING_FACTOR,
                latent_shape=(1, RUNTIME_DIMS.latent_channels, RUNTIME_DIMS.latent_height, RUNTIME_DIMS.latent_width),
                image_size=RUNTIME_DIMS.image_height, latent_shift=SHIFT_FACTOR, draws_only_image_size=True,
                diffusers_scheduler="flow_match_euler_diffusers",
                diffusers_departure="MNN's runtime truncates its shifted timesteps to integers")

# tokenizer_model: T5's Unigram is what no SD1.x family has (its CLIP BPE is SD1.5's).
# Stability's files (sd3.5_medium.safetensors, sd3_medium_incl_clips*.safetensors): the MMDiT under
# model.diffusion_model., each text encoder under text_encoders.<name>.transformer. when included.
SINGLE_FILE = SingleFileLayout({"transformer": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
                                "text_encoder": ("text_encoders.clip_l.transformer.",),
                                "text_encoder_2": ("text_encoders.clip_g.transformer.",),
                                "text_encoder_3": ("text_encoders.t5xxl.transformer.",)},
                               denoiser_marker="joint_blocks.")
CLIP_WITH_PROJECTION = (("transformers", "CLIPTextModelWithProjection"),)
CLIP_TOKENIZER = (("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast"))
CLASSES = {"text_encoder": CLIP_WITH_PROJECTION, "text_encoder_2": CLIP_WITH_PROJECTION,
           "text_encoder_3": (("transformers", "T5EncoderModel"),), "tokenizer": CLIP_TOKENIZER,
           "tokenizer_2": CLIP_TOKENIZER,
           "tokenizer_3": (("transformers", "T5TokenizerFast"), ("transformers", "T5Tokenizer")),
           "transformer": (("diffusers", "SD3Transformer2DModel"),), "vae": IMAGE_VAES}
SD35 = Family("sd35", CLIP_FORMAT, "Unigram", COMPONENTS, RUNTIME_COMPONENTS, RECIPE,
              ("", "a photo of a cat"), tokenizers=TOKENIZERS, denoiser="transformer", single_file=SINGLE_FILE,
              classes=CLASSES, pipelines=("StableDiffusion3Pipeline",), title="Stable Diffusion 3", steps_module="sd2mnn.recipes.sd35",
              exporter_module="sd2mnn.exporters.sd35", fixed_widths=True)
