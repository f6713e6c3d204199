"""sd2mnn convert on the tiny demo pipeline, with the real converter and real runtimes."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tree_state

import sd2mnn
from sd2mnn.tokenization.prompt_ids import PromptIds
from sd2mnn.cli import main as cli_main
from sd2mnn.errors import ConversionError, ConverterNotFoundError, InputError
from sd2mnn.families import SD15
from sd2mnn.core.manifest import sha256_file
from sd2mnn.core.runtime import MnnModel, OrtModel, RuntimeConfig

RNG = np.random.default_rng(0)


def sample_inputs(onnx_model: Path) -> dict[str, np.ndarray]:
    """Random inputs of the model's declared shapes (token ids for int inputs)."""
    feeds = {}
    for tensor in onnx.load(str(onnx_model), load_external_data=False).graph.input:
        shape = [d.dim_value for d in tensor.type.tensor_type.shape.dim]
        if tensor.type.tensor_type.elem_type == onnx.TensorProto.INT32:
            high = 49408 if tensor.name == "input_ids" else 1000
            feeds[tensor.name] = RNG.integers(0, high, size=shape).astype(np.int32)
        else:
            feeds[tensor.name] = RNG.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_fp32_outputs_match_onnx_runtime(fp32_bundle, demo_onnx, name):
    spec = SD15.components[name]
    source = demo_onnx / name / "model.onnx"
    feeds = sample_inputs(source)
    reference = dict(feeds)
    if name == "text_encoder":  # the bundle's text encoder rewrites ids first (sd2mnn.tokenization.id_rewrite)
        reference["input_ids"] = PromptIds.for_bundle(fp32_bundle, SD15.prompt).rewrite_pair(feeds["input_ids"])
    expected = OrtModel(source).run(reference)
    # Winograd kernels off: they are MNN's runtime approximation, not the conversion's doing
    # (they alone put the VAE decoder at ~7e-4; test_winograd_error_is_the_runtimes shows it).
    exact = RuntimeConfig(winograd=False)
    got = MnnModel(fp32_bundle / spec.mnn_name, spec.inputs, spec.outputs, exact).run(feeds)
    for output in spec.outputs:
        assert got[output].shape == expected[output].shape
        error = float(np.max(np.abs(got[output] - expected[output])))
        assert error < 1e-3, f"{name}.{output}: max abs error {error}"


def test_winograd_error_is_the_runtimes(fp32_bundle, demo_onnx):
    """With MNN's default kernels the decoder still matches, within Winograd's own error."""
    source = demo_onnx / "vae_decoder" / "model.onnx"
    feeds = sample_inputs(source)
    expected = OrtModel(source).run(feeds)["sample"]
    fast = MnnModel(fp32_bundle / "vae_decoder.mnn", ["latent_sample"], ["sample"]).run(feeds)["sample"]
    exact = MnnModel(fp32_bundle / "vae_decoder.mnn", ["latent_sample"], ["sample"],
                     RuntimeConfig(winograd=False)).run(feeds)["sample"]
    assert np.max(np.abs(exact - expected)) < 1e-4
    assert 1e-4 < np.max(np.abs(fast - expected)) < 5e-3


def test_bundle_layout_and_manifest(fp32_bundle, demo_onnx):
    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    assert manifest["sd2mnn_version"] == sd2mnn.__version__
    assert manifest["converter"]["kind"] == "python-package"
    assert manifest["converter"]["version"].count(".") >= 1
    assert manifest["converter_flags"] == []
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, record in manifest["components"].items():
        spec = SD15.components[name]
        # Sources: the model plus its external data, hashed.
        source_paths = [f["path"] for f in record["sources"]]
        assert source_paths[0] == f"{name}/model.onnx"
        for f in record["sources"]:
            assert f["size"] == (demo_onnx / f["path"]).stat().st_size
            assert f["sha256"] == sha256_file(demo_onnx / f["path"])
        # Outputs: the model and its external weights, hashed.
        assert [f["path"] for f in record["outputs"]] == [spec.mnn_name, spec.weight_name]
        for f in record["outputs"]:
            assert f["size"] == (fp32_bundle / f["path"]).stat().st_size > 0
            assert f["sha256"] == sha256_file(fp32_bundle / f["path"])
        assert [t["name"] for t in record["inputs"]] == list(spec.inputs)
        assert [t["name"] for t in record["output_tensors"]] == list(spec.outputs)
        assert all(t["dtype"] in ("float32", "int32") and t["shape"] for t in record["inputs"] + record["output_tensors"])
        assert record["wall_s"] > 0 and record["peak_rss_bytes"] > 10 << 20
        assert record["flags"] == []
        assert "Converted Success!" in (fp32_bundle / "logs" / f"{name}.log").read_text()
    unet = manifest["components"]["unet"]
    assert "unet/weights.pb" in [f["path"] for f in unet["sources"]]
    assert {t["name"]: t for t in unet["inputs"]}["timestep"]["dtype"] == "int32"
    # The tokenizer files are copied next to the models, and tokenizer.mtok written.
    tokenizer_files = {f["path"] for f in manifest["tokenizer"]}
    assert "tokenizer.mtok" in tokenizer_files
    assert {p.name for p in (demo_onnx / "tokenizer").iterdir()} <= tokenizer_files
    assert (fp32_bundle / "tokenizer.mtok").read_bytes().startswith(b"430 ")
    # Nothing of the run's private work area is left behind.
    assert not (fp32_bundle / ".sd2mnn").exists()
    assert not list(fp32_bundle.rglob(".__convert_external_data.bin"))


