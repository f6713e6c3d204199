"""Single-file checkpoints: an original-layout ``.safetensors`` or ``.ckpt`` (CompVis's SD1.x
files, Stability's SD3 files) with a local diffusers folder of the same model for the configs and
tokenizers (``--config``), turned into the diffusers folder that export reads.

Each model is loaded as diffusers' ``from_single_file`` loads it (the same key conversions, SD3's
CLIP-L with the identity projection diffusers gives it), but one at a time: only its tensors are
read from a ``.safetensors`` file, it is saved, then freed, so a 2.5B-parameter transformer never
shares memory with the text encoders. A model the file does not include (Stability's
``sd3.5_medium.safetensors`` has no text encoders) comes from the config folder when that folder
has its weights; T5, which MNN's SD3.5 runtime can run without, is otherwise left out.
"""
from __future__ import annotations

import gc
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sd2mnn import families
from sd2mnn.core.files import read_json_object
from sd2mnn.errors import InputError, UnsafeModelError
from sd2mnn.families import Family

SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Reading a model holds its tensors as stored, the key conversion's copies (SD3's split qkv), the
# float32 model, and torch itself: SD3.5 Medium's MMDiT at full width (6 of its 24 layers, 1.54 GiB
# float16 in the file) peaked at 6.17 GiB, this estimate's 6.63 GiB (benchmarks/single_file_memory.py).
STORED_FACTOR = 1.5
READ_OVERHEAD = 1.25 * 2**30

# safetensors' dtype names -> bytes per element.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

Progress = Callable[[str, str], None]  # (component, message)


@dataclass(frozen=True)
class ModelSource:
    """Where one diffusers model of the pipeline comes from."""

    folder: str  # the model's diffusers folder (unet, transformer, vae, text_encoder, ...)
    keys: int  # tensors the checkpoint has for it (0: not in the checkpoint)
    from_config: bool = False  # loaded from the config folder's own weights
    left_out: bool = False  # neither has it and the runtime runs without it


def materialize(ckpt: Path, config: Path | None, work: Path, components: tuple[str, ...] | None,
                say: Progress, budget: int | None = None) -> Path:
    """Write ``ckpt`` as a diffusers folder under ``work``, the models that exporting
    ``components`` (None: the family's) needs with weights, the others with their configs only.
    A model whose reading cannot fit in ``budget`` bytes (default: the memory available now) is
    refused before any is read. Returns the folder."""
    require_config(ckpt, config)
    family = families.detect(config)
    if family.single_file is None:
        raise InputError(f"{ckpt}: {family.name} models have no single-file layout; export the diffusers folder")
    index = read_json_object(config / "model_index.json")
    models = [f for f in family.single_file.prefixes if _listed(index, f)]
    for folder in models:
        if not (config / folder / "config.json").is_file():
            raise InputError(f"{config / folder / 'config.json'}: missing; --config must be a diffusers folder "
                             "of the checkpoint's model")
    wanted = _wanted_folders(family, components)
    out = work / "_diffusers"
    out.mkdir()
    with Checkpoint(ckpt) as checkpoint:
        denoiser = family.single_file.prefixes[family.denoiser]
        if not any(family.single_file.denoiser_marker in k for k in checkpoint.keys_under(denoiser)):
            raise InputError(f"{ckpt}: not a {family.title} checkpoint (no {denoiser[0]}"
                             f"{family.single_file.denoiser_marker}* tensors, which {config} needs); "
                             "pass the config folder of the checkpoint's model")
        # Where each model comes from is settled, and its reading sized, before any is read.
        sources = [_source(checkpoint, family, config, folder, explicit=wanted is not None)
                   for folder in models if wanted is None or folder in wanted]
        _check_memory(checkpoint, family, [s.folder for s in sources if s.keys], budget)
        for folder in models:
            if wanted is not None and folder not in wanted:
                (out / folder).mkdir()
                shutil.copy2(config / folder / "config.json", out / folder / "config.json")
        for source in sources:
            if source.left_out:
                index[source.folder] = [None, None]
                say(source.folder, f"not in {ckpt.name} nor {config / source.folder}: left out (the runtime runs "
                                   "without it)")
            elif source.from_config:
                # The config folder's own copy, linked rather than copied (a T5 is ~19 GB).
                (out / source.folder).symlink_to((config / source.folder).resolve(), target_is_directory=True)
                say(source.folder, f"not in {ckpt.name}: from {config / source.folder}")
            else:
                _read_model(checkpoint, family, config, index, source.folder, out)
                say(source.folder, f"{source.keys} tensors from {ckpt.name}")
    for name in (*family.prompt_formats, "scheduler"):  # the tokenizers export copies, the scheduler
        if (config / name).is_dir():
            shutil.copytree(config / name, out / name)
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return out


