"""Write MNN's pipeline tokenizer file ``tokenizer.mtok`` from a diffusers tokenizer folder.

The bytes equal what MNN's own flow writes (``export_diffusion_mtok`` in
transformers/diffusion/export/convert_mnn.py: transformers materializes ``tokenizer.json``, then
llmexport 0.0.5's ``LlmTokenizer.export_mtok`` writes the file), without torch or transformers:
the ``tokenizers`` library rebuilds what transformers 5 would save, and this module writes it.

File layout (little-endian; strings are u16 length + UTF-8 bytes):
    text   "430 4\\n"  "<n_special> <n_stop> <n_prefix>\\n"  "<ids separated by spaces>\\n"
    binary normalizer tree | pre-tokenizer tree | model (BPE, WordPiece or Unigram) |
           decoder tree | added tokens | u32 chat template | u16 eos | u8 flags | u16 bos
"""
from __future__ import annotations

import base64
import functools
import io
import json
import logging
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sd2mnn.errors import InputError
from sd2mnn.tokenization.codes import Decoder, Model, Normalizer, PreTokenizer
from sd2mnn.tokenization.diffusers_scheme import (bert_hugging_face_json, clip_end_of_word_json,
                                                  end_of_word_special_ids, uses_bert_scheme, uses_end_of_word_scheme)
from sd2mnn.tokenization.folder import read_json as _read_json
from sd2mnn.tokenization.folder import tokenizer_folder_files, tokenizer_kind
from sd2mnn.tokenization.reader import MTOK_NAME, PromptFormat, PromptTokenizer, read_mtok
from sd2mnn.tokenization.t5_scheme import t5_hugging_face_json, uses_t5_scheme

log = logging.getLogger(__name__)

MAGIC = 430
PIPELINE = 4  # MNN's Tokenizer::PIPELINE: the binary .mtok format

# transformers' order for all_special_tokens (SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The defaults of transformers 5's CLIPTokenizer / BertTokenizer __init__, used when the
# folder's config does not name a token.
CLASS_DEFAULTS = {
    "clip": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "bert": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
             "cls_token": "[CLS]", "mask_token": "[MASK]"},
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "generic": {},
}
# The texts the reference encodes to find stop and prefix tokens.
PROBES = ("<|eot_id|>", "<end_of_turn>", "<turn|>", "A")
# CLIP's pre-tokenizer split, as transformers' CLIPTokenizer builds it.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass
class TokenizerSource:
    """Everything the writer reads: the tokenizer.json content, the tokenizer_config fields,
    and the header's id lists (already in the order the reference writes them)."""

    tokenizer_json: dict
    chat_template: str
    eos_token: str
    bos_token: str
    clean_up_spaces: bool
    special_ids: list[int]
    stop_ids: list[int]
    prefix_ids: list[int]
    pad_id: int | None = None  # what Hugging Face pads with (not written: MNN's runtime pads with 0)
    kind: str = "generic"  # the folder's TokenizerKind name: 'clip', 'bert', 't5' or 'generic'