def test_weight_quant_8_shrinks_unet(fp32_bundle, w8_bundle):
    fp32 = (fp32_bundle / "unet.mnn.weight").stat().st_size
    w8 = (w8_bundle / "unet.mnn.weight").stat().st_size
    assert fp32 / w8 >= 3, f"unet weights {fp32} -> {w8} bytes is only {fp32 / w8:.2f}x"
    manifest = json.loads((w8_bundle / "manifest.json").read_text())
    assert manifest["converter_flags"] == ["--weightQuantBits=8"]


def test_extra_flags_pass_through_verbatim(demo_onnx, w8_bundle, tmp_path):
    out = tmp_path / "extra"
    code = cli_main(["convert", str(demo_onnx), str(out), "--weightQuantBits=8", "--components", "unet", "-q"])
    assert code == 0
    # Same flags as --weight-quant-bits 8, so the same bytes.
    assert sha256_file(out / "unet.mnn.weight") == sha256_file(w8_bundle / "unet.mnn.weight")
    log = (out / "logs" / "unet.log").read_text()
    assert log.splitlines()[0].endswith("--saveExternalData=1 --weightQuantBits=8")
    record = json.loads((out / "manifest.json").read_text())["components"]["unet"]
    assert record["flags"] == ["--weightQuantBits=8"]


def test_extra_flags_may_not_override_file_arguments(demo_onnx, tmp_path):
    with pytest.raises(InputError, match="set by sd2mnn itself"):
        sd2mnn.convert(demo_onnx, tmp_path / "x", extra="--MNNModel other.mnn")
    assert not (tmp_path / "x").exists()


# -- errors: one line naming the file and the fix, the output folder untouched ---------------


def run_cli(args, capsys) -> tuple[int, str]:
    code = cli_main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def existing_bundle(fp32_bundle, tmp_path):
    """An earlier good bundle in the output folder, to prove a failed run leaves it intact."""
    import shutil

    target = tmp_path / "existing"
    shutil.copytree(fp32_bundle, target)
    return target


def assert_fails_cleanly(args, capsys, bundle, expected):
    before = tree_state(bundle)
    code, err = run_cli(args, capsys)
    assert code != 0
    first_line = err.strip().splitlines()[0]
    assert first_line.startswith("error: ") and expected in first_line, err
    assert tree_state(bundle) == before


def test_error_missing_folder(tmp_path, existing_bundle, capsys):
    missing = tmp_path / "nope"
    assert_fails_cleanly(["convert", missing, existing_bundle], capsys, existing_bundle, f"{missing} does not exist")


def test_error_missing_component(onnx_copy, existing_bundle, capsys):
    import shutil

    shutil.rmtree(onnx_copy / "unet")
    assert_fails_cleanly(["convert", onnx_copy, existing_bundle], capsys, existing_bundle,
                         f"{onnx_copy / 'unet' / 'model.onnx'} is missing")


def test_error_missing_external_data(onnx_copy, existing_bundle, capsys):
    (onnx_copy / "unet" / "weights.pb").unlink()
    assert_fails_cleanly(["convert", onnx_copy, existing_bundle], capsys, existing_bundle,
                         f"needs its external data file {onnx_copy / 'unet' / 'weights.pb'}")


def test_error_not_onnx(onnx_copy, existing_bundle, capsys):
    (onnx_copy / "vae_decoder" / "model.onnx").write_text("this is not a model\n")
    assert_fails_cleanly(["convert", onnx_copy, existing_bundle], capsys, existing_bundle,
                         f"{onnx_copy / 'vae_decoder' / 'model.onnx'} is not an ONNX model")


def test_error_wrong_tensor_names(onnx_copy, existing_bundle, capsys):
    model = onnx.load(str(onnx_copy / "vae_decoder" / "model.onnx"))
    model.graph.output[0].name = "image"
    for node in model.graph.node:
        node.output[:] = ["image" if o == "sample" else o for o in node.output]
    onnx.save(model, str(onnx_copy / "vae_decoder" / "model.onnx"))
    assert_fails_cleanly(["convert", onnx_copy, existing_bundle], capsys, existing_bundle,
                         "but MNN's runtime loads the vae_decoder with inputs ['latent_sample'] and outputs ['sample']")


def test_error_no_converter(demo_onnx, existing_bundle, tmp_path, capsys):
    not_a_converter = tmp_path / "MNNConvert"
    assert_fails_cleanly(["convert", demo_onnx, existing_bundle, "--converter", not_a_converter], capsys,
                         existing_bundle, f"{not_a_converter} (from --converter) is not an executable MNNConvert")


