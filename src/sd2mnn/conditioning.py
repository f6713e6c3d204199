"""Bundles whose MNN runtime feeds the CLIP text encoder the ids diffusers would.

MNN 3.6.1's runtime tokenizes with its pipeline tokenizer (``tokenizer.mtok``), whose BPE has no
end-of-word suffix, and pads with 0. Hugging Face's CLIPTokenizer (diffusers) gives the last
symbol of every pre-token its ``</w>`` form ("cat" -> ``cat</w>``, 2368) and pads SD1.5 with
``<|endoftext|>``. Two parts, both written by ``sd2mnn convert``, make the device condition as
diffusers does:

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
2. **The text encoder** (``rewrite_graph``): int32 operations in front of the CLIP model, inside
   ``text_encoder.mnn`` (interface unchanged: ``input_ids`` int32 [2,77]), that take the ids
   after the last end-of-word token and replace their longest tail found in a table of
   last-word rewrites (the text of every token of the vocabulary, whole-word or not, from the
   runtime's ids to Hugging Face's; where no tail is found, the last id becomes its end-of-word
   twin), and pad with the tokenizer's pad id instead of 0. ``rewrite_ids`` is the same function
   in numpy, for ONNX Runtime and tests.

What stays different is listed by kind in the README (rare last words that CLIP splits
elsewhere, prompts that overflow 77 tokens by exactly their last word, contractions after
punctuation, decomposed accents, control and zero-width characters).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd2mnn.errors import InputError

log = logging.getLogger(__name__)

SCHEMES = ("diffusers", "mnn")  # the .mtok + text encoder a bundle gets; "mnn" is MNN's own flow
DEFAULT_SCHEME = "diffusers"
SCHEME_VERSION = "clip-eow-1"  # bump when the .mtok or the graph this module writes changes

END_OF_WORD = "</w>"
MARKER = "\u0120"  # "Ġ": the byte-level character of " ", the end-of-word mark in the .mtok
PLACEHOLDER = "\x01"  # around punctuation while normalizing; user controls became spaces first
APOSTROPHE = "\x04"  # a protected contraction's apostrophe while normalizing
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
KEY_LENGTH = 8  # the longest last word (in runtime tokens) the rewrite table holds

# CLIP's pre-tokenizer split with one optional trailing space kept in each pre-token.
CLIP_SPLIT_KEEPING_SPACE = "|".join(
    alt + " ?" for alt in (r"<\|startoftext\|>", r"<\|endoftext\|>", *CONTRACTIONS,
                           r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+"))


def uses_end_of_word_scheme(tokenizer_json: dict, scheme: str) -> bool:
    """Whether ``scheme`` changes this tokenizer: only CLIP's BPE (an end-of-word suffix) needs it."""
    if scheme not in SCHEMES:
        raise InputError(f"--tokenizer must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    model = tokenizer_json.get("model", {})
    if not (scheme == "diffusers" and model.get("type", "BPE") == "BPE" and model.get("end_of_word_suffix") == END_OF_WORD):
        return False
    # A byte-level vocabulary (CLIP's: every byte a character) has the byte of " " as MARKER.
    if MARKER not in model.get("vocab", {}):
        _warn_not_byte_level()
        return False
    return True


@functools.lru_cache(maxsize=1)  # once per process, not once per file written
def _warn_not_byte_level() -> None:
    log.warning("warning: the tokenizer's BPE vocabulary is not byte-level (no %r): tokenizer.mtok and the "
                "text encoder are written as MNN writes them (--tokenizer mnn)", MARKER)


# ---------------------------------------------------------------------------------------------
# Part 1: the .mtok
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _codepoints(*categories: str) -> list[str]:
    return [chr(cp) for cp in range(0x110000)
            if unicodedata.category(chr(cp))[0] in categories and not 0xD800 <= cp <= 0xDFFF]


def _literal(pattern: str, content: str) -> dict:
    return {"type": "Replace", "pattern": {"String": pattern}, "content": content}


def _normalizer_steps() -> list[dict]:
    """Literal replacements after NFC (which turns control characters into spaces in MNN, so the
    placeholders cannot come from the prompt) and lowercasing. Order matters; see above."""
    steps = [_literal(c, " ") for c in "\t\n\r\x0b\x0c\u2028\u2029" + "".join(_codepoints("Z"))
             if c != " "]
    steps += [_literal(c, APOSTROPHE + c[1:]) for c in CONTRACTIONS]
    # What CLIP's regex calls [^\s\p{L}\p{N}]: punctuation, symbols, marks, format characters.
    others = _codepoints("P", "S", "M") + [c for c in _codepoints("C") if unicodedata.category(c) == "Cf"]
    steps += [_literal(c, PLACEHOLDER + c + PLACEHOLDER) for c in others]
    steps.append(_literal(PLACEHOLDER * 2, ""))  # adjacent punctuation stays one pre-token
    steps += [_literal(c, f" {c} ") for c in _codepoints("N")]
    steps.append(_literal(PLACEHOLDER, " "))
    steps.append(_literal(APOSTROPHE, " '"))
    return steps


def clip_end_of_word_json(tokenizer_json: dict) -> dict:
    """``tokenizer_json`` (a CLIP tokenizer.json) rewritten for the .mtok writer as above."""
    tj = json.loads(json.dumps(tokenizer_json))
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    renamed = {(t[:-len(END_OF_WORD)] + MARKER if t.endswith(END_OF_WORD) else t): i for t, i in vocab.items()}
    if len(renamed) != len(vocab) or MARKER not in renamed:
        raise InputError("tokenizer.json: this CLIP vocabulary cannot take the end-of-word scheme (a token "
                         f"already ends in {MARKER!r}); convert with --tokenizer mnn")
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

    from sd2mnn.tokenizer import BpeModel

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
    tj["normalizer"] = {"type": "Sequence", "normalizers": kept + _normalizer_steps()}
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_KEEPING_SPACE}, "behavior": "Removed", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return tj


