"""Prompt ids as MNN's C++ diffusion runtime makes them.

The expected ids were checked against MNN's C++ tokenizer (transformers/llm/engine/src/tokenizer
and transformers/diffusion/engine/src/tokenizer.cpp) built from commit 4d40bdbd7, loading the
tokenizer.mtok that write_mtok makes for the tiny tokenizers of test_mtok.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_mtok import build_tiny_bert, build_tiny_clip

from sd2mnn.errors import InputError
from sd2mnn import families
from sd2mnn.tokenization.reader import PromptTokenizer
from sd2mnn.tokenization.writer import folder_tokenizer, write_mtok

SD15, TAIYI = families.SD15.prompt, families.TAIYI.prompt

BOS, EOS = 49406, 49407

# MNN's Tokenizer::encode ids (no BOS/EOS) on the tiny CLIP. Note: no "</w>" ever.
CLIP_IDS = [
    ("", []),
    ("a photo of a cat", [64, 560, 78, 69, 64, 561]),
    ("A PHOTO OF A CAT", [64, 560, 78, 69, 64, 561]),
    ("Hello, World!", [554, 78, 11, 558, 67, 0]),
    ("the cat's dog... riding a horse on mars?!", [517, 68, 561, 6, 82, 562, 13, 13, 13, 535, 70, 64, 565, 78, 77,
                                                   543, 82, 30, 0]),
    ("an astronaut riding a horse", [64, 77, 530, 83, 535, 70, 64, 565]),
    ("<|startoftext|>cat<|endoftext|>", [BOS, 561, EOS]),
    ("3 cats & 12 dogs", [18, 561, 82, 5, 16, 17, 562, 82]),
    ("café naïve", [519, 69, 127, 102, 77, 64, 127, 107, 85, 68]),
]

# The same for the tiny BERT (Taiyi layout): [CLS] / [SEP] come from the runtime, not the file.
BERT_IDS = [
    ("", []),
    ("一个宇航员骑马的照片", [210, 211, 212, 213, 214, 215, 216, 217, 218, 219]),
    ("The CAT, photograph!", [198, 199, 115, 201, 202, 104]),
    ("中国山水画，油画。", [231, 232, 233, 234, 222, 208, 223, 222, 209]),
    ("Café naïve", [207, 159, 172, 180, 193, 176]),
    ("[CLS] cat [SEP]", [101, 199, 102]),
    ("xyz qq", [169, 196, 197, 162, 188]),
]


@pytest.fixture(scope="session")
def clip_bundle(tmp_path_factory):
    """A folder laid out like a bundle: the tokenizer files plus tokenizer.mtok."""
    folder = build_tiny_clip(tmp_path_factory.mktemp("clip_bundle") / "bundle")
    write_mtok(folder, folder / "tokenizer.mtok", "mnn")
    return folder


@pytest.fixture(scope="session")
def bert_bundle(tmp_path_factory):
    folder = build_tiny_bert(tmp_path_factory.mktemp("bert_bundle") / "bundle")
    write_mtok(folder, folder / "tokenizer.mtok", "mnn")
    return folder


@pytest.fixture(scope="session")
def clip(clip_bundle) -> PromptTokenizer:
    return PromptTokenizer.from_dir(clip_bundle, SD15)


@pytest.fixture(scope="session")
def bert(bert_bundle) -> PromptTokenizer:
    return PromptTokenizer.from_dir(bert_bundle, TAIYI)


@pytest.mark.parametrize(("prompt", "ids"), CLIP_IDS)
def test_clip_ids_match_mnn(clip, prompt, ids):
    assert clip.encode(prompt) == ids


@pytest.mark.parametrize(("prompt", "ids"), BERT_IDS)
def test_bert_ids_match_mnn(bert, prompt, ids):
    assert bert.encode(prompt) == ids


def test_formats(clip, bert):
    assert clip.format == SD15 and (SD15.bos_id, SD15.eos_id, SD15.max_length, SD15.model_type) == (BOS, EOS, 77, 0)
    assert bert.format == TAIYI
    assert (TAIYI.bos_id, TAIYI.eos_id, TAIYI.max_length, TAIYI.model_type) == (101, 102, 512, 1)


def test_pair_layout(clip):
    ids = clip.encode_pair("a photo of a cat", 77)
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[0].tolist() == [BOS, EOS] + [0] * 75  # MNN's unconditional row: "" (padded with 0)
    assert ids[1].tolist() == [BOS, 64, 560, 78, 69, 64, 561, EOS] + [0] * 69


def test_default_length_and_negative_prompt(clip):
    ids = clip.encode_pair("a cat", negative_prompt="dog")
    assert ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [BOS, 562, EOS, 0]


def test_long_prompt_is_cut_with_eos_last(clip):
    ids = clip.encode_pair("a photo of a cat " * 20, 77)[1].tolist()  # 120 tokens
    assert ids == [BOS] + ([64, 560, 78, 69, 64, 561] * 13)[:75] + [EOS]


def test_bos_and_eos_not_doubled(clip):
    assert clip.encode_single("<|startoftext|>cat<|endoftext|>", 8) == [BOS, 561, EOS, 0, 0, 0, 0, 0]
    assert clip.encode_single("cat<|endoftext|>x", 8) == [BOS, 561, EOS, 87, EOS, 0, 0, 0]


def test_bert_pair(bert):
    ids = bert.encode_pair("一个宇航员骑马的照片", 512)
    assert ids.shape == (2, 512)
    assert ids[0, :3].tolist() == [101, 102, 0]
    assert ids[1, :12].tolist() == [101, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219, 102]
    assert not ids[1, 12:].any()


def test_from_tokenizer_folder_writes_the_mtok_first(clip_bundle, tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        (folder / name).write_bytes((clip_bundle / name).read_bytes())
    assert folder_tokenizer(folder, "mnn", SD15).encode("a photo of a cat") == [64, 560, 78, 69, 64, 561]
    assert not (folder / "tokenizer.mtok").exists()  # written to a temporary file
    assert PromptTokenizer.from_dir(clip_bundle / "tokenizer.mtok", SD15).format == SD15


def test_unreadable_mtok(tmp_path):
    (tmp_path / "tokenizer.mtok").write_bytes(b"431 4\n0 0 0\n\n")
    with pytest.raises(InputError, match="not a readable MNN pipeline tokenizer"):
        PromptTokenizer.from_dir(tmp_path, SD15)


# ---------------------------------------------------------------------------------------------
# Against Hugging Face
# ---------------------------------------------------------------------------------------------

PLAIN_PROMPTS = ["a photo of a cat", "A PHOTO OF A CAT", "Hello, World!", "the cat's dog... riding a horse on mars?!",
                 "3 cats & 12 dogs", "  spaced\tout\nprompt  "]


def test_clip_is_hf_without_end_of_word_suffix(clip, clip_bundle):
    """MNN runs HF's CLIP pipeline (NFC, lowercase, CLIP split, byte-level BPE) minus "</w>"."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    hf = transformers.CLIPTokenizer.from_pretrained(str(clip_bundle))
    spec = json.loads(hf.backend_tokenizer.to_str())
    spec["model"]["end_of_word_suffix"] = None
    no_suffix = Tokenizer.from_str(json.dumps(spec))
    for prompt in PLAIN_PROMPTS:
        assert clip.encode(prompt) == no_suffix.encode(prompt, add_special_tokens=False).ids, prompt
    # Where they agree: the frame of special tokens, and the empty prompt.
    assert hf("").input_ids == clip.encode_single("", 2) == [BOS, EOS]
    assert hf("<|endoftext|>").input_ids == [BOS, EOS, EOS]
    assert clip.encode_single("<|endoftext|>", 3) == [BOS, EOS, 0]  # EOS already last: not appended
    # Where they differ: HF says "a</w>" (320), MNN "a" (64); HF pads with EOS, MNN with 0.
    assert hf("a photo of a cat").input_ids == [BOS, 320, 515, 516, 320, 520, EOS]
    assert hf("a cat", padding="max_length", max_length=6).input_ids == [BOS, 320, 520, EOS, EOS, EOS]
    assert clip.encode_single("a cat", 6) == [BOS, 64, 561, EOS, 0, 0]


def test_bert_matches_hf(bert, bert_bundle):
    """For the Taiyi layout MNN and HF agree, padding ([PAD] = 0) and truncation included."""
    transformers = pytest.importorskip("transformers")

    hf = transformers.BertTokenizer.from_pretrained(str(bert_bundle))
    prompts = [p for p, _ in BERT_IDS if "[CLS]" not in p]
    prompts += ["The Cafe, PAINTING: 油画!", "飞流直下三千尺" * 100]  # the last one is cut
    for prompt in prompts:
        expected = hf(prompt, padding="max_length", max_length=512, truncation=True).input_ids
        assert bert.encode_pair(prompt, 512)[1].tolist() == expected, prompt
    # A prompt that starts with [CLS] / ends with [SEP] itself: MNN adds them only if missing.
    assert hf("[CLS] cat [SEP]").input_ids == [101, 101, 199, 102, 102]
    assert bert.encode_single("[CLS] cat [SEP]", 5) == [101, 199, 102, 0, 0]
