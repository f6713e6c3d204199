"""tokenizer.mtok: byte-equal to MNN's own flow (transformers save_pretrained + llmexport 0.0.5).

The tiny tokenizer builders here are also used by test_tokenizer.py.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from sd2mnn.errors import InputError
from sd2mnn.tokenization.writer import write_mtok

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "src/sd2mnn/data/demo_pipeline/tokenizer"


# ---------------------------------------------------------------------------------------------
# Tiny tokenizers in the layouts diffusers ships
# ---------------------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """CLIP's byte -> unicode map, in CLIP's vocabulary order (printable bytes first)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def _word_merges(word: str, end_of_word: bool) -> list[tuple[str, str]]:
    """The merges that build ``word`` left to right (with "</w>" on its last symbol or not)."""
    parts = list(word)
    if end_of_word:
        parts[-1] += "</w>"
    merges, current = [], parts[0]
    for part in parts[1:]:
        merges.append((current, part))
        current += part
    return merges


def build_tiny_clip(folder: Path) -> Path:
    """SD1.5's tokenizer layout (vocab.json, merges.txt, configs, no tokenizer.json) with a
    byte-level BPE of a few dozen merges. Ids are dense up to "<|startoftext|>" = 49406 and
    "<|endoftext|>" = 49407 like SD1.5's: MNN's loader indexes tokens by id."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in ["a", "photo", "of", "the", "cat", "dog", "an", "astronaut", "riding", "horse", "on",
                 "mars", "painting", "hello", "world"]:
        merges += [m for m in _word_merges(word, True) if m not in merges]
    for word in ["photo", "cat", "dog", "ing", "horse"]:  # inner-word merges, without "</w>"
        merges += [m for m in _word_merges(word, False) if m not in merges]
    vocab += ["".join(m) for m in merges]
    vocab += [f"<|unused{i}|>" for i in range(len(vocab), 49406)]  # unreachable fillers
    ids = {token: i for i, token in enumerate(vocab)}
    ids.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (folder / "vocab.json").write_text(json.dumps(ids), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    specials = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
                "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer",
              **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v) for k, v in specials.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


BERT_WORDS = ["the", "cat", "dog", "photo", "##graph", "paint", "##ing", "astronaut", "horse", "cafe", "，", "。"]
BERT_CHARS = "一个宇航员骑马的照片猫狗画油飞流直下三千尺中国山水"


def build_tiny_bert(folder: Path) -> Path:
    """Taiyi's tokenizer layout: BertTokenizer over vocab.txt, [CLS]/[SEP] = 101/102."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list("!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~") + list("abcdefghijklmnopqrstuvwxyz")
    tokens += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + BERT_WORDS + list(BERT_CHARS)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    specials = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                "unk_token": "[UNK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    config = {**specials, "do_basic_tokenize": True, "do_lower_case": True, "model_max_length": 512,
              "never_split": None, "strip_accents": None, "tokenize_chinese_chars": True,
              "tokenizer_class": "BertTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# MNN's reference flow: convert_mnn.py's export_diffusion_mtok, on a copy of the folder
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def reference_mtok(tmp_path_factory):
    """folder -> the bytes MNN's flow writes for it (its tokenizer.json materialized in a copy)."""
    spec = importlib.util.find_spec("llmexport")
    if spec is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("the reference needs llmexport and transformers (pip install -e .[test])")
    # llmexport's top-level import is broken; its tokenizer module imports as utils.tokenizer.
    folder = list(spec.submodule_search_locations)[0]
    sys.path.insert(0, folder)
    try:
        from transformers import AutoTokenizer
        from utils.tokenizer import LlmTokenizer
    finally:
        sys.path.remove(folder)

    def model_type(folder: Path, tokenizer) -> str:
        for name in ("config.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                found = json.loads((folder / name).read_text(encoding="utf-8")).get("model_type")
                if found:
                    return found
        cls = type(tokenizer).__name__.lower()
        return "bert" if "bert" in cls else "t5" if "t5" in cls else "clip"

    def run(folder: Path) -> bytes:
        work = tmp_path_factory.mktemp("reference") / "tok"
        shutil.copytree(folder, work)
        tokenizer = None
        for use_fast in (False, True):
            try:
                tokenizer = AutoTokenizer.from_pretrained(work.as_posix(), trust_remote_code=True, use_fast=use_fast)
                break
            except Exception:  # noqa: BLE001 - the reference tries both
                pass
        assert tokenizer is not None, f"transformers cannot load {folder}"
        if not (work / "tokenizer.json").exists():
            tokenizer.save_pretrained(work.as_posix())
        kind = model_type(work, tokenizer)
        out = LlmTokenizer(work.as_posix(), kind).export(work.as_posix(), model_path=work.as_posix(), model_type=kind)
        assert out.endswith("tokenizer.mtok"), out
        return Path(out).read_bytes()

    return run


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "tokenizer")


