"""The two folder layouts sd2mnn works between, and the tensor contract of each component.

ONNX pipeline folder (what a diffusers -> ONNX export writes, MNN's onnx_export.py layout)::

    text_encoder/model.onnx   unet/model.onnx + unet/weights.pb   vae_decoder/model.onnx
    vae_encoder/model.onnx    tokenizer/

MNN bundle (what MNN's C++ diffusion runtime loads)::

    text_encoder.mnn(.weight)  unet.mnn(.weight)  vae_decoder.mnn(.weight)  tokenizer.mtok
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sd2mnn.errors import InputError, UnsafeModelError
from sd2mnn.families import SD15, ComponentSpec
from sd2mnn.onnx_scan import OnnxSummary, scan_onnx


# The components and their tensor names are the family's (sd2mnn.families); every family
# sd2mnn knows today shares SD1.5's four.
COMPONENTS: dict[str, ComponentSpec] = SD15.components
DEFAULT_COMPONENTS: tuple[str, ...] = tuple(n for n, s in COMPONENTS.items() if s.default)

TOKENIZER_DIR = "tokenizer"
MTOK_NAME = "tokenizer.mtok"
MANIFEST_NAME = "manifest.json"
LOGS_DIR = "logs"


def parse_components(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Normalize a --components value ("unet,vae_decoder" or a list) to known names, in order."""
    if names is None:
        return DEFAULT_COMPONENTS
    if isinstance(names, str):
        names = [n for n in names.replace(" ", ",").split(",") if n]
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise InputError(
            f"unknown component {unknown[0]!r}; choose from {', '.join(COMPONENTS)}"
        )
    if not names:
        raise InputError(f"no component named; choose from {', '.join(COMPONENTS)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ComponentSource:
    """One component of an ONNX pipeline folder, checked: model file, data files, signature."""

    spec: ComponentSpec
    model: Path
    data_files: tuple[Path, ...]
    summary: OnnxSummary

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.model, *self.data_files)

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _check_external_location(location: str, model: Path, folder: Path) -> Path:
    """Refuse external-data locations that leave the component's folder (untrusted models)."""
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location.split("/")[0]:
        raise UnsafeModelError(
            f"{model} refers to external data at an absolute path ({location!r}); "
            "re-export it with its data beside the model"
        )
    if ".." in Path(location.replace("\\", "/")).parts:
        raise UnsafeModelError(
            f"{model} refers to external data outside its folder ({location!r}); "
            "re-export it with its data beside the model"
        )
    target = folder / location
    if not target.exists():
        raise InputError(
            f"{model} needs its external data file {target}, which is missing; "
            "copy it beside the model (re-export if it was lost)"
        )
    if not _inside(target.resolve(), folder.resolve()):
        raise UnsafeModelError(
            f"{target} is a link that leaves {folder}; replace it with the real file"
        )
    return target


def _check_signature(spec: ComponentSpec, model: Path, summary: OnnxSummary) -> None:
    """The runtime feeds exactly these inputs and reads these outputs by name."""
    have_inputs = [t.name for t in summary.inputs]
    have_outputs = [t.name for t in summary.outputs]
    if set(have_inputs) != set(spec.inputs) or not set(spec.outputs) <= set(have_outputs):
        raise InputError(
            f"{model} has inputs {have_inputs} and outputs {have_outputs}, but MNN's runtime loads the "
            f"{spec.name} with inputs {list(spec.inputs)} and outputs {list(spec.outputs)}; "
            "re-export it with sd2mnn export"
        )


def load_component(onnx_dir: Path, name: str) -> ComponentSource:
    """Find and check one component in an ONNX pipeline folder."""
    spec = COMPONENTS[name]
    folder = onnx_dir / name
    model = folder / "model.onnx"
    if model.is_dir():
        raise InputError(f"{model} is a folder, not an ONNX file; put the {name}'s model.onnx there")
    if not model.is_file():
        raise InputError(
            f"{model} is missing; export the {name} (sd2mnn export) or leave it out with --components"
        )
    if not _inside(model.resolve(), folder.resolve()):
        raise UnsafeModelError(f"{model} is a link that leaves {folder}; replace it with the real file")
    summary = scan_onnx(model)
    _check_signature(spec, model, summary)
    data_files = tuple(_check_external_location(loc, model, folder) for loc in summary.external_locations)
    return ComponentSource(spec, model, data_files, summary)


@dataclass(frozen=True)
class OnnxPipeline:
    root: Path
    components: dict[str, ComponentSource]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR


def open_onnx_pipeline(onnx_dir: str | os.PathLike, components: tuple[str, ...]) -> OnnxPipeline:
    """Check an ONNX pipeline folder for the named components and its tokenizer; read nothing big."""
    root = Path(onnx_dir)
    if not root.exists():
        raise InputError(f"{root} does not exist; give the folder a diffusers -> ONNX export wrote")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give the folder a diffusers -> ONNX export wrote")
    tokenizer = root / TOKENIZER_DIR
    if not tokenizer.is_dir():
        raise InputError(f"{tokenizer} is missing; copy the pipeline's tokenizer folder into {root}")
    return OnnxPipeline(root, {name: load_component(root, name) for name in components})
