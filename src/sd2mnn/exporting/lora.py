"""LoRAs merged into a pipeline's weights at export: MNN loads weights once and cannot apply one at
run time, so the bundle carries them fused, as Apple's converter does (``--loras-to-merge``).

Each file is read as diffusers reads it, by the family's LoRA loader (``Exporter.lora_loader``, e.g.
StableDiffusionLoraLoaderMixin): its ``lora_state_dict`` turns the keys (diffusers/PEFT, and kohya/A1111
where that loader reads them) into diffusers' names, the model's ``load_lora_adapter`` (the denoiser) or
the loader's ``load_lora_into_text_encoder`` injects it with PEFT, diffusers fuses it at its scale, and
the PEFT layers are removed, leaving plain weights to export. Only .safetensors files are read: a
pickled LoRA could run code.

Before anything is exported, each LoRA is injected into every model it targets built on the meta
device (no weights, no memory, seconds at full size): weights for a part the pipeline lacks, layers the
model lacks and shapes that differ are refused there, naming the file.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from sd2mnn.core.manifest import sha256_file
from sd2mnn.errors import InputError

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Lora:
    """A LoRA file and the scale it is fused at."""

    path: Path
    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))  # a str from the Python API

    @classmethod
    def parse(cls, text: str) -> "Lora":
        """``FILE`` or ``FILE:SCALE`` (a file whose own name has a colon is taken whole)."""
        if Path(text).is_file() or ":" not in text:
            return cls(Path(text))
        name, _, scale = text.rpartition(":")
        try:
            value = float(scale)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InputError(f"--lora {text}: the scale {scale!r} is not a number; give FILE or FILE:SCALE "
                             f"(e.g. {name}:0.8)")
        return cls(Path(name), value)


@dataclass(frozen=True)
class LoraRecord:
    """What the manifest says of a merged LoRA."""

    file: str
    sha256: str
    scale: float
    components: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "scale": self.scale, "components": list(self.components)}


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA as diffusers' loader returns it: keys prefixed by the part they target."""

    lora: Lora
    state_dict: dict
    network_alphas: dict | None  # kohya files' alphas
    metadata: dict | None  # PEFT's config, as diffusers' save_lora_weights stores it

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(key.split(".", 1)[0] for key in self.state_dict))

    def count(self, component: str) -> int:
        return sum(key.startswith(f"{component}.") for key in self.state_dict)


def loader_class(name: str):
    """diffusers' LoRA loader mixin called ``name``."""
    import diffusers.loaders

    return getattr(diffusers.loaders, name)


def read(lora: Lora, loader) -> LoraWeights:
    """The LoRA at ``lora.path`` as ``loader`` (a diffusers LoRA loader mixin) reads it."""
    path = lora.path
    if not path.is_file():
        raise InputError(f"--lora {path}: not found; give a LoRA .safetensors file")
    if path.suffix.lower() != SUFFIX:
        raise InputError(f"--lora {path}: only .safetensors LoRAs are read (a pickled file can run code); "
                         "save it as .safetensors")
    try:
        # A local folder and file name, safetensors only: diffusers never unpickles or downloads.
        result = loader.lora_state_dict(str(path.parent), weight_name=path.name, use_safetensors=True,
                                        local_files_only=True, return_lora_metadata=True)
    except Exception as err:  # safetensors, diffusers' converters and PEFT raise many types
        raise InputError(f"--lora {path}: not a LoRA diffusers reads ({_first_line(err)})") from err
    *weights, metadata = result  # SD1.x's loader also returns kohya's alphas
    state_dict, alphas = weights[0], (weights[1] if len(weights) > 1 else None)
    if not state_dict:
        raise InputError(f"--lora {path}: holds no weights")
    return LoraWeights(lora, state_dict, alphas or None, metadata or None)


def check_targets(weights: LoraWeights, loader, components: tuple[str, ...], pipeline: str) -> None:
    """Refuse a LoRA whose weights are for a part the loader does not load or the pipeline lacks
    (a LoRA for another model family, or keys diffusers does not convert for this one)."""
    loadable = [n for n in loader._lora_loadable_modules if n in components]
    foreign = [t for t in weights.targets if t not in loadable]
    if foreign:
        example = next(k for k in weights.state_dict if k.split(".", 1)[0] == foreign[0])
        # kohya's names (lora_unet_*, lora_te_*) are left as they are by a loader that does not convert them.
        why = (f"kohya keys, which diffusers' {loader.__name__} does not convert: save it in diffusers' format"
               if example.startswith("lora_") else "a LoRA for another model family?")
        raise InputError(f"--lora {weights.lora.path}: its weights are not for {pipeline} (e.g. {example!r}; "
                         f"diffusers loads {', '.join(loadable)}): {why}")