# ---------------------------------------------------------------------------------------------
# BERT (Taiyi): Hugging Face's BertNormalizer, spelt in steps MNN's runtime has
# ---------------------------------------------------------------------------------------------

# Format characters MNN's table step turns into spaces before its lookup (SentencePiece's rule):
# they are deleted by literal Replace steps first, as Hugging Face's clean_text deletes them.
TABLE_SPACED = [chr(cp) for cp in (*range(0x200B, 0x2010), 0xFEFF, *range(0x202A, 0x202F),
                                   *range(0x2060, 0x206A), *range(0xFFF0, 0xFFF9))]


def uses_bert_scheme(tokenizer_json: dict, scheme: str) -> bool:
    """Whether ``scheme`` changes this tokenizer: a WordPiece model behind a BertNormalizer."""
    norm = tokenizer_json.get("normalizer") or {}
    return (scheme == "diffusers" and tokenizer_json.get("model", {}).get("type") == "WordPiece"
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


# ---------------------------------------------------------------------------------------------
# Part 2: the last word and the padding, rewritten in front of the text encoder
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class IdRewrite:
    """Everything the id rewrite needs; the same arrays feed the ONNX graph and ``rewrite_ids``."""

    bos: int
    eos: int
    pad: int
    always: np.ndarray  # int32 [V]: applied to every id first (runtime-only spellings of contractions)
    boundary: np.ndarray  # int32 [V]: 1 for end-of-word tokens and BOS: a pre-token ends there
    final: np.ndarray  # int32 [V]: a token's end-of-word twin (itself where it has none)
    keys: np.ndarray  # int32 [E, K]: the runtime's ids of a last word, -1 padded
    values: np.ndarray  # int32 [E, K]: Hugging Face's ids of that word, -1 padded
    lengths: np.ndarray  # int32 [E]: how many of ``values`` count

    @functools.cached_property
    def lookup(self) -> dict[tuple[int, ...], int]:
        return {tuple(int(t) for t in key if t >= 0): i for i, key in enumerate(self.keys)}

    def digest(self) -> str:
        h = hashlib.sha256(SCHEME_VERSION.encode())
        for part in (self.always, self.boundary, self.final, self.keys, self.values, self.lengths,
                     np.array([self.bos, self.eos, self.pad], np.int32)):
            h.update(part.tobytes())
        return h.hexdigest()[:16]


def build_id_rewrite(tokenizer_json: dict, runtime, bos: int, eos: int, pad: int) -> IdRewrite:
    """The tables for a CLIP ``tokenizer_json`` and ``runtime``, the PromptTokenizer of the
    .mtok this scheme writes for it (its vocabulary, and how it tokenizes a word, as byte-level
    characters, when the word is a prompt's last pre-token)."""
    from tokenizers import Tokenizer

    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    runtime_vocab, runtime_bpe = runtime.vocabulary, runtime.model_ids
    # Every id the runtime can feed: the vocabulary's, and BOS/EOS, which it adds whatever the
    # vocabulary (a text encoder too small for them is refused before it runs).
    size = max(*runtime_vocab.values(), bos, eos, pad) + 1
    boundary = np.zeros(size, np.int32)
    final = np.arange(size, dtype=np.int32)
    for token, token_id in vocab.items():
        if token.endswith(END_OF_WORD):
            boundary[token_id] = 1
            twin = vocab.get(token[:-len(END_OF_WORD)])
            if twin is not None:
                final[twin] = token_id
    boundary[bos] = 1
    # A contraction is one CLIP pre-token ("'s" -> 's</w>); the runtime leaves it without its end
    # mark when letters follow ("'moody" -> 'm + oody). Hugging Face never emits the unmarked
    # token, so it can be mapped to the marked one wherever it stands.
    always = np.arange(size, dtype=np.int32)
    for contraction in CONTRACTIONS:
        plain, marked = runtime_vocab.get(contraction), vocab.get(contraction + END_OF_WORD)
        if plain is not None and marked is not None and runtime_bpe(contraction) == [plain]:
            always[plain] = marked
            boundary[plain] = 1

    # The words a prompt can end in without a marker (letter runs and contractions; a prompt
    # ending in a digit or punctuation is already exact): the text of every token, whole-word
    # (cat</w>) or not (cat), so that a last word's final tokens are found whole or, failing
    # that, for its longest tail that is a token's text.
    hf = Tokenizer.from_str(json.dumps(tokenizer_json))
    from sd2mnn.tokenizer import CHAR_TO_BYTE as decoder
    words, seen = [], set()
    for token in vocab:
        core = token[:-len(END_OF_WORD)] if token.endswith(END_OF_WORD) else token
        try:
            text = bytes(decoder[c] for c in core).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if ((text.isalpha() and text == text.lower()) or text in CONTRACTIONS) and text not in seen:
            seen.add(text)
            words.append((core, text))
    expected = hf.encode_batch([text for _, text in words], add_special_tokens=False)
    keys, values = [], []
    for (core, _), encoding in zip(words, expected):
        key, value = runtime_bpe(core), encoding.ids
        fallback = key[:-1] + [int(final[key[-1]])] if key else []
        if key and value != fallback and len(key) <= KEY_LENGTH and len(value) <= KEY_LENGTH:
            keys.append(key + [-1] * (KEY_LENGTH - len(key)))
            values.append(value + [-1] * (KEY_LENGTH - len(value)))
    if not keys:  # one entry that no key matches keeps the graph's shapes non-empty
        keys, values = [[-2] * KEY_LENGTH], [[-2] * KEY_LENGTH]
    lengths = np.array([sum(v >= 0 for v in row) for row in values], np.int32)
    return IdRewrite(bos, eos, pad, always, boundary, final,
                     np.array(keys, np.int32).reshape(-1, KEY_LENGTH),
                     np.array(values, np.int32).reshape(-1, KEY_LENGTH), lengths)


def rewrite_ids(ids: np.ndarray, rw: IdRewrite) -> np.ndarray:
    """int32 [B, L] runtime ids -> the ids Hugging Face's tokenizer gives (numpy twin of the graph)."""
    out = rw.always[np.asarray(ids, np.int32)]
    length = out.shape[1]
    table = rw.lookup
    for row in out:
        eos_at = np.flatnonzero(row == rw.eos)
        e = int(eos_at[0]) if eos_at.size else length - 1
        ends = np.flatnonzero(rw.boundary[row[:e]] == 1)
        s = int(ends[-1]) + 1 if ends.size else 0
        if e == s or e == length - 1:  # nothing to rewrite, or cut at 77 tokens: keep
            row[e + 1:] = rw.pad
            continue
        # The longest run of trailing ids that spells a word of the table, else the last id's twin.
        hit = next(((j, table[key]) for j in range(max(s, e - KEY_LENGTH), e)
                    if (key := tuple(int(t) for t in row[j:e])) in table), None)
        if hit is not None:
            j, entry = hit
            word = rw.values[entry, :rw.lengths[entry]]
        else:
            j, word = e - 1, rw.final[row[e - 1:e]]
        tail = np.concatenate([word, [rw.eos]])[:length - j]
        row[j:j + len(tail)] = tail
        row[j + len(tail):] = rw.pad
        if j + len(word) > length - 1:
            row[-1] = rw.eos
    return out


def rewrite_graph(rw: IdRewrite, length: int, input_name: str = "input_ids", output_name: str = "input_ids_rewritten",
                  opset: int = 18):
    """ONNX nodes and initializers computing ``rewrite_ids`` on ``input_name`` (int32 [B, length]).
    Only int32 Gather/GatherElements, comparisons, Where, arithmetic and reductions: operations
    MNN's converter and CPU backend run exactly."""
    from onnx import TensorProto, helper, numpy_helper

    K = KEY_LENGTH
    nodes, inits = [], []

    def const(name, value, dtype=np.int32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), "rw_" + name))
        return "rw_" + name

    def op(kind, inputs, name, **attrs):
        nodes.append(helper.make_node(kind, inputs, ["rw_" + name], name="rw_" + name, **attrs))
        return "rw_" + name

    def as_int(x, name):
        return op("Cast", [x], name, to=TensorProto.INT32)

    def reduce(kind, x, axis, name, keepdims=1):
        if kind == "ReduceSum" and opset >= 13 or opset >= 18:  # axes became an input
            return op(kind, [x, const(name + "_axes", [axis], np.int64)], name, keepdims=keepdims)
        return op(kind, [x], name, axes=[axis], keepdims=keepdims)

    def argmax(x, axis, name):
        return as_int(op("ArgMax", [x], name + "64", axis=axis, keepdims=1), name)

    pos = const("pos", np.arange(length).reshape(1, length))
    zero, one, last = const("zero", 0), const("one", 1), const("last", length - 1)
    eos, pad, minus1 = const("eos", rw.eos), const("pad", rw.pad), const("minus1", -1)
    ids = op("Gather", [const("always", rw.always), input_name], "ids", axis=0)
    # e: the first EOS (the last position when there is none); s: one past the last end-of-word
    # id before it (the last word's start)
    is_eos = as_int(op("Equal", [ids, eos], "is_eos_b"), "is_eos")
    first = reduce("ReduceMax", op("Mul", [is_eos, const("to_end", length - np.arange(length).reshape(1, length))],
                                   "eos_to_end"), 1, "first_eos")
    e = op("Min", [op("Sub", [const("length", length), first], "e_raw"), last], "e")
    ended = op("Mul", [op("Gather", [const("boundary", rw.boundary), ids], "bnd", axis=0),
                       as_int(op("Less", [pos, e], "before_e_b"), "before_e")], "ended")
    s = reduce("ReduceMax", op("Mul", [ended, op("Add", [pos, one], "pos1")], "ended_at"), 1, "s")
    # candidate c: the last c+1 ids (starting at j_c), valid when j_c >= s
    j_c = op("Sub", [op("Sub", [e, one], "e1"), const("c", np.arange(K).reshape(1, K))], "j_c")
    valid = as_int(op("Greater", [op("Add", [j_c, one], "j_c1"), s], "valid_b"), "valid")
    at = op("Add", [op("Unsqueeze", [j_c, const("axis2", [2], np.int64)], "j_c3"),
                    const("t", np.arange(K).reshape(1, 1, K))], "at")
    flat = op("Reshape", [op("Clip", [at, zero, last], "at_c"), const("flat", [0, K * K], np.int64)], "at_flat")
    gathered = op("Reshape", [op("GatherElements", [ids, flat], "key_flat", axis=1),
                              const("cube", [0, K, K], np.int64)], "key_raw")
    in_key = const("in_key", (np.arange(K)[None, :] <= np.arange(K)[:, None]).reshape(1, K, K), np.bool_)
    key = op("Where", [in_key, gathered, minus1], "key")
    same = as_int(op("Equal", [op("Unsqueeze", [key, const("axis2b", [2], np.int64)], "key4"),
                               const("keys", rw.keys[None, None])], "same_b"), "same")
    hit = as_int(op("Equal", [reduce("ReduceSum", same, 3, "score", keepdims=0), const("klen", K)], "hit_b"), "hit")
    found_c = op("Squeeze", [reduce("ReduceMax", hit, 2, "found_c3"), const("axis2c", [2], np.int64)], "found_c")
    entry_c = op("Squeeze", [argmax(hit, 2, "entry_c3"), const("axis2d", [2], np.int64)], "entry_c")
    score = op("Mul", [op("Mul", [found_c, valid], "usable"), const("c1", np.arange(1, K + 1).reshape(1, K))], "pick")
    best = reduce("ReduceMax", score, 1, "best")  # the longest suffix found (0: none)
    entry = op("GatherElements", [entry_c, argmax(score, 1, "best_c")], "entry", axis=1)  # [B,1]
    found = op("Greater", [best, zero], "found")
    j = op("Where", [found, op("Sub", [e, best], "e_best"), op("Sub", [e, one], "e_one")], "j")
    value = op("Reshape", [op("Gather", [const("values", rw.values), entry], "value3", axis=0),
                           const("rows", [-1, K], np.int64)], "value")
    m = op("Where", [found, op("Gather", [const("lengths", rw.lengths), entry], "m_table", axis=0), one], "m")
    rel = op("Clip", [op("Sub", [pos, j], "rel"), zero, const("kmax", K - 1)], "rel_c")
    body = op("Where", [found, op("GatherElements", [value, rel], "from_table", axis=1),
                        op("Gather", [const("final", rw.final), ids], "twin", axis=0)], "body")
    end = op("Add", [j, m], "end")
    tail = op("Where", [op("Equal", [pos, end], "at_end"), eos, pad], "tail")
    word = op("Where", [op("Less", [pos, end], "in_word"), body, tail], "word")
    rewritten = op("Where", [op("Less", [pos, j], "in_head"), ids, word], "rewritten")
    cut = op("Where", [op("Equal", [pos, last], "at_cut"), eos, rewritten], "cut")
    rewritten = op("Where", [op("Greater", [end, last], "overflow"), cut, rewritten], "rewritten_cut")
    plain = op("Where", [op("Greater", [pos, e], "after_e"), pad, ids], "plain")
    # keep the ids where there is no last word to rewrite (e == s) or the prompt was cut at 77
    skip = op("Greater", [op("Add", [as_int(op("Equal", [e, s], "empty_b"), "empty"),
                                     as_int(op("Equal", [e, last], "full_b"), "full")], "skip_n"), zero], "skip")
    nodes.append(helper.make_node("Where", [skip, plain, rewritten], [output_name], name="rw_out"))
    return nodes, inits


