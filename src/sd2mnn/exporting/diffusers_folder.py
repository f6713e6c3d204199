"""A diffusers pipeline folder as export reads it, checked before anything is loaded from it.

model_index.json and each config.json are read once and checked with types:

- each model_index.json entry is a [library, class] pair, and the class is one the family loads
  (``Family.classes``): a model folder never picks the code that reads it;
- each config value export sizes the model with is the number or list it should be;
- the denoiser and the VAE work on the latent channels MNN's runtime draws with (text-to-image);
- each tokenizer folder holds the files its tokenizer is read from, its JSON files are objects;
- nothing read links out of the folder (``files.confined_tree``).
"""
from __future__ import annotations

from pathlib import Path

from sd2mnn.core.files import confined_tree, read_json_object
from sd2mnn.errors import InputError
from sd2mnn.families import FAMILIES, Family

FIX = "re-download the model"
LINK_FIX = "copy the files into the model's folder (no links that leave it)"
# Every entry some family loads: model_index.json must give each a [library, class] pair.
LOADED_ENTRIES = frozenset(name for family in FAMILIES.values() for name in family.classes)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _counts(value) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_count, value))


# kind -> (test, what a value of that kind is)
KINDS = {
    "count": (_count, "a positive whole number"),
    "counts": (_counts, "a non-empty list of positive whole numbers"),
    "size": (lambda v: _count(v) or (_counts(v) and len(v) == 2), "a positive whole number or a pair of them"),
    "per_block": (lambda v: _count(v) or _counts(v), "a positive whole number or a list of them"),
    "names": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(n, str) for n in v),
              "a non-empty list of block names"),
}
# Per class: the config values export reads, and their kind. A missing value takes the library's
# default; "kind?" may also be null (the default), "kind!" must be given.
CONFIG_FIELDS = {
    "UNet2DConditionModel": {"in_channels": "count", "sample_size": "size?", "block_out_channels": "counts",
                             "cross_attention_dim": "per_block?", "attention_head_dim": "per_block?",
                             "num_attention_heads": "per_block?", "down_block_types": "names"},
    "AutoencoderKL": {"in_channels": "count", "latent_channels": "count", "block_out_channels": "counts"},
    "AutoencoderTiny": {"in_channels": "count", "latent_channels": "count", "block_out_channels": "counts?",
                        "decoder_block_out_channels": "counts"},
    "SD3Transformer2DModel": {"in_channels": "count", "sample_size": "size", "patch_size": "count",
                              "joint_attention_dim": "count", "pooled_projection_dim": "count",
                              "num_attention_heads": "count", "attention_head_dim": "count",
                              "pos_embed_max_size": "count?"},
    "CLIPTextModel": {"hidden_size": "count!", "max_position_embeddings": "count", "num_attention_heads": "count"},
    "CLIPTextModelWithProjection": {"hidden_size": "count!", "projection_dim": "count",
                                    "max_position_embeddings": "count", "num_attention_heads": "count"},
    "BertModel": {"hidden_size": "count!", "max_position_embeddings": "count", "num_attention_heads": "count"},
    "T5EncoderModel": {"d_model": "count", "num_heads": "count"},
    "UMT5EncoderModel": {"d_model": "count", "num_heads": "count"},
    "WanTransformer3DModel": {"in_channels": "count", "out_channels": "count", "num_attention_heads": "count",
                              "attention_head_dim": "count", "text_dim": "count"},
    "AutoencoderKLWan": {"z_dim": "count", "base_dim": "count", "dim_mult": "counts"},
}
# The config value that holds a model's latent channels (MNN's runtime draws text-to-image only).
LATENT_CHANNELS = {"UNet2DConditionModel": "in_channels", "SD3Transformer2DModel": "in_channels",
                   "AutoencoderKL": "latent_channels", "AutoencoderTiny": "latent_channels",
                   "WanTransformer3DModel": "in_channels", "AutoencoderKLWan": "z_dim"}
# Tokenizer class prefix -> the sets of files it can be read from (any one set will do).
TOKENIZER_FILES = {"CLIPTokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
                   "BertTokenizer": (("vocab.txt",), ("tokenizer.json",)),
                   # MNN's tokenizer writer reads T5's Unigram model from tokenizer.json only.
                   "T5Tokenizer": (("tokenizer.json",),)}
TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.json",
                  "added_tokens.json")


def read_index(folder: Path) -> dict:
    """``folder``'s model_index.json, each entry a JSON object's [library, class] pair (or nulls)."""
    path = folder / "model_index.json"
    if not path.exists():
        raise InputError(f"{path}: not found; MODEL must be a diffusers pipeline folder")
    index = read_json_object(path)
    for name, entry in index.items():
        if name.startswith("_") or (name not in LOADED_ENTRIES and not isinstance(entry, list)):
            continue  # diffusers' own fields (_class_name) and flags (requires_safety_checker)
        pair = isinstance(entry, list) and len(entry) == 2
        if not (pair and (all(isinstance(v, str) and v for v in entry) or entry == [None, None])):
            raise InputError(f"{path}: {name!r} is {entry!r}, not a [library, class] pair; {FIX}")
    return index


