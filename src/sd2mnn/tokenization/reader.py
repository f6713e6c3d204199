"""Prompt -> input_ids exactly as MNN's C++ diffusion runtime makes them.

MNN's runtime (transformers/diffusion/engine/src/tokenizer.cpp, MtokTokenizer) loads
``tokenizer.mtok`` into its LLM PipelineTokenizer (transformers/llm/engine/src/tokenizer/) and
builds ``[uncond "", prompt]`` rows: BOS inserted if missing, EOS appended if missing, cut to
max_length with EOS in the last slot, padded with 0. This module reads the same .mtok and
re-implements that pipeline, so ``sd2mnn generate`` feeds the text encoder the ids the device
would. Behaviour established against MNN's C++ tokenizer built from commit 4d40bdbd7.

Where MNN differs from Hugging Face's CLIPTokenizer (so from diffusers), on purpose here:
  * No "</w>" end-of-word suffix: the .mtok has no field for it and the C++ BPE never appends
    it, so "cat" is looked up as "c","a","t" merged by the non-"</w>" merges (HF: "cat</w>").
    Nearly every word gets a different id than in diffusers.
  * Padding with 0 (HF pads SD1.5 with 49407); the unconditional row is always "" in MNN.
  * Normalization is per code point: NFC by table lookup (no composition of "e" + U+0301),
    C0/C1 controls and zero-width characters become spaces, lowercase uses 1:1 mappings only,
    and the "\\s+" -> " " Replace is dropped by the writer (harmless: the split removes spaces).
  * Regexes run on "folded" text (each non-ASCII code point becomes its category marker).
For BERT (Taiyi) the C++ agrees with HF for ordinary text: [CLS] ... [SEP], padded with 0.
For T5 (SD3.5's tokenizer_3, Unigram) the runtime adds no BOS, EOS 1 unless the ids already end
with it, cuts to 256 with EOS last and pads with 0, as diffusers does; sd2mnn.tokenization.t5_scheme's .mtok
makes the ids Hugging Face's (what remains is listed there).
"""
from __future__ import annotations

import functools
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd2mnn.core.files import confined
from sd2mnn.errors import InputError
from sd2mnn.tokenization.codes import Decoder, Model, Normalizer, PostOp, PreTokenizer

MTOK_NAME = "tokenizer.mtok"


@dataclass(frozen=True)
class PromptFormat:
    """What MNN's runtime does with a tokenizer: diffusion_demo's model_type, BOS/EOS, length.
    Each family says which format each of its tokenizers is run with (Family.prompt_formats).

    A negative id is one the runtime does not add (MtokTokenizer checks ``id >= 0``), as T5's BOS."""

    name: str
    model_type: int
    bos_id: int
    eos_id: int
    max_length: int
    # The EOS the family's exported text encoder writes after the runtime's ids itself, where the
    # runtime adds none but the model was trained with one (Wan's umT5); -1: none.
    graph_eos_id: int = -1


def read_mtok_model_kind(path: Path) -> str:
    """The tokenizer model kind ("BPE", "WordPiece", ...) a tokenizer.mtok holds."""
    return read_mtok(path).model.kind


