"""SD3.5's T5 tokenizer (tokenizer_3/): the .mtok sd2mnn writes, the ids sd2mnn says MNN's runtime
makes from it (MtokTokenizer(kSingle, -1, 1), 256 ids: no BOS, EOS 1, cut with EOS last, padded
with 0), and how close those are to Hugging Face's T5TokenizerFast, which diffusers' SD3 pipeline
runs (``_get_t5_prompt_embeds``: padding="max_length", max_length=256, truncation, EOS added; the
unconditional prompt is "").

The comparison with MNN's own C++ tokenizer is opt-in, as in test_mnn_tokenizer_match.py:
    SD2MNN_MNN_TOKENIZER=build/mnn_tokenizer pytest tests/test_t5_tokenizer.py
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from t5_tokenizer import write_t5_tokenizer
from test_mnn_tokenizer_match import MNN_TOKENIZER, read_corpus, run_mnn_tokenizer

from sd2mnn.errors import InputError
from sd2mnn.families import SD35
from sd2mnn.tokenization.reader import MTOK_NAME, PromptTokenizer
from sd2mnn.tokenization.writer import write_mtok

LENGTH = 256  # diffusion_sd35.hpp mMaxTextLenT5; diffusers' max_sequence_length default
EOS = 1
# Prompts the corpus lacks: whitespace runs and ends, controls and format characters, the
# charsmap's compositions and compatibility forms, unknown characters, special tokens, a prompt
# over 256 tokens.
EDGE = ["", " ", "a  b", "  lead", "trail  ", "tab\there", "new\nline", "cr\r\nlf", "a\tb\t\tc",
        "🦄🦄 unicorn 🦄", "Ｆｕｌｌ ½ café ﬁre", "a\u200bb", "a\u200db", "👩\u200d🚀 astronaut", "bom\ufeffx",
        "bell\x07here", "\x80c1", "nbsp\u00a0here", "nel\x85here", "ls\u2028here", "x\ufffdy", "e\u0301te\u0301",
        "ÉCOLE", "\u2581cat", "a\u2581b", "© ™ ℃ ①", "𝐁𝐨𝐥𝐝 𝕕𝕠𝕦𝕓𝕝𝕖", "日本語 の テキスト", "Ελληνικά", "русский",
        "<extra_id_0> y", "a<pad>b", "...", "((masterpiece))", "word " * 300,
        "x</s>", "ｅ\u0301", "!!!"]
# What no .mtok can express, each for its reason (the rest of EDGE encodes as Hugging Face does):
KNOWN_MISSES = {
    "x</s>": "the runtime adds EOS only when the ids do not already end with it",
    "ｅ\u0301": "the charsmap replaces a short grapheme by its first character's mapping alone",
    "!!!": "a Viterbi tie: MNN keeps the shorter last piece, Hugging Face the longer",
}
CORPUS_AGREEMENT = 658  # of 660 prompts; the other two are Viterbi ties ("!!!")


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    return write_t5_tokenizer(tmp_path_factory.mktemp("sd3") / "tokenizer_3")


@pytest.fixture(scope="module")
def hugging_face(t5_folder):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.T5TokenizerFast.from_pretrained(str(t5_folder))

    def encode(prompt: str) -> list[int]:
        return tokenizer(prompt, padding="max_length", max_length=LENGTH, truncation=True).input_ids
    return encode


@pytest.fixture(scope="module")
def runtime(t5_folder, tmp_path_factory):
    """scheme -> the PromptTokenizer of a bundle's tokenizer_3/tokenizer.mtok."""
    made = {}

    def get(scheme: str) -> PromptTokenizer:
        if scheme not in made:
            bundle = tmp_path_factory.mktemp(f"bundle-{scheme}")
            (bundle / "tokenizer_3").mkdir()
            write_mtok(t5_folder, bundle / "tokenizer_3" / MTOK_NAME, scheme)
            made[scheme] = PromptTokenizer.from_dir(bundle / "tokenizer_3", SD35.prompt_formats["tokenizer_3"])
        return made[scheme]
    return get


def _agreement(runtime: PromptTokenizer, hugging_face, prompts: list[str]) -> tuple[int, list[str]]:
    misses = [p for p in prompts if runtime.encode_single(p) != hugging_face(p)]
    return len(prompts) - len(misses), misses


def test_the_runtime_format_comes_from_the_folder(runtime):
    fmt = runtime("diffusers").format
    assert (fmt.bos_id, fmt.eos_id, fmt.max_length) == (-1, EOS, LENGTH)
    ids = runtime("diffusers").encode_pair("a cat")
    assert ids.shape == (2, LENGTH) and str(ids.dtype) == "int32"
    assert ids[0].tolist() == [EOS] + [0] * (LENGTH - 1)  # "" as the unconditional row: EOS, then pads


def test_corpus_encodes_as_hugging_face(runtime, hugging_face):
    prompts = read_corpus()
    agree, misses = _agreement(runtime("diffusers"), hugging_face, prompts)
    assert agree >= CORPUS_AGREEMENT, f"{agree} of {len(prompts)} agree; e.g. {misses[:5]}"
    # Every miss holds the same pieces in another order (a tie between equal-scoring splits).
    for prompt in misses:
        ours, theirs = runtime("diffusers").encode_single(prompt), hugging_face(prompt)
        assert sorted(ours) == sorted(theirs), prompt
    assert sum(len([i for i in hugging_face(p) if i]) == LENGTH for p in prompts) > 0  # some are cut at 256