def load_rewrite(tokenizer_dir: Path, scheme: str, runtime=None) -> IdRewrite | None:
    """The id rewrite a bundle of the tokenizer in ``tokenizer_dir`` gets under ``scheme``
    (None where the scheme leaves the tokenizer as MNN writes it). ``runtime``: the PromptTokenizer
    of that bundle's tokenizer.mtok, when it is at hand (else the .mtok is written to a temp file)."""
    from sd2mnn.mtok import load_tokenizer_source
    from sd2mnn.tokenizer import PromptTokenizer

    source = load_tokenizer_source(Path(tokenizer_dir))
    if not uses_end_of_word_scheme(source.tokenizer_json, scheme):
        return None
    runtime = runtime or PromptTokenizer.from_dir(Path(tokenizer_dir), scheme)
    fmt = runtime.format
    pad = source.pad_id if source.pad_id is not None else fmt.eos_id
    return build_id_rewrite(source.tokenizer_json, runtime, fmt.bos_id, fmt.eos_id, pad)


@dataclass(frozen=True)
class TextEncoderPrefix:
    """The id rewrite as conversion uses it: recorded by ``prefix_id``, applied by ``prepend``."""

    rewrite: IdRewrite

    @property
    def prefix_id(self) -> str:
        return f"{SCHEME_VERSION}:{self.rewrite.digest()}"

    def prepend(self, source: Path, target: Path) -> Path:
        return prepend_rewrite(source, target, self.rewrite)


