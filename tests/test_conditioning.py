"""Bundles that make MNN's runtime condition as diffusers does (sd2mnn.tokenization).

The real CLIP ViT-L/14 tokenizer (SD1.x's, tests/clip_tokenizer.py) against transformers'
CLIPTokenizer, which diffusers uses, on the built-in corpus of 660 prompts; the id rewrite as ONNX
graph on ONNX Runtime and, converted by the real converter, on MNN; and whole conversions.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clip_tokenizer import with_sd15_tokenizer, write_sd15_tokenizer
from sd2mnn.families import SD15
from sd2mnn.tokenization.id_rewrite import MAX_WORD, rewrite_graph, rewrite_ids
from sd2mnn.tokenization.prompt_ids import PromptIds
from sd2mnn.tokenization.writer import write_mtok
from sd2mnn.verification.conditioning import builtin_prompts

PROMPTS = builtin_prompts()


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return write_sd15_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer")


@pytest.fixture(scope="session")
def clip_ids(clip_dir) -> PromptIds:
    return PromptIds.for_tokenizer(clip_dir, SD15.prompt, "diffusers")


@pytest.fixture(scope="session")
def diffusers_tokenizer(clip_dir):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_dir)

    def encode(prompt: str) -> list[int]:
        return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    return encode


@pytest.fixture(scope="session")
def diffusers_ids(diffusers_tokenizer) -> dict[str, list[int]]:
    return {p: diffusers_tokenizer(p) for p in PROMPTS}


def _exact(ids: PromptIds, expected: dict[str, list[int]]) -> list[str]:
    return [p for p in expected if ids.model_pair(p)[1].tolist() == expected[p]]


def test_the_corpus_has_what_people_write(diffusers_ids):
    assert len(PROMPTS) >= 500 and len(set(PROMPTS)) == len(PROMPTS)
    kinds = {
        "digits": lambda p: any(c.isdigit() for c in p), "hyphens": lambda p: "-" in p,
        "apostrophes": lambda p: "'" in p, "non-ASCII": lambda p: not p.isascii(),
        "comma lists": lambda p: p.count(",") >= 5, "77-token overflows": lambda p: diffusers_ids[p][-1] != 49407
        or diffusers_ids[p][-2] != 49407,
    }
    for kind, has in kinds.items():
        assert sum(map(has, PROMPTS)) >= 10, kind


def test_mnns_own_tokenizer_conditions_differently_for_nearly_every_prompt(clip_dir, diffusers_ids):
    mnn = PromptIds.for_tokenizer(clip_dir, SD15.prompt, "mnn")
    assert mnn.rewrite is None
    assert len(_exact(mnn, diffusers_ids)) <= len(PROMPTS) // 50


def test_the_default_bundle_conditions_like_diffusers(clip_ids, diffusers_ids):
    exact = _exact(clip_ids, diffusers_ids)
    assert len(exact) / len(PROMPTS) >= 0.99, sorted(set(PROMPTS) - set(exact))[:20]
    # What differs is a character MNN's normalizer turns into a space (a zero-width joiner).
    assert all("\u200d" in prompt for prompt in set(PROMPTS) - set(exact))


def test_last_words_clip_splits_differently_without_its_end_mark_are_exact(clip_ids, diffusers_tokenizer):
    # Words whose end-of-word BPE is not their plain BPE with the last token marked, and words
    # as long as the text encoder's unrolled BPE takes, and one longer (its last id's twin).
    words = ["behance", "toriyama", "duotone", "DaVinci", "grainy", "富士山と桜", "unbelievabilities",
             "a" * MAX_WORD, "pneumonoultramicroscopicsilicovolcanoconiosis"]
    for word in words:
        prompt = f"a photo, {word}"
        got, want = clip_ids.model_pair(prompt)[1].tolist(), diffusers_tokenizer(prompt)
        if len(word.encode()) <= MAX_WORD:
            assert got == want, word
        else:
            assert got[:4] == want[:4] and got.count(49407) > 1, word


def test_every_prompt_ending_in_a_whole_word_token_is_exact(clip_dir, clip_ids, diffusers_tokenizer, diffusers_ids):
    vocab = json.loads((clip_dir / "vocab.json").read_text())
    words = sorted(t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha())
    sample = random.Random(0).sample(words, 1500)
    prompts = {f"a photo of {w}": diffusers_tokenizer(f"a photo of {w}") for w in sample}
    # Of the corpus: every prompt whose last pre-token is one whole-word token in diffusers' ids
    # (but for a zero-width joiner, which MNN's normalizer turns into a space wherever it stands).
    for prompt, ids in diffusers_ids.items():
        if "\u200d" in prompt:
            continue
        end = ids.index(49407)
        if prompt.rstrip()[-1:].isalpha() and end < 76 and prompt.rstrip().lower().split()[-1].isalpha():
            if diffusers_tokenizer(prompt.rstrip().split()[-1])[1:3] == [ids[end - 1], 49407]:
                prompts[prompt] = ids
    assert len(prompts) > 1800
    assert sorted(set(prompts) - set(_exact(clip_ids, prompts))) == []


def test_hugging_face_ids_are_diffusers_ids(clip_ids, diffusers_ids):
    assert [p for p in PROMPTS if clip_ids.hf_pair(p)[1].tolist() != diffusers_ids[p]] == []
    assert clip_ids.hf_pair("a cat")[0].tolist() == [49406, 49407] + [49407] * 75  # diffusers' unconditional row


def test_the_rewrite_leaves_diffusers_ids_alone(clip_ids, diffusers_ids):
    # A bundle's text encoder may be fed Hugging Face's ids (generate --tokenizer hf, verify).
    for prompt in PROMPTS[:200]:
        ids = clip_ids.hf_pair(prompt)
        assert (rewrite_ids(ids, clip_ids.rewrite) == ids).all(), prompt


# SD3's CLIP-G tokenizer (tokenizer_2) pads with "!", an added token Hugging Face cuts out of the
# text first: every "!" is the plain id 0 and the word before it ends there.
PAD_CHARACTER_PROMPTS = ["hello, world!", "!!!", "wow?! a cat!", "a!b", "sunset!!! over the sea", "(cat)!dog",
                         "it's!'s great", "a cat !", "!a", "a 35mm!photo", "héllo!wörld?!", "cat!" * 30]


@pytest.fixture(scope="session")
def clip_g_dir(tmp_path_factory) -> Path:
    from builders import write_sd3_tokenizers

    return write_sd3_tokenizers(tmp_path_factory.mktemp("sd3-tokenizers")) / "tokenizer_2"


@pytest.fixture(scope="session")
def clip_g_ids(clip_g_dir) -> PromptIds:
    return PromptIds.for_tokenizer(clip_g_dir, SD15.prompt, "diffusers")


def test_a_pad_character_conditions_like_diffusers(clip_g_dir, clip_g_ids):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_g_dir)
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0

    def diffusers(prompt: str) -> list[int]:
        return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert diffusers("hello, world!")[:6] == [49406, 3306, 267, 1002, 0, 49407]
    for prompt in PAD_CHARACTER_PROMPTS:
        assert clip_g_ids.model_pair(prompt)[1].tolist() == diffusers(prompt), prompt
        assert clip_g_ids.hf_pair(prompt)[1].tolist() == diffusers(prompt), prompt
        hf = clip_g_ids.hf_pair(prompt)  # fed diffusers' ids, the rewrite keeps them
        assert (rewrite_ids(hf, clip_g_ids.rewrite) == hf).all(), prompt
    # The corpus as for CLIP-L: all but a zero-width joiner (spaced by MNN's normalizer).
    differ = [p for p in PROMPTS if clip_g_ids.model_pair(p)[1].tolist() != diffusers(p)]
    assert all("\u200d" in p for p in differ) and len(differ) <= len(PROMPTS) // 100, differ[:10]
    assert sum("!" in p for p in PROMPTS) >= 7


def _rewrite_model(rw, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = rewrite_graph(rw, 77, "input_ids", "ids", opset=18)
    graph = helper.make_graph(nodes, "rewrite", [helper.make_tensor_value_info("input_ids", TensorProto.INT32, [2, 77])],
                              [helper.make_tensor_value_info("ids", TensorProto.INT32, [2, 77])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("which", ["clip_ids", "clip_g_ids"])
def test_the_rewrite_graph_gives_the_numpy_ids_on_onnxruntime_and_mnn(which, request, tmp_path):
    from sd2mnn.conversion.converter import find_converter
    from sd2mnn.conversion.plan import converter_argv
    from sd2mnn.core.runtime import MnnModel, OrtModel, RuntimeConfig

    clip_ids = request.getfixturevalue(which)
    source = _rewrite_model(clip_ids.rewrite, tmp_path / "rewrite.onnx")
    target = tmp_path / "rewrite.mnn"
    argv = find_converter().argv(converter_argv(source, target, ()))
    log = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "Converted Success" in log.stdout, log.stdout[-2000:]
    ort = OrtModel(source, threads=1)
    mnn = MnnModel(target, ["input_ids"], ["ids"], RuntimeConfig(threads=4, precision="low"))  # as MNN's runtime
    cases = [clip_ids.runtime_pair(p) for p in PROMPTS + PAD_CHARACTER_PROMPTS]
    cases.append(np.array([[49406, 49407] + [0] * 75] * 2, np.int32))  # two empty prompts
    for ids in cases:
        expected = rewrite_ids(ids, clip_ids.rewrite)
        assert (ort.run({"input_ids": ids})["ids"] == expected).all()
        assert (np.asarray(mnn.run({"input_ids": ids})["ids"]) == expected).all()
    for prompt in PAD_CHARACTER_PROMPTS if which == "clip_g_ids" else []:  # "!" cut out: diffusers' ids on MNN
        device = np.asarray(mnn.run({"input_ids": clip_ids.runtime_pair(prompt)})["ids"])
        assert (device == clip_ids.hf_pair(prompt)).all(), prompt


@pytest.fixture(scope="session")
def clip_pipeline(demo_onnx, tmp_path_factory) -> Path:
    """The demo pipeline (its text encoder has CLIP's 49408 ids) with SD1.5's real tokenizer."""
    return with_sd15_tokenizer(demo_onnx, tmp_path_factory.mktemp("clip-pipeline") / "onnx")


@pytest.fixture(scope="session")
def clip_bundle(clip_pipeline, tmp_path_factory) -> Path:
    import sd2mnn

    out = tmp_path_factory.mktemp("clip-bundle") / "bundle"
    sd2mnn.convert(clip_pipeline, out, components=["text_encoder"])
    return out


def test_convert_writes_a_text_encoder_that_conditions_like_diffusers(clip_pipeline, clip_bundle, diffusers_ids):
    from sd2mnn.core.runtime import MnnModel, OrtModel, RuntimeConfig

    manifest = json.loads((clip_bundle / "manifest.json").read_text())
    assert manifest["tokenizer_scheme"] == "diffusers"
    assert manifest["components"]["text_encoder"]["prefix"].startswith("clip-eow-")
    ids = PromptIds.for_bundle(clip_bundle, SD15.prompt)
    assert ids.tokenizer_scheme == "diffusers"
    onnx = OrtModel(clip_pipeline / "text_encoder" / "model.onnx", threads=2)
    mnn = MnnModel(clip_bundle / "text_encoder.mnn", ["input_ids"], ["last_hidden_state", "pooler_output"],
                   RuntimeConfig(threads=2))
    for prompt in PROMPTS[:40]:
        if ids.model_pair(prompt)[1].tolist() != diffusers_ids[prompt]:
            continue
        # The device: the runtime's ids into the bundle; diffusers: its ids into the source model.
        device = mnn.run({"input_ids": ids.runtime_pair(prompt)})
        reference = onnx.run({"input_ids": ids.hf_pair(prompt)})  # = diffusers' ids (test above)
        for name in ("last_hidden_state", "pooler_output"):
            assert np.abs(np.asarray(device[name]) - reference[name]).max() < 1e-4, (prompt, name)


def test_verify_checks_the_conditioning(clip_pipeline, clip_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nan astronaut riding a horse, 8k\n")
    out = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "verify", str(clip_pipeline), str(clip_bundle),
                          "--components", "text_encoder", "--prompts", str(prompts), "--json", "--quiet"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["conditioning"]
    assert report["tokenizer_scheme"] == "diffusers" and report["prompts"] == 2 and report["identical_prompts"] == 2
    assert report["matching_cosine"] > 0.9999


def test_tokenizer_mnn_keeps_mnns_flow_and_switching_reconverts(clip_pipeline, clip_bundle, tmp_path):
    import sd2mnn

    bundle = tmp_path / "bundle"
    shutil.copytree(clip_bundle, bundle)
    report = sd2mnn.convert(clip_pipeline, bundle, components=["text_encoder"], tokenizer_scheme="mnn")
    assert [(c.name, c.reason) for c in report.components] == [("text_encoder", "tokenizer scheme changed")]
    expected = write_mtok(clip_pipeline / "tokenizer", tmp_path / "mnn.mtok", "mnn")
    assert (bundle / "tokenizer.mtok").read_bytes() == expected.read_bytes()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tokenizer_scheme"] == "mnn" and manifest["components"]["text_encoder"]["prefix"] == ""
    assert PromptIds.for_bundle(bundle, SD15.prompt).tokenizer_scheme == "mnn"
    # verify reports MNN's conditioning without failing it: the user asked for MNN's flow.
    out = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "verify", str(clip_pipeline), str(bundle),
                          "--components", "text_encoder", "--json", "--quiet"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    conditioning = json.loads(out.stdout)["conditioning"]
    assert conditioning["tokenizer_scheme"] == "mnn" and conditioning["prompt_share"] < 0.05


def test_generate_with_hugging_face_ids_draws_the_runtimes_image(fp32_bundle, tmp_path):
    # On the demo bundle "a photo of a cat" gets diffusers' ids from the runtime too: one image.
    images = []
    for tokenizer in ("runtime", "hf"):
        out = tmp_path / f"{tokenizer}.png"
        done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "generate", str(fp32_bundle), "a photo of a cat",
                               "-o", str(out), "--steps", "2", "--tokenizer", tokenizer, "-q"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        images.append(out)
    from PIL import Image

    a, b = (np.asarray(Image.open(p)) for p in images)
    assert (a == b).all()
    info = Image.open(images[1]).info
    assert info["tokenizer"] == "hf (scheme diffusers)" and info["matches_mnn_runtime"].startswith("no")
