"""The "diffusers" scheme's .mtok for CLIP and BERT: tokenizer.json rewritten so that MNN's
pipeline tokenizer, with the text encoder's id rewrite (sd2mnn.tokenization.id_rewrite) for CLIP,
feeds the ids Hugging Face's tokenizer gives (so diffusers' conditioning).

MNN 3.6.1's runtime tokenizes with its pipeline tokenizer (``tokenizer.mtok``), whose BPE has no
end-of-word suffix, and pads with 0. Hugging Face's CLIPTokenizer (diffusers) gives the last
symbol of every pre-token its ``</w>`` form ("cat" -> ``cat</w>``, 2368) and pads SD1.5 with
``<|endoftext|>``.

Two parts make the device condition as diffusers does; this module writes the first:

1. **The .mtok** (``clip_end_of_word_json``). The C++ pipeline has no step that appends to a
   pre-token, but it can *keep* one whitespace character at a pre-token's end:
   * literal Replace normalizers put a space at every boundary CLIP's split regex makes without
     one: around each digit (every digit is a pre-token of its own), and around each run of
     punctuation, symbols and marks (``\\x01`` placeholders around every such character, adjacent
     placeholders removed so that runs like "((" stay one pre-token, then placeholders to spaces);
     contractions ("'s", "'t", ...) are protected first, as CLIP's regex matches them first;
   * the split regex is CLIP's with `` ?`` after each alternative, so a pre-token keeps one
     following space; after the byte-level step that space is ``Ġ``;
   * the vocabulary is CLIP's with every ``</w>`` suffix spelt ``Ġ`` (ids unchanged), and rank-0
     merges ``(c, Ġ) -> cĠ`` for the 256 byte characters. A pre-token then starts exactly as
     Hugging Face starts it (last character in its end-of-word form) and the same merges follow.
   Every pre-token followed by anything gets its end-of-word ids; only the prompt's last
   pre-token, when nothing follows it, cannot (the runtime adds nothing after the text).
   An added token that is one punctuation character (SD3's CLIP-G pads with "!", id 0) is cut out
   of the text by Hugging Face before anything else: it is always its plain id, and the text
   before it ends a pre-token. The runtime would cut it too, but then the word before it has
   nothing after it; so the .mtok leaves such a character to the text instead (out of its
   special and added tokens, ``split_out_characters``): the normalizer puts spaces around it,
   and the split regex matches it alone, without the following space, so its BPE is the plain id.
The BERT (Taiyi) part spells Hugging Face's BertNormalizer in steps MNN's runtime has.
"""
from __future__ import annotations

import functools
import json
import logging
import unicodedata

from sd2mnn.errors import InputError
from sd2mnn.tokenization.reader import BpeModel

log = logging.getLogger(__name__)

SCHEMES = ("diffusers", "mnn")  # the .mtok + text encoder a bundle gets; "mnn" is MNN's own flow
DEFAULT_SCHEME = "diffusers"

END_OF_WORD = "</w>"
MARKER = "\u0120"  # "Ġ": the byte-level character of " ", the end-of-word mark in the .mtok
PLACEHOLDER = "\x01"  # around punctuation while normalizing; user controls became spaces first
APOSTROPHE = "\x04"  # a protected contraction's apostrophe while normalizing
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

REGEX_SPECIAL = set("\\^$.|?*+()[]{}")