def _with_tokenizer_json(folder: Path, target: Path) -> Path:
    """``folder`` plus the tokenizer.json transformers saves for it (configs left as they are)."""
    from transformers import AutoTokenizer

    shutil.copytree(folder, target)
    saved = target.parent / "saved"
    AutoTokenizer.from_pretrained(folder.as_posix()).save_pretrained(saved.as_posix())
    shutil.copy(saved / "tokenizer.json", target / "tokenizer.json")
    return target


def _assert_same(ours: Path, reference: bytes) -> None:
    data = ours.read_bytes()
    if data != reference:
        at = next((i for i, (a, b) in enumerate(zip(data, reference)) if a != b), min(len(data), len(reference)))
        pytest.fail(f"tokenizer.mtok differs from MNN's at byte {at} (ours {len(data)} bytes, MNN's "
                    f"{len(reference)}): {data[at:at + 24]!r} vs {reference[at:at + 24]!r}")


def test_clip_folder_without_tokenizer_json(tiny_clip, reference_mtok, tmp_path):
    assert not (tiny_clip / "tokenizer.json").exists()
    _assert_same(write_mtok(tiny_clip, tmp_path / "tokenizer.mtok", "mnn"), reference_mtok(tiny_clip))


def test_clip_folder_with_tokenizer_json(tiny_clip, reference_mtok, tmp_path):
    folder = _with_tokenizer_json(tiny_clip, tmp_path / "tok")
    _assert_same(write_mtok(folder, tmp_path / "tokenizer.mtok", "mnn"), reference_mtok(folder))


def test_bert_folder(tiny_bert, reference_mtok, tmp_path):
    _assert_same(write_mtok(tiny_bert, tmp_path / "tokenizer.mtok", "mnn"), reference_mtok(tiny_bert))


def test_bert_folder_with_tokenizer_json(tiny_bert, reference_mtok, tmp_path):
    folder = _with_tokenizer_json(tiny_bert, tmp_path / "tok")
    _assert_same(write_mtok(folder, tmp_path / "tokenizer.mtok", "mnn"), reference_mtok(folder))


def test_config_fields_and_extra_special_tokens(tiny_clip, reference_mtok, tmp_path):
    """clean_up_tokenization_spaces, a chat template (save_pretrained moves it out of the config,
    so the reference writes none) and a special token outside the vocabulary."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_clip, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(clean_up_tokenization_spaces=True, chat_template="{{ messages }}",
                  additional_special_tokens=["<|im_end|>"])
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    _assert_same(write_mtok(folder, tmp_path / "tokenizer.mtok", "mnn"), reference_mtok(folder))


@pytest.mark.skipif(not DEMO_TOKENIZER.is_dir(), reason="the demo pipeline has no tokenizer yet")
def test_demo_pipeline_tokenizer(reference_mtok, tmp_path):
    _assert_same(write_mtok(DEMO_TOKENIZER, tmp_path / "tokenizer.mtok", "mnn"), reference_mtok(DEMO_TOKENIZER))


# ---------------------------------------------------------------------------------------------
# Folders that cannot be handled
# ---------------------------------------------------------------------------------------------

def test_missing_vocab_names_the_file(tiny_clip, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_clip, folder)
    (folder / "merges.txt").unlink()
    with pytest.raises(InputError, match=r"merges\.txt: missing"):
        write_mtok(folder, tmp_path / "tokenizer.mtok", "mnn")


def test_unknown_tokenizer_class(tiny_clip, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_clip, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "T5Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(InputError, match=r"tokenizer_config\.json: tokenizer_class 'T5Tokenizer'"):
        write_mtok(folder, tmp_path / "tokenizer.mtok", "mnn")


def test_sparse_ids_are_refused(tiny_clip, tmp_path):
    """MNN's loader stores token i in slot i of a len(vocab) array: a sparse vocabulary (ids up
    to 49407 in a few hundred tokens) overflows it when the device loads the bundle."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_clip, folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in vocab.items() if not t.startswith("<|unused")}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(InputError, match="fill the unused ids"):
        write_mtok(folder, tmp_path / "tokenizer.mtok", "mnn")


def test_not_a_folder(tmp_path):
    with pytest.raises(InputError, match="no tokenizer folder"):
        write_mtok(tmp_path / "absent", tmp_path / "tokenizer.mtok", "mnn")
