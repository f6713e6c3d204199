"""sd2mnn verify: fidelity against ONNX Runtime and the runtime contract, on the tiny demo pipeline."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tree_state
from onnx import numpy_helper

import sd2mnn
from sd2mnn.families import SD15
from sd2mnn.cli import main as cli_main
from sd2mnn.core.contract import _check_tensors, check_contract
from sd2mnn.errors import InputError
from sd2mnn.core.manifest import read_manifest
from sd2mnn.verification.verify import DEFAULT_THRESHOLDS, Thresholds, compare, resolve_thresholds, verify

FP32 = DEFAULT_THRESHOLDS["fp32"]["unet"]


def _convert_directly(onnx_model: Path, mnn_model: Path) -> None:
    """The converter without sd2mnn's input checks (they refuse the broken models built here)."""
    subprocess.run(
        [sys.executable, "-m", "sd2mnn.conversion._mnnconvert", "-f", "ONNX", "--modelFile", str(onnx_model),
         "--MNNModel", str(mnn_model), "--saveExternalData=1"],
        cwd=mnn_model.parent, check=True, capture_output=True,
    )
    assert mnn_model.is_file() and mnn_model.with_name(mnn_model.name + ".weight").is_file()


# -- metrics and thresholds ------------------------------------------------------------------


def test_metrics_on_known_arrays():
    ref = np.linspace(0, 1, 1000, dtype=np.float32)
    assert compare(ref, ref) == (0.0, 0.0, 1.0, 200.0)  # identical: PSNR capped
    max_abs, mean_abs, cosine, psnr = compare(ref, ref + 0.01)
    assert max_abs == pytest.approx(0.01, rel=1e-4) and mean_abs == pytest.approx(0.01, rel=1e-4)
    assert psnr == pytest.approx(40.0, abs=0.01)  # peak-to-peak 1, RMS error 0.01
    assert cosine < 1.0
    # The peak is the reference's range, so scaling both leaves PSNR and cosine unchanged.
    scaled = compare(ref * 30, (ref + 0.01) * 30)
    assert scaled[3] == pytest.approx(psnr) and scaled[2] == pytest.approx(cosine)


def test_threshold_overrides():
    assert resolve_thresholds("unet", False, None) == FP32
    assert resolve_thresholds("unet", True, None) == DEFAULT_THRESHOLDS["quantized"]["unet"]
    assert FP32.min_psnr > DEFAULT_THRESHOLDS["quantized"]["unet"].min_psnr
    overrides = {"*": {"min_psnr": 30}, "unet": Thresholds(50, 0.999)}
    assert resolve_thresholds("vae_decoder", False, overrides) == Thresholds(30, FP32.min_cosine)
    assert resolve_thresholds("unet", False, overrides) == Thresholds(50, 0.999)


# -- good bundles ----------------------------------------------------------------------------


def test_fp32_bundle_passes(fp32_bundle, demo_onnx):
    before = tree_state(fp32_bundle)
    report = verify(demo_onnx, fp32_bundle)
    assert report.passed, report.failures
    assert [c.name for c in report.components] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert report.contract == []
    for component in report.components:
        assert not component.quantized and component.thresholds == DEFAULT_THRESHOLDS["fp32"][component.name]
        assert component.cases >= 2
        for output in component.outputs:
            assert output.psnr > 80 and output.cosine > 0.99999, (component.name, output)
    text, unet = report.components[0], report.components[1]
    assert {o.name for o in text.outputs} == {"last_hidden_state", "pooler_output"}
    assert "tokenizer.mtok" in text.inputs and "ONNX text encoder output" in unet.inputs
    assert tree_state(fp32_bundle) == before  # verification never writes into the bundle


def test_w8_bundle_passes_with_quantized_thresholds(w8_bundle, demo_onnx):
    report = verify(demo_onnx, w8_bundle)
    assert report.passed, report.failures
    assert [c.name for c in report.components] == ["text_encoder", "unet", "vae_decoder"]
    for component in report.components:
        assert component.quantized and "--weightQuantBits=8" in component.precision_basis
        assert component.thresholds == DEFAULT_THRESHOLDS["quantized"][component.name]
    # The fp32 limits are too strict for 8-bit weights: that is why the defaults differ.
    strict = verify(demo_onnx, w8_bundle, components="unet", thresholds={"*": FP32})
    assert not strict.passed and any("unet.out_sample: PSNR" in f for f in strict.failures)


def test_quantization_detected_without_manifest(w8_bundle, demo_onnx, tmp_path):
    bundle = tmp_path / "w8"
    shutil.copytree(w8_bundle, bundle)
    (bundle / "manifest.json").unlink()
    report = verify(demo_onnx, bundle, components="unet")
    assert report.passed, report.failures
    assert report.components[0].quantized and "no manifest" in report.components[0].precision_basis