class PromptTokenizer:
    """A tokenizer.mtok, encoding like MNN's C++ runtime with ``prompt_format``."""

    def __init__(self, mtok: "_Mtok", prompt_format: PromptFormat):
        self._mtok = mtok
        self.format = prompt_format

    @classmethod
    def from_dir(cls, path: Path, prompt_format: PromptFormat) -> "PromptTokenizer":
        """A bundle's tokenizer.mtok (``path`` the file, the bundle, or a folder holding
        tokenizer/tokenizer.mtok)."""
        path = Path(path)
        fix = "replace the link with the file itself"
        candidates = [path] if path.is_file() else [confined(path, rel, fix) for rel in (MTOK_NAME, f"tokenizer/{MTOK_NAME}")]
        for candidate in candidates:
            if candidate.is_file():
                return cls(read_mtok(candidate), prompt_format)
        raise InputError(f"{path}: no {MTOK_NAME}; point at a bundle, or convert the tokenizer folder first")

    @property
    def model_kind(self) -> str:
        """The .mtok's model kind: "BPE", "WordPiece" or "Unigram"."""
        return self._mtok.model.kind

    @property
    def vocabulary(self) -> dict[str, int]:
        """The BPE model's token -> id table, as the .mtok has it."""
        return self._mtok.model.vocab

    def model_ids(self, piece: str) -> list[int]:
        """The model's ids for one pre-token as the runtime hands it over (after normalization
        and pre-tokenization; byte-level characters for CLIP)."""
        return self._mtok.model.tokenize(piece)

    def encode(self, text: str) -> list[int]:
        """MNN's Tokenizer::encode: the ids of ``text``, no BOS/EOS added unless the file says so."""
        return self._mtok.encode(text)

    def encode_single(self, text: str, max_length: int | None = None) -> list[int]:
        """MtokTokenizer::encodeSingle: BOS/EOS if missing, cut (EOS last) or padded with 0."""
        fmt, max_length = self.format, max_length or self.format.max_length
        ids = self.encode(text)
        # A negative id is one the runtime does not add (T5 has no BOS).
        if fmt.bos_id >= 0 and (not ids or ids[0] != fmt.bos_id):
            ids.insert(0, fmt.bos_id)
        if fmt.eos_id >= 0 and (not ids or ids[-1] != fmt.eos_id):
            ids.append(fmt.eos_id)
        if len(ids) > max_length:
            ids = ids[:max_length]
            if fmt.eos_id >= 0:
                ids[-1] = fmt.eos_id
        return ids + [0] * (max_length - len(ids))

    def encode_pair(self, prompt: str, max_length: int | None = None, negative_prompt: str = "") -> np.ndarray:
        """int32 [2, max_length]: row 0 the unconditional (MNN: always ""), row 1 the prompt."""
        rows = [self.encode_single(negative_prompt, max_length), self.encode_single(prompt, max_length)]
        return np.array(rows, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Reading tokenizer.mtok (the layout is in sd2mnn.tokenization.writer's docstring)
# ---------------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def take(self, fmt: str):
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        raw = self.raw(self.take("<H"))
        return raw.decode("utf-8", errors="replace")

    def raw(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def table(self) -> dict[int, str]:
        return {self.take("<I"): self.string() for _ in range(self.take("<I"))}

    def more(self) -> bool:
        return self.pos < len(self.data)


def read_mtok(path: Path) -> "_Mtok":
    data = path.read_bytes()
    try:
        lines = data.split(b"\n", 3)
        magic, kind = lines[0].split()[:2]
        if int(magic) != 430 or int(kind) != 4:
            raise ValueError(f"header {lines[0]!r} is not '430 4'")
        counts = [int(n) for n in lines[1].split()[:3]]
        ids = [int(n) for n in lines[2].split()]
        r = _Reader(data, len(lines[0]) + len(lines[1]) + len(lines[2]) + 3)
        mtok = _Mtok(special=ids[:counts[0]], prefix=ids[counts[0] + counts[1]:sum(counts)],
                     normalizer=_read_normalizer(r), pre_tokenizer=_read_pre_tokenizer(r),
                     model=_read_model(r))
        mtok.read_tail(r)
    except (ValueError, IndexError, struct.error) as err:
        raise InputError(f"{path}: not a readable MNN pipeline tokenizer ({err}); "
                         "rewrite it with sd2mnn convert") from err
    return mtok


def _read_normalizer(r: _Reader):
    """A function str -> str, or None."""
    kind = r.take("<B")
    if kind == Normalizer.NONE:
        return None
    if kind in (Normalizer.NFKC_NO_TABLE, Normalizer.NFKC):  # a per-code-point table; old files carry none
        table = r.table() if kind == Normalizer.NFKC else {}
        return (lambda text: "".join(" " if _is_control(ord(c)) else table.get(ord(c), c) for c in text)) \
            if table else (lambda text: text)
    if kind == Normalizer.PREPEND:
        prefix = r.string()
        return lambda text: prefix + text
    if kind == Normalizer.REPLACE:
        pattern, content = r.string(), r.string()
        return _Replace(pattern, content) if pattern else None
    if kind == Normalizer.SEQUENCE:
        steps = _fuse_replacements([n for n in (_read_normalizer(r) for _ in range(r.take("<I"))) if n])

        def sequence(text):
            for step in steps:
                text = step(text)
            return text
        return sequence
    if kind in (Normalizer.BERT, Normalizer.BERT_WITH_NFD):
        clean, chinese, strip, lower = (bool(b) for b in r.raw(4))
        nfd = r.table() if kind == Normalizer.BERT_WITH_NFD and strip else {}
        return lambda text: _bert_normalize(text, clean, chinese, strip and bool(nfd), lower, nfd)
    if kind == Normalizer.STRIP:
        left, right = (bool(b) for b in r.raw(2))
        return lambda text: _strip_whitespace(text, left, right)
    raise ValueError(f"unknown normalizer type {kind}")


@dataclass(frozen=True)
class _Replace:
    """MNN's literal Replace normalizer (left to right, no overlaps)."""

    pattern: str
    content: str

    def __call__(self, text: str) -> str:
        return text.replace(self.pattern, self.content)


def _fuse_replacements(steps: list) -> list:
    """Runs of one-character Replace steps as one str.translate: the same result as one after
    the other when no content holds a later step's pattern (sd2mnn's .mtok has thousands)."""
    fused, run = [], {}
    written: set[str] = set()  # every character of the run's contents: a one-character pattern's test

    def flush():
        if len(run) > 1:
            table = str.maketrans(dict(run))
            fused.append(lambda text: text.translate(table))
        else:
            fused.extend(_Replace(p, c) for p, c in run.items())
        run.clear()
        written.clear()

    for step in steps:
        single = isinstance(step, _Replace) and len(step.pattern) == 1
        if not (single and step.pattern not in run and step.pattern not in written):
            flush()
            if not single:
                fused.append(step)
                continue
        run[step.pattern] = step.content
        written.update(step.content)
    flush()
    return fused


def _read_pre_tokenizer(r: _Reader):
    """A function list[str] -> list[str], or None."""
    kind = r.take("<B")
    if kind == PreTokenizer.NONE:
        return None
    if kind == PreTokenizer.BYTE_LEVEL:
        use_regex = bool(r.take("<B"))

        def byte_level(splits):
            if use_regex:
                splits = [p for s in splits if s for p in _regex_scan(s, GPT2_PATTERN)]
            return ["".join(BYTE_TO_CHAR[b] for b in s.encode("utf-8")) for s in splits]
        return byte_level
    if kind == PreTokenizer.DIGITS:
        individual = bool(r.take("<B"))
        return lambda splits: [p for s in splits for p in _split_digits(s, individual)]
    if kind == PreTokenizer.METASPACE:
        replacement, prefix_space = r.string(), bool(r.take("<B"))

        def metaspace(splits):
            splits = [" " + s if prefix_space and s and s[0] != " " else s for s in splits]
            return [s.replace(" ", replacement) for s in splits]
        return metaspace
    if kind == PreTokenizer.SPLIT:
        pattern, invert, behavior = r.string(), bool(r.take("<B")), r.take("<B")
        _compile(pattern)  # refuse a pattern sd2mnn cannot reproduce now, not at the first prompt
        return lambda splits: [p for s in splits if s for p in _regex_split(s, pattern, invert, behavior)]
    if kind == PreTokenizer.BERT:
        return lambda splits: [p for s in splits for p in _bert_split(s)]
    if kind == PreTokenizer.SEQUENCE:
        steps = [p for p in (_read_pre_tokenizer(r) for _ in range(r.take("<I"))) if p]

        def sequence(splits):
            for step in steps:
                splits = step(splits)
            return splits
        return sequence
    raise ValueError(f"unknown pre-tokenizer type {kind}")


def _read_model(r: _Reader) -> "BpeModel | _WordPiece | UnigramModel":
    kind, size = r.take("<B"), r.take("<I")
    if kind == Model.BPE:
        r.take("<B")  # byte_fallback: unused by the C++, which always tries <0xXX> tokens
        byte_level, n_merges = bool(r.take("<B")), r.take("<I")
        vocab = _read_vocab(r, size)
        merges: dict[tuple[int, int], int] = {}
        for _ in range(n_merges):
            a, b, rank = r.take("<III")
            merges.setdefault((a, b), rank)  # sorted by pair, ties by rank: the first one wins
        return BpeModel(vocab, merges, byte_level)
    if kind == Model.WORDPIECE:
        unk, prefix, max_chars = r.string(), r.string(), r.take("<I")
        return _WordPiece(_read_vocab(r, size), unk, prefix, max_chars)
    if kind == Model.UNIGRAM:
        unk_id, byte_fallback = r.take("<I"), bool(r.take("<B"))
        entries = []
        for _ in range(size):
            token = r.raw(r.take("<H"))
            token_id, score = r.take("<Id")
            entries.append((token, token_id, score))
        return UnigramModel(entries, unk_id, byte_fallback)
    raise ValueError(f"unknown model type {kind}")


def _read_vocab(r: _Reader, size: int) -> dict[str, int]:
    vocab = {}
    for _ in range(size):
        token = r.string()
        vocab[token] = r.take("<I")
    return vocab


@dataclass
class _Mtok:
    special: list[int]
    prefix: list[int]
    normalizer: object
    pre_tokenizer: object
    model: "BpeModel | _WordPiece"
    added: tuple = ()  # (id, content, lstrip, rstrip)
    post_ops: tuple = ()  # (kind, id): kind 0 = the text, 1 = a special token
    byte_level_decode: bool = False
    wordpiece_prefix: str | None = None

    def read_tail(self, r: _Reader) -> None:
        self._read_decoder(r)
        added = []
        for _ in range(r.take("<I")):
            token_id, _special, lstrip, rstrip = r.take("<IBBB")
            added.append((token_id, r.string(), bool(lstrip), bool(rstrip)))
        self.added = tuple(added)
        # Optional fields: chat template, eos, flags, bos (decoding only), then the
        # single-sequence post-processor that newer MNN writers add.
        if r.more():
            r.raw(r.take("<I"))
        for field in ("<H", "<B", "<H"):
            if r.more():
                n = r.take(field)
                if field == "<H":
                    r.raw(n)
        if r.more():
            count = r.take("<H")
            if len(r.data) - r.pos == 4 * count:  # an older variant: special ids after the text
                self.post_ops = ((PostOp.SEQUENCE, -1),) + tuple((PostOp.SPECIAL_TOKEN, r.take("<I")) for _ in range(count))
            else:
                ops = []
                for _ in range(count):
                    kind = r.take("<B")
                    if kind not in (PostOp.SEQUENCE, PostOp.SPECIAL_TOKEN):
                        break
                    ops.append((kind, r.take("<I") if kind == PostOp.SPECIAL_TOKEN else -1))
                self.post_ops = tuple(ops)

    def _read_decoder(self, r: _Reader) -> None:
        kind = r.take("<B")
        if kind == Decoder.BYTE_LEVEL:
            self.byte_level_decode = True  # MNN reads 0 as ByteLevel
        elif kind == Decoder.METASPACE:
            r.string()
            r.take("<B")
        elif kind == Decoder.REPLACE:
            r.string()
            r.string()
        elif kind == Decoder.WORDPIECE:
            self.wordpiece_prefix = r.string()
            r.take("<B")
        elif kind == Decoder.STRIP:
            r.string()
            r.take("<II")
        elif kind == Decoder.SEQUENCE:
            for _ in range(r.take("<I")):
                self._read_decoder(r)

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = list(self.prefix)
        # Tokenizer::encode first cuts the raw text at the special tokens, as decode() spells them.
        specials = [(s, i) for i in self.special if (s := self.decode_special(i))]
        start = i = 0
        while i < len(text):
            hit = next(((s, token_id) for s, token_id in specials if text.startswith(s, i)), None)
            if hit:
                ids += self._encode_text(text[start:i])
                ids.append(hit[1])
                start = i = i + len(hit[0])
            else:
                i += 1
        ids += self._encode_text(text[start:])
        if self.post_ops:
            ids = [x for kind, token_id in self.post_ops
                   for x in (ids if kind == PostOp.SEQUENCE else [token_id] if token_id >= 0 else [])]
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """PipelineTokenizer::encode: added tokens, then normalize, pre-tokenize, model."""
        ids: list[int] = []
        while text:
            hit = self._find_added(text)
            if hit is None:
                ids += self._pipeline(text)
                break
            pos, (_, content, lstrip, rstrip) = hit
            before, text = text[:pos], text[pos + len(content):]
            ids += self._pipeline(before.rstrip(C_SPACE) if lstrip else before)
            ids.append(next(a[0] for a in self.added if a[1] == content))  # the first with that text
            if rstrip:
                text = text.lstrip(C_SPACE)
        return ids

    def _find_added(self, text: str):
        """The earliest added token in ``text`` (the longest on a tie)."""
        best = None
        for token in self.added:
            pos = text.find(token[1]) if token[1] else -1
            if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(token[1]) > len(best[1][1]))):
                best = (pos, token)
        return best

    def _pipeline(self, text: str) -> list[int]:
        if not text:
            return []
        if self.normalizer:
            text = self.normalizer(text)
        if not text:
            return []
        splits = self.pre_tokenizer([text]) if self.pre_tokenizer else [text]
        return [token_id for s in splits for token_id in self.model.tokenize(s)]

    def decode_special(self, token_id: int) -> str:
        """PipelineTokenizer::decode(id) for one token, which is how the C++ spells specials."""
        token = self.model.id_to_token(token_id)
        raw = re.sub(rb"<0x([0-9A-Fa-f]{2})>", lambda m: bytes([int(m.group(1), 16)]),
                     token.replace("\u2581", " ").encode("utf-8"))
        if self.wordpiece_prefix is not None:
            p = self.wordpiece_prefix.encode("utf-8")
            raw = raw[len(p):] if p and raw.startswith(p) else b" " + raw
        elif self.byte_level_decode:
            text = raw.decode("utf-8", errors="replace")
            raw = b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8") for c in text)
        return raw.decode("utf-8", errors="replace")


class BpeModel:
    kind = "BPE"

    def __init__(self, vocab: dict[str, int], merges: dict[tuple[int, int], int], byte_level: bool):
        self.vocab, self.merges, self.byte_level = vocab, merges, byte_level
        self.tokens = {i: t for t, i in vocab.items()}
        self._cache: dict[str, list[int]] = {}

    def id_to_token(self, token_id: int) -> str:
        return self.tokens.get(token_id, "")

    def tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        if text in self._cache:
            return list(self._cache[text])
        if self.byte_level:
            pieces = [BYTE_TO_CHAR[b] for b in text.encode("utf-8")]
        else:  # one symbol per code point, else its <0xXX> byte tokens; unknown ones vanish
            pieces = [p for c in text for p in ([c] if c in self.vocab else
                                                 [f"<0x{b:02X}>" for b in c.encode("utf-8")])]
        ids = [self.vocab[p] for p in pieces if p in self.vocab]
        # Merge the lowest-ranked adjacent pair (leftmost on a tie) until none applies. No
        # end-of-word suffix ("</w>") is ever added: MNN's BPE has none.
        while len(ids) > 1:
            pairs = enumerate(zip(ids, ids[1:]))
            candidates = [(self.merges[pair], i) for i, pair in pairs if pair in self.merges]
            if not candidates:
                break
            _, i = min(candidates)
            merged = self.vocab.get(self.id_to_token(ids[i]) + self.id_to_token(ids[i + 1]))
            if merged is None:
                break
            ids[i:i + 2] = [merged]
        self._cache[text] = ids
        return list(ids)


class UnigramModel:
    """MNN's UnigramModel: a Viterbi search over the UTF-8 bytes of one pre-token.

    As the C++ does it, not as SentencePiece or Hugging Face do: every vocabulary entry can match
    (also <pad>, </s>), a tie keeps the path found first (the shortest last piece), an unknown
    character is an <unk> only where no piece ends, scored with <unk>'s own score, and a run of
    <unk> collapses to one."""

    kind = "Unigram"

    def __init__(self, entries: list[tuple[bytes, int, float]], unk_id: int, byte_fallback: bool):
        self.vocab = {token: token_id for token, token_id, _ in entries}
        self.tokens = {token_id: token.decode("utf-8", errors="replace") for token, token_id, _ in entries}
        self.scores = {token_id: score for _, token_id, score in entries}
        self.unk_id, self.byte_fallback = unk_id, byte_fallback
        self.max_len = max((len(token) for token in self.vocab), default=0)
        self.unk_score = self.scores.get(unk_id, -10.0)
        self._cache: dict[str, list[int]] = {}

    def id_to_token(self, token_id: int) -> str:
        return self.tokens.get(token_id, self.tokens.get(self.unk_id, ""))

    def tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        if text not in self._cache:
            self._cache[text] = self._viterbi(text.encode("utf-8"))
        return list(self._cache[text])

    def _viterbi(self, data: bytes) -> list[int]:
        n, unset = len(data), -1e17
        best = [-1e18] * (n + 1)
        best_id, best_prev = [-1] * (n + 1), [0] * (n + 1)
        best[0] = 0.0
        for i in range(1, n + 1):
            for j in range(i - 1, max(i - self.max_len, 0) - 1, -1):
                if best[j] <= unset:
                    continue
                token_id = self.vocab.get(data[j:i], -1)
                if token_id != -1 and token_id != self.unk_id:
                    score = self.scores[token_id]
                elif self.byte_fallback and i - j == 1:
                    token_id = self.vocab.get(f"<0x{data[j]:02X}>".encode(), self.unk_id)
                    score = self.scores.get(token_id, self.unk_score) if token_id != self.unk_id else self.unk_score
                else:
                    continue
                if best[j] + score > best[i] or best[i] <= unset:
                    best[i], best_prev[i], best_id[i] = best[j] + score, j, token_id
            if best[i] <= unset:
                # No piece ends here: one character (or, inside one, a byte) as <unk>.
                char_len = 1
                for k in range(1, min(4, i) + 1):
                    c = data[i - k]
                    if c & 0xC0 != 0x80:
                        expected = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2 if c >= 0xC0 else 1
                        char_len = k if expected == k else 1
                        break
                if best[i - char_len] > unset:
                    best[i], best_prev[i], best_id[i] = best[i - char_len] + self.unk_score, i - char_len, self.unk_id
        if best[n] <= unset:
            return []
        out, cur = [], n
        while cur > 0:
            token_id = best_id[cur]
            if not out or token_id != self.unk_id or out[-1] != self.unk_id:
                out.append(token_id)
            cur = best_prev[cur]
        return out[::-1]


class _WordPiece:
    kind = "WordPiece"

    def __init__(self, vocab: dict[str, int], unk: str, prefix: str, max_chars: int):
        self.vocab = {t.encode("utf-8"): i for t, i in vocab.items()}
        self.tokens = {i: t for t, i in vocab.items()}
        self.unk, self.prefix, self.max_chars = unk, prefix.encode("utf-8"), max_chars
        self.unk_id = vocab.get(unk, -1)

    def id_to_token(self, token_id: int) -> str:
        return self.tokens.get(token_id, self.unk)

    def tokenize(self, text: str) -> list[int]:
        """Greedy longest match; the C++ measures words and shortens candidates in bytes."""
        word = text.encode("utf-8")
        if not word:
            return []
        if len(word) > self.max_chars:
            return [self.unk_id] if self.unk_id != -1 else []
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                token_id = self.vocab.get((self.prefix if start else b"") + word[start:end])
                if token_id is not None and token_id != self.unk_id:
                    ids.append(token_id)
                    start = end
                    break
            else:
                return [self.unk_id]
        return ids


# ---------------------------------------------------------------------------------------------
# Character classes and text steps, as MNN defines them (tables from Python's unicodedata, as
# MNN's gen_unicode_data.py makes its own)
# ---------------------------------------------------------------------------------------------

C_SPACE = " \t\n\v\f\r"  # C isspace(), used for added tokens' lstrip/rstrip


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def _is_control(cp: int) -> bool:
    """Characters the table normalizer turns into spaces (SentencePiece's rule)."""
    if cp in (0, 0x0A, 0x0D, 0x09):
        return False
    return (1 <= cp <= 0x1F or cp == 0x7F or 0x80 <= cp <= 0x9F or cp in (0x200B, 0x200C, 0x200D, 0xFEFF)
            or 0x200E <= cp <= 0x200F or 0x202A <= cp <= 0x202E or 0x2060 <= cp <= 0x2069
            or 0xFFF0 <= cp <= 0xFFF8)


def _is_whitespace(c: str) -> bool:
    return c in C_SPACE or unicodedata.category(c) == "Zs"


def _to_lower(c: str) -> str:
    lower = c.lower()
    return lower if len(lower) == 1 else c  # 1:1 mappings only ("İ" stays)


def _is_chinese(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _bert_normalize(text: str, clean: bool, chinese: bool, strip: bool, lower: bool, nfd: dict) -> str:
    out = []
    for c in text:
        cp, cat = ord(c), unicodedata.category(c)
        if clean and (c in "\t\n\r" or cat == "Zs"):
            out.append(" ")
        elif clean and (cp in (0, 0xFFFD) or cat == "Cc"):
            continue
        elif chinese and _is_chinese(cp):
            out.append(f" {c} ")
        elif strip:
            out.extend(d for d in nfd.get(cp, c) if not unicodedata.category(d).startswith("M"))
        else:
            out.append(c)
    text = "".join(out)
    return "".join(_to_lower(c) for c in text) if lower else text


def _strip_whitespace(text: str, left: bool, right: bool) -> str:
    start, end = 0, len(text)
    while left and start < end and _is_whitespace(text[start]):
        start += 1
    while right and end > start and _is_whitespace(text[end - 1]):
        end -= 1
    return text[start:end]


def _split_digits(s: str, individual: bool) -> list[str]:
    if not individual:
        return [s] if s else []
    return [p for p in re.split(r"([0-9])", s) if p]


def _bert_split(s: str) -> list[str]:
    """Split on whitespace and isolate punctuation (Unicode P* and ASCII symbols)."""
    out, current = [], ""
    for c in s:
        if _is_whitespace(c):
            out += [current] if current else []
            current = ""
        elif unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum() and 33 <= ord(c) <= 126):
            out += ([current] if current else []) + [c]
            current = ""
        else:
            current += c
    return out + ([current] if current else [])


# ---------------------------------------------------------------------------------------------
# Regexes. MNN folds the text to one byte per code point (ASCII as is, any other code point to
# its category marker) and matches an ASCII regex on that, where \p{L} means "ASCII letter or the
# letter marker" and so on. Here the pattern's classes are rewritten to the same folded sets and
# Python's re matches the same folded text. That is exact for the patterns SD tokenizers use
# (CLIP's split, GPT-2's byte-level split); constructs MNN's engine treats its own way
# (lookbehind, \b, backreferences, lazy quantifiers, non-ASCII literals) are refused.
# ---------------------------------------------------------------------------------------------

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LETTER, _NUMBER, _SPACE, _OTHER, _MARK, _PUNCT, _SYMBOL = range(1, 8)


def _fold(c: str) -> str:
    if c.isascii():
        return c
    cat = unicodedata.category(c)
    if cat == "Zs":
        return chr(_SPACE)
    return chr({"L": _LETTER, "N": _NUMBER, "M": _MARK, "P": _PUNCT, "S": _SYMBOL}.get(cat[0], _OTHER))


def _members(chars: str, marker: int) -> str:
    return "".join(f"\\x{ord(c):02x}" for c in chars + chr(marker))


_LETTERS = _members("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", _LETTER)
_DIGITS = _members("0123456789", _NUMBER)
_SPACES = _members(" \t\n\r\f\v", _SPACE)
_FOLDED_CLASSES = {  # the contents of a [...] for each escape, over folded text
    "p{L}": _LETTERS, "p{N}": _DIGITS, "p{M}": _members("", _MARK), "p{Z}": _SPACES,
    "p{P}": _members("!\"#%&'()*,-./:;?@[\\]_{}", _PUNCT), "p{S}": _members("$+<=>^`|~", _SYMBOL),
    "s": _SPACES, "d": _DIGITS, "w": _LETTERS + _DIGITS + "_",
}
_UNSUPPORTED = re.compile(r"[^\x00-\x7f]|\(\?[=<]|\\[bBAZ1-9]|[+*?}]\?|(?<!\\)[\^$](?![^\[]*\])")


def _fold_pattern(pattern: str) -> str:
    if _UNSUPPORTED.search(pattern.replace("[^", "[")):
        raise InputError(f"the tokenizer's pre-tokenizer regex {pattern!r} uses constructs MNN's "
                         "regex engine handles its own way; sd2mnn reproduces SD1.5 and Taiyi tokenizers")
    out, in_class, i = [], False, 0
    while i < len(pattern):
        escape = re.match(r"\\([pP]\{\w+\}|[sSdDwW])", pattern[i:])
        if escape:
            name = escape.group(1)  # \p{Letter} is \p{L}: MNN reads the first letter only
            negated = name[0] in "PSDW"
            members = _FOLDED_CLASSES.get(name[0].lower() if len(name) == 1 else f"p{{{name[2]}}}")
            if members is None or (in_class and negated):
                raise InputError(f"the tokenizer's pre-tokenizer regex {pattern!r} uses \\{name} "
                                 "in a way sd2mnn does not reproduce")
            out.append(members if in_class else f"[{'^' if negated else ''}{members}]")
            i += escape.end()
            continue
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(_fold_pattern(pattern))


def _matches(text: str, pattern: str) -> list[tuple[int, int]]:
    """MNN's scan: at each position the first alternative that matches; skip a character when
    none does (or only an empty match)."""
    rx, folded = _compile(pattern), "".join(_fold(c) for c in text)
    spans, pos = [], 0
    while pos < len(folded):
        m = rx.match(folded, pos)
        if m and m.end() > pos:
            spans.append((pos, m.end()))
            pos = m.end()
        else:
            pos += 1
    return spans


def _regex_scan(text: str, pattern: str) -> list[str]:
    """Matches, with every unmatched character as a piece of its own."""
    out, prev = [], 0
    for start, end in _matches(text, pattern):
        out += list(text[prev:start]) + [text[start:end]]
        prev = end
    return out + list(text[prev:])


def _regex_split(text: str, pattern: str, invert: bool, behavior: int) -> list[str]:
    """behavior: 0 isolated, 1 removed, 2 merged with previous (the .mtok codes)."""
    segments, prev = [], 0
    for start, end in _matches(text, pattern):
        if start > prev:
            segments.append((text[prev:start], invert))
        segments.append((text[start:end], not invert))
        prev = end
    if prev < len(text):
        segments.append((text[prev:], invert))
    if behavior == 1:
        return [s for s, is_match in segments if not is_match and s]
    if behavior == 2:
        out = []
        for s, is_match in segments:
            if is_match and out:
                out[-1] += s
            elif s:
                out.append(s)
        return out
    return [s for s, _ in segments if s]
