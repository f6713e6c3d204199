"""sd2mnn convert on a tiny SD3 pipeline (two CLIPs, T5, an MMDiT, a 16-channel VAE), exported by
sd2mnn export and converted by the real converter: the bundle MNN's SD3.5 runtime loads
(diffusion_sd35.cpp), with the guarantees an SD1.5 bundle has."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_state

import sd2mnn
from sd2mnn.tokenization.prompt_ids import PromptIds
from sd2mnn.core.contract import check_contract, contract_notes
from sd2mnn.errors import InputError
from sd2mnn.families import SD35
from sd2mnn.core.runtime import MnnModel, OrtModel

pytest.importorskip("diffusers")

MODELS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
WITHOUT_T5 = "text_encoder,text_encoder_2,transformer,vae_decoder"


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd2mnn.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def without_t5(tiny_sd3_onnx, tmp_path_factory) -> Path:
    """The tiny SD3 converted without T5, through the command line."""
    out = tmp_path_factory.mktemp("sd3-no-t5") / "bundle"
    done = cli("convert", tiny_sd3_onnx, out, "--components", WITHOUT_T5, "-q")
    assert done.returncode == 0, done.stderr
    return out


def test_bundle_has_the_five_models_three_tokenizers_and_the_family(tiny_sd3_bundle, tiny_sd3_onnx):
    manifest = json.loads((tiny_sd3_bundle / "manifest.json").read_text())
    assert manifest["family"] == "sd35" and manifest["tokenizer_scheme"] == "diffusers"
    assert list(manifest["components"]) == list(MODELS)
    for name in MODELS:
        record = manifest["components"][name]
        assert [f["path"] for f in record["outputs"]] == [f"{name}.mnn", f"{name}.mnn.weight"]
        assert record["sources"][0]["path"] == f"{name}/model.onnx"
        assert [t["name"] for t in record["inputs"]] == list(SD35.components[name].inputs)
    # The transformer's and the big text encoders' weights sit beside their models (external data).
    for name in ("text_encoder_2", "text_encoder_3", "transformer"):
        assert f"{name}/weights.pb" in [f["path"] for f in manifest["components"][name]["sources"]]
    # Each CLIP gets the id rewrite of its own tokenizer; T5's .mtok needs none in its encoder.
    prefixes = {n: r["prefix"] for n, r in manifest["components"].items()}
    assert prefixes["text_encoder"] and prefixes["text_encoder_2"] and prefixes["text_encoder"] != prefixes["text_encoder_2"]
    assert prefixes["text_encoder_3"] == prefixes["transformer"] == prefixes["vae_decoder"] == ""
    # diffusion_sd35.cpp loads <bundle>/tokenizer*/tokenizer.mtok; each folder keeps its tokenizer's files.
    recorded = {f["path"] for f in manifest["tokenizer"]}
    assert not (tiny_sd3_bundle / "tokenizer.mtok").exists()
    for folder in TOKENIZERS:
        mtok = tiny_sd3_bundle / folder / "tokenizer.mtok"
        assert mtok.read_bytes().startswith(b"430 ") and f"{folder}/tokenizer.mtok" in recorded
        assert {f"{folder}/{p.name}" for p in (tiny_sd3_onnx / folder).iterdir()} <= recorded
    assert not (tiny_sd3_bundle / ".sd2mnn").exists()


def test_each_clip_pads_as_its_own_tokenizer(tiny_sd3_bundle):
    """CLIP-L pads with <|endoftext|> (49407), CLIP-G's tokenizer_2 with "!" (id 0): the ids each
    bundled text encoder's rewrite hands its CLIP are what diffusers gives that CLIP."""
    clip_l, clip_g = (PromptIds.for_bundle(tiny_sd3_bundle / f, SD35.prompt_formats[f]) for f in ("tokenizer", "tokenizer_2"))
    assert clip_l.tokenizer_scheme == clip_g.tokenizer_scheme == "diffusers"
    for ids, pad in ((clip_l, 49407), (clip_g, 0)):
        seen = ids.model_pair("a photo of a cat")
        assert (seen == ids.hf_pair("a photo of a cat")).all()
        assert seen[1, -1] == pad and ids.runtime_pair("a photo of a cat")[1, -1] == 0


