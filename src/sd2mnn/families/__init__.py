"""Model families: everything sd2mnn knows about one kind of pipeline, in one frozen dataclass.

    base.py              Family, ComponentSpec (tensors, runtime shapes, verify feeds, export
                         tolerance), PromptFormat, Recipe (scheduler, guidance, latent scaling)
    stable_diffusion.py  SD15 (CLIP BPE, 77 tokens) and TAIYI (BERT WordPiece, 512 tokens)
    sd35.py              SD35 (two CLIPs, optional T5, MMDiT transformer, flow-match Euler)
    wan.py               WAN (Wan2.1 text to video: UMT5, a 3D transformer, a causal 3D VAE)

Which family a folder holds is decided here only: ``detect(path)``.
"""
from __future__ import annotations

import json
from pathlib import Path

from sd2mnn.core.files import read_json_object
from sd2mnn.core.manifest import read_manifest
from sd2mnn.core.onnx_scan import scan_onnx
from sd2mnn.errors import InputError
from sd2mnn.families.base import ComponentSpec, Family, PromptFormat, Recipe, TensorShapes
from sd2mnn.families.sd35 import SD35, SD35Dims
from sd2mnn.families.stable_diffusion import SD15, TAIYI
from sd2mnn.families.wan import WAN, WanDims
from sd2mnn.tokenization.folder import tokenizer_folder_files, tokenizer_kind
from sd2mnn.tokenization.reader import MTOK_NAME, read_mtok_model_kind

FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, TAIYI, SD35, WAN)}

__all__ = ["ComponentSpec", "FAMILIES", "Family", "PromptFormat", "Recipe", "SD15", "SD35", "SD35Dims", "TAIYI",
           "TensorShapes", "WAN", "WanDims", "by_name", "by_tokenizer_model", "detect", "runtime_family", "write_marker"]

# What `sd2mnn export` writes into ONNX_DIR to say which family the folder holds: {"family": name}.
FAMILY_MARKER = "sd2mnn_family.json"