def class_of(index: dict, family: Family, name: str) -> tuple[str, str]:
    """The (library, class) ``name`` is loaded as: its model_index.json entry, else the family's default."""
    entry = index.get(name)
    return tuple(entry) if entry and entry[0] else family.classes[name][0]


def check_pipeline(folder: Path, index: dict, family: Family, models: tuple[str, ...], confine: bool = True) -> None:
    """Refuse, before anything is loaded, a pipeline whose ``models`` (diffusers folders) or
    tokenizers export would misread; see the module doc. ``confine``: refuse links that leave ``folder``."""
    _check_classes(folder / "model_index.json", index, family)
    tokenizers = tuple(family.prompt_formats)
    if confine:
        root, inside = _link_root(folder)
        for name in (*models, *tokenizers):
            confined_tree(root, inside / name, LINK_FIX)
    for name in models:
        _check_config(folder / name / "config.json", class_of(index, family, name)[1], family)
    for name in tokenizers:
        _check_tokenizer(folder / name, class_of(index, family, name)[1])


def check_vae(folder: Path, family: Family) -> tuple[str, str]:
    """Refuse, before anything is loaded, a --vae folder export cannot put in a ``family`` pipeline:
    one that is not a diffusers VAE folder, of a class the family does not load, with links that
    leave it, or drawing other latent channels. The (library, class) to load it as."""
    if not folder.is_dir():
        raise InputError(f"--vae {folder}: not a folder; give a diffusers VAE folder (config.json and weights)")
    confined_tree(folder, Path(), LINK_FIX)
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: not found; --vae takes a diffusers VAE folder (config.json and weights)")
    config = read_json_object(path)
    cls = config.get("_class_name")
    allowed = family.classes["vae"]
    if ("diffusers", cls) not in allowed:
        names = " or ".join(c for _, c in allowed)
        raise InputError(f"{path}: a {cls or 'model with no _class_name'}, not a VAE sd2mnn loads for a "
                         f"{family.title or family.name} pipeline ({names})")
    key, latent = LATENT_CHANNELS[cls], family.recipe.latent_shape[1]
    if key in config and config[key] != latent:
        raise InputError(f"{path}: {key} {config[key]}; a {family.title or family.name} pipeline draws {latent} "
                         "latent channels: a VAE for another model family?")
    _check_config(path, cls, family)
    if not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
        raise InputError(f"{folder}: no weights (*.safetensors or *.bin); give a VAE saved with save_pretrained")
    return "diffusers", cls


def _link_root(folder: Path) -> tuple[Path, Path]:
    """(the folder a pipeline's links may lead into, the pipeline's place in it): the pipeline
    itself, or for a snapshot in Hugging Face's cache (REPO/snapshots/REVISION, whose files link
    to REPO/blobs/) its repository folder."""
    real = folder.resolve()
    if real.parent.name == "snapshots":
        return real.parent.parent, Path("snapshots", real.name)
    return folder, Path()


def _check_classes(path: Path, index: dict, family: Family) -> None:
    for name, allowed in family.classes.items():
        entry = index.get(name)
        if entry and entry[0] and tuple(entry) not in allowed:
            names = " or ".join(f"{library}.{cls}" for library, cls in allowed)
            raise InputError(f"{path}: {name} is {entry[0]}.{entry[1]}, which sd2mnn does not load for a "
                             f"{family.name} model (it loads {names}); set that class or use the model's own "
                             "model_index.json")


def _check_config(path: Path, class_name: str, family: Family) -> None:
    config = read_json_object(path)
    for key, kind in CONFIG_FIELDS[class_name].items():
        test, what = KINDS[kind.rstrip("?!")]
        if key not in config or (config[key] is None and kind.endswith("?")):
            if kind.endswith("!"):
                raise InputError(f"{path}: no {key}; it must be {what} ({FIX})")
            continue
        if not test(config[key]):
            raise InputError(f"{path}: {key} {config[key]!r} is not {what}; {FIX}")
    key = LATENT_CHANNELS.get(class_name)
    latent = family.recipe.latent_shape[1]
    if key in config and config[key] != latent:
        what = "text-to-video" if family.recipe.frames else "text-to-image"
        raise InputError(f"{path}: {key} {config[key]}; MNN's {family.name} runtime draws {what} with "
                         f"{latent} latent channels only (inpainting and other image-conditioned models take "
                         f"more): export a {what} model")


def _check_tokenizer(folder: Path, class_name: str) -> None:
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            read_json_object(folder / name, fix=f"restore {folder.name}/ from the model")
    sets = next((files for prefix, files in TOKENIZER_FILES.items() if class_name.startswith(prefix)), ())
    if sets and not any(all((folder / f).is_file() for f in files) for files in sets):
        needs = " or ".join(" and ".join(files) for files in sets)
        raise InputError(f"{folder}: no {class_name} files (it needs {needs}); copy the model's "
                         f"{folder.name}/ folder whole")