def test_edge_prompts_encode_as_hugging_face_but_the_known_misses(runtime, hugging_face):
    _, misses = _agreement(runtime("diffusers"), hugging_face, EDGE)
    assert set(misses) == set(KNOWN_MISSES)


def test_mnn_scheme_is_what_mnn_writes_and_encodes_further_from_hugging_face(runtime, hugging_face):
    # Without the rewrite: whitespace runs and ends become "▁" tokens, controls become spaces.
    corpus = read_corpus()
    mnn, _ = _agreement(runtime("mnn"), hugging_face, corpus)
    ours, _ = _agreement(runtime("diffusers"), hugging_face, corpus)
    assert mnn < ours
    _, misses = _agreement(runtime("mnn"), hugging_face, EDGE)
    assert {"a  b", "trail  ", "tab\there", "a\u200db", "e\u0301te\u0301"} <= set(misses)


def test_mnn_scheme_bytes_equal_mnn_flow(t5_folder, tmp_path):
    spec = importlib.util.find_spec("llmexport")
    if spec is None:
        pytest.skip("the reference needs llmexport (pip install -e .[test])")
    folder = list(spec.submodule_search_locations)[0]
    sys.path.insert(0, folder)  # llmexport's top-level import is broken; its module is utils.tokenizer
    try:
        from utils.tokenizer import LlmTokenizer
    finally:
        sys.path.remove(folder)
    work = tmp_path / "tokenizer_3"
    shutil.copytree(t5_folder, work)
    # convert_mnn_sd35.py's export_sd35_mtok: the folder's own tokenizer.json, model_type "t5".
    reference = Path(LlmTokenizer(str(work), "t5").export(str(work), model_path=str(work), model_type="t5"))
    ours = write_mtok(t5_folder, tmp_path / MTOK_NAME, "mnn")
    assert ours.read_bytes() == reference.read_bytes()


def test_t5_folder_without_tokenizer_json(t5_folder, tmp_path):
    folder = tmp_path / "tokenizer_3"
    shutil.copytree(t5_folder, folder)
    (folder / "tokenizer.json").unlink()
    out = tmp_path / MTOK_NAME
    with pytest.raises(InputError, match=r"tokenizer_config\.json: tokenizer_class 'T5Tokenizer' needs the "
                                         r"folder's tokenizer\.json") as err:
        write_mtok(folder, out)
    assert "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.skipif(not MNN_TOKENIZER, reason="set SD2MNN_MNN_TOKENIZER to a tokenizer built by "
                                              "scripts/build_mnn_tokenizer.sh to compare against it")
@pytest.mark.parametrize("scheme", ["diffusers", "mnn"])
def test_mnn_tokenizer_gives_the_python_ids(t5_folder, runtime, hugging_face, tmp_path, scheme):
    prompts = read_corpus() + [p for p in EDGE if "\n" not in p]  # the binary reads lines
    bundle = tmp_path / "tokenizer_3"
    bundle.mkdir()
    write_mtok(t5_folder, bundle / MTOK_NAME, scheme)
    cpp = run_mnn_tokenizer(bundle, prompts, tmp_path, ("--single", "-1", str(EOS), str(LENGTH)))
    assert len(cpp) == len(prompts)
    python = [runtime(scheme).encode_single(p) for p in prompts]
    differ = [i for i, (c, p) in enumerate(zip(cpp, python)) if c != p]
    shown = "\n".join(f"{prompts[i]!r}\n  C++    {cpp[i]}\n  Python {python[i]}" for i in differ[:5])
    assert not differ, f"{scheme}: {len(differ)} of {len(prompts)} prompts differ, e.g.\n{shown}"
    if scheme == "diffusers":  # and so the device's ids, not only sd2mnn's, agree with diffusers'
        misses = {prompts[i] for i, ids in enumerate(cpp) if ids != hugging_face(prompts[i])}
        assert len(misses - set(KNOWN_MISSES)) <= len(read_corpus()) - CORPUS_AGREEMENT


def test_t5_folder_whose_model_is_not_unigram(t5_folder, tmp_path):
    folder = tmp_path / "tokenizer_3"
    shutil.copytree(t5_folder, folder)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"] = {"type": "WordLevel", "vocab": {"<pad>": 0, "</s>": 1, "<unk>": 2, "\u2581a": 3}, "unk_token": "<unk>"}
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < 3]
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    out = tmp_path / MTOK_NAME
    with pytest.raises(InputError, match=r"tokenizer_3/tokenizer\.json: a T5 tokenizer holds a Unigram model, "
                                         r"this one a WordLevel model") as err:
        write_mtok(folder, out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    with pytest.raises(InputError, match=r"tokenizer_3/tokenizer\.json: tokenizer model 'WordLevel' cannot be written"):
        write_mtok(folder, out, "mnn")
    assert not out.exists()  # not half a file either


@pytest.mark.parametrize("charsmap", ["AAAA", "CAAAAAAAAAAAAAAA"])  # cut short; a trie pointing outside itself
def test_damaged_charsmap(t5_folder, tmp_path, charsmap):
    folder = tmp_path / "tokenizer_3"
    shutil.copytree(t5_folder, folder)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"]["normalizers"][0]["precompiled_charsmap"] = charsmap
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    out = tmp_path / MTOK_NAME
    with pytest.raises(InputError, match=r"tokenizer_3/tokenizer\.json: ") as err:
        write_mtok(folder, out)
    assert "\n" not in str(err.value)
    assert not out.exists()
