"""The Stable Diffusion 1.x families MNN's runtime runs: SD1.5 (CLIP BPE, 77 tokens) and Taiyi
(Chinese BERT WordPiece, 512 tokens). Both have the same four components and the same recipe.

SD:n cites transformers/diffusion/engine/src/stable_diffusion.cpp of MNN 3.6.1."""
from __future__ import annotations

from sd2mnn.families.base import (IMAGE_VAES, ComponentSpec, Family, PromptFormat, Recipe, SingleFileLayout,
                                  TensorShapes)

# SD:84: mLatentVar = _Input({1, 4, 64, 64}, NCHW, float); SD:90: sample = _Concat({latent, latent}, 0).
LATENT = [1, 4, 64, 64]
SAMPLE = [2, 4, 64, 64]
VAE_SCALE = 0.18215  # SD1.5's latent scaling factor, as in MNN's runtime
VERIFY_PROMPTS = 3  # sd2mnn.verification.inputs.PROMPTS (the text encoder is fed one pair per prompt)


def _text_encoder_tensors(length: int, hidden: int | None) -> TensorShapes:
    # SD:85 _Input({2, mMaxTextLen}, NCHW, int); SD:104 outputs {"last_hidden_state", "pooler_output"},
    # SD:138 outputs[0] becomes the unet's encoder_hidden_states.
    return {"input_ids": ("int32", [2, length]), "last_hidden_state": ("float32", [2, length, hidden]),
            "pooler_output": ("float32", [2, hidden])}


def _unet_tensors(length: int, hidden: int | None) -> TensorShapes:
    # SD:90 sample = [latent, latent]; SD:86 timestep _Input({1}, NCHW, int); SD:145 the text
    # encoder's output; SD:284-290 out_sample split in two on axis 0, each stepped with the latent.
    return {"sample": ("float32", SAMPLE), "timestep": ("int32", [1]),
            "encoder_hidden_states": ("float32", [2, length, hidden]), "out_sample": ("float32", SAMPLE)}


def _vae_decoder_tensors(length: int, hidden: int | None) -> TensorShapes:
    # SD:304-307 the [1,4,64,64] latent; SD:311-314 any [1,3,h,w] image (cvtColor needs 3 channels).
    return {"latent_sample": ("float32", LATENT), "sample": ("float32", [1, 3, None, None])}


# The feed makers run in verify only, which has numpy loaded; importing it here would make
# `import sd2mnn` heavy.
def _text_encoder_feeds(shape, dtype, rng, ids, embeddings, cases):
    return [{"input_ids": i.astype(dtype["input_ids"])} for i in ids], f"{len(ids)} prompts"


def denoiser_inputs(shape, rng, embeddings, steps, latent_name: str):
    """(the text embeddings are usable, [(latents, hidden)] per step): a denoiser's batch of the
    same latents twice (the runtime's [latents, latents]) and its text conditioning, the text
    encoder's output where its shape fits, else random. Draws in the same order for every family."""
    import numpy as np

    hidden_shape = shape["encoder_hidden_states"]
    usable = bool(embeddings) and list(embeddings[0].shape) == hidden_shape
    cases = []
    for i, _ in enumerate(steps):
        batch, *latent = shape[latent_name]
        latents = rng.standard_normal([1, *latent]).astype(np.float32)
        hidden = embeddings[i % len(embeddings)] if usable else rng.standard_normal(hidden_shape).astype(np.float32)
        cases.append((np.repeat(latents, batch, axis=0), hidden.astype(np.float32)))
    return usable, cases


def _unet_feeds(shape, dtype, rng, ids, embeddings, cases):
    import numpy as np

    steps = np.linspace(999, 1, cases).round().astype(int)
    usable, inputs = denoiser_inputs(shape, rng, embeddings, steps, "sample")
    feeds = [{"sample": latents, "timestep": np.array([step], dtype=dtype["timestep"]), "encoder_hidden_states": hidden}
             for step, (latents, hidden) in zip(steps, inputs)]
    text = "ONNX text encoder output" if usable else "random text embeddings (no usable text encoder)"
    return feeds, f"timesteps {', '.join(map(str, steps))}; latents ~N(0,1); {text}"


def _vae_decoder_feeds(shape, dtype, rng, ids, embeddings, cases):
    import numpy as np

    feeds = [{"latent_sample": (rng.standard_normal(shape["latent_sample"]) / VAE_SCALE).astype(np.float32)}
             for _ in range(cases)]
    return feeds, f"{cases} latents ~N(0,1) / {VAE_SCALE}"