def prepend_rewrite(source: Path, target: Path, rw: IdRewrite, input_name: str = "input_ids") -> Path:
    """Write ``target``: the ONNX model ``source`` with the id rewrite in front of ``input_name``."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    spec = next((i for i in graph.input if i.name == input_name), None)
    if spec is None:
        raise InputError(f"{source}: no input named {input_name!r}; the text encoder must take input_ids")
    dims = [d.dim_value for d in spec.type.tensor_type.shape.dim]
    if len(dims) != 2 or dims[1] <= 0 or spec.type.tensor_type.elem_type != onnx.TensorProto.INT32:
        raise InputError(f"{source}: input_ids must be int32 [batch, length] with a fixed length; "
                         "export it with sd2mnn export, or convert with --tokenizer mnn")
    rewritten = "sd2mnn_" + input_name
    for n in graph.node:
        n.input[:] = [rewritten if i == input_name else i for i in n.input]
    for out in graph.output:
        if out.name == input_name:  # an identity passthrough: keep it the runtime's ids
            raise InputError(f"{source}: input_ids is also an output; convert with --tokenizer mnn")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise InputError(f"{source}: opset {opset} < 13; re-export the text encoder with opset 13 or newer, "
                         "or convert with --tokenizer mnn")
    nodes, inits = rewrite_graph(rw, dims[1], input_name, rewritten, opset)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    graph.initializer.extend(inits)
    # Weights beside the model only where protobuf's 2 GB limit forces it (CLIP is ~0.5 GB).
    large = sum(t.ByteSize() for t in graph.initializer) > 1_800_000_000  # ByteSize() itself fails over 2 GB
    onnx.save_model(model, str(target), save_as_external_data=large, location=target.name + ".data")
    return target



# ---------------------------------------------------------------------------------------------
# Prompt -> ids, three ways: what the runtime feeds, what the CLIP model inside sees, diffusers'
# ---------------------------------------------------------------------------------------------

def _is_end_of_word_mtok(runtime) -> bool:
    """A .mtok of this scheme: its BPE joins a character and the marker into one (end-of-word) id."""
    return len(runtime.model_ids("a" + MARKER)) == 1


class PromptIds:
    """The ids of ``[negative, prompt]`` for a bundle (its tokenizer.mtok and tokenizer files) or
    a tokenizer folder converted with ``scheme``."""

    def __init__(self, tokenizer_dir: Path, runtime, rewrite: IdRewrite | None, scheme: str):
        self.tokenizer_dir, self.runtime, self.rewrite, self.scheme = Path(tokenizer_dir), runtime, rewrite, scheme
        self._hf = None

    @classmethod
    def for_bundle(cls, bundle_dir: Path) -> "PromptIds":
        from sd2mnn.tokenizer import MTOK_NAME, PromptTokenizer

        runtime = PromptTokenizer.from_dir(Path(bundle_dir) / MTOK_NAME)
        if runtime.format.model_type != 0:  # BERT (Taiyi): one .mtok for both schemes
            return cls(bundle_dir, runtime, None, DEFAULT_SCHEME)
        if _is_end_of_word_mtok(runtime):
            return cls(bundle_dir, runtime, load_rewrite(bundle_dir, "diffusers", runtime), "diffusers")
        return cls(bundle_dir, runtime, None, "mnn")

    @classmethod
    def for_tokenizer(cls, tokenizer_dir: Path, scheme: str = DEFAULT_SCHEME) -> "PromptIds":
        from sd2mnn.tokenizer import PromptTokenizer

        runtime = PromptTokenizer.from_dir(tokenizer_dir, scheme)
        return cls(tokenizer_dir, runtime, load_rewrite(tokenizer_dir, scheme, runtime), scheme)

    @property
    def max_length(self) -> int:
        return self.runtime.format.max_length

    def runtime_pair(self, prompt: str, length: int | None = None, negative: str = "") -> np.ndarray:
        """int32 [2, L]: what MNN's runtime feeds ``text_encoder.mnn``."""
        return self.runtime.encode_pair(prompt, length, negative)

    def model_pair(self, prompt: str, length: int | None = None, negative: str = "") -> np.ndarray:
        """int32 [2, L]: what the CLIP/BERT model inside the bundle's text encoder sees."""
        return self.rewrite_pair(self.runtime_pair(prompt, length, negative))

    def rewrite_pair(self, runtime_ids: np.ndarray) -> np.ndarray:
        """The bundle's text encoder's id rewrite (none for MNN's own scheme), in numpy."""
        return rewrite_ids(runtime_ids, self.rewrite) if self.rewrite is not None else runtime_ids

    def hf_pair(self, prompt: str, length: int | None = None, negative: str = "") -> np.ndarray:
        """int32 [2, L]: Hugging Face's ids (diffusers' conditioning), from the tokenizer files."""
        length = length or self.max_length
        if self._hf is None:
            from tokenizers import Tokenizer

            from sd2mnn.mtok import load_tokenizer_source

            source = load_tokenizer_source(self.tokenizer_dir)
            self._hf = Tokenizer.from_str(json.dumps(source.tokenizer_json))
            self._hf_pad = source.pad_id if source.pad_id is not None else 0
        rows = []
        for text in (negative, prompt):
            ids = self._hf.encode(text).ids  # with the post-processor's BOS/EOS
            if len(ids) > length:
                ids = ids[:length - 1] + ids[-1:]  # truncation keeps the closing special token
            rows.append(ids + [self._hf_pad] * (length - len(ids)))
        return np.array(rows, dtype=np.int32)
