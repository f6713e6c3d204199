"""The two folder layouts sd2mnn works between, and the tensor contract of each component.

ONNX pipeline folder (what a diffusers -> ONNX export writes, MNN's onnx_export.py layout)::

    text_encoder/model.onnx   unet/model.onnx + unet/weights.pb   vae_decoder/model.onnx
    vae_encoder/model.onnx    tokenizer/

MNN bundle (what MNN's C++ diffusion runtime loads)::

    text_encoder.mnn(.weight)  unet.mnn(.weight)  vae_decoder.mnn(.weight)  tokenizer.mtok

Which components a folder holds, and where each tokenizer goes, is its family's
(sd2mnn.families): an SD3.5 folder has text_encoder, text_encoder_2, text_encoder_3, transformer,
vae_decoder and tokenizer/, tokenizer_2/, tokenizer_3/, and its bundle keeps each tokenizer in a
folder of that name (``<name>/tokenizer.mtok``, where diffusion_sd35.cpp loads it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sd2mnn.core.files import confined
from sd2mnn.core.onnx_scan import OnnxSummary, scan_onnx
from sd2mnn.errors import InputError
from sd2mnn.families import ComponentSpec, Family
from sd2mnn.tokenization.folder import tokenizer_folder_files

TOKENIZER_DIR = "tokenizer"
MTOK_NAME = "tokenizer.mtok"
MANIFEST_NAME = "manifest.json"
LOGS_DIR = "logs"


def split_components(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A --components value ("unet,vae_decoder" or a list) as names, unchecked (the family of
    the folder, known later, says which names exist); None stays None (the family's defaults)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [n for n in names.replace(" ", ",").split(",") if n]
    return tuple(dict.fromkeys(names))


def parse_components(names: str | list[str] | tuple[str, ...] | None, family: Family) -> tuple[str, ...]:
    """Normalize a --components value ("unet,vae_decoder" or a list) to the ``family``'s
    component names, in order; None: the family's defaults."""
    names = split_components(names)
    if names is None:
        return family.default_components
    unknown = [n for n in names if n not in family.components]
    if unknown:
        raise InputError(
            f"unknown component {unknown[0]!r}; choose from {', '.join(family.components)}"
            f" (the components of {family.name} pipelines)"
        )
    if not names:
        raise InputError(f"no component named; choose from {', '.join(family.components)}")
    return names


def component_choices() -> str:
    """Every family's components, for help texts and errors: "a, b (sd15, taiyi); c, d (sd35)"."""
    from sd2mnn.families import FAMILIES

    groups: dict[tuple[str, ...], list[str]] = {}
    for family in FAMILIES.values():
        groups.setdefault(tuple(family.components), []).append(family.name)
    return "; ".join(f"{', '.join(names)} ({', '.join(which)})" for names, which in groups.items())


def check_component_names(names: tuple[str, ...] | None) -> None:
    """Refuse a name no family has (before an export that takes minutes, say)."""
    from sd2mnn.families import FAMILIES

    unknown = [n for n in names or () if not any(n in f.components for f in FAMILIES.values())]
    if unknown:
        raise InputError(f"unknown component {unknown[0]!r}; choose from {component_choices()}")


def tokenizer_layout(family: Family) -> dict[str, str]:
    """The ONNX folder's tokenizer folders -> where the bundle keeps each. One tokenizer lives in
    the bundle's own folder (MNN's SD1.x runtime reads ``<bundle>/tokenizer.mtok``); several keep
    their folders (diffusion_sd35.cpp reads ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``)."""
    folders = list(family.prompt_formats)
    return {TOKENIZER_DIR: ""} if folders == [TOKENIZER_DIR] else {f: f for f in folders}


def bundle_mtoks(family: Family) -> list[str]:
    """The bundle-relative tokenizer.mtok files of the family, one per tokenizer, all of which its
    runtime loads."""
    return [f"{folder}/{MTOK_NAME}" if folder else MTOK_NAME for folder in tokenizer_layout(family).values()]


def bundle_mtok(family: Family, component: str) -> str:
    """The bundle-relative tokenizer.mtok whose ids the runtime feeds ``component``."""
    folder = tokenizer_layout(family)[family.components[component].tokenizer]
    return f"{folder}/{MTOK_NAME}" if folder else MTOK_NAME


def folder_family(root: Path) -> Family:
    """The family of an ONNX pipeline folder or a bundle (sd2mnn.families.detect)."""
    from sd2mnn import families

    return families.detect(root)


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


def _check_external_location(location: str, model: Path, folder: Path) -> Path:
    """The data file an external-data ``location`` names, refused when it leaves the component's
    folder (untrusted models) and when it is missing."""
    target = confined(folder, location, f"{model} names it as external data: re-export the model with its "
                                        "data beside it")
    if not target.exists():
        raise InputError(
            f"{model} needs its external data file {target}, which is missing; "
            "copy it beside the model (re-export if it was lost)"
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


def load_component(onnx_dir: Path, name: str, family: Family) -> ComponentSource:
    """Find and check one of the ``family``'s components in an ONNX pipeline folder."""
    spec = family.components[name]
    folder = confined(onnx_dir, name, f"replace the link with the {name} folder itself")
    model = confined(folder, "model.onnx", "replace the link with the file itself")
    if model.is_dir():
        raise InputError(f"{model} is a folder, not an ONNX file; put the {name}'s model.onnx there")
    if not model.is_file():
        raise InputError(
            f"{model} is missing; export the {name} (sd2mnn export) or leave it out with --components"
        )
    summary = scan_onnx(model)
    _check_signature(spec, model, summary)
    data_files = tuple(_check_external_location(loc, model, folder) for loc in summary.external_locations)
    return ComponentSource(spec, model, data_files, summary)


@dataclass(frozen=True)
class OnnxPipeline:
    root: Path
    components: dict[str, ComponentSource]
    family: Family

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def tokenizers(self) -> dict[str, Path]:
        """Bundle folder ("" : the bundle itself) -> the ONNX folder's tokenizer folder."""
        return {target: self.root / source for source, target in tokenizer_layout(self.family).items()}


def check_onnx_root(onnx_dir: str | os.PathLike) -> Path:
    root = Path(onnx_dir)
    if not root.exists():
        raise InputError(f"{root} does not exist; give the folder a diffusers -> ONNX export wrote")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give the folder a diffusers -> ONNX export wrote")
    return root


def open_onnx_pipeline(onnx_dir: str | os.PathLike, components: tuple[str, ...] | str | None,
                       family: Family | None = None) -> OnnxPipeline:
    """Check an ONNX pipeline folder for the named components (None: its family's defaults) and
    its tokenizers; read nothing big. ``family``: the folder's (default: detected)."""
    root = check_onnx_root(onnx_dir)
    family = family or folder_family(root)
    if components is None:  # the defaults, less one the runtime runs without that was not exported
        components = tuple(n for n in family.default_components
                           if not (family.components[n].runtime_optional and not (root / n / "model.onnx").exists()))
    names = parse_components(components, family)
    for folder in tokenizer_layout(family):
        path = confined(root, folder, f"replace the link with the {folder} folder itself")
        if not path.is_dir():
            raise InputError(f"{path} is missing; copy the pipeline's {folder} folder into {root}")
        tokenizer_folder_files(path)
    return OnnxPipeline(root, {name: load_component(root, name, family) for name in names}, family)
