"""Taiyi (Chinese BERT WordPiece, 512 tokens): the ids MNN's runtime feeds the text encoder
against the ids diffusers' Taiyi pipeline gets from transformers' BertTokenizer
(``tokenizer(prompt, padding="max_length", max_length=512, truncation=True).input_ids``), on the
built-in English corpus and a Chinese one (tests/data/prompts_zh.txt).

The runtime's ids are sd2mnn's PromptIds (the .mtok sd2mnn writes, read and encoded as MNN's C++
does; the opt-in test at the end checks them against MNN's own tokenizer). They agree with
Hugging Face everywhere but on a few characters MNN's BertNormalizer and WordPiece treat their
own way; every such prompt of the corpus is listed in ``DIFFERING`` with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from bert_tokenizer import write_bert_tokenizer

from sd2mnn.families import TAIYI
from sd2mnn.tokenization.prompt_ids import PromptIds
from sd2mnn.tokenization.writer import write_mtok

CORPUS = Path(__file__).parents[1] / "src" / "sd2mnn" / "data" / "prompts.txt"
CHINESE = Path(__file__).parent / "data" / "prompts_zh.txt"
LENGTH = 512

# Prompts where MNN's own BertNormalizer and WordPiece differ from Hugging Face's, and why; the
# .mtok sd2mnn writes by default spells Hugging Face's normalizer in steps MNN has (see
# conditioning.bert_hugging_face_json), so none of them differ with it.
MNN_DIFFERS_ON = {
    # U+20E3 (keycap, an enclosing mark Me): MNN's strip-accents drops every mark, Hugging Face
    # only nonspacing ones (Mn); "1\u20e3" is then "1" for MNN, [UNK] for Hugging Face.
    "1\ufe0f\u20e3号选手，赛跑，运动会",
    # Format characters (Cf: zero-width space, soft hyphen): Hugging Face's clean_text deletes
    # them, MNN's deletes only control characters (Cc), so the word around them becomes [UNK].
    "一只猫\u200b，可爱，复制粘贴的提示词",
    "super\u00adman超人，漫画封面",
    # A CJK compatibility ideograph (U+F900): Hugging Face decomposes it (NFD) to U+8C48, MNN
    # isolates Chinese characters before its NFD step and looks U+F900 up as it is ([UNK]).
    "\uf900有此理，书法",
    # A word of 34..100 characters but over 100 UTF-8 bytes: MNN's WordPiece limit counts bytes,
    # Hugging Face's characters, so MNN makes it [UNK].
    "ふしぎなもりのなかでちいさなおんなのこがうさぎといっしょにあそんでいるえほんのいらすと",
}
DIFFERING: set[str] = set()
# Measured on the 660 + 230 prompts (positions: all 512 of every row).
PROMPTS, IDENTICAL, POSITIONS_IDENTICAL = 890, 890, 455680


def read_prompts(path: Path) -> list[str]:
    # Split on "\n" only, as MNN's tools read lines: prompts keep their spaces and tabs.
    text = path.read_bytes().decode("utf-8")
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


@pytest.fixture(scope="module")
def taiyi_folder(tmp_path_factory) -> Path:
    return write_bert_tokenizer(tmp_path_factory.mktemp("taiyi") / "tokenizer")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return read_prompts(CORPUS) + read_prompts(CHINESE)


@pytest.fixture(scope="module")
def transformers_ids(taiyi_folder, prompts) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.BertTokenizer.from_pretrained(taiyi_folder.as_posix())
    assert tokenizer.model_max_length == LENGTH
    return np.array([tokenizer(p, padding="max_length", max_length=LENGTH, truncation=True).input_ids
                     for p in prompts], dtype=np.int32)


@pytest.fixture(scope="module")
def prompt_ids(taiyi_folder) -> PromptIds:
    ids = PromptIds.for_tokenizer(taiyi_folder, TAIYI.prompt, "diffusers")
    assert ids.max_length == LENGTH
    return ids


def test_corpus(prompts):
    assert len(read_prompts(CORPUS)) == 660
    assert len(read_prompts(CHINESE)) >= 200
    assert MNN_DIFFERS_ON <= set(prompts)


def test_runtime_ids_against_transformers(prompt_ids, prompts, transformers_ids):
    runtime = np.stack([prompt_ids.runtime_pair(p)[1] for p in prompts])
    assert runtime.shape == transformers_ids.shape == (PROMPTS, LENGTH)
    same = (runtime == transformers_ids).all(axis=1)
    differ = {prompts[i] for i in np.flatnonzero(~same)}
    assert differ == DIFFERING, (f"newly differing: {sorted(differ - DIFFERING)!r}; "
                                 f"now identical: {sorted(DIFFERING - differ)!r}")
    assert int(same.sum()) == IDENTICAL
    assert int((runtime == transformers_ids).sum()) == POSITIONS_IDENTICAL


def test_mnns_own_flow_differs_on_those_characters(taiyi_folder, prompts, transformers_ids):
    mnn = PromptIds.for_tokenizer(taiyi_folder, TAIYI.prompt, "mnn")
    runtime = np.stack([mnn.runtime_pair(p)[1] for p in prompts])
    differ = {prompts[i] for i in np.flatnonzero(~(runtime == transformers_ids).all(axis=1))}
    assert differ == MNN_DIFFERS_ON


def test_runtime_pair_rows(prompt_ids):
    """[CLS] text [SEP], padded with 0; the unconditional row is ""; cut at 512 with [SEP] last."""
    pair = prompt_ids.runtime_pair("一只猫")
    assert pair.shape == (2, LENGTH) and pair.dtype == np.int32
    assert pair[0, :3].tolist() == [101, 102, 0] and not pair[0, 2:].any()
    assert pair[1, 0] == 101 and pair[1, 4] == 102 and not pair[1, 5:].any()
    long = prompt_ids.runtime_pair("猫" * 600)[1]
    assert long[0] == 101 and long[-1] == 102 and (long[1:-1] == long[1]).all()


def test_hf_pair_is_transformers(prompt_ids, prompts, transformers_ids):
    """PromptIds.hf_pair (the tokenizers library, what verify compares against) is exactly
    transformers' BertTokenizer as diffusers calls it."""
    hf = np.stack([prompt_ids.hf_pair(p)[1] for p in prompts])
    np.testing.assert_array_equal(hf, transformers_ids)