def write_mtok(tokenizer_dir: Path, out_path: Path, tokenizer_scheme: str = "diffusers") -> Path:
    """Write ``out_path`` (tokenizer.mtok) for the tokenizer in ``tokenizer_dir``.

    ``tokenizer_scheme="mnn"`` writes exactly what MNN's own flow writes; ``"diffusers"`` (for CLIP BPE
    tokenizers; others are written as MNN writes them) the end-of-word scheme of
    ``sd2mnn.tokenization.diffusers_scheme``, which with the rewritten text encoder conditions as diffusers does.
    For T5 (SD3.5's tokenizer_3/) ``"diffusers"`` writes ``sd2mnn.tokenization.t5_scheme``'s normalizer and
    split, which make the runtime's ids Hugging Face's with the text encoder unchanged.
    """
    src = load_tokenizer_source(Path(tokenizer_dir))
    tj = src.tokenizer_json
    if uses_t5_scheme(src.kind, tokenizer_scheme):
        tj = t5_hugging_face_json(tj, Path(tokenizer_dir) / "tokenizer.json")
    elif uses_end_of_word_scheme(tj, tokenizer_scheme):
        src.special_ids = end_of_word_special_ids(tj, src.special_ids)  # its text handles some
        tj = clip_end_of_word_json(tj)
    elif uses_bert_scheme(tj, tokenizer_scheme):
        tj = bert_hugging_face_json(tj)
    out_path = Path(out_path)
    json_path = Path(tokenizer_dir) / "tokenizer.json"
    # Built in memory: a tokenizer the format cannot hold fails before the file is touched.
    with io.BytesIO() as fp:
        ids = src.special_ids + src.stop_ids + src.prefix_ids
        header = (f"{MAGIC} {PIPELINE}\n"
                  f"{len(src.special_ids)} {len(src.stop_ids)} {len(src.prefix_ids)}\n"
                  + " ".join(str(i) for i in ids) + "\n")
        fp.write(header.encode("utf-8"))
        _write_normalizer(fp, tj.get("normalizer"))
        _write_pre_tokenizer(fp, tj.get("pre_tokenizer"))
        _write_model(fp, tj, json_path if json_path.is_file() else Path(tokenizer_dir))
        _write_decoder(fp, tj.get("decoder"))
        added = tj.get("added_tokens", [])
        fp.write(_u32(len(added)))
        for tok in added:
            fp.write(_u32(tok.get("id", -1)))
            fp.write(bytes([int(tok.get("special", False)), int(tok.get("lstrip", False)),
                            int(tok.get("rstrip", False))]))
            fp.write(_str(tok.get("content", "")))
        template = src.chat_template.encode("utf-8")
        fp.write(_u32(len(template)) + template)
        fp.write(_str(src.eos_token))
        fp.write(bytes([0x01 if src.clean_up_spaces else 0]))
        fp.write(_str(src.bos_token))
        out_path.write_bytes(fp.getvalue())
    return out_path


def folder_tokenizer(tokenizer_dir: Path, tokenizer_scheme: str, prompt_format: PromptFormat) -> PromptTokenizer:
    """The PromptTokenizer of the tokenizer.mtok a conversion with ``--tokenizer-scheme`` writes for
    ``tokenizer_dir`` (written to a temporary file and read back)."""
    with tempfile.TemporaryDirectory(prefix="sd2mnn-mtok-") as tmp:
        return PromptTokenizer(read_mtok(write_mtok(tokenizer_dir, Path(tmp) / MTOK_NAME, tokenizer_scheme)), prompt_format)


# ---------------------------------------------------------------------------------------------
# Reading the folder: what transformers + LlmTokenizer would hand to the writer
# ---------------------------------------------------------------------------------------------

def _content(value) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return None if value is None else str(value)


def load_tokenizer_source(tokenizer_dir: Path) -> TokenizerSource:
    from tokenizers import Tokenizer

    if not tokenizer_dir.is_dir():
        raise InputError(f"{tokenizer_dir}: no tokenizer folder; point at the pipeline's tokenizer/ folder")
    tokenizer_folder_files(tokenizer_dir)
    kind = tokenizer_kind(tokenizer_dir).name
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    map_path = tokenizer_dir / "special_tokens_map.json"
    token_map = _read_json(map_path) if map_path.is_file() else {}

    named = {}
    for attr in NAMED_SPECIALS:
        value = config[attr] if attr in config else token_map.get(attr, CLASS_DEFAULTS[kind].get(attr))
        named[attr] = value
    extras = config.get("additional_special_tokens") or config.get("extra_special_tokens") \
        or token_map.get("additional_special_tokens") or []

    json_path = tokenizer_dir / "tokenizer.json"
    if json_path.is_file():
        tj = _read_json(json_path)
        _check_charsmaps(tj.get("normalizer"), json_path)
        try:
            tok = Tokenizer.from_file(str(json_path))
            for probe in PROBES:  # what _stop_ids and _prefix_ids encode: panics surface here
                tok.encode(probe)
        except (Exception, BaseException) as err:  # a Rust panic is a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise InputError(f"{json_path}: the tokenizers library cannot load it ({err}); "
                             "re-save it with transformers or remove it") from err
        # The reference reads this folder's own tokenizer_config.json as it is.
        chat_template = config.get("chat_template") or ""
        eos = _content(config.get("eos_token")) or ""
        bos = _content(config.get("bos_token")) or ""
    else:
        tok = _build_backend(tokenizer_dir, kind, config, named, extras)
        tj = json.loads(tok.to_str())
        # save_pretrained rewrites tokenizer_config.json: bos/eos become plain strings and a
        # chat template moves out to chat_template.jinja, where the writer does not look.
        chat_template = ""
        eos = _content(named["eos_token"]) or ""
        bos = _content(named["bos_token"]) or ""
    _check_dense_ids(tj, json_path if json_path.is_file() else
                     tokenizer_dir / ("vocab.txt" if kind == "bert" else "vocab.json"))
    if not isinstance(chat_template, str):
        chat_template = ""  # a list of named templates: the reference would fail; keep none

    def to_id(token):
        # transformers' convert_tokens_to_ids: a token outside the vocabulary maps to unk.
        if token is None:
            return None
        found = tok.token_to_id(token)
        if found is None and _content(named["unk_token"]) is not None:
            return tok.token_to_id(_content(named["unk_token"]))
        return found

    all_special = []
    for value in [named[a] for a in NAMED_SPECIALS] + list(extras):
        text = _content(value)
        if text is not None and text not in all_special:
            all_special.append(text)
    special_ids = list(set(to_id(t) for t in all_special))  # list(set()) as the reference
    for added in tj.get("added_tokens", []):
        if added.get("special", False) and added.get("id", -1) not in special_ids:
            special_ids.append(added["id"])
    special_ids = [i for i in special_ids if i is not None]

    def decode(token_id: int) -> str:
        text = tok.decode([token_id], skip_special_tokens=False)
        return text.replace("</w>", " ").strip() if kind == "clip" else text

    return TokenizerSource(
        tokenizer_json=tj, chat_template=chat_template, eos_token=eos, bos_token=bos,
        clean_up_spaces=config.get("clean_up_tokenization_spaces", False) is True,
        special_ids=special_ids, stop_ids=_stop_ids(tok, to_id(_content(named["eos_token"]))),
        prefix_ids=_prefix_ids(tok, decode), pad_id=to_id(_content(named["pad_token"])), kind=kind)


