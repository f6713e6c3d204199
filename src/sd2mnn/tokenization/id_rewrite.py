"""The CLIP text encoder's id rewrite: the second part of the "diffusers" scheme
(sd2mnn.tokenization.diffusers_scheme writes the first, the .mtok).

**The text encoder** (``rewrite_graph``): int32 operations in front of the CLIP model, inside
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd2mnn.errors import InputError
from sd2mnn.tokenization.diffusers_scheme import (CONTRACTIONS, END_OF_WORD, split_out_characters,
                                                  uses_end_of_word_scheme)
from sd2mnn.tokenization.reader import PromptFormat, PromptTokenizer
from sd2mnn.tokenization.writer import folder_tokenizer, load_tokenizer_source

SCHEME_VERSION = "clip-eow-2"  # bump when the graph changes beyond its tables (they are in the digest)
MAX_WORD = 40  # the longest last word (in characters) the text encoder re-encodes exactly
HASH_SIZE = 1 << 16  # buckets of the merge table (CLIP has 48,894 merges)


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
                         "convert with --tokenizer-scheme mnn")
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


def load_rewrite(tokenizer_dir: Path, tokenizer_scheme: str, prompt_format: PromptFormat, runtime: PromptTokenizer | None = None,
                 mtok: Path | None = None) -> IdRewrite | None:
    """The id rewrite a bundle of the tokenizer in ``tokenizer_dir`` gets under ``tokenizer_scheme``
    (None where the scheme leaves the tokenizer as MNN writes it), for a runtime that encodes
    with ``prompt_format``. ``runtime``: the PromptTokenizer of that bundle's tokenizer.mtok,
    when it is at hand; else ``mtok``, that file, read only if the scheme rewrites the tokenizer
    (else the .mtok is written to a temp file)."""
    source = load_tokenizer_source(Path(tokenizer_dir))
    if not uses_end_of_word_scheme(source.tokenizer_json, tokenizer_scheme):
        return None
    if runtime is None:
        runtime = (PromptTokenizer.from_dir(Path(mtok), prompt_format) if mtok
                   else folder_tokenizer(Path(tokenizer_dir), tokenizer_scheme, prompt_format))
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
                         "folder without hard links (cp -r), or convert with --tokenizer-scheme mnn") from None
    graph = model.graph
    spec = next((i for i in graph.input if i.name == input_name), None)
    if spec is None:
        raise InputError(f"{source}: no input named {input_name!r}; the text encoder must take input_ids")
    dims = [d.dim_value for d in spec.type.tensor_type.shape.dim]
    if len(dims) != 2 or dims[1] <= 0 or spec.type.tensor_type.elem_type != onnx.TensorProto.INT32:
        raise InputError(f"{source}: input_ids must be int32 [batch, length] with a fixed length; "
                         "export it with sd2mnn export, or convert with --tokenizer-scheme mnn")
    rewritten = "sd2mnn_" + input_name
    for n in graph.node:
        n.input[:] = [rewritten if i == input_name else i for i in n.input]
    for out in graph.output:
        if out.name == input_name:  # an identity passthrough: keep it the runtime's ids
            raise InputError(f"{source}: input_ids is also an output; convert with --tokenizer-scheme mnn")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise InputError(f"{source}: opset {opset} < 13; re-export the text encoder with opset 13 or newer, "
                         "or convert with --tokenizer-scheme mnn")
    nodes, inits = rewrite_graph(rw, dims[1], input_name, rewritten, opset)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    graph.initializer.extend(inits)
    # Weights beside the model only where protobuf's 2 GB limit forces it (CLIP is ~0.5 GB).
    large = sum(t.ByteSize() for t in graph.initializer) > 1_800_000_000  # ByteSize() itself fails over 2 GB
    onnx.save_model(model, str(target), save_as_external_data=large, location=target.name + ".data")
    return target
