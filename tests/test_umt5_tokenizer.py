"""Wan's tokenizer (umT5's kind: SentencePiece Unigram with byte fallback): the ids MNN's Wan
runtime makes from the tokenizer.mtok sd2mnn writes (MtokTokenizer kSingle: no BOS, no EOS, 512
ids; the text encoder's graph writes the EOS), against Hugging Face's from the same folder
(the tokenizer.json run by the tokenizers library), on prompts the tokenizer was not trained on;
and what MNN's own writer's file makes of them.

The comparison with MNN's own C++ tokenizer is opt-in, as in test_mnn_tokenizer_match.py:
    SD2MNN_MNN_TOKENIZER=build/mnn_tokenizer pytest tests/test_umt5_tokenizer.py
"""
from __future__ import annotations

from pathlib import Path

import pytest
from t5_tokenizer import umt5_corpus, write_umt5_tokenizer
from test_mnn_tokenizer_match import MNN_TOKENIZER, read_corpus, run_mnn_tokenizer

from sd2mnn.families.wan import TEXT_LENGTH, WAN
from sd2mnn.tokenization.prompt_ids import PromptIds
from sd2mnn.tokenization.reader import MTOK_NAME, PromptTokenizer
from sd2mnn.tokenization.writer import write_mtok

pytest.importorskip("sentencepiece")

MIN_SHARE = 0.99  # of prompts whose ids are Hugging Face's, for a bundle sd2mnn writes
MNN_WRITER_MAX_SHARE = 0.10  # MNN's writer: byte pieces win over the vocabulary almost everywhere


def evaluation_prompts() -> list[str]:
    """The built-in prompts and, to overflow 512 ids, the longest ones three times over."""
    prompts = read_corpus()
    return prompts + [" ".join([p] * 3) for p in prompts if len(p) > 600]


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory) -> Path:
    return write_umt5_tokenizer(tmp_path_factory.mktemp("wan") / "tokenizer")


@pytest.fixture(scope="module")
def bundles(umt5_folder, tmp_path_factory) -> dict[str, Path]:
    """scheme -> a bundle folder holding the tokenizer.mtok that scheme writes, and the tokenizer files."""
    made = {}
    for scheme in ("diffusers", "mnn"):
        bundle = tmp_path_factory.mktemp(f"bundle-{scheme}")
        for item in umt5_folder.iterdir():
            (bundle / item.name).write_bytes(item.read_bytes())
        write_mtok(umt5_folder, bundle / MTOK_NAME, scheme)
        made[scheme] = bundle
    return made


def _identical(ids: PromptIds, prompts: list[str]) -> list[bool]:
    """Per prompt: do the ids the text encoder's model sees (the runtime's, with the EOS the graph
    writes) equal Hugging Face's?"""
    return [bool((ids.seen_pair(ids.runtime_pair(p, TEXT_LENGTH))[1] == ids.hf_pair(p, TEXT_LENGTH)[1]).all())
            for p in prompts]


def test_the_evaluation_prompts_are_not_the_training_text():
    training = umt5_corpus()
    assert sum(any(ord(c) > 127 for c in line) for line in training) > 500  # non-ASCII pieces to learn
    text = "\n".join(training)
    prompts = evaluation_prompts()
    assert not [p for p in prompts if len(p) > 12 and p in text]


def test_a_bundle_gets_hugging_face_ids_and_mnn_writer_bytes_instead(umt5_folder, bundles):
    from tokenizers import Tokenizer

    prompts = evaluation_prompts()
    encodings = {p: Tokenizer.from_file(str(umt5_folder / "tokenizer.json")).encode(p) for p in prompts}
    assert len(prompts) >= 500 and sum(any(ord(c) > 127 for c in p) for p in prompts) >= 50
    assert sum(len(e.ids) > TEXT_LENGTH for e in encodings.values()) >= 5  # cut, EOS kept last
    # Characters no piece covers: Hugging Face spells them in byte pieces.
    spelled_in_bytes = {p for p, e in encodings.items() if any(t.startswith("<0x") for t in e.tokens)}
    assert len(spelled_in_bytes) >= 10
    ours = dict(zip(prompts, _identical(PromptIds.for_bundle(bundles["diffusers"], WAN.prompt), prompts)))
    assert sum(ours.values()) / len(prompts) >= MIN_SHARE, [p for p, ok in ours.items() if not ok][:10]
    assert sum(ours[p] for p in spelled_in_bytes) >= len(spelled_in_bytes) - 1
    theirs = _identical(PromptIds.for_bundle(bundles["mnn"], WAN.prompt), prompts)
    assert sum(theirs) / len(prompts) <= MNN_WRITER_MAX_SHARE


@pytest.mark.skipif(not MNN_TOKENIZER, reason="set SD2MNN_MNN_TOKENIZER to a tokenizer built by "
                                              "scripts/build_mnn_tokenizer.sh to compare against it")
@pytest.mark.parametrize("scheme", ["diffusers", "mnn"])
def test_mnn_tokenizer_gives_the_python_ids(bundles, tmp_path, scheme):
    prompts = evaluation_prompts()
    cpp = run_mnn_tokenizer(bundles[scheme], prompts, tmp_path, ("--single", "-1", "-1", str(TEXT_LENGTH)))
    tokens = PromptTokenizer.from_dir(bundles[scheme], WAN.prompt)
    python = [tokens.encode_single(p) for p in prompts]
    differ = [i for i, (c, p) in enumerate(zip(cpp, python)) if c != p]
    shown = "\n".join(f"{prompts[i]!r}\n  C++    {cpp[i]}\n  Python {python[i]}" for i in differ[:5])
    assert not differ, f"{scheme}: {len(differ)} of {len(prompts)} prompts differ, e.g.\n{shown}"
