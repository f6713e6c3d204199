"""Model families: everything sd2mnn knows about one kind of pipeline, in one frozen dataclass.

    base.py              Family, ComponentSpec (tensors, runtime shapes, verify feeds, export
                         tolerance), PromptFormat, Recipe (scheduler, guidance, latent scaling)
    stable_diffusion.py  SD15 (CLIP BPE, 77 tokens) and TAIYI (BERT WordPiece, 512 tokens)
    sd35.py              SD35 (two CLIPs, optional T5, MMDiT transformer, flow-match Euler)

Which family a folder holds is decided here only: ``detect(path)``.
"""
from __future__ import annotations

import json
from pathlib import Path

from sd2mnn.errors import InputError
from sd2mnn.files import read_json_object
from sd2mnn.families.base import ComponentSpec, Family, PromptFormat, Recipe, TensorShapes
from sd2mnn.families.sd35 import SD35, SD35Dims
from sd2mnn.families.stable_diffusion import SD15, TAIYI

FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, TAIYI, SD35)}

__all__ = ["ComponentSpec", "FAMILIES", "Family", "PromptFormat", "Recipe", "SD15", "SD35", "SD35Dims", "TAIYI",
           "TensorShapes", "by_name", "by_text_length", "by_tokenizer_model", "detect"]

# Files only an SD3 folder has: an ONNX export's models, or a bundle's (MNN's runtime loads
# transformer.mnn and tokenizer_3/tokenizer.mtok). A folder counts by its files, never by its name:
# an empty transformer/ beside an SD1.5 export says nothing.
SD3_MARKERS = ("transformer/model.onnx", "text_encoder_3/model.onnx", "tokenizer_3/tokenizer.json",
               "tokenizer_3/tokenizer_config.json", "transformer.mnn", "tokenizer_3/tokenizer.mtok")


def by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise InputError(f"unknown model family {name!r}; sd2mnn knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def by_tokenizer_model(model_kind: str) -> Family:
    """The family whose runtime tokenizer is of this model kind ("BPE" -> SD1.5, "WordPiece" -> Taiyi)."""
    for family in FAMILIES.values():
        if family.tokenizer_model == model_kind:
            return family
    raise InputError(f"{model_kind} tokenizers have no MNN SD runtime (it knows CLIP BPE for SD1.5, "
                     "BERT WordPiece for Taiyi and T5's Unigram for SD3.5)")


def by_text_length(length: int | None) -> Family | None:
    """The family whose runtime feeds the text encoder ``length`` ids (a converted text encoder's
    input says which), or None."""
    return next((f for f in FAMILIES.values() if f.text_length == length), None)


def _from_diffusers_index(index_path: Path) -> Family:
    # A diffusers folder names its classes: an SD3 pipeline or transformer is SD3.5, a BERT
    # tokenizer or text encoder is Taiyi.
    index = read_json_object(index_path)
    if str(index.get("_class_name") or "").startswith("StableDiffusion3") or "transformer" in index:
        return SD35
    classes = [((index.get(part) or [None, ""])[1] or "") for part in ("tokenizer", "text_encoder")]
    return TAIYI if any(str(c).startswith("Bert") for c in classes) else SD15


def _from_tokenizer_folder(folder: Path) -> Family:
    from sd2mnn.layout import tokenizer_folder_files

    tokenizer_folder_files(folder)
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError as err:
            raise InputError(f"{config_path}: not valid JSON ({err}); re-download the tokenizer") from None
    cls = str(config.get("tokenizer_class") or "")
    if cls.startswith("CLIPTokenizer"):
        return SD15
    if cls.startswith("BertTokenizer"):
        return TAIYI
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            kind = (json.loads(path.read_text()).get("model") or {}).get("type") or ""
        except ValueError as err:
            raise InputError(f"{path}: not valid JSON ({err}); re-download the tokenizer") from None
        if kind:
            return by_tokenizer_model(kind)
        if (folder / "merges.txt").is_file():
            return SD15
    raise InputError(f"{folder}: no tokenizer sd2mnn can tell the model family from; give a CLIPTokenizer "
                     "(SD1.5) or BertTokenizer (Taiyi) folder, or one with a tokenizer.json")


def detect(path: str | Path) -> Family:
    """The family of a bundle (its manifest, else its tokenizer.mtok), a tokenizer.mtok, an ONNX
    pipeline folder or a diffusers folder (their tokenizer), or a tokenizer folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".mtok":
        from sd2mnn.tokenizer import read_mtok_model_kind

        return by_tokenizer_model(read_mtok_model_kind(path))
    if (path / "manifest.json").is_file():
        from sd2mnn.manifest import read_manifest

        name = read_manifest(path / "manifest.json").family
        if name:
            return by_name(name)
    if (path / "tokenizer.mtok").is_file():
        return detect(path / "tokenizer.mtok")
    if (path / "model_index.json").is_file():
        return _from_diffusers_index(path / "model_index.json")
    if any((path / marker).is_file() for marker in SD3_MARKERS):
        return SD35
    if (path / "tokenizer").is_dir():
        return _from_tokenizer_folder(path / "tokenizer")
    if path.is_dir():
        return _from_tokenizer_folder(path)
    raise InputError(f"{path} does not exist; give a bundle, an ONNX pipeline folder or a tokenizer folder")
