"""The inputs sd2mnn verify feeds both runtimes: deterministic, and shaped like the real ones.

    text_encoder  [uncond "", prompt] ids from the pipeline's tokenizer, one pair per prompt in PROMPTS
    unet          latents ~ N(0,1) twice (the runtime's classifier-free-guidance batch), timesteps
                  spread over 999..1, text embeddings = the ONNX text encoder's output for PROMPTS
    vae_decoder   latents ~ N(0,1) / 0.18215 (the runtime scales by 1/0.18215 before decoding)
    vae_encoder   a smooth random image in [-1, 1]
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from sd2mnn.contract import check_runtime_ids, check_vocabulary, expected_tensors
from sd2mnn.errors import InputError
from sd2mnn.layout import MTOK_NAME, TOKENIZER_DIR

PROMPTS = (
    "a photo of a cat",
    "an astronaut riding a horse on the moon",
    "portrait of an old man, oil painting, high quality, detailed",
)
# Inputs per component; the unet's are spread over the timesteps.
CASES = {"text_encoder": len(PROMPTS), "unet": 3, "vae_decoder": 2, "vae_encoder": 2}
VAE_SCALE = 0.18215  # SD1.5's latent scaling factor, as in MNN's runtime


def component_rng(seed: int, name: str) -> np.random.Generator:
    """The random inputs of one component: seeded by its name, so a subset (--components) and
    any order see the same inputs as a full run."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def static_shape(name: str, tensor) -> list[int]:
    """The ONNX input's shape, with symbolic dimensions filled in from the runtime contract."""
    expected = expected_tensors(name, 77, None).get(tensor.name, (None, []))[1]
    shape = []
    for i, dim in enumerate(tensor.shape):
        if not isinstance(dim, int) or dim <= 0:
            dim = expected[i] if i < len(expected) else None
            if dim is None:
                raise InputError(f"{name} input {tensor.name!r} has a dynamic dimension {i}; re-export with static shapes")
        shape.append(int(dim))
    return shape


def prompt_ids(mnn_dir: Path, onnx_dir: Path, length: int, vocabulary: int | None = None,
               model_file: Path | None = None) -> tuple[list[np.ndarray], str]:
    """One int32 [2, length] array ([uncond "", prompt]) per prompt in PROMPTS, made as MNN's
    runtime makes them: from the bundle's tokenizer.mtok, else from the ONNX tokenizer folder.
    With the text encoder's ``vocabulary`` (rows of its embedding table, in ``model_file``), ids
    it cannot take are an InputError here, before any runtime sees them."""
    check_runtime_ids(vocabulary, length, model_file or "the text encoder")
    from sd2mnn.conditioning import PromptIds

    # The ids the CLIP model inside the bundle's text encoder sees, so that the ONNX source (which
    # has no id rewrite in front) gets the same; the bundle's rewrite leaves them as they are.
    if (mnn_dir / MTOK_NAME).is_file():
        tokenizer, how = PromptIds.for_bundle(mnn_dir), "the bundle's tokenizer.mtok"
    else:
        tokenizer = PromptIds.for_tokenizer(onnx_dir / TOKENIZER_DIR)
        how = f"the tokenizer in {onnx_dir / TOKENIZER_DIR}"
    ids = [np.asarray(tokenizer.model_pair(p, length), dtype=np.int32).reshape(2, length) for p in PROMPTS]
    check_vocabulary(np.stack(ids), vocabulary, model_file or "the text encoder")
    return ids, how


def _smooth_image(rng: np.random.Generator, shape: list[int]) -> np.ndarray:
    """A photo-like image in [-1, 1]: an 8x8 random picture upscaled bicubically, plus grain."""
    from PIL import Image

    n, channels, height, width = shape
    small = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32)[..., :channels]
    image = big / 127.5 - 1.0 + rng.normal(0, 0.02, size=big.shape).astype(np.float32)
    return np.clip(image.transpose(2, 0, 1)[None], -1.0, 1.0).repeat(n, axis=0).astype(np.float32)


def build_inputs(name: str, source, rng: np.random.Generator, ids: list[np.ndarray],
                 embeddings: list[np.ndarray] | None) -> tuple[list[dict[str, np.ndarray]], str]:
    """The feeds for one component's cases, and a line saying what they are."""
    specs = {t.name: t for t in source.summary.inputs}
    shape = {n: static_shape(name, t) for n, t in specs.items()}
    dtype = {n: np.dtype(t.dtype) for n, t in specs.items()}
    cases = CASES[name]
    if name == "text_encoder":
        return [{"input_ids": i.astype(dtype["input_ids"])} for i in ids], f"{len(ids)} prompts"
    if name == "unet":
        steps = np.linspace(999, 1, cases).round().astype(int)
        hidden_shape = shape["encoder_hidden_states"]
        usable = embeddings and list(embeddings[0].shape) == hidden_shape
        feeds = []
        for i, step in enumerate(steps):
            batch, *latent = shape["sample"]
            latents = rng.standard_normal([1, *latent]).astype(np.float32)
            hidden = embeddings[i % len(embeddings)] if usable else rng.standard_normal(hidden_shape).astype(np.float32)
            feeds.append({
                "sample": np.repeat(latents, batch, axis=0),  # the runtime's [latents, latents] batch
                "timestep": np.array([step], dtype=dtype["timestep"]),
                "encoder_hidden_states": hidden.astype(np.float32),
            })
        text = "ONNX text encoder output" if usable else "random text embeddings (no usable text encoder)"
        return feeds, f"timesteps {', '.join(map(str, steps))}; latents ~N(0,1); {text}"
    if name == "vae_decoder":
        feeds = [{"latent_sample": (rng.standard_normal(shape["latent_sample"]) / VAE_SCALE).astype(np.float32)}
                 for _ in range(cases)]
        return feeds, f"{cases} latents ~N(0,1) / {VAE_SCALE}"
    feeds = [{"sample": _smooth_image(rng, shape["sample"])} for _ in range(cases)]
    return feeds, f"{cases} smooth random images in [-1, 1]"