def require_config(ckpt: Path, config: Path | None) -> None:
    """Refuse a single file without a --config diffusers folder."""
    if config is None:
        raise InputError(
            f"{ckpt}: a single-file checkpoint needs a local config: pass --config DIR, a diffusers "
            "folder of the same model (model_index.json, */config.json, tokenizer/); no hub access"
        )
    if not (config / "model_index.json").is_file():
        raise InputError(f"{config}: not a diffusers folder (no model_index.json); --config needs the checkpoint's "
                         "model as a diffusers folder, weights optional")


def refuse_unsafe_pickle(err: BaseException, path: Path) -> None:
    """Raise UnsafeModelError when ``err`` (or what it was raised from) is torch's weights-only
    loader refusing a pickle that calls code beyond plain tensors: such a file is never run."""
    while err is not None:
        if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in str(err).lower():
            line = next((line for line in str(err).splitlines() if "GLOBAL" in line), "")
            detail = line.split(". Please")[0].replace("WeightsUnpickler error:", "").strip()
            raise UnsafeModelError(f"{path}: refused as unsafe: its pickle calls code beyond plain tensors"
                                   f"{f' ({detail[:200]})' if detail else ''}, which sd2mnn never runs; use the "
                                   "model's .safetensors file") from None
        err = err.__cause__ or err.__context__


def _source(checkpoint: "Checkpoint", family: Family, config: Path, folder: str, explicit: bool) -> ModelSource:
    """Where ``folder``'s model comes from: the file, else the config folder's weights, else (for
    a model the runtime runs without) nowhere; otherwise an error naming both."""
    keys = checkpoint.keys_under(family.single_file.prefixes[folder])
    if keys:
        return ModelSource(folder, len(keys))
    if _has_weights(config / folder):
        return ModelSource(folder, 0, from_config=True)
    spec = family.components.get(folder)
    prefix = family.single_file.prefixes[folder][0]
    if spec is not None and spec.runtime_optional:
        if explicit:
            raise InputError(f"{checkpoint.path}: no {folder} weights ({prefix}*) and {config / folder} has "
                             f"none; leave {folder} out of --components")
        return ModelSource(folder, 0, left_out=True)
    raise InputError(f"{checkpoint.path}: no {folder} weights ({prefix}*) and {config / folder} has none; "
                     f"use a checkpoint that includes it or a --config folder with {folder}'s weights")


def _read_model(checkpoint: "Checkpoint", family: Family, config: Path, index: dict, folder: str, out: Path) -> None:
    """Load ``folder``'s model from its tensors alone, save it under ``out``, free it."""
    state = {k: checkpoint.tensor(k) for k in checkpoint.keys_under(family.single_file.prefixes[folder])}
    _tie_t5_embeddings(state, family.single_file.prefixes[folder])
    model = _load(checkpoint.path, config, index, folder, state)
    del state
    model.save_pretrained(str(out / folder), safe_serialization=True)
    del model
    gc.collect()


def _load(ckpt: Path, config: Path, index: dict, folder: str, state: dict):
    """One model from its tensors, as diffusers' from_single_file loads each pipeline component."""
    import diffusers.pipelines
    import torch
    from diffusers.loaders.single_file import load_single_file_sub_model

    library, class_name = index[folder]
    try:
        return load_single_file_sub_model(
            library_name=library, class_name=class_name, name=folder, checkpoint=state,
            pipelines=diffusers.pipelines, is_pipeline_module=hasattr(diffusers.pipelines, library),
            cached_model_config_path=str(config), torch_dtype=torch.float32, local_files_only=True,
        )
    except Exception as err:  # diffusers and transformers raise many types for mismatched weights
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"{ckpt}: cannot load its {folder} with {config / folder / 'config.json'} "
                         f"({type(err).__name__}: {message[:300]}); is --config the checkpoint's model?") from err