def test_no_converter_anywhere(monkeypatch, tmp_path):
    import importlib.util

    from sd2mnn.conversion.converter import find_converter

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "_tools" else real_find_spec(n, *a))
    with pytest.raises(ConverterNotFoundError, match="pip install MNN"):
        find_converter(environ={"PATH": str(tmp_path)})


def unsupported_op_model(path: Path) -> None:
    """A valid ONNX file with the vae_decoder's names whose op MNN does not know."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["latent_sample"], ["sample"], domain="org.example")],
        "vae_decoder",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, [1, 4, 64, 64])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 3, 512, 512])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example", 1)])
    onnx.save(model, str(path))


def test_error_converter_failure(onnx_copy, existing_bundle, capsys):
    unsupported_op_model(onnx_copy / "vae_decoder" / "model.onnx")
    before = tree_state(existing_bundle)
    code, err = run_cli(["convert", onnx_copy, existing_bundle, "--components", "vae_decoder"], capsys)
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert error_lines == [f"error: vae_decoder: {onnx_copy / 'vae_decoder' / 'model.onnx'} did not convert "
                           "(converter failed); see the converter output below, fix the model or the flags, and run again"]
    assert "These Op Not Support: ONNX::NoSuchOp" in err  # the converter log's tail
    assert tree_state(existing_bundle) == before


def test_error_converter_failure_new_folder(onnx_copy, tmp_path):
    unsupported_op_model(onnx_copy / "vae_decoder" / "model.onnx")
    out = tmp_path / "new"
    with pytest.raises(ConversionError):
        sd2mnn.convert(onnx_copy, out, components=["vae_decoder"])
    assert not out.exists()
    assert not list(tmp_path.rglob(".__convert_external_data.bin"))


def test_error_bad_flag_values(demo_onnx, tmp_path, capsys):
    code, err = run_cli(["convert", demo_onnx, tmp_path / "x", "--weight-quant-bits", "9"], capsys)
    assert code == 2 and "between 2 and 8" in err
    code, err = run_cli(["convert", demo_onnx, tmp_path / "x", "--components", "unet,vae"], capsys)
    assert code == 2 and "unknown component 'vae'" in err
    assert not (tmp_path / "x").exists()


# -- the CLI and the demo --------------------------------------------------------------------


def test_cli_json_report(demo_onnx, tmp_path, capsys):
    code = cli_main(["convert", str(demo_onnx), str(tmp_path / "b"), "--components", "vae_decoder", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"][0]["name"] == "vae_decoder"
    assert report["components"][0]["status"] == "converted"
    assert {"vae_decoder.mnn", "vae_decoder.mnn.weight", "tokenizer.mtok"} <= {f["path"] for f in report["files"]}


def test_vae_encoder_only_on_request(w8_bundle):
    assert not (w8_bundle / "vae_encoder.mnn").exists()
    assert {p.name for p in w8_bundle.glob("*.mnn")} == {"text_encoder.mnn", "unet.mnn", "vae_decoder.mnn"}


def test_demo_command_without_torch(tmp_path):
    """`sd2mnn demo` runs in a child Python where torch cannot be imported."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("torch", "diffusers", "transformers"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "demo", str(out), "-q"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "tokenizer.mtok" in done.stdout
    assert (out / "unet.mnn.weight").stat().st_size > 0


def test_converter_output_is_captured_not_printed(demo_onnx, tmp_path, capfd):
    sd2mnn.convert(demo_onnx, tmp_path / "b", components=["vae_decoder"])
    out, err = capfd.readouterr()
    assert "Converted Success" not in out + err


def test_doctor(capsys):
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "python-package" in out and "onnxruntime" in out


def test_non_executable_converter_path(tmp_path):
    from sd2mnn.conversion.converter import find_converter

    script = tmp_path / "MNNConvert"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(ConverterNotFoundError):
        find_converter(script)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert find_converter(script).kind == "executable"


def test_relative_output_folder(demo_onnx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["convert", str(demo_onnx), "rel/bundle", "--components", "vae_decoder", "-q"]) == 0
    assert (tmp_path / "rel" / "bundle" / "vae_decoder.mnn.weight").stat().st_size > 0


def test_extra_after_options(demo_onnx, tmp_path):
    """EXTRA may follow the options, as one string of several flags."""
    out = tmp_path / "b"
    assert cli_main(["convert", str(demo_onnx), str(out), "--components", "vae_decoder", "-q",
                     "--fp16 --weightQuantBits=4"]) == 0
    flags = json.loads((out / "manifest.json").read_text())["converter_flags"]
    assert flags == ["--fp16", "--weightQuantBits=4"]
    with pytest.raises(SystemExit):  # a misspelt sd2mnn flag is not taken for a converter flag
        cli_main(["convert", str(demo_onnx), str(out), "--weight-quant-bitz", "8"])
