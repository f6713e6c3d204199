"""A small T5 tokenizer folder in the layout of SD3's tokenizer_3/ (T5TokenizerFast), built offline.

T5's tokenizer is a SentencePiece Unigram model (spiece.model) and its Hugging Face conversion
(tokenizer.json). Here SentencePiece trains a Unigram model the way T5's was made (nmt_nfkc
normalization, <pad>=0, </s>=1, <unk>=2, no BOS, no byte fallback) on the prompt corpus, with a fixed
vocabulary size, single-threaded and seeded so the same bytes come out every time. tokenizer.json is
built from that model as transformers' T5 conversion builds it: the precompiled NFKC charsmap and a
collapse of repeated spaces, a Metaspace pre-tokenizer (replacement "▁", prepended always), the
Unigram vocabulary with its scores then <extra_id_99>..<extra_id_0>, and "$A </s>" as the template.

``write_umt5_tokenizer`` builds the one Wan's tests use, umT5-like: the same settings plus
SentencePiece's byte fallback (umT5's vocabulary has it: 256 "<0xXX>" pieces for characters no piece
covers), trained not on the prompts it is checked with but on other text (``umt5_corpus``):
Python's own docstrings, and the same sentences respelled in other scripts so that the vocabulary
holds non-ASCII pieces, as a multilingual one does.
"""
from __future__ import annotations

import importlib
import io
import json
import random
import zlib
from pathlib import Path

PROMPTS = Path(__file__).parents[1] / "src" / "sd2mnn" / "data" / "prompts.txt"
VOCAB_SIZE = 1000
EXTRA_IDS = 100
SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


UMT5_VOCAB_SIZE = 2000
# Modules whose docstrings are the umT5-like tokenizer's training text (none of them is a prompt).
DOC_MODULES = ("argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email",
               "fractions", "functools", "http.client", "inspect", "itertools", "json", "logging", "pathlib",
               "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
               "tarfile", "textwrap", "threading", "unittest", "urllib.parse", "uuid", "xml.etree.ElementTree",
               "zipfile")
ACCENTED = dict(zip("aeiounc", "áéíóúñç"))
CYRILLIC = dict(zip("abvgdezijklmnoprstufhc", "абвгдезийклмнопрстуфхц"))
GREEK = dict(zip("abgdezhiklmnoprstufxy", "αβγδεζηικλμνοπρστυφχψ"))


def _glyphs(word: str, first: int, count: int) -> str:
    """``word`` spelled in ``count`` code points from ``first``, one per 3 letters (CJK, kana)."""
    return "".join(chr(first + zlib.crc32(f"{word}{k}".encode()) % count) for k in range(max(1, len(word) // 3)))


def umt5_corpus() -> list[str]:
    """Python's docstrings, one paragraph per line, and a third of them respelled (seeded) with
    accents, in Cyrillic, Greek, CJK ideographs or kana."""
    lines, seen = [], set()
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in (module, *vars(module).values()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and doc not in seen:
                seen.add(doc)
                lines += [text for text in (" ".join(p.split()) for p in doc.split("\n\n")) if len(text) > 20]
    rng = random.Random(0)
    respelled = []
    for i, text in enumerate(rng.sample(lines, len(lines) // 3)):
        kind = i % 5
        if kind == 0:
            respelled.append("".join(ACCENTED.get(c, c) if rng.random() < 0.3 else c for c in text))
        elif kind in (1, 2):
            letters = CYRILLIC if kind == 1 else GREEK
            respelled.append("".join(letters.get(c, c) for c in text.lower()))
        elif kind == 3:
            respelled.append("".join(_glyphs(w, 0x4E00, 400) for w in text.split()))
        else:
            respelled.append(" ".join(_glyphs(w, 0x3041, 86) for w in text.split()))
    return lines + respelled


def train_spiece(vocab_size: int = VOCAB_SIZE, corpus: Path | list[str] = PROMPTS, byte_fallback: bool = False) -> bytes:
    """A serialized SentencePiece Unigram model (spiece.model) trained on ``corpus`` (a file, or lines)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    source = dict(input=str(corpus)) if isinstance(corpus, Path) else dict(sentence_iterator=iter(corpus))
    spm.SentencePieceTrainer.train(
        **source, model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
        character_coverage=1.0, num_threads=1, minloglevel=2, byte_fallback=byte_fallback)
    return buf.getvalue()


def _tokenizer_json(model: bytes, legacy_pre_tokenizer: bool) -> str:
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, decoders, processors
    from tokenizers.models import Unigram

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    vocab = [(p.piece, p.score) for p in proto.pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if legacy_pre_tokenizer:
        # The first conversions of T5 (t5-base's tokenizer.json): charsmap only, whitespace split.
        tok.normalizer = normalizers.Precompiled(charsmap)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap),
                                               normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(EXTRA_IDS - 1, -1, -1)]
    tok.add_special_tokens(specials)
    return tok.to_str(pretty=True)


def write_t5_tokenizer(folder: Path, vocab_size: int = VOCAB_SIZE, with_spiece: bool = True,
                       legacy_pre_tokenizer: bool = False, corpus: Path | list[str] = PROMPTS,
                       byte_fallback: bool = False) -> Path:
    """Write a T5TokenizerFast folder (tokenizer.json, the configs, spiece.model unless
    ``with_spiece`` is false) into ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = train_spiece(vocab_size, corpus, byte_fallback)
    (folder / "tokenizer.json").write_text(_tokenizer_json(model, legacy_pre_tokenizer), encoding="utf-8")
    if with_spiece:
        (folder / "spiece.model").write_bytes(model)
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special_map = {**SPECIALS, "additional_special_tokens": extra}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    config = {**SPECIALS, "additional_special_tokens": extra, "extra_ids": EXTRA_IDS, "legacy": True,
              "add_prefix_space": True, "clean_up_tokenization_spaces": True, "model_max_length": 512,
              "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def write_umt5_tokenizer(folder: Path) -> Path:
    """The umT5-like T5TokenizerFast folder (byte fallback, trained on ``umt5_corpus``)."""
    return write_t5_tokenizer(folder, UMT5_VOCAB_SIZE, corpus=umt5_corpus(), byte_fallback=True)
