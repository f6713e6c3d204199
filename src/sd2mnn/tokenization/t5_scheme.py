"""T5's tokenizer.json rewritten so MNN's pipeline tokenizer encodes as Hugging Face's T5TokenizerFast.

transformers' T5 tokenizer (what diffusers' SD3 pipeline runs for tokenizer_3/) normalizes with
SentencePiece's precompiled charsmap, splits on whitespace, prefixes each word with "▁" and runs
the Unigram model on each word. MNN's writer turns the same tokenizer.json into a .mtok that
encodes differently:
  * the charsmap becomes Python's NFKC table, and MNN's table normalizer turns its own list of
    control and format characters into spaces before the lookup (the charsmap deletes C0
    controls, keeps ZWJ, maps "▁" and U+FFFD to spaces, ...);
  * the " {2,}" Regex Replace is dropped and the Metaspace step neither splits nor drops
    spaces, so doubled, leading and trailing spaces become extra "▁" tokens.
Here the normalizer is the charsmap itself as literal Replace steps (its multi-character keys
first, then one step per changed code point; MNN runs Replace steps without its control rule),
and the pre-tokenizer splits on whitespace before the Metaspace step, as transformers does.
A Unigram model with byte fallback (umT5's, Wan's tokenizer) gets a third fix: MNN's Viterbi
offers a byte piece ("<0xE2>") for any single byte no piece spells, at the piece's own score,
0 as SentencePiece writes it, above every real piece's; so the runtime spells "▁cat" as the
bytes of "▁" then "cat", and every non-ASCII letter as bytes. Hugging Face falls back to bytes
only for a character no piece covers, scored as its unknown token (the lowest score less 10).
The byte pieces get that score here, which leaves them to the characters no piece covers.
What no .mtok can express is left: Hugging Face breaks a Viterbi tie between equal-scoring
segmentations in favour of the longer last piece, MNN the shorter ("!!!": "!", "!!" vs
"!!", "!"); and the charsmap works per grapheme (a short grapheme that starts with a changed
character is replaced by that character's mapping alone).
"""
from __future__ import annotations

import base64
import copy
import functools
import unicodedata
from pathlib import Path

from sd2mnn.errors import InputError

# Rust's char::is_whitespace (Unicode White_Space), which WhitespaceSplit splits on, beyond
# what MNN's "\s" matches (ASCII whitespace and the Zs category).
EXTRA_WHITESPACE = ("\x85", "\u2028", "\u2029")


def uses_t5_scheme(kind: str, tokenizer_scheme: str) -> bool:
    """Whether ``tokenizer_scheme`` rewrites a tokenizer of this kind (sd2mnn.tokenization.folder): T5's under
    the "diffusers" scheme."""
    return tokenizer_scheme == "diffusers" and kind == "t5"


def t5_hugging_face_json(tokenizer_json: dict, source: Path = Path("tokenizer.json")) -> dict:
    """A copy of ``tokenizer_json`` (read from ``source``, named in errors) whose .mtok encodes
    as transformers' T5 tokenizer does."""
    tj = copy.deepcopy(tokenizer_json)
    kind = (tj.get("model") or {}).get("type", "Unigram")
    if kind != "Unigram":
        raise InputError(f"{source}: a T5 tokenizer holds a Unigram model, this one a {kind} model; "
                         "restore the model's tokenizer_3/ folder")
    try:
        steps = [{"type": "Replace", "pattern": {"String": key}, "content": value}
                 for key, value in charsmap_steps(_find_charsmap(tj.get("normalizer")))]
    except ValueError as err:
        raise InputError(f"{source}: {err}; restore the model's tokenizer_3/ folder") from err
    tj["normalizer"] = {"type": "Sequence", "normalizers": steps}
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"},
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}]}
    if tj["model"].get("byte_fallback"):
        _score_bytes_as_unknown(tj["model"]["vocab"])
    return tj


UNKNOWN_PENALTY = 10.0  # tokenizers' Unigram: an unknown character scores the lowest score less this
BYTE_PIECES = frozenset(f"<0x{b:02X}>" for b in range(256))


def _score_bytes_as_unknown(vocab: list) -> None:
    """Give the byte pieces of ``vocab`` ([piece, score] pairs) Hugging Face's unknown score."""
    scores = [item[1] for item in vocab if isinstance(item, list) and len(item) >= 2 and item[0] not in BYTE_PIECES]
    unknown = min(scores, default=0.0) - UNKNOWN_PENALTY
    for item in vocab:
        if isinstance(item, list) and len(item) >= 2 and item[0] in BYTE_PIECES:
            item[1] = unknown


def _find_charsmap(norm: dict | None) -> str:
    """The base64 charsmap of the (first) Precompiled step, or "" (transformers then has none)."""
    if not norm:
        return ""
    if norm.get("type") == "Precompiled":
        return norm.get("precompiled_charsmap") or ""
    for child in norm.get("normalizers") or []:
        found = _find_charsmap(child)
        if found:
            return found
    return ""


@functools.lru_cache(maxsize=4)
def charsmap_steps(charsmap: str) -> tuple[tuple[str, str], ...]:
    """(text, replacement) pairs in the order MNN must run them: the charsmap's multi-character
    entries (longest first), then every code point it changes, then the whitespace MNN's split
    does not know as a space. ValueError for a charsmap the tokenizers library cannot run."""
    single: dict[str, str] = {}
    multi: dict[str, str] = {}
    if charsmap:
        try:
            single, multi = _charsmap_tables(charsmap)
        except (Exception, BaseException) as err:  # a Rust panic is a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"the Precompiled normalizer's charsmap is unreadable ({err})") from err
    # Whitespace MNN's "\s" does not match is a space to WhitespaceSplit: make it one.
    for c in EXTRA_WHITESPACE:
        if single.get(c, c) == c:
            single[c] = " "
    spaced = str.maketrans(dict.fromkeys(EXTRA_WHITESPACE, " "))
    single = {c: mapped.translate(spaced) for c, mapped in single.items()}
    multi = {seq: mapped.translate(spaced) for seq, mapped in multi.items()}
    ordered = sorted(multi.items(), key=lambda kv: (-len(kv[0]), kv[0]))
    return tuple(ordered) + tuple(sorted(single.items()))


def _charsmap_tables(charsmap: str) -> tuple[dict[str, str], dict[str, str]]:
    """What Hugging Face's Precompiled normalizer makes of each code point it changes, and of
    each multi-character sequence it maps otherwise than character by character."""
    from tokenizers import normalizers

    pre = normalizers.Precompiled(base64.b64decode(charsmap))
    single, multi = {}, {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        mapped = pre.normalize_str(c)
        if mapped != c:
            single[c] = mapped

    def per_char(text: str) -> str:
        return "".join(single.get(c, c) for c in text)

    # The charsmap's multi-character keys are (de)compositions: look them up where Unicode has
    # them. Keep those whose result differs from mapping each character, and that the
    # per-character steps that follow leave alone.
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        for form in ("NFD", "NFKD"):
            seq = unicodedata.normalize(form, chr(cp))
            if len(seq) > 1 and seq not in multi:
                mapped = pre.normalize_str(seq)
                if mapped != per_char(seq) and per_char(mapped) == mapped:
                    multi[seq] = mapped
    return single, multi