def _smooth_image(rng, shape: list[int]):
    """A photo-like image in [-1, 1]: an 8x8 random picture upscaled bicubically, plus grain."""
    import numpy as np
    from PIL import Image

    n, channels, height, width = shape
    small = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32)[..., :channels]
    image = big / 127.5 - 1.0 + rng.normal(0, 0.02, size=big.shape).astype(np.float32)
    return np.clip(image.transpose(2, 0, 1)[None], -1.0, 1.0).repeat(n, axis=0).astype(np.float32)


def _vae_encoder_feeds(shape, dtype, rng, ids, embeddings, cases):
    feeds = [{"sample": _smooth_image(rng, shape["sample"])} for _ in range(cases)]
    return feeds, f"{cases} smooth random images in [-1, 1]"


# Names from SD's Module::load calls.
COMPONENTS: dict[str, ComponentSpec] = {
    spec.name: spec
    for spec in (
        ComponentSpec("text_encoder", ("input_ids",), ("last_hidden_state", "pooler_output"), True,
                      _text_encoder_tensors, _text_encoder_feeds, VERIFY_PROMPTS,
                      prompt_ids=True, conditioning_output="last_hidden_state"),
        ComponentSpec("unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",), True,
                      _unet_tensors, _unet_feeds, 3, weights_file="weights.pb", conditioned=True),
        ComponentSpec("vae_decoder", ("latent_sample",), ("sample",), True,
                      _vae_decoder_tensors, _vae_decoder_feeds, 2, picture_output="sample"),
        # Only img2img needs the encoder; MNN's reference script exports but never converts it,
        # and the runtime never loads it (no shape is expected of it).
        ComponentSpec("vae_encoder", ("sample",), ("latent_sample",), False,
                      verify_feeds=_vae_encoder_feeds, verify_cases=2),
    )
}

# SD:101, SD:108, SD:115: the three models StableDiffusion::load() loads.
RUNTIME_COMPONENTS = ("text_encoder", "unet", "vae_decoder")

# unet(): PLMS, "scaleptr[0] = 7.5"; vae_decoder(): "latent * _Const(1 / 0.18215)", a float.
RECIPE = Recipe(scheduler="plms", guidance=7.5, latent_scale=1 / 0.18215,
                latent_shape=tuple(LATENT), image_size=512)

# SD:32 (mMaxTextLen = 77 for STABLE_DIFFUSION_1_5), SD:34 (512 for STABLE_DIFFUSION_TAIYI_CHINESE);
# SD:123 MtokTokenizer(kPair, 49406, 49407), SD:125 MtokTokenizer(kPair, 101, 102).
# CompVis's layout (v1-5-pruned.safetensors and the like), as diffusers' from_single_file reads it;
# an OpenCLIP text encoder sits under cond_stage_model.model.
SINGLE_FILE = SingleFileLayout({"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
                                "text_encoder": ("cond_stage_model.transformer.", "cond_stage_model.model.")},
                               denoiser_marker="input_blocks.")
CODE = dict(title="Stable Diffusion 1.x", steps_module="sd2mnn.recipes.stable_diffusion",
            exporter_module="sd2mnn.exporters.stable_diffusion")
PIPELINES = ("StableDiffusionPipeline",)  # Taiyi's folders name it too: its tokenizer tells them apart
IMAGE_MODELS = {"unet": (("diffusers", "UNet2DConditionModel"),), "vae": IMAGE_VAES}
SD15 = Family("sd15", PromptFormat("sd15", 0, 49406, 49407, 77), "BPE", COMPONENTS, RUNTIME_COMPONENTS,
              RECIPE, ("", "a photo of a cat"), single_file=SINGLE_FILE, named_in_metadata=False, **CODE,
              pipelines=PIPELINES,
              classes={"text_encoder": (("transformers", "CLIPTextModel"),),
                       "tokenizer": (("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")),
                       **IMAGE_MODELS})
TAIYI = Family("taiyi", PromptFormat("taiyi", 1, 101, 102, 512), "WordPiece", COMPONENTS, RUNTIME_COMPONENTS,
               RECIPE, ("", "一只猫的照片"), single_file=SINGLE_FILE, **CODE, pipelines=PIPELINES,
               classes={"text_encoder": (("transformers", "BertModel"),),
                        "tokenizer": (("transformers", "BertTokenizer"), ("transformers", "BertTokenizerFast")),
                        **IMAGE_MODELS})