def clip_split_keeping_space(split: str = "") -> str:
    """CLIP's pre-tokenizer split with one optional trailing space kept in each pre-token; each
    character of ``split`` (see ``split_out_characters``) first, alone and without the space."""
    alone = ["\\" + c if c in REGEX_SPECIAL else c for c in split]
    return "|".join(alone + [alt + " ?" for alt in (r"<\|startoftext\|>", r"<\|endoftext\|>", *CONTRACTIONS,
                                                    r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+")])



def _is_clip_punctuation(c: str) -> bool:
    r"""What CLIP's regex calls [^\s\p{L}\p{N}]: punctuation, symbols, marks, format characters."""
    category = unicodedata.category(c)
    return category[0] in "PSM" or category == "Cf"


def split_out_characters(tokenizer_json: dict) -> dict[str, int]:
    """The added tokens Hugging Face cuts out of a prompt that are one punctuation character
    with that same id in the vocabulary (SD3's CLIP-G pad "!"): character -> id. Each is its
    plain id wherever it stands, and the text before it ends a pre-token."""
    vocab = tokenizer_json.get("model", {}).get("vocab", {})
    found = {}
    for added in tokenizer_json.get("added_tokens", []):
        c = added.get("content", "")
        if (len(c) == 1 and _is_clip_punctuation(c) and vocab.get(c) == added.get("id")
                and not any(added.get(k, False) for k in ("lstrip", "rstrip", "single_word"))):
            found[c] = added["id"]
    return found


def end_of_word_special_ids(tokenizer_json: dict, special_ids: list[int]) -> list[int]:
    """The special ids the runtime cuts out of the text in a .mtok of this scheme: all but those
    of ``split_out_characters``, which its normalizer and split regex handle instead."""
    split = set(split_out_characters(tokenizer_json).values())
    return [i for i in special_ids if i not in split]


def uses_end_of_word_scheme(tokenizer_json: dict, tokenizer_scheme: str) -> bool:
    """Whether ``tokenizer_scheme`` changes this tokenizer: only CLIP's BPE (an end-of-word suffix) needs it."""
    if tokenizer_scheme not in SCHEMES:
        raise InputError(f"--tokenizer-scheme must be one of {', '.join(SCHEMES)}, got {tokenizer_scheme!r}")
    model = tokenizer_json.get("model", {})
    if not (tokenizer_scheme == "diffusers" and model.get("type", "BPE") == "BPE" and model.get("end_of_word_suffix") == END_OF_WORD):
        return False
    # A byte-level vocabulary (CLIP's: every byte a character) has the byte of " " as MARKER.
    if MARKER not in model.get("vocab", {}):
        _warn_not_byte_level()
        return False
    return True


@functools.lru_cache(maxsize=1)  # once per process, not once per file written
def _warn_not_byte_level() -> None:
    log.warning("warning: the tokenizer's BPE vocabulary is not byte-level (no %r): tokenizer.mtok and the "
                "text encoder are written as MNN writes them (--tokenizer-scheme mnn)", MARKER)


# ---------------------------------------------------------------------------------------------
# Part 1: the .mtok
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _by_major_category() -> dict[str, list[str]]:
    """Every code point but the surrogates, by the first letter of its category, in order
    (one pass over Unicode for all the categories asked for)."""
    groups: dict[str, list[str]] = {}
    for cp in range(0x110000):
        if not 0xD800 <= cp <= 0xDFFF:
            groups.setdefault(unicodedata.category(chr(cp))[0], []).append(chr(cp))
    return groups


def _codepoints(*categories: str) -> list[str]:
    """The code points of these major categories, in code point order."""
    groups = _by_major_category()
    return sorted(c for category in categories for c in groups.get(category, ()))


def _literal(pattern: str, content: str) -> dict:
    return {"type": "Replace", "pattern": {"String": pattern}, "content": content}


def _normalizer_steps(split: str = "") -> list[dict]:
    """Literal replacements after NFC (which turns control characters into spaces in MNN, so the
    placeholders cannot come from the prompt) and lowercasing. Order matters; see above. Each
    character of ``split`` gets spaces around it instead of placeholders, so it is never part of
    a run of punctuation and the text before it ends with a space."""
    steps = [_literal(c, " ") for c in "\t\n\r\x0b\x0c\u2028\u2029" + "".join(_codepoints("Z"))
             if c != " "]
    steps += [_literal(c, APOSTROPHE + c[1:]) for c in CONTRACTIONS]
    # What CLIP's regex calls [^\s\p{L}\p{N}]: punctuation, symbols, marks, format characters.
    others = _codepoints("P", "S", "M") + [c for c in _codepoints("C") if unicodedata.category(c) == "Cf"]
    steps += [_literal(c, PLACEHOLDER + c + PLACEHOLDER) for c in others if c not in split]
    steps.append(_literal(PLACEHOLDER * 2, ""))  # adjacent punctuation stays one pre-token
    steps += [_literal(c, f" {c} ") for c in _codepoints("N")]
    steps.append(_literal(PLACEHOLDER, " "))
    steps.append(_literal(APOSTROPHE, " '"))
    steps += [_literal(c, f" {c} ") for c in split]
    return steps


def clip_end_of_word_json(tokenizer_json: dict) -> dict:
    """``tokenizer_json`` (a CLIP tokenizer.json) rewritten for the .mtok writer as above."""
    tj = json.loads(json.dumps(tokenizer_json))
    split = "".join(split_out_characters(tokenizer_json))
    tj["added_tokens"] = [a for a in tj.get("added_tokens", []) if a.get("content") not in split]
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    renamed = {(t[:-len(END_OF_WORD)] + MARKER if t.endswith(END_OF_WORD) else t): i for t, i in vocab.items()}
    if len(renamed) != len(vocab) or MARKER not in renamed:
        raise InputError("tokenizer.json: this CLIP vocabulary cannot take the end-of-word scheme (a token "
                         f"already ends in {MARKER!r}); convert with --tokenizer-scheme mnn")
    # The byte character "Ġ" keeps its id only as the marker; its own end-of-word twin is unused.
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    merges = [[a, b[:-len(END_OF_WORD)] + MARKER if b.endswith(END_OF_WORD) else b] for a, b in merges]
    base = [t for t in vocab if len(t) == 1 and t + END_OF_WORD in vocab and t != MARKER]
    merges = [[c, MARKER] for c in base] + merges
    model["vocab"], model["merges"] = renamed, merges
    # A contraction followed by letters ("'moody": 'm + oody) reaches the BPE without its mark.
    # Where Hugging Face makes the contraction one token ('m</w>), the runtime's unmarked pieces
    # are folded into one token too (merges ranked after all others, new ids after the
    # vocabulary), which the text encoder maps to the marked one. Only a contraction pre-token
    # holds an apostrophe next to a letter, so these merges change nothing else.
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(json.dumps(tokenizer_json))
    ranks: dict[tuple[int, int], int] = {}
    for rank, (a, b) in enumerate(merges):
        ranks.setdefault((renamed[a], renamed[b]), rank)  # as the .mtok reader: the first rank wins
    runtime = BpeModel(renamed, ranks, byte_level=False)
    for contraction in CONTRACTIONS:
        if hf.encode(contraction, add_special_tokens=False).ids != [vocab.get(contraction + END_OF_WORD)]:
            continue
        pieces = [runtime.id_to_token(i) for i in runtime.tokenize(contraction)]
        folded = pieces[0]
        for piece in pieces[1:]:
            merges.append([folded, piece])
            folded += piece
            renamed.setdefault(folded, len(renamed))
    model["end_of_word_suffix"] = None
    norm = tj.get("normalizer") or {"type": "Sequence", "normalizers": []}
    children = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
    kept = [n for n in children if n.get("type") != "Replace"]  # CLIP's regex \s+ collapse: ours below
    # After NFC and lowercasing: contractions are matched in lower case, as CLIP's regex sees them.
    tj["normalizer"] = {"type": "Sequence", "normalizers": kept + _normalizer_steps(split)}
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": clip_split_keeping_space(split)}, "behavior": "Removed", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return tj


# ---------------------------------------------------------------------------------------------
# BERT (Taiyi): Hugging Face's BertNormalizer, spelt in steps MNN's runtime has
# ---------------------------------------------------------------------------------------------

# Format characters MNN's table step turns into spaces before its lookup (SentencePiece's rule):
# they are deleted by literal Replace steps first, as Hugging Face's clean_text deletes them.
TABLE_SPACED = [chr(cp) for cp in (*range(0x200B, 0x2010), 0xFEFF, *range(0x202A, 0x202F),
                                   *range(0x2060, 0x206A), *range(0xFFF0, 0xFFF9))]


def uses_bert_scheme(tokenizer_json: dict, tokenizer_scheme: str) -> bool:
    """Whether ``tokenizer_scheme`` changes this tokenizer: a WordPiece model behind a BertNormalizer."""
    norm = tokenizer_json.get("normalizer") or {}
    return (tokenizer_scheme == "diffusers" and tokenizer_json.get("model", {}).get("type") == "WordPiece"
            and norm.get("type") == "BertNormalizer")


@functools.lru_cache(maxsize=None)
def _bert_codepoint_map(clean_text: bool, strip_accents: bool) -> dict[int, str]:
    """What Hugging Face's clean_text and strip_accents do per code point, beyond MNN's own:
    delete format and private-use characters (MNN deletes only Cc), line/paragraph separators to
    spaces, and NFD without nonspacing marks only (MNN drops every mark, Mc and Me too, and never
    decomposes CJK compatibility ideographs)."""
    table = {}
    for cp in range(0x110000):
        c = chr(cp)
        cat = unicodedata.category(c)
        if cat == "Cs" or c in TABLE_SPACED:
            continue
        if clean_text and (cat == "Cf" or (cat == "Co" and cp <= 0xFFFF)):
            table[cp] = ""
        elif clean_text and cat in ("Zl", "Zp"):
            table[cp] = " "
        elif strip_accents:
            stripped = "".join(d for d in unicodedata.normalize("NFD", c) if unicodedata.category(d) != "Mn")
            if stripped != c:
                table[cp] = stripped
    return table


def bert_hugging_face_json(tokenizer_json: dict) -> dict:
    """``tokenizer_json`` (a BERT tokenizer.json) with its BertNormalizer rewritten into steps that
    MNN's runtime runs as Hugging Face runs the one step, and WordPiece's word limit in bytes."""
    tj = json.loads(json.dumps(tokenizer_json))
    norm = tj["normalizer"]
    lower = norm.get("lowercase", True)
    strip = norm.get("strip_accents")
    strip = lower if strip is None else bool(strip)
    clean = bool(norm.get("clean_text", True))
    bert = {"type": "BertNormalizer", "strip_accents": False}
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {**bert, "clean_text": clean, "handle_chinese_chars": False, "lowercase": False},
        *[_literal(c, "") for c in (TABLE_SPACED if clean else [])],
        {"type": "CodepointMap", "map": _bert_codepoint_map(clean, strip)},
        # Hugging Face pads Chinese characters before stripping accents: the same, as NFD maps
        # nothing into or out of the Chinese ranges but compatibility ideographs (in both).
        {**bert, "clean_text": False, "handle_chinese_chars": bool(norm.get("handle_chinese_chars", True)),
         "lowercase": bool(lower)},
    ]}
    # Hugging Face counts a word's characters, MNN its UTF-8 bytes (at most 4 a character).
    model = tj["model"]
    model["max_input_bytes_per_word"] = 4 * int(model.get("max_input_chars_per_word", 100))
    return tj
