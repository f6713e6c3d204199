"""The inputs sd2mnn verify feeds both runtimes: deterministic, and shaped like the real ones.

    text_encoder  [uncond "", prompt] ids from the pipeline's tokenizer, one pair per prompt in PROMPTS
    unet          latents ~ N(0,1) twice (the runtime's classifier-free-guidance batch), timesteps
                  spread over 999..1, text embeddings = the ONNX text encoder's output for PROMPTS
    vae_decoder   latents ~ N(0,1) / 0.18215 (the runtime scales by 1/0.18215 before decoding)
    vae_encoder   a smooth random image in [-1, 1]

Other families' components are fed as their ComponentSpec.verify_feeds say (SD3.5: each text
encoder its own tokenizer's ids; sd2mnn.families.sd35).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from sd2mnn.core.contract import check_runtime_ids, check_vocabulary, expected_tensors
from sd2mnn.core.layout import bundle_mtok
from sd2mnn.errors import InputError
from sd2mnn.families import Family
from sd2mnn.tokenization.prompt_ids import PromptIds

PROMPTS = (
    "a photo of a cat",
    "an astronaut riding a horse on the moon",
    "portrait of an old man, oil painting, high quality, detailed",
)


def component_rng(seed: int, name: str) -> np.random.Generator:
    """The random inputs of one component: seeded by its name, so a subset (--components) and
    any order see the same inputs as a full run."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def static_shape(name: str, tensor, family: Family) -> list[int]:
    """The ONNX input's shape, with symbolic dimensions filled in from the runtime contract."""
    expected = expected_tensors(name, 77, None, family).get(tensor.name, (None, []))[1]
    shape = []
    for i, dim in enumerate(tensor.shape):
        if not isinstance(dim, int) or dim <= 0:
            dim = expected[i] if i < len(expected) else None
            if dim is None:
                raise InputError(f"{name} input {tensor.name!r} has a dynamic dimension {i}; re-export with static shapes")
        shape.append(int(dim))
    return shape


def prompt_ids(mnn_dir: Path, onnx_dir: Path, length: int, vocabulary: int | None,
               model_file: Path | None, family: Family,
               component: str | None = None) -> tuple[list[np.ndarray], str]:
    """One int32 [2, length] array ([uncond "", prompt]) per prompt in PROMPTS for ``component``
    (a text encoder of ``family``), made as MNN's runtime makes them: from the bundle's
    tokenizer.mtok for it, else from its ONNX tokenizer folder. With the text encoder's
    ``vocabulary`` (rows of its embedding table, in ``model_file``), ids it cannot take are an
    InputError here, before any runtime sees them."""
    component = component or family.text_encoder
    what = model_file or f"the {component}"
    check_runtime_ids(vocabulary, length, what, family, component)
    # The ids the CLIP model inside the bundle's text encoder sees, so that the ONNX source (which
    # has no id rewrite in front) gets the same; the bundle's rewrite leaves them as they are.
    mtok = bundle_mtok(family, component)
    prompt_format = family.prompt_formats[family.components[component].tokenizer]
    if (mnn_dir / mtok).is_file():
        tokenizer, how = PromptIds.for_bundle((mnn_dir / mtok).parent, prompt_format), f"the bundle's {mtok}"
    else:
        folder = onnx_dir / family.components[component].tokenizer
        tokenizer, how = PromptIds.for_tokenizer(folder, prompt_format), f"the tokenizer in {folder}"
    ids = [np.asarray(tokenizer.model_pair(p, length), dtype=np.int32).reshape(2, length) for p in PROMPTS]
    check_vocabulary(np.stack(ids), vocabulary, what)
    return ids, how


def build_inputs(name: str, inputs, rng: np.random.Generator, ids: list[np.ndarray],
                 embeddings: list[np.ndarray] | None, family: Family) -> tuple[list[dict[str, np.ndarray]], str]:
    """The feeds for one component's cases (made as its family's spec says) from its model's
    ``inputs`` (TensorSpecs), and a line saying what they are."""
    specs = {t.name: t for t in inputs}
    shape = {n: static_shape(name, t, family) for n, t in specs.items()}
    dtype = {n: np.dtype(t.dtype) for n, t in specs.items()}
    spec = family.components[name]
    return spec.verify_feeds(shape, dtype, rng, ids, embeddings, spec.verify_cases)
