"""Prompt -> ids, three ways: what MNN's runtime feeds a bundle's text encoder, what the CLIP or
BERT model inside it sees (after the id rewrite), and what diffusers feeds it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sd2mnn.tokenization.diffusers_scheme import DEFAULT_SCHEME, MARKER
from sd2mnn.tokenization.id_rewrite import IdRewrite, load_rewrite, rewrite_ids
from sd2mnn.tokenization.reader import MTOK_NAME, PromptFormat, PromptTokenizer
from sd2mnn.tokenization.writer import folder_tokenizer, load_tokenizer_source


def _is_end_of_word_mtok(runtime) -> bool:
    """A .mtok of this scheme: its BPE joins a character and the marker into one (end-of-word) id."""
    return len(runtime.model_ids("a" + MARKER)) == 1


def with_graph_eos(ids: np.ndarray, eos: int) -> np.ndarray:
    """The ids a text encoder graph that writes ``eos`` after the runtime's ids gives its model:
    ``eos`` after each row's last id (in the last position when all are used), 0 after it."""
    out = np.array(ids, dtype=np.int32, copy=True)
    for row in out.reshape(-1, out.shape[-1]):
        used = min(int((row != 0).sum()), row.size - 1)
        row[used], row[used + 1:] = eos, 0
    return out


def without_graph_eos(ids: np.ndarray, eos: int) -> np.ndarray:
    """What to feed such a graph for its model to see ``ids`` (each row ending in ``eos``)."""
    out = np.array(ids, dtype=np.int32, copy=True)
    for row in out.reshape(-1, out.shape[-1]):
        used = int((row != 0).sum())
        if used and row[used - 1] == eos:
            row[used - 1] = 0
    return out


class PromptIds:
    """The ids of ``[negative, prompt]`` for a bundle (its tokenizer.mtok and tokenizer files) or
    a tokenizer folder converted with ``tokenizer_scheme``."""

    def __init__(self, tokenizer_dir: Path, runtime, rewrite: IdRewrite | None, tokenizer_scheme: str):
        self.tokenizer_dir, self.runtime, self.rewrite, self.tokenizer_scheme = (
            Path(tokenizer_dir), runtime, rewrite, tokenizer_scheme)
        self._hf = None

    @classmethod
    def for_bundle(cls, bundle_dir: Path, prompt_format: PromptFormat) -> "PromptIds":
        """The bundle folder holding the tokenizer.mtok its runtime encodes with ``prompt_format``
        (the family's format for that tokenizer), beside that tokenizer's files."""
        runtime = PromptTokenizer.from_dir(Path(bundle_dir) / MTOK_NAME, prompt_format)
        if runtime.format.model_type != 0:  # BERT (Taiyi): one .mtok for both schemes
            return cls(bundle_dir, runtime, None, DEFAULT_SCHEME)
        if _is_end_of_word_mtok(runtime):
            return cls(bundle_dir, runtime, load_rewrite(bundle_dir, "diffusers", prompt_format, runtime), "diffusers")
        return cls(bundle_dir, runtime, None, "mnn")

    @classmethod
    def for_tokenizer(cls, tokenizer_dir: Path, prompt_format: PromptFormat, tokenizer_scheme: str = DEFAULT_SCHEME) -> "PromptIds":
        """A tokenizer folder, as a conversion with ``tokenizer_scheme`` would write its tokenizer.mtok."""
        runtime = folder_tokenizer(Path(tokenizer_dir), tokenizer_scheme, prompt_format)
        return cls(tokenizer_dir, runtime, load_rewrite(tokenizer_dir, tokenizer_scheme, prompt_format, runtime), tokenizer_scheme)

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

    def seen_pair(self, runtime_ids: np.ndarray) -> np.ndarray:
        """The ids the model inside the text encoder sees: the id rewrite's, and the EOS a graph
        that writes its own (Wan) adds after them."""
        eos = self.runtime.format.graph_eos_id
        rewritten = self.rewrite_pair(runtime_ids)
        return with_graph_eos(rewritten, eos) if eos >= 0 else rewritten

    def graph_feed(self, model_ids: np.ndarray) -> np.ndarray:
        """What to feed the text encoder's graph for its model to see ``model_ids`` (diffusers'):
        without their EOS where the graph writes its own."""
        eos = self.runtime.format.graph_eos_id
        return without_graph_eos(model_ids, eos) if eos >= 0 else model_ids

    def hf_pair(self, prompt: str, length: int | None = None, negative: str = "") -> np.ndarray:
        """int32 [2, L]: Hugging Face's ids (diffusers' conditioning), from the tokenizer files."""
        length = length or self.max_length
        if self._hf is None:
            from tokenizers import Tokenizer

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