def test_the_converted_rewrite_runs_inside_the_text_encoders(tiny_sd3_bundle, tiny_sd3_onnx):
    """The runtime's ids through each bundled CLIP = diffusers' ids through the ONNX CLIP."""
    for name, folder in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        ids = PromptIds.for_bundle(tiny_sd3_bundle / folder, SD35.prompt_formats[folder])
        spec = SD35.components[name]
        got = MnnModel(tiny_sd3_bundle / spec.mnn_name, spec.inputs, spec.outputs).run(
            {"input_ids": ids.runtime_pair("an astronaut riding a horse")})
        expected = OrtModel(tiny_sd3_onnx / name / "model.onnx").run(
            {"input_ids": ids.hf_pair("an astronaut riding a horse")})
        for output in spec.outputs:
            assert np.max(np.abs(got[output] - expected[output])) < 1e-3, f"{name}.{output}"


def test_clip_gs_pad_character_in_a_prompt_conditions_as_diffusers_on_mnn(tiny_sd3_bundle, tiny_sd3_onnx):
    """diffusers' CLIP-G tokenizer cuts its pad "!" out of the text (the plain id 0, the word
    before it ending there): the runtime's ids through the bundled text_encoder_2 give what
    transformers' ids give through the ONNX one."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tiny_sd3_onnx / "tokenizer_2")
    ids = PromptIds.for_bundle(tiny_sd3_bundle / "tokenizer_2", SD35.prompt_formats["tokenizer_2"])
    spec = SD35.components["text_encoder_2"]
    mnn = MnnModel(tiny_sd3_bundle / spec.mnn_name, spec.inputs, spec.outputs)
    onnx = OrtModel(tiny_sd3_onnx / "text_encoder_2" / "model.onnx")
    for prompt in ("hello, world!", "wow?! a cat!", "a!b", "sunset!!! over the sea"):
        diffusers = np.array([tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
                              for text in ("", prompt)], np.int32)
        assert (ids.model_pair(prompt) == diffusers).all(), prompt
        got = mnn.run({"input_ids": ids.runtime_pair(prompt)})
        expected = onnx.run({"input_ids": diffusers})
        for output in spec.outputs:
            assert np.max(np.abs(got[output] - expected[output])) < 1e-3, (prompt, output)


def test_rerun_reuses_everything_and_changes_nothing(tiny_sd3_bundle, tiny_sd3_onnx, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle)
    before = tree_state(bundle)
    report = sd2mnn.convert(tiny_sd3_onnx, bundle)
    assert [(c.name, c.status) for c in report.components] == [(n, "reused") for n in MODELS]
    assert tree_state(bundle) == before


def test_without_t5_the_bundle_keeps_t5s_tokenizer_and_meets_the_contract(without_t5):
    manifest = json.loads((without_t5 / "manifest.json").read_text())
    assert list(manifest["components"]) == [n for n in MODELS if n != "text_encoder_3"]
    assert not (without_t5 / "text_encoder_3.mnn").exists()
    # The runtime's load() fails without any of the three .mtok files, T5's included.
    assert (without_t5 / "tokenizer_3" / "tokenizer.mtok").is_file()
    issues = check_contract(without_t5)
    assert not [i for i in issues if i.kind != "shape"], issues  # tiny widths: the only deviation
    assert not [i for i in issues if "text_encoder_3" in i.file or i.component == "tokenizer"]
    notes = contract_notes(without_t5)
    assert len(notes) == 1 and "text_encoder_3.mnn is absent" in notes[0] and "zeros" in notes[0]


def test_an_export_without_t5_converts_the_rest_by_default(tiny_sd3_onnx, tmp_path):
    from sd2mnn.core.layout import open_onnx_pipeline

    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_sd3_onnx, onnx, ignore=shutil.ignore_patterns("text_encoder_3"))
    assert list(open_onnx_pipeline(onnx, None).components) == [n for n in MODELS if n != "text_encoder_3"]
    assert list(open_onnx_pipeline(tiny_sd3_onnx, None).components) == list(MODELS)
    # Named, it must be there.
    with pytest.raises(InputError, match="text_encoder_3/model.onnx is missing"):
        open_onnx_pipeline(onnx, ("text_encoder_3",))


def test_unknown_component_names_the_familys(tiny_sd3_onnx, tmp_path):
    done = cli("convert", tiny_sd3_onnx, tmp_path / "b", "--components", "unet")
    one_line_error(done, "unknown component 'unet'", "transformer", "sd35")
    assert not (tmp_path / "b").exists()


def test_missing_t5_tokenizer_is_refused_before_any_conversion(tiny_sd3_onnx, tmp_path):
    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_sd3_onnx, onnx, ignore=shutil.ignore_patterns("tokenizer_3"))
    done = cli("convert", onnx, tmp_path / "b", "--components", WITHOUT_T5)
    one_line_error(done, str(onnx / "tokenizer_3"), "missing")
    assert not (tmp_path / "b").exists()


def test_hard_linked_weights_are_one_line_not_onnxs_traceback(tiny_sd3_onnx, tmp_path):
    # onnx will not read external data with several links (cp -al), where the id rewrite loads CLIP-G.
    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_sd3_onnx, onnx, copy_function=os.link)
    try:
        done = cli("convert", onnx, tmp_path / "b", "--components", "text_encoder_2", "--quiet")
    finally:
        # The links are the shared fixture's files too: ONNX would refuse them in every later test.
        shutil.rmtree(onnx)
    one_line_error(done, str(onnx / "text_encoder_2" / "model.onnx"), "hard links", "cp -r")
    assert not (tmp_path / "b").exists()


def test_a_users_file_in_a_tokenizer_folder_is_not_replaced(tiny_sd3_onnx, tmp_path):
    out = tmp_path / "mine"
    (out / "tokenizer_2").mkdir(parents=True)
    (out / "tokenizer_2" / "vocab.json").write_text("mine\n")
    before = tree_state(out)
    done = cli("convert", tiny_sd3_onnx, out, "--components", "vae_decoder", "-q")
    one_line_error(done, "not an sd2mnn bundle", "tokenizer_2/vocab.json", "--overwrite")
    assert tree_state(out) == before


def test_changing_the_scheme_under_a_kept_text_encoder_is_refused(tiny_sd3_bundle, tiny_sd3_onnx, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle)
    before = tree_state(bundle)
    with pytest.raises(InputError, match=r"text_encoder_2, text_encoder_3 were converted with --tokenizer-scheme diffusers"):
        sd2mnn.convert(tiny_sd3_onnx, bundle, components=["text_encoder"], tokenizer_scheme="mnn")
    assert tree_state(bundle) == before
    # Converting what the tokenizers feed keeps the bundle's scheme, as for SD1.5.
    report = sd2mnn.convert(tiny_sd3_onnx, bundle, components=["vae_decoder"], tokenizer_scheme="mnn")
    assert [(c.name, c.status) for c in report.components] == [("vae_decoder", "reused")]
    assert json.loads((bundle / "manifest.json").read_text())["tokenizer_scheme"] == "diffusers"


def test_an_sd15_bundle_is_not_mixed_with_sd35_components(tiny_sd3_onnx, bundle_copy):
    before = tree_state(bundle_copy)
    with pytest.raises(InputError, match=r"holds an sd15 bundle, and .* is an sd35 pipeline; convert it into another"):
        sd2mnn.convert(tiny_sd3_onnx, bundle_copy, components=["vae_decoder"])
    assert tree_state(bundle_copy) == before