def test_isolated_passes_match_in_process(fp32_bundle, demo_onnx):
    inline = verify(demo_onnx, fp32_bundle, components="vae_decoder", isolate=False)
    isolated = verify(demo_onnx, fp32_bundle, components="vae_decoder", isolate=True)
    assert isolated.passed
    assert [r.isolated for r in isolated.components[0].runs] == [True, True]
    assert all(r.peak_rss_bytes > 0 for r in isolated.components[0].runs)
    assert isolated.components[0].outputs[0].psnr == pytest.approx(inline.components[0].outputs[0].psnr)


# -- broken bundles --------------------------------------------------------------------------


def test_perturbed_component_fails_exactly_that_component(onnx_copy, bundle_copy, demo_onnx, capsys):
    model_path = onnx_copy / "vae_decoder" / "model.onnx"
    model = onnx.load(str(model_path))
    for i, init in enumerate(model.graph.initializer):
        if init.name.endswith("conv_out.weight"):
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.1, init.name))
    onnx.save(model, str(model_path))
    manifest_path = bundle_copy / "manifest.json"
    demo_sources = json.loads(manifest_path.read_text())["components"]["vae_decoder"]["sources"]
    sd2mnn.convert(onnx_copy, bundle_copy, components=["vae_decoder"])
    # A conversion gone wrong: the manifest still names the demo's model as the source (else
    # verify would refuse demo_onnx as not the bundle's source before comparing anything).
    manifest = json.loads(manifest_path.read_text())
    manifest["components"]["vae_decoder"]["sources"] = demo_sources
    manifest_path.write_text(json.dumps(manifest))

    report = verify(demo_onnx, bundle_copy)
    assert not report.passed
    assert [c.name for c in report.components if not c.passed] == ["vae_decoder"]
    assert report.failures and all(f.startswith("vae_decoder.sample: ") for f in report.failures)
    assert report.contract == []

    assert cli_main(["verify", str(demo_onnx), str(bundle_copy), "--components", "vae_decoder"]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error and error[0].startswith("error: verification failed: vae_decoder.sample: PSNR")
    assert "cosine" in error[0]


def test_missing_pooler_output_fails_the_contract(demo_onnx, bundle_copy, tmp_path, capsys):
    model = onnx.load(str(demo_onnx / "text_encoder" / "model.onnx"))
    kept = [o for o in model.graph.output if o.name != "pooler_output"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(tmp_path / "no_pooler.onnx"))
    work = tmp_path / "convert"
    work.mkdir()
    _convert_directly(tmp_path / "no_pooler.onnx", work / "text_encoder.mnn")
    for name in ("text_encoder.mnn", "text_encoder.mnn.weight"):
        shutil.copy2(work / name, bundle_copy / name)

    issues = check_contract(bundle_copy)
    assert [(i.component, i.kind) for i in issues] == [("text_encoder", "missing tensor")]
    assert "output 'pooler_output'" in issues[0].message and "re-export" in issues[0].message

    assert cli_main(["verify", str(demo_onnx), str(bundle_copy), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    failed = [c for c in report["components"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["text_encoder"] and failed[0]["outputs"] == []
    assert "error: verification failed: text_encoder: text_encoder.mnn: missing tensor" in captured.err
    assert "pooler_output" in captured.err


def test_missing_weight_file_fails_the_contract(demo_onnx, bundle_copy):
    (bundle_copy / "unet.mnn.weight").unlink()
    issues = check_contract(bundle_copy)
    assert [(i.component, i.file, i.kind) for i in issues] == [("unet", "unet.mnn.weight", "missing file")]
    assert "weights beside unet.mnn" in issues[0].message
    report = verify(demo_onnx, bundle_copy, components="unet,vae_decoder")
    assert [c.name for c in report.components if not c.passed] == ["unet"]
    assert report.failures == [f"unet: {issues[0].message}"]


def test_missing_tokenizer_fails_the_contract(demo_onnx, bundle_copy, capsys):
    (bundle_copy / "tokenizer.mtok").unlink()
    issues = check_contract(bundle_copy)
    assert [(i.component, i.file, i.kind) for i in issues] == [("tokenizer", "tokenizer.mtok", "missing file")]
    # Every model still matches (the ids come from the ONNX tokenizer), but the bundle fails.
    assert cli_main(["verify", str(demo_onnx), str(bundle_copy), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert all(c["passed"] for c in report["components"]) and not report["passed"]
    assert "tokenizer.mtok: missing file" in captured.err


def test_corrupt_model_is_reported(demo_onnx, bundle_copy):
    (bundle_copy / "vae_decoder.mnn").write_bytes(b"not a model")
    issues = check_contract(bundle_copy)
    assert [(i.file, i.kind) for i in issues] == [("vae_decoder.mnn", "unreadable")]


def test_contract_shapes_and_dtypes():
    """What the runtime feeds is checked, not just the names (a model exported at another size)."""
    info = {"inputs": ["sample", "timestep", "encoder_hidden_states"], "tensors": {
        "sample": {"shape": [2, 4, 96, 96], "dtype": "float32"},
        "timestep": {"shape": [1], "dtype": "float32"},
        "encoder_hidden_states": {"shape": [2, 77, -1], "dtype": "float32"},  # dynamic: fine
        "out_sample": {"shape": [2, 4, 96, 96], "dtype": "float32"},
    }}
    issues = _check_tensors("unet", info, 77, 768, SD15)
    assert [(i.kind, i.expected) for i in issues] == [
        ("shape", "input 'sample' of shape [2,4,64,64]"),
        ("dtype", "input 'timestep' as int32"),
        ("shape", "output 'out_sample' of shape [2,4,64,64]"),
    ]


def test_unknown_or_missing_component(demo_onnx, fp32_bundle, onnx_copy):
    with pytest.raises(InputError, match="unknown component"):
        verify(demo_onnx, fp32_bundle, components="refiner")
    shutil.rmtree(onnx_copy / "vae_encoder")
    with pytest.raises(InputError, match="vae_encoder"):
        verify(onnx_copy, fp32_bundle, components="vae_encoder")
    with pytest.raises(InputError, match="is not a folder"):
        verify(demo_onnx, onnx_copy / "nowhere")


# -- outputs ---------------------------------------------------------------------------------


def test_cli_json(demo_onnx, fp32_bundle, capsys):
    assert cli_main(["verify", str(demo_onnx), str(fp32_bundle), "--json", "--components", "text_encoder,unet"]) == 0
    data = json.loads(capsys.readouterr().out)  # nothing else on stdout (MNN's own prints included)
    assert data["passed"] and data["failures"] == [] and data["contract"] == []
    unet = data["components"][1]
    assert unet["name"] == "unet" and unet["thresholds"] == {"min_psnr": FP32.min_psnr, "min_cosine": FP32.min_cosine}
    assert set(unet["outputs"][0]) >= {"max_abs", "mean_abs", "cosine", "psnr"}
    assert [r["runtime"] for r in unet["runs"]] == ["onnxruntime", "mnn"]


def test_cli_table_and_threshold_flags(demo_onnx, fp32_bundle, capsys):
    assert cli_main(["verify", str(demo_onnx), str(fp32_bundle), "--components", "vae_decoder"]) == 0
    out = capsys.readouterr().out
    assert "vae_decoder  sample" in out and "PASS" in out
    assert cli_main(["verify", str(demo_onnx), str(fp32_bundle), "--components", "vae_decoder",
                     "--min-psnr", "vae_decoder=200", "-q"]) == 1
    assert "vae_decoder.sample: PSNR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["verify", str(demo_onnx), str(fp32_bundle), "--min-cosine", "refiner=0.9"])


def test_report_folder(demo_onnx, fp32_bundle, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "report"
    assert cli_main(["verify", str(demo_onnx), str(fp32_bundle), "--components", "vae_decoder", "--report", str(out)]) == 0
    assert f"wrote {out / 'vae_decoder.png'}" in capsys.readouterr().out
    with Image.open(out / "vae_decoder.png") as picture:
        assert picture.size == (3 * 512, 512 + 20)  # ONNX | MNN | error map, captioned
        pixels = np.asarray(picture.convert("RGB"))
    onnx_half, mnn_half = pixels[20:, :512].astype(int), pixels[20:, 512:1024].astype(int)
    assert np.abs(onnx_half - mnn_half).max() <= 1  # fp32: the same picture
    saved = json.loads((out / "verification.json").read_text())
    assert saved["passed"] and saved["report_files"] == [str(out / "vae_decoder.png"), str(out / "verification.json")]


def test_convert_verify_records_results_in_manifest(demo_onnx, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert cli_main(["convert", str(demo_onnx), str(bundle), "--verify"]) == 0
    assert "PASS" in capsys.readouterr().out
    manifest = read_manifest(bundle / "manifest.json")
    for name, record in manifest.components.items():
        assert record.verification["passed"] and record.verification["name"] == name
        assert record.verification["seed"] == 0 and record.verification["outputs"]
    assert not list(bundle.glob(".manifest.json.tmp-*"))
    # A reconversion that reuses everything keeps the results; a forced one drops them.
    sd2mnn.convert(demo_onnx, bundle)
    assert read_manifest(bundle / "manifest.json").components["unet"].verification["passed"]
    sd2mnn.convert(demo_onnx, bundle, components=["unet"], force=True)
    assert read_manifest(bundle / "manifest.json").components["unet"].verification is None
