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
   An added token that is one punctuation character (SD3's CLIP-G pads with "!", id 0) is cut out
   of the text by Hugging Face before anything else: it is always its plain id, and the text
   before it ends a pre-token. The runtime would cut it too, but then the word before it has
   nothing after it; so the .mtok leaves such a character to the text instead (out of its
   special and added tokens, ``split_out_characters``): the normalizer puts spaces around it,
   and the split regex matches it alone, without the following space, so its BPE is the plain id.
2. **The text encoder** (``rewrite_graph``): int32 operations in front of the CLIP model, inside
   ``text_encoder.mnn`` (interface unchanged: ``input_ids`` int32 [2,77]), that take the ids
   after the last end-of-word token, spell them back into characters and run CLIP's BPE on
   them with the last character in its end-of-word form (the merge loop unrolled, merges found
   through a hash table), so the last word gets exactly Hugging Face's ids; and pad with the
   tokenizer's pad id instead of 0. ``rewrite_ids`` is the same function in numpy, for ONNX
   Runtime and tests.

What stays different is listed by kind in the README (characters MNN's normalizer turns into
spaces, such as a zero-width joiner; last words over MAX_WORD characters; prompts that overflow
77 tokens by exactly their last word; contractions after punctuation; decomposed accents).
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
SCHEME_VERSION = "clip-eow-2"  # bump when the graph changes beyond its tables (they are in the digest)

END_OF_WORD = "</w>"
MARKER = "\u0120"  # "Ġ": the byte-level character of " ", the end-of-word mark in the .mtok
PLACEHOLDER = "\x01"  # around punctuation while normalizing; user controls became spaces first
APOSTROPHE = "\x04"  # a protected contraction's apostrophe while normalizing
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
MAX_WORD = 40  # the longest last word (in characters) the text encoder re-encodes exactly
HASH_SIZE = 1 << 16  # buckets of the merge table (CLIP has 48,894 merges)

REGEX_SPECIAL = set("\\^$.|?*+()[]{}")


def clip_split_keeping_space(split: str = "") -> str:
    """CLIP's pre-tokenizer split with one optional trailing space kept in each pre-token; each
    character of ``split`` (see ``split_out_characters``) first, alone and without the space."""
    alone = ["\\" + c if c in REGEX_SPECIAL else c for c in split]
    return "|".join(alone + [alt + " ?" for alt in (r"<\|startoftext\|>", r"<\|endoftext\|>", *CONTRACTIONS,
                                                    r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+")])


CLIP_SPLIT_KEEPING_SPACE = clip_split_keeping_space()


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
    """Everything the id rewrite needs; the same arrays feed the ONNX graph and ``rewrite_ids``.

    The last word is re-encoded exactly as CLIP's BPE encodes a pre-token: its characters (from
    the runtime's tokens), the last one in its end-of-word form, then merges, lowest rank first,
    leftmost first, until none applies. Merges are found through a hash table of buckets, so each
    step is a few gathers instead of a comparison against every merge."""

    bos: int
    eos: int
    pad: int
    always: np.ndarray  # int32 [V]: applied to every id first (runtime-only spellings of contractions)
    boundary: np.ndarray  # int32 [V]: 1 for end-of-word tokens and BOS: a pre-token ends there
    final: np.ndarray  # int32 [V]: a token's end-of-word twin (itself where it has none)
    char_start: np.ndarray  # int32 [V]: where a token's characters start in ``chars``
    char_count: np.ndarray  # int32 [V]: how many characters a token has
    chars: np.ndarray  # int32 [N]: every token's characters, as the ids of the one-character tokens
    merge_left: np.ndarray  # int32 [M + 1]: merge r joins merge_left[r] and merge_right[r] ...
    merge_right: np.ndarray
    merge_result: np.ndarray  # ... into merge_result[r]; entry M matches nothing
    buckets: np.ndarray  # int32 [HASH_SIZE, D]: the merges of a hash value, M where empty
    hash_left: int  # hash(a, b) = (a * hash_left % HASH_SIZE + b * hash_right % HASH_SIZE) % HASH_SIZE
    hash_right: int

    @property
    def no_merge(self) -> int:
        return len(self.merge_left) - 1

    @functools.cached_property
    def ranks(self) -> dict[tuple[int, int], int]:
        return {(int(a), int(b)): r for r, (a, b) in enumerate(zip(self.merge_left[:-1], self.merge_right[:-1]))}

    def word_symbols(self, tokens) -> list[int]:
        """The characters of the runtime's ``tokens`` of a last word, the last one end-of-word."""
        symbols = [int(c) for t in tokens for c in self.chars[self.char_start[t]:self.char_start[t] + self.char_count[t]]]
        if symbols:
            symbols[-1] = int(self.final[symbols[-1]])
        return symbols

    def encode_word(self, symbols: list[int]) -> list[int]:
        """CLIP's BPE on ``symbols``: the lowest-ranked adjacent pair merged, leftmost first."""
        symbols = list(symbols)
        while len(symbols) > 1:
            ranks = [self.ranks.get(pair, self.no_merge) for pair in zip(symbols, symbols[1:])]
            best = min(ranks)
            if best == self.no_merge:
                break
            at = ranks.index(best)
            symbols[at:at + 2] = [int(self.merge_result[best])]
        return symbols

    def digest(self) -> str:
        h = hashlib.sha256(SCHEME_VERSION.encode())
        for part in (self.always, self.boundary, self.final, self.char_start, self.char_count, self.chars,
                     self.merge_left, self.merge_right, self.merge_result, self.buckets,
                     np.array([self.bos, self.eos, self.pad, self.hash_left, self.hash_right], np.int32)):
            h.update(part.tobytes())
        return h.hexdigest()[:16]


def _hash(left, right, hash_left: int, hash_right: int):
    return (left * hash_left % HASH_SIZE + right * hash_right % HASH_SIZE) % HASH_SIZE


def _merge_buckets(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Buckets of merge indices by hash, for the multipliers that make the fullest bucket
    smallest: its size is how many merges each graph step compares. MNN multiplies int32 by a
    constant in float32, so every product stays below 2**24, where float32 counts exactly."""
    ids = max(int(left.max(initial=0)), int(right.max(initial=0))) + 1
    primes = [p for p in range(3, min(256, (1 << 24) // ids + 1)) if all(p % q for q in range(2, int(p ** 0.5) + 1))]
    best = None
    for hash_left in primes:
        for hash_right in primes:
            if hash_left == hash_right:
                continue
            h = _hash(left.astype(np.int64), right.astype(np.int64), hash_left, hash_right)
            depth = int(np.bincount(h, minlength=HASH_SIZE).max()) if len(h) else 1
            if best is None or depth < best[0]:
                best = (depth, h, hash_left, hash_right)
    if best is None:
        raise InputError(f"tokenizer.json: a vocabulary of {ids} ids is too large for the end-of-word scheme; "
                         "convert with --tokenizer mnn")
    depth, h, hash_left, hash_right = best
    buckets = np.full((HASH_SIZE, depth), len(left), np.int32)
    fill = np.zeros(HASH_SIZE, np.int64)
    for index, value in enumerate(h):  # in rank order, so a bucket lists its merges by rank
        buckets[value, fill[value]] = index
        fill[value] += 1
    return buckets, hash_left, hash_right


def build_id_rewrite(tokenizer_json: dict, runtime, bos: int, eos: int, pad: int) -> IdRewrite:
    """The tables for a CLIP ``tokenizer_json`` and ``runtime``, the PromptTokenizer of the
    .mtok this scheme writes for it (its vocabulary, and how it spells contractions)."""
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
    for token_id in split_out_characters(tokenizer_json).values():  # always plain, and a word ends before it
        boundary[token_id] = 1
    # A contraction is one CLIP pre-token ("'s" -> 's</w>); the runtime leaves it without its end
    # mark when letters follow ("'moody" -> 'm + oody). Hugging Face never emits the unmarked
    # token, so it can be mapped to the marked one wherever it stands.
    always = np.arange(size, dtype=np.int32)
    for contraction in CONTRACTIONS:
        plain, marked = runtime_vocab.get(contraction), vocab.get(contraction + END_OF_WORD)
        if plain is not None and marked is not None and runtime_bpe(contraction) == [plain]:
            always[plain] = marked
            boundary[plain] = 1

    # Each token's characters as one-character token ids (the runtime's own spelling for the ids
    # its .mtok adds); a character the vocabulary lacks stands for itself as "no merge" would.
    texts = {i: t[:-len(END_OF_WORD)] if t.endswith(END_OF_WORD) else t for t, i in vocab.items()}
    for text, token_id in runtime_vocab.items():
        texts.setdefault(token_id, text)
    char_start = np.zeros(size, np.int32)
    char_count = np.zeros(size, np.int32)
    chars: list[int] = []
    for token_id in range(size):
        spelled = [vocab.get(c, -1) for c in texts.get(token_id, "")]
        if -1 in spelled:
            spelled = []
        char_start[token_id], char_count[token_id] = len(chars), len(spelled)
        chars += spelled

    ranks: dict[tuple[int, int], tuple[int, int]] = {}
    for merge in tokenizer_json["model"].get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if a in vocab and b in vocab and a + b in vocab:
            ranks.setdefault((vocab[a], vocab[b]), (len(ranks), vocab[a + b]))  # the first rank wins
    pairs = sorted(ranks.items(), key=lambda item: item[1][0])
    left = np.array([p[0][0] for p in pairs] + [-2], np.int32)
    right = np.array([p[0][1] for p in pairs] + [-2], np.int32)
    result = np.array([p[1][1] for p in pairs] + [-1], np.int32)
    buckets, hash_left, hash_right = _merge_buckets(left[:-1], right[:-1])
    return IdRewrite(bos, eos, pad, always, boundary, final, char_start, char_count,
                     np.array(chars or [0], np.int32), left, right, result, buckets, hash_left, hash_right)


def rewrite_ids(ids: np.ndarray, rw: IdRewrite) -> np.ndarray:
    """int32 [B, L] runtime ids -> the ids Hugging Face's tokenizer gives (numpy twin of the graph)."""
    out = rw.always[np.asarray(ids, np.int32)]
    length = out.shape[1]
    for row in out:
        eos_at = np.flatnonzero(row == rw.eos)
        e = int(eos_at[0]) if eos_at.size else length - 1
        ends = np.flatnonzero(rw.boundary[row[:e]] == 1)
        s = int(ends[-1]) + 1 if ends.size else 0
        if e == s or e == length - 1:  # nothing to rewrite, or cut at 77 tokens: keep
            row[e + 1:] = rw.pad
            continue
        symbols = rw.word_symbols(row[s:e])
        if 0 < len(symbols) <= MAX_WORD:
            j, word = s, rw.encode_word(symbols)
        else:  # a word too long for the graph's steps: the last id's end-of-word twin
            j, word = e - 1, [int(rw.final[row[e - 1]])]
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
    MNN's converter and CPU backend run exactly. The BPE's merge loop is unrolled: MAX_WORD - 1
    steps, each merging one pair or, once none is left, nothing."""
    from onnx import TensorProto, helper, numpy_helper

    W = MAX_WORD
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

    def unsqueeze(x, axis, name):
        return op("Unsqueeze", [x, const(name + "_axis", [axis], np.int64)], name)

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

    # The last word's tokens (k < e - s) and their characters, laid end to end in W slots.
    k = const("k", np.arange(W).reshape(1, W))
    token = op("GatherElements", [ids, op("Clip", [op("Add", [s, k], "s_k"), zero, last], "s_k_c")], "token", axis=1)
    in_word = as_int(op("Less", [k, op("Sub", [e, s], "n_tokens")], "in_word_b"), "in_word")
    count = op("Mul", [op("Gather", [const("char_count", rw.char_count), token], "count_raw", axis=0), in_word], "count")
    start = op("Gather", [const("char_start", rw.char_start), token], "start", axis=0)
    before = const("before", (np.arange(W)[None, :] < np.arange(W)[:, None]).astype(np.int32)[None])  # [1,k,k']
    offset = reduce("ReduceSum", op("Mul", [unsqueeze(count, 1, "count3"), before], "offset3"), 2, "offset", keepdims=0)
    total = reduce("ReduceSum", count, 1, "total")
    slot = const("slot", np.arange(W).reshape(1, W, 1))
    owner = op("Sub", [reduce("ReduceSum", as_int(op("LessOrEqual", [unsqueeze(offset, 1, "offset_row"), slot], "owns_b"),
                                                  "owns"), 2, "owners", keepdims=0), one], "owner_raw")
    owner = op("Clip", [owner, zero, const("w1", W - 1)], "owner")
    at = op("Sub", [op("Add", [op("GatherElements", [start, owner], "owner_start", axis=1), k], "at_raw"),
                    op("GatherElements", [offset, owner], "owner_offset", axis=1)], "at")
    char = op("Gather", [const("chars", rw.chars), op("Clip", [at, zero, const("n_chars", len(rw.chars) - 1)], "at_c")],
              "char", axis=0)
    symbols = op("Where", [op("Less", [k, total], "in_text"), char, minus1], "symbols0")
    final = const("final", rw.final)
    end_char = op("Gather", [final, op("Max", [char, zero], "char0")], "end_char", axis=0)
    symbols = op("Where", [op("Equal", [k, op("Sub", [total, one], "total1")], "is_last"), end_char, symbols], "symbols")

    # CLIP's BPE: each step finds every adjacent pair's rank through its hash bucket and merges the
    # lowest-ranked, leftmost pair; a merge index stands for its rank (merges are in rank order).
    size, no_merge = const("hash_size", HASH_SIZE), const("no_merge", rw.no_merge)
    left_t, right_t = const("merge_left", rw.merge_left), const("merge_right", rw.merge_right)
    result_t, buckets = const("merge_result", rw.merge_result), const("buckets", rw.buckets)
    hash_left, hash_right = const("hash_left", rw.hash_left), const("hash_right", rw.hash_right)
    pair_at = const("pair_at", np.arange(W - 1).reshape(1, W - 1))
    next_at = const("next_at", np.minimum(np.arange(W) + 1, W - 1))
    first_pair, second_pair = const("first_pair", [0], np.int64), const("second_pair", [1], np.int64)
    pairs_end, symbols_end = const("pairs_end", [W - 1], np.int64), const("symbols_end", [W], np.int64)
    axis1, far, w_last = const("axis1", [1], np.int64), const("far", W), const("w_last", W - 1)
    for step in range(W - 1):
        n = f"{step}_"
        a = op("Slice", [symbols, first_pair, pairs_end, axis1], n + "a")
        b = op("Slice", [symbols, second_pair, symbols_end, axis1], n + "b")
        h = op("Mod", [op("Add", [op("Mod", [op("Mul", [op("Max", [a, zero], n + "a0"), hash_left], n + "ha"), size], n + "ham", fmod=0),
                                  op("Mod", [op("Mul", [op("Max", [b, zero], n + "b0"), hash_right], n + "hb"), size], n + "hbm", fmod=0)],
                           n + "hsum"), size], n + "h", fmod=0)
        candidates = op("Gather", [buckets, h], n + "cand", axis=0)  # [B, W-1, D]
        match = op("And", [op("Equal", [op("Gather", [left_t, candidates], n + "cl", axis=0), unsqueeze(a, 2, n + "a3")], n + "ml"),
                           op("Equal", [op("Gather", [right_t, candidates], n + "cr", axis=0), unsqueeze(b, 2, n + "b3")], n + "mr")],
                    n + "match")
        rank = reduce("ReduceMin", op("Where", [match, candidates, no_merge], n + "ranks3"), 2, n + "rank", keepdims=0)
        best = reduce("ReduceMin", rank, 1, n + "best")
        where = reduce("ReduceMin", op("Where", [op("Equal", [rank, best], n + "is_best"), pair_at, far], n + "best_at"), 1, n + "where")
        merged = op("Gather", [result_t, best], n + "merged", axis=0)
        shifted = op("Gather", [symbols, next_at], n + "shifted_raw", axis=1)
        shifted = op("Where", [op("Equal", [k, w_last], n + "at_w"), minus1, shifted], n + "shifted")
        stepped = op("Where", [op("Less", [k, where], n + "keep"), symbols,
                               op("Where", [op("Equal", [k, where], n + "here"), merged, shifted], n + "after")], n + "stepped")
        symbols = op("Where", [op("Less", [best, no_merge], n + "merges"), stepped, symbols], n + "symbols")

    # The word's ids from s on, then EOS and the padding, cut at ``length`` as Hugging Face cuts.
    usable = op("And", [op("Greater", [total, zero], "some"), op("LessOrEqual", [total, const("w", W)], "fits")], "usable")
    n_out = reduce("ReduceSum", as_int(op("GreaterOrEqual", [symbols, zero], "is_symbol_b"), "is_symbol"), 1, "n_out")
    j = op("Where", [usable, s, op("Sub", [e, one], "e_one")], "j")
    m = op("Where", [usable, n_out, one], "m")
    rel = op("Clip", [op("Sub", [pos, j], "rel"), zero, const("w_1", W - 1)], "rel_c")
    body = op("Where", [usable, op("GatherElements", [symbols, rel], "from_bpe", axis=1),
                        op("Gather", [final, ids], "twin", axis=0)], "body")
    end = op("Add", [j, m], "end")
    tail = op("Where", [op("Equal", [pos, end], "at_end"), eos, pad], "tail")
    word = op("Where", [op("Less", [pos, end], "in_word_ids"), body, tail], "word")
    rewritten = op("Where", [op("Less", [pos, j], "in_head"), ids, word], "rewritten")
    cut = op("Where", [op("Equal", [pos, last], "at_cut"), eos, rewritten], "cut")
    rewritten = op("Where", [op("Greater", [end, last], "overflow"), cut, rewritten], "rewritten_cut")
    plain = op("Where", [op("Greater", [pos, e], "after_e"), pad, ids], "plain")
    # keep the ids where there is no last word to rewrite (e == s) or the prompt was cut at 77
    skip = op("Greater", [op("Add", [as_int(op("Equal", [e, s], "empty_b"), "empty"),
                                     as_int(op("Equal", [e, last], "full_b"), "full")], "skip_n"), zero], "skip")
    nodes.append(helper.make_node("Where", [skip, plain, rewritten], [output_name], name="rw_out"))
    return nodes, inits


def load_rewrite(tokenizer_dir: Path, scheme: str, runtime=None, mtok: Path | None = None) -> IdRewrite | None:
    """The id rewrite a bundle of the tokenizer in ``tokenizer_dir`` gets under ``scheme``
    (None where the scheme leaves the tokenizer as MNN writes it). ``runtime``: the PromptTokenizer
    of that bundle's tokenizer.mtok, when it is at hand; else ``mtok``, that file, read only if
    the scheme rewrites the tokenizer (else the .mtok is written to a temp file)."""
    from sd2mnn.mtok import load_tokenizer_source
    from sd2mnn.tokenizer import PromptTokenizer

    source = load_tokenizer_source(Path(tokenizer_dir))
    if not uses_end_of_word_scheme(source.tokenizer_json, scheme):
        return None
    runtime = runtime or PromptTokenizer.from_dir(Path(mtok) if mtok else Path(tokenizer_dir), scheme)
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

    try:
        model = onnx.load(str(source))
    except onnx.checker.ValidationError as err:
        # onnx refuses external data files with several hard links (a folder copied with cp -al).
        raise InputError(f"{source}: ONNX will not read its weights ({str(err).splitlines()[0]}); copy the "
                         "folder without hard links (cp -r), or convert with --tokenizer mnn") from None
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