class Checkpoint:
    """The checkpoint's tensors by name: a .safetensors file read one tensor at a time, a .ckpt
    (a pickled state dict, loaded weights-only) whole."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        self._state: dict | None = None

    def __enter__(self) -> "Checkpoint":
        try:
            if self.path.suffix.lower() == ".safetensors":
                from safetensors import safe_open

                self._file = safe_open(str(self.path), framework="pt")
                self._keys = list(self._file.keys())
            else:
                from diffusers.loaders.single_file_utils import load_single_file_checkpoint

                self._state = load_single_file_checkpoint(str(self.path), local_files_only=True)
                self._keys = list(self._state)
        except Exception as err:  # safetensors, torch and pickle raise many types for damaged files
            refuse_unsafe_pickle(err, self.path)
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise InputError(f"{self.path}: cannot load as a single-file checkpoint ({type(err).__name__}: "
                             f"{message[:200]}); re-download it") from None
        return self

    def __exit__(self, *exc) -> None:
        self._file = self._state = None

    def keys_under(self, prefixes: tuple[str, ...]) -> list[str]:
        return [k for k in self._keys if k.startswith(prefixes)]

    def nbytes(self, keys: list[str]) -> tuple[int, int]:
        """(bytes as stored, bytes as float32) of these tensors, from the header alone."""
        import math

        stored = float32 = 0
        for key in keys:
            if self._file is not None:
                view = self._file.get_slice(key)
                count = math.prod(view.get_shape())
                size = DTYPE_BYTES.get(view.get_dtype(), 4)
            else:
                tensor = self._state[key]
                count, size = tensor.numel(), tensor.element_size()
            stored += count * size
            float32 += count * 4
        return stored, float32

    def tensor(self, key: str):
        if self._file is None:
            return self._state[key]
        try:
            return self._file.get_tensor(key)
        except Exception as err:  # a damaged file can pass the header check and fail here
            raise InputError(f"{self.path}: cannot read tensor {key} ({type(err).__name__}: {err}); "
                             "re-download it") from None


def reading_bytes(checkpoint: "Checkpoint", family: Family, folders: list[str]) -> dict[str, int]:
    """Per model folder: an upper estimate of the peak memory of reading it from the file (0: not in it)."""
    needs = {}
    for folder in folders:
        stored, float32 = checkpoint.nbytes(checkpoint.keys_under(family.single_file.prefixes[folder]))
        needs[folder] = int(STORED_FACTOR * stored + float32 + READ_OVERHEAD) if stored else 0
    return needs


def _check_memory(checkpoint: "Checkpoint", family: Family, folders: list[str], budget: int | None) -> None:
    if budget is None:
        import psutil

        budget = psutil.virtual_memory().available
    needs = reading_bytes(checkpoint, family, folders)
    worst = max(needs, key=needs.get, default=None)
    if worst is not None and needs[worst] > budget:
        raise InputError(f"{checkpoint.path}: reading its {worst} needs about {needs[worst] / 2**30:.1f} GiB, "
                         f"{budget / 2**30:.1f} GiB available; free memory, or export the model's diffusers folder")


def _tie_t5_embeddings(state: dict, prefixes: tuple[str, ...]) -> None:
    """T5 ties its encoder's token embedding to ``shared``; files saved by transformers keep only
    ``shared.weight``, and diffusers loads the state strictly when accelerate is not installed."""
    for prefix in prefixes:
        shared, embed = prefix + "shared.weight", prefix + "encoder.embed_tokens.weight"
        if shared in state and embed not in state:
            state[embed] = state[shared]


def _wanted_folders(family: Family, components: tuple[str, ...] | None) -> set[str] | None:
    return None if components is None else {family.model_folder(c) for c in components}


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and all(entry)


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir())