def _check_charsmaps(norm, source: Path) -> None:
    """A Precompiled charsmap the tokenizers library can parse (it panics on one it cannot): a
    u32 trie size, the trie (whole u32 units), then the normalized strings."""
    if not isinstance(norm, dict):
        return
    if norm.get("type") == "Precompiled":
        try:
            data = base64.b64decode(norm.get("precompiled_charsmap") or "", validate=True)
        except (ValueError, TypeError):
            data = b""
        size = struct.unpack_from("<I", data)[0] if len(data) >= 4 else -1
        if not (0 <= size <= len(data) - 4 and size % 4 == 0) and data != b"":
            raise InputError(f"{source}: the Precompiled normalizer's charsmap is damaged; "
                             "restore the tokenizer folder from the model")
    for child in norm.get("normalizers") or []:
        _check_charsmaps(child, source)


def _check_dense_ids(tj: dict, source: Path) -> None:
    """MNN's loader puts token i in slot i of an array of len(vocab) entries: an id outside
    0..len-1 writes past its end (a heap overflow when the device loads the bundle)."""
    vocab = tj.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        return  # Unigram: a list, dense by construction
    bad = [i for i in vocab.values() if not 0 <= i < len(vocab)]
    if bad:
        raise InputError(f"{source}: token ids must be 0..{len(vocab) - 1} for MNN's runtime but {len(bad)} "
                         f"are not (e.g. {max(bad)}); fill the unused ids with placeholder tokens")


def _stop_ids(tok, eos_id: int | None) -> list[int]:
    """LlmTokenizer's stop ids: eos, plus chat end-of-turn tokens when the vocabulary has them."""
    stop = [eos_id]
    try:
        ids = tok.encode("<|eot_id|>").ids
        if len(ids) == 1:
            stop.append(ids[0])
        ids = tok.encode("<end_of_turn>").ids
        if len(ids) == 2 and ids[0] == 2:
            stop.append(ids[1])
    except Exception:  # noqa: BLE001 - the reference ignores any failure here too
        pass
    try:
        ids = tok.encode("<turn|>", add_special_tokens=False).ids
        if len(ids) == 1 and ids[0] not in stop:
            stop.append(ids[0])
    except Exception:  # noqa: BLE001
        pass
    return list(set(i for i in stop if i is not None))


def _prefix_ids(tok, decode) -> list[int]:
    """Tokens the post-processor puts before the text (a BOS without an EOS)."""
    try:
        ids = tok.encode("A").ids
        if len(ids) > 1 and decode(ids[-1]) == "A":
            return ids[:-1]
    except Exception:  # noqa: BLE001
        pass
    return []


