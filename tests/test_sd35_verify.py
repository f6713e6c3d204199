"""sd2mnn verify, bench and sweep on a tiny SD3 bundle (two CLIPs, T5, an MMDiT, a 16-channel VAE):
every component against ONNX Runtime with its own inputs, MNN's SD3.5 runtime contract
(diffusion_sd35.cpp), and each tokenizer's conditioning check.

The tiny models are narrower than the widths the C++ fixes (768, 1280, 4096, 16x128x128 latents),
so, like SD1.5's off-contract pipelines, their bundle fails the contract on those shapes alone."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest
from onnx import numpy_helper

import sd2mnn
from sd2mnn.measurement.bench import bench
from sd2mnn.cli import main as cli_main
from sd2mnn.core.contract import check_contract
from sd2mnn.errors import InputError
from sd2mnn.families import SD35
from sd2mnn.measurement.sweep import sweep
from sd2mnn.verification.verify import verify

pytest.importorskip("diffusers")

MODELS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder")


def only_the_fixed_widths(issues) -> bool:
    """Every issue is a shape the C++ fixes and the tiny models do not have."""
    return all(i.kind == "shape" and "found" in i.message for i in issues)


@pytest.fixture(scope="module")
def verified(tiny_sd3_onnx, tiny_sd3_bundle):
    return verify(tiny_sd3_onnx, tiny_sd3_bundle, prompts=None)


def test_every_component_matches_onnx_runtime_with_its_own_inputs(verified, tiny_sd3_bundle):
    report = verified
    assert report.family == "sd35"
    assert [c.name for c in report.components] == list(MODELS)
    for c in report.components:
        assert c.error is None and c.outputs, c.name
        assert not [f for o in c.outputs for f in o.failures(c.thresholds)], c.name
        assert [o.name for o in c.outputs] == list(SD35.components[c.name].outputs)
    inputs = {c.name: c.inputs for c in report.components}
    for name, folder in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
        assert f"ids from the bundle's {folder}/tokenizer.mtok" in inputs[name]
    assert "timesteps 1000," in inputs["transformer"] and "/ 1.5305 + 0.0609" in inputs["vae_decoder"]
    # The only failures: the widths diffusion_sd35.cpp fixes (the tiny models are narrower).
    assert report.contract and only_the_fixed_widths(report.contract)
    assert {i.component for i in report.contract} == set(MODELS)
    assert sorted(report.failures) == sorted(f"{i.component}: {i.message}" for i in report.contract)
    assert ("transformer: transformer.mnn: shape: the runtime expects input 'encoder_hidden_states' of shape "
            "[2,333,4096]; found [2,333,64]") in report.failures
    assert report.notes == []


def test_each_tokenizer_gets_its_conditioning_check(verified):
    checks = {c.component: c for c in verified.conditionings}
    assert list(checks) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    for name, check in checks.items():
        assert check.tokenizer_scheme == "diffusers" and check.failures == [], (name, check.summary())
        assert check.prompt_share >= 0.95 and check.matching_cosine >= 0.999
    assert verified.conditioning is checks["text_encoder"]
    assert checks["text_encoder_2"].summary().startswith("conditioning of text_encoder_2 (diffusers)")


def test_without_t5_verify_accepts_the_bundle_and_says_so(tiny_sd3_onnx, tiny_sd3_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("text_encoder_3.mnn*"))
    report = verify(tiny_sd3_onnx, bundle, components="text_encoder_2,vae_decoder")
    assert not [i for i in report.contract if "text_encoder_3" in i.file or i.kind != "shape"]
    assert len(report.notes) == 1 and "text_encoder_3.mnn is absent" in report.notes[0]
    # By default the ONNX T5 is not compared with a bundle that has none.
    assert "text_encoder_3" not in [c.name for c in verify(tiny_sd3_onnx, bundle, components=None,
                                                           prompts=["a cat"]).components]


def test_a_transformer_from_another_onnx_fails_exactly_the_transformer(tiny_sd3_onnx, tiny_sd3_bundle, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd3_onnx, other)
    model_path = other / "transformer" / "model.onnx"
    model = onnx.load(str(model_path))  # with its weights.pb
    # The exporter's names are mangled: scale the largest float weight by 1.1.
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    init = max(floats, key=lambda i: numpy_helper.to_array(i).size)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.1, init.name))
    onnx.save(model, str(model_path), save_as_external_data=True, location="weights.pb")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle)
    manifest_path = bundle / "manifest.json"
    recorded_sources = json.loads(manifest_path.read_text())["components"]["transformer"]["sources"]
    sd2mnn.convert(other, bundle, components=["transformer"])

    # The manifest knows the transformer came from another ONNX: verify refuses to compare them.
    with pytest.raises(InputError, match=r"transformer/model.onnx: .*not the transformer the bundle"):
        verify(tiny_sd3_onnx, bundle, components="text_encoder,transformer,vae_decoder", prompts=["a cat"])
    # A conversion gone wrong that still records the right source: the numbers catch it.
    manifest = json.loads(manifest_path.read_text())
    manifest["components"]["transformer"]["sources"] = recorded_sources
    manifest_path.write_text(json.dumps(manifest))
    report = verify(tiny_sd3_onnx, bundle, components="text_encoder,transformer,vae_decoder", prompts=["a cat"])
    metric = [f for c in report.components for o in c.outputs for f in o.failures(c.thresholds)]
    assert [c.name for c in report.components if any(o.failures(c.thresholds) for o in c.outputs)] == ["transformer"]
    assert metric and all(f.startswith(("PSNR", "cosine")) for f in metric)
    assert any(f.startswith("transformer.out_hidden_states: PSNR") for f in report.failures)


def test_the_contract_flags_a_wrong_tensor_name(tiny_sd3_onnx, tiny_sd3_bundle, tmp_path):
    model = onnx.load(str(tiny_sd3_onnx / "text_encoder" / "model.onnx"))
    for node in model.graph.node:
        node.output[:] = ["pooler_output" if o == "text_embeds" else o for o in node.output]
    for out in model.graph.output:
        if out.name == "text_embeds":
            out.name = "pooler_output"  # SD1.5's name: diffusion_sd35.cpp reads text_embeds
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle)
    subprocess.run([sys.executable, "-m", "sd2mnn.conversion._mnnconvert", "-f", "ONNX", "--modelFile", str(tmp_path / "renamed.onnx"),
                    "--MNNModel", str(bundle / "text_encoder.mnn"), "--saveExternalData=1"],
                   cwd=bundle, check=True, capture_output=True)

    issues = [i for i in check_contract(bundle) if i.kind != "shape"]
    assert [(i.component, i.file, i.kind) for i in issues] == [("text_encoder", "text_encoder.mnn", "missing tensor")]
    assert "output 'text_embeds'" in issues[0].message


def test_the_contract_wants_all_three_tokenizers(tiny_sd3_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("text_encoder_3.mnn*"))
    (bundle / "tokenizer_3" / "tokenizer.mtok").unlink()
    (bundle / "tokenizer_2" / "tokenizer.mtok").write_bytes(b"not a tokenizer")
    issues = [(i.component, i.file, i.kind) for i in check_contract(bundle) if i.kind != "shape"]
    assert issues == [("tokenizer", "tokenizer_2/tokenizer.mtok", "unreadable"),
                      ("tokenizer", "tokenizer_3/tokenizer.mtok", "missing file")]


def test_folders_of_two_families_are_refused(demo_onnx, tiny_sd3_bundle):
    with pytest.raises(InputError, match="is an sd35 bundle but .* an sd15 pipeline"):
        verify(demo_onnx, tiny_sd3_bundle)


def test_cli_verify_reports_every_tokenizer_and_fails_on_the_widths(tiny_sd3_onnx, tiny_sd3_bundle, capsys):
    assert cli_main(["verify", str(tiny_sd3_onnx), str(tiny_sd3_bundle), "--components", "text_encoder_2",
                     "--json", "--quiet"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["family"] == "sd35" and [c["component"] for c in report["conditionings"]] == ["text_encoder_2"]
    assert report["components"][0]["outputs"] and all(o["psnr"] > 60 for o in report["components"][0]["outputs"])
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors and "text_encoder_2.mnn: shape: the runtime expects output 'last_hidden_state' of shape [2,77,1280]" in errors[0]


def test_bench_times_every_component_on_both_runtimes(tiny_sd3_onnx, tiny_sd3_bundle):
    report = bench(tiny_sd3_bundle, tiny_sd3_onnx, runs=1)
    assert [c.name for c in report.components] == list(MODELS)
    assert report.errors == []
    for c in report.components:
        assert set(c.timings) == {"mnn", "onnxruntime"} and c.ratios() is not None
        assert all(t.median_s > 0 and t.file_bytes > 0 for t in c.timings.values())
    assert report.off_contract and all("MNN's runtime would refuse" in n for n in report.off_contract)
    t5 = next(c for c in report.components if c.name == "text_encoder_3")
    assert "input_ids[2, 256]" in t5.inputs


def test_sweep_measures_sd35_variants(tiny_sd3_onnx, tmp_path):
    report = sweep(tiny_sd3_onnx, tmp_path / "sweep", "fp32,w8", min_psnr=20, components="transformer", runs=1)
    assert [(v.name, v.status) for v in report.variants] == [("fp32", "ok"), ("w8", "ok")], \
        [v.error for v in report.variants]
    fp32, w8 = report.variants
    assert w8.size_bytes < fp32.size_bytes and fp32.fidelity > w8.fidelity > 20
    assert report.recommended == "w8" and report.reference["transformer"] > 0
    assert report.off_contract and "transformer.mnn" in report.off_contract[0]
    assert json.loads((tmp_path / "sweep" / "w8" / "manifest.json").read_text())["family"] == "sd35"