def inject(model, component: str, weights: LoraWeights, loader, adapter: str, where: Path) -> None:
    """Load ``weights``' layers for ``component`` into ``model`` as PEFT adapter ``adapter``,
    refusing a LoRA whose layers the model lacks or whose shapes differ."""
    from diffusers import ModelMixin

    path = weights.lora.path
    try:
        with _silent():
            if isinstance(model, ModelMixin):
                model.load_lora_adapter(weights.state_dict, prefix=component, network_alphas=weights.network_alphas,
                                        adapter_name=adapter, metadata=weights.metadata)
            else:
                loader.load_lora_into_text_encoder(weights.state_dict, network_alphas=weights.network_alphas,
                                                   text_encoder=model, prefix=component, adapter_name=adapter,
                                                   metadata=weights.metadata)
    except Exception as err:  # PEFT and torch raise many types for layers that do not fit
        raise InputError(f"--lora {path}: does not fit {where} ({_misfit(err)}): a LoRA for another model?") from err
    loaded = sum(f".{adapter}." in name for name, _ in model.named_parameters())
    expected = weights.count(component)
    if loaded != expected:
        raise InputError(f"--lora {path}: {expected - loaded} of its {expected} {component} weights match no layer "
                         f"of {where}: a LoRA for another model?")


def merge(model, component: str, loras: tuple[Lora, ...], loader, where: Path):
    """``model`` with every LoRA targeting ``component`` fused at its scale, PEFT's layers removed."""
    for index, lora in enumerate(loras):
        weights = read(lora, loader)
        if component not in weights.targets:
            continue
        adapter = f"sd2mnn_{index}"
        inject(model, component, weights, loader, adapter, where)
        try:
            with _silent():
                _fuse(model, adapter, lora.scale)
        except ValueError as err:  # safe_fusing: the fused weights are not finite
            raise InputError(f"--lora {lora.path}: fusing it into {where} at scale {lora.scale:g} gives "
                             f"{_first_line(err)}") from err
    return model


def _fuse(model, adapter: str, scale: float) -> None:
    """Fuse PEFT adapter ``adapter`` into ``model``'s weights at ``scale`` as diffusers' fuse_lora
    does, then remove PEFT's layers as its unload_lora_weights does."""
    from diffusers import ModelMixin
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from diffusers.utils import recurse_remove_peft_layers

    if isinstance(model, ModelMixin):
        model.fuse_lora(lora_scale=scale, safe_fusing=True, adapter_names=[adapter])
        model.unload_lora()
        return
    fuse_text_encoder_lora(model, lora_scale=scale, safe_fusing=True, adapter_names=[adapter])
    recurse_remove_peft_layers(model)
    if getattr(model, "peft_config", None) is not None:
        del model.peft_config
        model._hf_peft_config_loaded = None


def record(lora: Lora, components: tuple[str, ...]) -> LoraRecord:
    return LoraRecord(lora.path.name, sha256_file(lora.path), lora.scale, components)


@contextlib.contextmanager
def _silent():
    """No warnings or log lines from torch, diffusers and transformers: a LoRA that does not fit
    is said once, in sd2mnn's error (diffusers logs it as an error first; copying into a meta model
    is a no-op, which torch warns of)."""
    import diffusers
    import transformers

    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
    transformers.utils.logging.set_verbosity(transformers.utils.logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def _misfit(err: BaseException) -> str:
    """Why PEFT could not load a LoRA's layers, in one line: the first shape that differs, or that
    none of its layers is in the model (PEFT lists every one)."""
    text = str(err).strip()
    if text.startswith("Target modules") and "not found in the base model" in text:
        return "none of its layers is in the model"
    mismatch = next((line.strip() for line in text.splitlines() if line.strip().startswith("size mismatch")), None)
    return (mismatch or _first_line(err)).rstrip(".")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