def by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise InputError(f"unknown model family {name!r}; sd2mnn knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def by_tokenizer_model(model_kind: str, among: tuple[Family, ...] | None = None, what: str = "") -> Family:
    """The one family (of ``among``, by default all) whose runtime tokenizer is of this model kind
    ("BPE" -> SD1.5, "WordPiece" -> Taiyi); refused where none or several are (``what`` names the
    tokenizer in the error)."""
    among = tuple(FAMILIES.values()) if among is None else among
    found = [f for f in among if f.tokenizer_model == model_kind]
    if len(found) == 1:
        return found[0]
    where = f"{what}: " if what else ""
    if found:
        raise InputError(f"{where}a {model_kind} tokenizer is the tokenizer of {' and '.join(f.name for f in found)}; "
                         "give the bundle with its manifest.json, or the ONNX folder sd2mnn export wrote")
    raise InputError(f"{where}{model_kind or 'this kind of'} tokenizers have no MNN SD runtime (it knows CLIP BPE for "
                     "SD1.5, BERT WordPiece for Taiyi and T5's Unigram for SD3.5)")


def runtime_family(pipeline: Family, mtok: Path) -> str:
    """The family MNN's runtime runs a bundle as, by its tokenizer.mtok: the pipeline's own where
    the tokenizer is of its kind, else the one family of that kind (SD1.5 weights with a BERT
    tokenizer run as Taiyi), else "" (a tokenizer no runtime takes)."""
    kind = read_mtok_model_kind(mtok)
    if kind == pipeline.tokenizer_model:
        return pipeline.name
    try:
        return by_tokenizer_model(kind, what=str(mtok)).name
    except InputError:
        return ""


def write_marker(onnx_dir: Path, family: Family, loras: list[dict] | None = None, vae: dict | None = None) -> None:
    """Record in an ONNX folder which family it holds (read back by ``detect``), and what export
    changed in the pipeline: the LoRAs merged into its weights, the VAE put in its own's place
    (read back by ``export_changes``, for the bundle's manifest)."""
    marker = {"family": family.name, **({"loras": loras} if loras else {}), **({"vae": vae} if vae else {})}
    (Path(onnx_dir) / FAMILY_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def export_changes(onnx_dir: Path) -> tuple[list[dict], dict]:
    """(the LoRAs merged, the VAE replaced: {} for the pipeline's own) as the ONNX folder's marker
    records them."""
    path = Path(onnx_dir) / FAMILY_MARKER
    marker = read_json_object(path) if path.is_file() else {}
    loras, vae = marker.get("loras", []), marker.get("vae", {})
    if not (isinstance(loras, list) and all(isinstance(item, dict) for item in loras) and isinstance(vae, dict)):
        raise InputError(f"{path}: its 'loras' or 'vae' is not what sd2mnn export writes; export the pipeline again")
    return loras, vae


def _from_diffusers_index(index_path: Path) -> Family:
    """A diffusers folder names its classes: of the families of its pipeline class, else those
    whose denoiser it has, the one that loads most of its entries as the classes named (a tie goes
    to the first in FAMILIES). A class no family loads still picks one, whose folder check then
    refuses it, naming the entry."""
    index = read_json_object(index_path)
    pipeline = index.get("_class_name")

    def entries_loaded(family: Family) -> int:
        return sum(isinstance(index.get(name), list) and tuple(index[name][:2]) in allowed
                   for name, allowed in family.classes.items())

    candidates = ([f for f in FAMILIES.values() if pipeline in f.pipelines]
                  or [f for f in FAMILIES.values() if f.denoiser in index] or list(FAMILIES.values()))
    return max(candidates, key=entries_loaded)  # max keeps the first of equals


def _read_marker(path: Path) -> Family:
    name = read_json_object(path).get("family")
    if not isinstance(name, str) or name not in FAMILIES:
        raise InputError(f"{path}: names no model family sd2mnn knows ({name!r}); delete it, or export the "
                         "pipeline again with sd2mnn export")
    return FAMILIES[name]


def _own_files(family: Family) -> tuple[str, ...]:
    """The files of the family's ONNX folders and bundles that no other family's have: its own
    components' models and its own tokenizer folders' files. A folder counts by its files, never
    by its name: an empty transformer/ beside an SD1.5 export says nothing."""
    others = [f for f in FAMILIES.values() if f is not family]
    components = [c for c in family.components if not any(c in f.components for f in others)]
    tokenizers = [t for t in family.prompt_formats if not any(t in f.prompt_formats for f in others)]
    return (*(f"{c}/model.onnx" for c in components), *(f"{c}.mnn" for c in components),
            *(f"{t}/{name}" for t in tokenizers for name in ("tokenizer.json", "tokenizer_config.json", MTOK_NAME)))


def _graph_inputs(model: Path) -> set[str] | None:
    """The input names of an ONNX graph, or None where it cannot be read."""
    try:
        return {t.name for t in scan_onnx(model).inputs}
    except InputError:
        return None


def _by_graphs(path: Path, among: tuple[Family, ...]) -> tuple[Family, ...]:
    """Those of ``among`` whose components found in ``path`` have the input names the family gives
    them; read only where the families' specs of a component differ."""
    kept = list(among)
    names = dict.fromkeys(c for f in among for c in f.components)
    for name in names:
        specs = {f.components[name].inputs if name in f.components else None for f in kept}
        model = path / name / "model.onnx"
        if len(specs) < 2 or not model.is_file():
            continue
        inputs = _graph_inputs(model)
        if inputs is not None:
            kept = [f for f in kept if name in f.components and set(f.components[name].inputs) == inputs] or kept
    return tuple(kept)


def _tokenizer_folders_fit(path: Path, family: Family) -> bool:
    """A family of several tokenizers keeps each in its own folder, in its exports and bundles
    alike (SD3.5's tokenizer_2/, tokenizer_3/): none of them there, and it is not this one's."""
    others = [name for name in family.prompt_formats if name != "tokenizer"]
    return not others or any((path / name).is_dir() for name in others)


def _by_tokenizer(path: Path, among: tuple[Family, ...]) -> Family:
    """Of ``among``, the family of the tokenizer in ``path``: its tokenizer.mtok (a bundle), its
    tokenizer/ folder or ``path`` itself as a tokenizer folder, by the tokenizer's kind."""
    if (path / MTOK_NAME).is_file():
        kind, where = read_mtok_model_kind(path / MTOK_NAME), str(path / MTOK_NAME)
    else:
        folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        tokenizer_folder_files(folder)
        if not any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
            raise InputError(f"{folder}: no tokenizer sd2mnn can tell the model family from; give a CLIPTokenizer "
                             "(SD1.5) or BertTokenizer (Taiyi) folder, or one with a tokenizer.json")
        kind, where = tokenizer_kind(folder).model, str(folder)
    # A family of several tokenizers may have any kind in tokenizer/ (SD3.5's is CLIP's).
    fitting = [f for f in among if f.tokenizer_model == kind] or [f for f in among if f.tokenizers]
    if len(fitting) > 1:  # T5's Unigram is SD3.5's and Wan's: the one whose tokenizer folders are there
        fitting = [f for f in fitting if _tokenizer_folders_fit(path, f)] or fitting
    return fitting[0] if len(fitting) == 1 else by_tokenizer_model(kind, among, where)


def _from_files(path: Path) -> Family:
    """An ONNX folder or a bundle without a record of its family, or a tokenizer folder: the
    family whose own files are there, else the one whose graphs and tokenizer fit."""
    owners = tuple(f for f in FAMILIES.values() if any((path / rel).is_file() for rel in _own_files(f)))
    if len(owners) == 1:
        return owners[0]
    if not owners:  # then those with every component found there (a transformer: SD3.5 or Wan)
        found = {c for f in FAMILIES.values() for c in f.components
                 if (path / c / "model.onnx").is_file() or (path / f"{c}.mnn").is_file()}
        owners = tuple(f for f in FAMILIES.values() if found <= set(f.components))
    return _by_tokenizer(path, _by_graphs(path, owners or tuple(FAMILIES.values())))


def detect(path: str | Path) -> Family:
    """The family of a bundle (its manifest's record), an ONNX folder (the record export writes),
    a diffusers folder (model_index.json's classes); else, for a bundle or ONNX folder without a
    record, the files only one family has, the graphs' input names and the tokenizer; for a
    tokenizer.mtok or a tokenizer folder, the one family with that kind of tokenizer."""
    path = Path(path)
    if path.is_file() and path.suffix == ".mtok":
        return by_tokenizer_model(read_mtok_model_kind(path), what=str(path))
    if not path.is_dir():
        raise InputError(f"{path} does not exist; give a bundle, an ONNX pipeline folder or a tokenizer folder")
    if (path / "manifest.json").is_file():
        name = read_manifest(path / "manifest.json").family
        if name:
            return by_name(name)
    if (path / FAMILY_MARKER).is_file():
        return _read_marker(path / FAMILY_MARKER)
    if (path / "model_index.json").is_file():
        return _from_diffusers_index(path / "model_index.json")
    return _from_files(path)
