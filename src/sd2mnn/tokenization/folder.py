"""A tokenizer folder as sd2mnn reads it: its files, and its kind, decided here only.

The kind ("clip", "bert", "t5" or "generic") says how the .mtok writer reads the folder (which
class defaults fill its special tokens) and which scheme rewrites it; its ``model`` (the
tokenizer.json model kind: "BPE", "WordPiece", "Unigram", ...) is what a family's tokenizer is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sd2mnn.core.files import confined
from sd2mnn.errors import InputError

# The model each class holds (transformers' CLIPTokenizer, BertTokenizer, T5Tokenizer).
CLASS_KINDS = {"CLIPTokenizer": ("clip", "BPE"), "BertTokenizer": ("bert", "WordPiece"),
               "T5Tokenizer": ("t5", "Unigram")}
GENERIC_CLASSES = ("", "PreTrainedTokenizerFast", "TokenizersBackend")


@dataclass(frozen=True)
class TokenizerKind:
    name: str  # "clip", "bert", "t5" or "generic" (a tokenizer.json with no model-specific class)
    model: str  # the model kind: "BPE", "WordPiece", "Unigram", or a generic tokenizer.json's own


def tokenizer_folder_files(folder: Path) -> list[Path]:
    """The files of a tokenizer folder; an entry that is a link leaving the folder is refused.
    Whatever reads a tokenizer folder (the .mtok writer, convert's copy) reads what this allows."""
    fix = "replace the link with the file itself"
    return [path for path in (confined(folder, item.name, fix) for item in sorted(folder.iterdir()))
            if path.is_file()]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable JSON file ({err}); restore it from the model") from err


def tokenizer_kind(tokenizer_dir: Path) -> TokenizerKind:
    """The kind of the tokenizer in ``tokenizer_dir``, from its tokenizer_config.json class, else
    (no model-specific class) from its tokenizer.json."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    cls = str(config.get("tokenizer_class") or "")
    json_path = tokenizer_dir / "tokenizer.json"
    known = next((kind for prefix, kind in CLASS_KINDS.items() if cls.startswith(prefix)), None)
    if known == CLASS_KINDS["T5Tokenizer"] and not json_path.is_file():
        # MNN's writer reads the Unigram model from tokenizer.json only (never spiece.model).
        raise InputError(f"{config_path}: tokenizer_class {cls!r} needs the folder's tokenizer.json, which is "
                         f"missing; copy the model's {tokenizer_dir.name}/ folder whole, or save it with "
                         "transformers' T5TokenizerFast.save_pretrained")
    if known:
        return TokenizerKind(*known)
    if json_path.is_file() and cls in GENERIC_CLASSES:
        model = read_json(json_path).get("model")
        return TokenizerKind("generic", str((model if isinstance(model, dict) else {}).get("type") or ""))
    what = f"tokenizer_class {cls!r}" if cls else "no tokenizer_class"
    raise InputError(f"{config_path}: {what}; sd2mnn writes tokenizer.mtok for CLIPTokenizer (SD1.5, SD3.5), "
                     "BertTokenizer (Taiyi) and T5Tokenizer (SD3.5, Wan) folders, or a folder with a tokenizer.json")
