"""The type codes of tokenizer.mtok's binary sections, as MNN's
``PipelineTokenizer::load_vocab_binary`` (transformers/llm/engine/src/tokenizer/tokenizer.cpp)
reads them: one byte before each normalizer, pre-tokenizer, model and decoder. sd2mnn.tokenization.writer writes
them and sd2mnn.tokenization.reader reads them, both by these names."""
from __future__ import annotations

from enum import IntEnum


class Normalizer(IntEnum):
    NONE = 0
    NFKC_NO_TABLE = 1  # an older format: NFKC with an empty table
    PREPEND = 2  # prefix string
    REPLACE = 3  # pattern, content
    SEQUENCE = 4  # u32 count, then each child
    BERT = 5  # clean_text, chinese_chars, strip_accents, lowercase (no NFD table)
    NFKC = 6  # a per-code-point table (NFKC's, or any other map sd2mnn writes)
    BERT_WITH_NFD = 7  # as BERT, then the NFD table for stripping accents
    STRIP = 8  # strip_left, strip_right


class PreTokenizer(IntEnum):
    NONE = 0
    BYTE_LEVEL = 1  # use_regex
    DIGITS = 2  # individual_digits
    METASPACE = 3  # replacement, add_prefix_space
    SPLIT = 4  # pattern, invert, behavior
    BERT = 5
    SEQUENCE = 6  # u32 count, then each child


class Model(IntEnum):
    BPE = 0
    WORDPIECE = 1
    UNIGRAM = 2


class Decoder(IntEnum):
    BYTE_LEVEL = 0  # also what the C++ makes of "no decoder"
    BYTE_FALLBACK = 1
    METASPACE = 2  # replacement, add_prefix_space
    WORDPIECE = 3  # prefix, cleanup
    FUSE = 4
    REPLACE = 5  # pattern, content
    STRIP = 6  # content, start, stop
    SEQUENCE = 7  # u32 count, then each child


class PostOp(IntEnum):
    """The post-processor's steps, after the decoder (sd2mnn writes none; MNN's own files may)."""

    SEQUENCE = 0  # the encoded text
    SPECIAL_TOKEN = 1  # u32 id