def _build_backend(tokenizer_dir: Path, kind: str, config: dict, named: dict, extras: list):
    """The tokenizers pipeline transformers 5's CLIPTokenizer / BertTokenizer builds from the
    vocabulary files (what save_pretrained would then write to tokenizer.json)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, WordPiece

    def need(name: str) -> str:
        path = tokenizer_dir / name
        if not path.is_file():
            raise InputError(f"{path}: missing; a {kind.upper()} tokenizer folder without tokenizer.json "
                             f"needs it (copy the model's tokenizer/ folder whole)")
        return str(path)

    def load(make, files):
        try:
            return make()
        except Exception as err:
            raise InputError(f"{tokenizer_dir}: the tokenizers library cannot read {files} ({err}); "
                             "restore them from the model") from err

    if kind == "clip":
        vocab, merges = need("vocab.json"), need("merges.txt")
        tok = Tokenizer(load(lambda: BPE.from_file(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
            unk_token=_content(named["unk_token"])), "vocab.json/merges.txt"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "bert":
        vocab = need("vocab.txt")
        tok = Tokenizer(load(lambda: WordPiece.from_file(vocab, unk_token=_content(named["unk_token"])),
                             "vocab.txt"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
            strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    else:
        raise InputError(f"{tokenizer_dir / 'tokenizer.json'}: missing; add the model's tokenizer.json")

    # transformers adds the config's added tokens, then every named and extra special token.
    new = []
    for token_id, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        new.append(_added_token(AddedToken, spec, special=bool(spec.get("special", False))))
    for value in [named[a] for a in NAMED_SPECIALS] + list(extras):
        if _content(value) is not None and all(str(t) != _content(value) for t in new):
            new.append(_added_token(AddedToken, value, special=True))
    tok.add_special_tokens(new)

    def token_id(attr):
        return tok.token_to_id(_content(named[attr]) or "")

    if kind == "clip":
        eos, bos = _content(named["eos_token"]), _content(named["bos_token"])
        tok.post_processor = processors.RobertaProcessing(
            (eos, token_id("eos_token")), (bos, token_id("bos_token")), trim_offsets=False, add_prefix_space=False)
    else:
        cls, sep = _content(named["cls_token"]), _content(named["sep_token"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, token_id("cls_token")), (sep, token_id("sep_token"))])
    return tok


def _added_token(added_token_cls, value, special: bool):
    if isinstance(value, dict):
        return added_token_cls(value["content"], single_word=value.get("single_word", False),
                               lstrip=value.get("lstrip", False), rstrip=value.get("rstrip", False),
                               normalized=value.get("normalized", not special), special=special)
    return added_token_cls(str(value), special=special, normalized=not special)


# ---------------------------------------------------------------------------------------------
# Binary sections (the type codes are MNN's PipelineTokenizer::load_vocab_binary)
# ---------------------------------------------------------------------------------------------

def _u8(v: int) -> bytes:
    return struct.pack("<B", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _str(s: str | bytes) -> bytes:
    data = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<H", len(data)) + data


def _pattern(spec: dict, keys: tuple[str, ...]) -> str:
    """A pattern field: a plain string, or {"String": ...} / {"Regex": ...} (only ``keys`` taken:
    the reference drops Regex patterns of Replace, so CLIP's whitespace collapse is lost)."""
    pattern = spec.get("pattern")
    if isinstance(pattern, str):
        return pattern
    if isinstance(pattern, dict):
        for key in keys:
            if key in pattern:
                return pattern[key]
    return ""


@functools.lru_cache(maxsize=None)
def _norm_table(form: str) -> bytes:
    """Every code point that ``form`` changes, as u32 count + (u32 cp, str) entries."""
    entries = []
    for cp in range(0x110000):
        ch = chr(cp)
        normalized = unicodedata.normalize(form, ch)
        if normalized != ch:
            entries.append(_u32(cp) + _str(normalized))
    return _u32(len(entries)) + b"".join(entries)


def _write_normalizer(fp: BinaryIO, norm: dict | None) -> None:
    kind = (norm or {}).get("type", "")
    if norm is None:
        fp.write(_u8(Normalizer.NONE))
    elif kind in ("NFKC", "Precompiled", "NFKD"):
        fp.write(_u8(Normalizer.NFKC) + _norm_table("NFKC"))
    elif kind == "NFC":
        fp.write(_u8(Normalizer.NFKC) + _norm_table("NFC"))
    elif kind == "CodepointMap":  # sd2mnn's own: a per-code-point table, as MNN reads NFKC's
        mapping = sorted((int(cp), text) for cp, text in norm["map"].items())
        fp.write(_u8(Normalizer.NFKC) + _u32(len(mapping)) + b"".join(_u32(cp) + _str(text) for cp, text in mapping))
    elif kind == "Prepend":
        fp.write(_u8(Normalizer.PREPEND) + _str(norm.get("prepend", "")))
    elif kind == "Replace":
        fp.write(_u8(Normalizer.REPLACE) + _str(_pattern(norm, ("String",))) + _str(norm.get("content", "")))
    elif kind == "Sequence":
        children = norm.get("normalizers", [])
        fp.write(_u8(Normalizer.SEQUENCE) + _u32(len(children)))
        for child in children:
            _write_normalizer(fp, child)
    elif kind == "BertNormalizer":
        lowercase = norm.get("lowercase", True)
        strip = norm.get("strip_accents", False)
        if strip is None and lowercase:  # HF: strip_accents unset follows lowercase
            strip = True
        strip = int(strip or False)
        flags = bytes([int(norm.get("clean_text", True)), int(norm.get("handle_chinese_chars", True)),
                       strip, int(lowercase)])
        fp.write(_u8(Normalizer.BERT_WITH_NFD if strip else Normalizer.BERT) + flags + (_norm_table("NFD") if strip else b""))
    elif kind == "Lowercase":
        fp.write(_u8(Normalizer.BERT) + bytes([0, 0, 0, 1]))
    elif kind == "StripAccents":
        fp.write(_u8(Normalizer.BERT_WITH_NFD) + bytes([0, 0, 1, 0]) + _norm_table("NFD"))
    elif kind == "Strip":
        fp.write(_u8(Normalizer.STRIP) + bytes([int(norm.get("strip_left", True)), int(norm.get("strip_right", True))]))
    else:
        log.warning("tokenizer.mtok: normalizer %r is not supported by MNN; written as none", kind)
        fp.write(_u8(Normalizer.NONE))


def _write_pre_tokenizer(fp: BinaryIO, pre: dict | None) -> None:
    kind = (pre or {}).get("type", "")
    if pre is None:
        fp.write(_u8(PreTokenizer.NONE))
    elif kind == "ByteLevel":
        fp.write(_u8(PreTokenizer.BYTE_LEVEL) + _u8(int(pre.get("use_regex", True))))
    elif kind == "Digits":
        fp.write(_u8(PreTokenizer.DIGITS) + _u8(int(pre.get("individual_digits", False))))
    elif kind == "Metaspace":
        replacement = pre.get("str_rep") or pre.get("replacement", "\u2581")
        fp.write(_u8(PreTokenizer.METASPACE) + _str(replacement) + _u8(int(pre.get("add_prefix_space", True))))
    elif kind == "Split":
        behavior = {"Isolated": 0, "MergedWithPrevious": 2}.get(pre.get("behavior", "Isolated"), 1)
        fp.write(_u8(PreTokenizer.SPLIT) + _str(_pattern(pre, ("Regex", "String")))
                 + bytes([int(pre.get("invert", False)), behavior]))
    elif kind == "BertPreTokenizer":
        fp.write(_u8(PreTokenizer.BERT))
    elif kind == "Sequence":
        children = pre.get("pretokenizers", [])
        fp.write(_u8(PreTokenizer.SEQUENCE) + _u32(len(children)))
        for child in children:
            _write_pre_tokenizer(fp, child)
    elif kind == "WhitespaceSplit":  # as a Split on \s+, behavior Removed
        fp.write(_u8(PreTokenizer.SPLIT) + _str("\\s+") + bytes([0, 1]))
    else:
        log.warning("tokenizer.mtok: pre-tokenizer %r is not supported by MNN; written as none", kind)
        fp.write(_u8(PreTokenizer.NONE))


def _write_model(fp: BinaryIO, tj: dict, source: Path) -> None:
    model = tj.get("model", {})
    kind = model.get("type", "")
    if not kind:  # old tokenizer.json files omit the type
        if "continuing_subword_prefix" in model and "merges" not in model:
            kind = "WordPiece"
        elif isinstance(model.get("vocab"), list):
            kind = "Unigram"
        else:
            kind = "BPE"
    vocab = model.get("vocab", {})
    if kind == "BPE":
        merges = model.get("merges", [])
        # Byte-level BPE whose ByteLevel step lives only in the decoder: the C++ maps bytes itself.
        pre, dec = tj.get("pre_tokenizer") or {}, tj.get("decoder") or {}
        byte_level = int(pre.get("type") == "Sequence" and not _has_byte_level(pre.get("pretokenizers", []))
                         and (dec.get("type") == "ByteLevel"
                              or dec.get("type") == "Sequence" and _has_byte_level(dec.get("decoders", []))))
        fp.write(_u8(Model.BPE) + _u32(len(vocab)) + bytes([int(model.get("byte_fallback", False)), byte_level])
                 + _u32(len(merges)))
        _write_sorted_vocab(fp, vocab)
        # (id1, id2, rank) sorted by (id1 << 32 | id2): the C++ binary-searches this.
        pairs = []
        for rank, merge in enumerate(merges):
            parts = merge.split(" ", 1) if isinstance(merge, str) else list(merge[:2])
            if len(parts) != 2:
                continue
            if parts[0] not in vocab or parts[1] not in vocab:
                raise InputError(f"{source}: merge {' '.join(parts)!r} (rank {rank}) uses a token missing from the "
                                 "vocabulary; the tokenizer's merges and vocab do not match")
            pairs.append((vocab[parts[0]], vocab[parts[1]], rank))
        pairs.sort(key=lambda p: (p[0] << 32) | p[1])
        fp.write(b"".join(struct.pack("<III", *p) for p in pairs))
    elif kind == "WordPiece":
        max_chars = model.get("max_input_chars_per_word", 100)
        fp.write(_u8(Model.WORDPIECE) + _u32(len(vocab)) + _str(model.get("unk_token", "[UNK]"))
                 + _str(model.get("continuing_subword_prefix", "##"))
                 + _u32(model.get("max_input_bytes_per_word", max_chars)))
        _write_sorted_vocab(fp, vocab)
    elif kind == "Unigram":
        entries = sorted((item[0], i, item[1]) for i, item in enumerate(vocab)
                         if isinstance(item, list) and len(item) >= 2)
        fp.write(_u8(Model.UNIGRAM) + _u32(len(entries)) + _u32(model.get("unk_id", 0))
                 + _u8(int(model.get("byte_fallback", False))))
        for token, token_id, score in entries:
            fp.write(_str(token) + _u32(token_id) + struct.pack("<d", score))
    else:
        raise InputError(f"{source}: tokenizer model {kind!r} cannot be written to tokenizer.mtok "
                         "(MNN reads BPE, WordPiece and Unigram); use a tokenizer of one of those")


def _has_byte_level(steps: list) -> bool:
    return any(step.get("type") == "ByteLevel" for step in steps)


def _write_sorted_vocab(fp: BinaryIO, vocab: dict) -> None:
    # Sorted by token (code point order = UTF-8 byte order) for the C++ binary search.
    fp.write(b"".join(_str(token) + _u32(token_id) for token, token_id in sorted(vocab.items())))


def _write_decoder(fp: BinaryIO, dec: dict | None) -> None:
    kind = (dec or {}).get("type", "")
    if dec is None or kind == "ByteLevel":
        fp.write(_u8(Decoder.BYTE_LEVEL))  # the C++ reads 0 as ByteLevel (also when there is no decoder)
    elif kind == "ByteFallback":
        fp.write(_u8(Decoder.BYTE_FALLBACK))
    elif kind == "Metaspace":
        fp.write(_u8(Decoder.METASPACE) + _str(dec.get("replacement", "\u2581")) + _u8(int(dec.get("add_prefix_space", True))))
    elif kind == "WordPiece":
        fp.write(_u8(Decoder.WORDPIECE) + _str(dec.get("prefix", "##")) + _u8(int(dec.get("cleanup", True))))
    elif kind == "Fuse":
        fp.write(_u8(Decoder.FUSE))
    elif kind == "Replace":
        fp.write(_u8(Decoder.REPLACE) + _str(_pattern(dec, ("String",))) + _str(dec.get("content", "")))
    elif kind == "Strip":
        fp.write(_u8(Decoder.STRIP) + _str(dec.get("content", "")) + struct.pack("<II", dec.get("start", 0), dec.get("stop", 0)))
    elif kind == "Sequence":
        children = dec.get("decoders", [])
        fp.write(_u8(Decoder.SEQUENCE) + _u32(len(children)))
        for child in children:
            _write_decoder(fp, child)
    else:
        fp.write(_u8(Decoder.BYTE_LEVEL))