def test_prompts_over_512_tokens(taiyi_folder, prompt_ids, prompts):
    """Cut to 512 with [SEP] last, by the runtime, hf_pair and transformers alike."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.BertTokenizer.from_pretrained(taiyi_folder.as_posix())
    for prompt in ("猫" * 600, "，".join(prompts[660:700]), " ".join(prompts[:40])):
        expected = tokenizer(prompt, padding="max_length", max_length=LENGTH, truncation=True).input_ids
        assert len(tokenizer(prompt).input_ids) > LENGTH
        assert prompt_ids.runtime_pair(prompt)[1].tolist() == expected
        assert prompt_ids.hf_pair(prompt)[1].tolist() == expected


MNN_TOKENIZER = os.environ.get("SD2MNN_MNN_TOKENIZER")


@pytest.mark.skipif(not MNN_TOKENIZER, reason="set SD2MNN_MNN_TOKENIZER to a tokenizer built by "
                                              "scripts/build_mnn_tokenizer.sh to compare against it")
def test_mnn_tokenizer_gives_the_runtime_ids(taiyi_folder, prompts, prompt_ids, tmp_path):
    """MNN's own C++ tokenizer on the Taiyi .mtok. The program makes SD1.5's call (BOS/EOS
    49406/49407, 77 ids), so its rows are [49406, text ids, 49407] cut at 77: the text ids are
    compared, as far as 75 of them."""
    from test_mnn_tokenizer_match import run_mnn_tokenizer

    write_mtok(taiyi_folder, tmp_path / "tokenizer.mtok", "diffusers")
    cpp = run_mnn_tokenizer(tmp_path, prompts, tmp_path)
    assert len(cpp) == len(prompts)
    differ = []
    for prompt, row in zip(prompts, cpp):
        ids = prompt_ids.runtime_pair(prompt)[1].tolist()
        text = ids[1:int(np.flatnonzero(ids)[-1])]  # [CLS] text [SEP] 0...
        assert row[0] == 49406
        end = row.index(49407)
        if row[1:end] != text[:75]:
            differ.append(f"{prompt!r}\n  C++    {row[1:end]}\n  Python {text[:75]}")
    assert not differ, f"{len(differ)} of {len(prompts)} prompts differ, e.g.\n" + "\n".join(differ[:5])
