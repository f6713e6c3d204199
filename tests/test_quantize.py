"""Bits per layer: MNN's compression file, the sensitivity measured on ONNX Runtime, sd2mnn quantize."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tree_state
from sd2mnn.core.runtime import MnnModel, RuntimeConfig
from sd2mnn.errors import InputError
from sd2mnn.families import FAMILIES
from sd2mnn.quantization.compression import (FLOAT_BITS, LayerBits, check_against_model, quantizable_layers,
                                             read_compression_file, write_compression_file)
from sd2mnn.quantization.fake_quant import quantized_weight
from sd2mnn.quantization.sensitivity import OverridableModel, load_weight, noise_psnr, output_noise
from sd2mnn.verification.verify import component_feeds

SD15 = FAMILIES["sd15"]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd2mnn.cli", *args], capture_output=True, text=True, timeout=timeout)


def _mnnconvert(model: Path, output: Path, *flags: str) -> None:
    done = subprocess.run([sys.executable, "-m", "sd2mnn.conversion._mnnconvert", "-f", "ONNX", "--modelFile", str(model),
                           "--MNNModel", str(output), "--saveExternalData=1", *flags],
                          capture_output=True, text=True, cwd=output.parent, timeout=600)
    assert done.returncode == 0 and "Converted Success" in done.stdout, done.stdout[-2000:]


# -- the layers and MNN's file ---------------------------------------------------------------


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_the_layers_read_from_onnx_are_the_ones_mnn_lists(demo_onnx, tmp_path, component):
    # Given a path that does not exist, MNNConvert writes every layer it quantizes there.
    written = tmp_path / "layers.json"
    _mnnconvert(demo_onnx / component / "model.onnx", tmp_path / "model.mnn", "--weightQuantBits=8",
                "--compressionParamsFile", str(written))
    listed = [entry["opName"] for entry in json.loads(written.read_text())["algo"][0]["quantParams"]["layer"]]
    assert set(quantizable_layers(demo_onnx / component / "model.onnx")) == set(listed)
    assert len(listed) > 10
    # And sd2mnn reads MNN's own file back.
    assert set(read_compression_file(written)) == set(listed)


@pytest.mark.parametrize("setting", [LayerBits(4), LayerBits(3, 16, asymmetric=False), LayerBits(6)])
def test_weights_quantized_in_numpy_give_what_mnn_gives(demo_onnx, tmp_path, setting):
    """One layer alone at ``setting``, the rest float: ONNX Runtime with sd2mnn's copy of MNN's
    quantization and the model MNN converts with that compression file give the same output."""
    model = demo_onnx / "unet" / "model.onnx"
    layers = list(quantizable_layers(model).values())
    feeds = component_feeds(demo_onnx, "unet", SD15)[:1]
    session = OverridableModel(model, [layer.weight for layer in layers], threads=2)
    reference = [session.run(feeds[0])]
    for layer in (layers[5], layers[30], layers[60]):
        ort_out = session.run(feeds[0], {layer.weight: quantized_weight(layer, load_weight(model, layer), setting)})
        choice = {other.op_name: setting if other is layer else LayerBits(FLOAT_BITS) for other in layers}
        write_compression_file(tmp_path / "one.json", choice)
        _mnnconvert(model, tmp_path / "one.mnn", "--compressionParamsFile", str(tmp_path / "one.json"))
        mnn = MnnModel(tmp_path / "one.mnn", list(feeds[0]), ["out_sample"], RuntimeConfig(threads=2, precision="high"))
        mnn_out = mnn.run(feeds[0])
        del mnn
        ort_db = noise_psnr(output_noise(reference, [ort_out]))
        mnn_db = noise_psnr(output_noise(reference, [{"out_sample": mnn_out["out_sample"]}]))
        assert ort_db < 90  # the layer's quantization shows
        assert abs(ort_db - mnn_db) < 0.5, (layer.op_name, ort_db, mnn_db)


def test_layer_bits_labels_read_back():
    for text in ("8", "4b64", "3b32s", "float", "2"):
        assert LayerBits.parse(LayerBits.parse(text).label).label == LayerBits.parse(text).label
    assert LayerBits.parse("4b64") == LayerBits(4, 64)
    for bad in ("9", "1", "4b20", "x", "4bx"):
        with pytest.raises(InputError):
            LayerBits.parse(bad)


# -- bad compression files: one line, nothing converted --------------------------------------


def _unet_file(demo_onnx: Path, tmp_path: Path, **changes) -> Path:
    layers = {name: LayerBits(8) for name in quantizable_layers(demo_onnx / "unet" / "model.onnx")}
    layers.update(changes)
    path = tmp_path / "unet.compression.json"
    write_compression_file(path, layers)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing layer", "is not in"),
    ("not quantizable", "MNN cannot quantize"),
    ("block", "do not divide"),
    ("not json", "is not JSON"),
    ("no forGuide", "forGuide"),
    ("suffix", "ends in .json"),
    ("bits", "bits must be"),
])
def test_a_bad_compression_file_is_one_line_and_converts_nothing(demo_onnx, tmp_path, case, message):
    bundle = tmp_path / "bundle"
    path = _unet_file(demo_onnx, tmp_path)
    document = json.loads(path.read_text())
    layers = document["algo"][0]["quantParams"]["layer"]
    if case == "missing layer":
        layers[0]["opName"] = "/model/not_there/Conv_output_0"
    elif case == "not quantizable":
        layers[0]["opName"] = _a_softmax_output(demo_onnx)
    elif case == "block":
        layers[0]["weight"][0]["blockSize"] = 32  # conv_in has 4 input channels
    elif case == "no forGuide":
        del document["forGuide"]
    elif case == "bits":
        layers[0]["weight"][0]["bits"] = 16
    text = json.dumps(document)
    if case == "not json":
        text = text[:-10]
    if case == "suffix":
        path = path.with_suffix(".txt")
    path.write_text(text)
    done = _cli("convert", str(demo_onnx), str(bundle), "--components", "unet", "--compression-file", f"unet={path}")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and str(path) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not bundle.exists()


def _a_softmax_output(demo_onnx: Path) -> str:
    import onnx

    graph = onnx.load(str(demo_onnx / "unet" / "model.onnx"), load_external_data=False).graph
    return next(node.output[0] for node in graph.node if node.op_type == "Softmax")


def test_compression_file_options_are_checked(demo_onnx, tmp_path):
    path = _unet_file(demo_onnx, tmp_path)
    for args, message in (
        (["--compression-file", str(path)], "COMPONENT=FILE"),
        (["--compression-file", f"vae_encoder={path}"], "does not convert"),
        ([f"--compressionParamsFile={path}"], "--compression-file COMPONENT=FILE"),
    ):
        done = _cli("convert", str(demo_onnx), str(tmp_path / "out"), *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert not (tmp_path / "out").exists()


def test_a_compression_file_converts_and_is_recorded(demo_onnx, tmp_path):
    import sd2mnn

    names = list(quantizable_layers(demo_onnx / "unet" / "model.onnx"))
    path = _unet_file(demo_onnx, tmp_path, **{name: LayerBits(4) for name in names[::2]})
    bundle = tmp_path / "bundle"
    report = sd2mnn.convert(demo_onnx, bundle, components="unet", compression={"unet": path})
    record = report.components[0].record
    assert record.compression[names[0]] == "4" and record.compression[names[1]] == "8"
    assert read_compression_file(bundle / "unet.compression.json") == read_compression_file(path)
    again = sd2mnn.convert(demo_onnx, bundle, components="unet", compression={"unet": path})
    assert again.components[0].status == "reused"
    flat = sd2mnn.convert(demo_onnx, bundle, components="unet")
    assert (flat.components[0].status, flat.components[0].reason) == ("converted", "layer bits changed")
    assert not (bundle / "unet.compression.json").exists()
    checked = sd2mnn.verify(demo_onnx, bundle, components="unet")
    assert not checked.components[0].quantized  # fp32 again: held to fp32's limits


def test_check_against_model_accepts_mnns_own_file(demo_onnx, tmp_path):
    written = tmp_path / "layers.json"
    _mnnconvert(demo_onnx / "vae_decoder" / "model.onnx", tmp_path / "model.mnn", "--weightQuantBits=4",
                "--compressionParamsFile", str(written))
    check_against_model(written, read_compression_file(written), demo_onnx / "vae_decoder" / "model.onnx")


# -- sd2mnn quantize ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(demo_onnx, tmp_path_factory):
    """The demo unet quantized to a 40 dB floor, and its report."""
    from sd2mnn.quantization.quantize import quantize

    bundle = tmp_path_factory.mktemp("quantize") / "bundle"
    return bundle, quantize(demo_onnx, bundle, min_psnr=40, components="unet")


def test_quantize_meets_the_floor_with_fewer_bytes_than_8_bits(quantized, w8_bundle, demo_onnx):
    bundle, report = quantized
    choice = report.components[0]
    assert choice.chosen.psnr >= 40
    assert report.verification.passed
    unet = report.verification.components[0]
    assert min(o.psnr for o in unet.outputs) >= 40 and unet.quantized
    assert sum(choice.histogram().values()) == len(quantizable_layers(demo_onnx / "unet" / "model.onnx"))
    assert len(choice.histogram()) >= 2  # bits per layer, not one width
    mixed = sum((bundle / n).stat().st_size for n in ("unet.mnn", "unet.mnn.weight"))
    uniform = sum((w8_bundle / n).stat().st_size for n in ("unet.mnn", "unet.mnn.weight"))
    assert mixed < 0.85 * uniform
    manifest = json.loads((bundle / "manifest.json").read_text())
    recorded = manifest["components"]["unet"]["compression"]
    assert recorded == {name: setting.label for name, setting in choice.layers.items()}
    assert read_compression_file(bundle / "unet.compression.json") == choice.layers
    assert not (bundle / ".sd2mnn" / "trial").exists()


def test_quantize_again_reuses_the_measurements_and_the_bundle(quantized, demo_onnx):
    bundle, first = quantized
    done = _cli("quantize", str(demo_onnx), str(bundle), "--min-psnr", "40", "--components", "unet", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    unet = report["components"][0]
    assert unet["reused_measurements"] and all(t["reused"] for t in unet["trials"])
    # The reusing run measured nothing itself; the kept measurements still say what measuring cost.
    assert unet["sensitivity_s"] == 0 and unet["sensitivity_peak_bytes"] == 0
    kept = json.loads((bundle / ".sd2mnn" / "measured" / "unet.json").read_text())
    assert kept["sensitivity_s"] > 0 and kept["sensitivity_peak_bytes"] >= first.components[0].sensitivity_peak_bytes > 0
    assert report["conversion"]["components"][0]["status"] == "reused"
    assert unet["chosen"]["digest"] == first.components[0].chosen.digest


def test_a_floor_no_choice_meets_is_refused_and_the_bundle_is_kept(quantized, demo_onnx, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(quantized[0], bundle)
    before = {k: v for k, v in tree_state(bundle).items() if not k.startswith(".sd2mnn")}
    done = _cli("quantize", str(demo_onnx), str(bundle), "--min-psnr", "70", "--components", "unet",
                "--choices", "4,3", "--attempts", "2")
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "no choice of bits" in line and "70" in line and "Traceback" not in done.stderr
    assert {k: v for k, v in tree_state(bundle).items() if not k.startswith(".sd2mnn")} == before
    assert not (bundle / ".sd2mnn" / "trial").exists()


@pytest.mark.parametrize("args, message", [
    (["--min-psnr", "abc"], "is not DB or COMPONENT=DB"),
    (["--min-psnr", "250"], "between 0 and 200"),
    (["--min-psnr", "40,vae_encoder=30", "--components", "unet"], "does not convert"),
    (["--min-psnr", "40", "--choices", "8,9"], "bits must be"),
    (["--min-psnr", "40", "--choices", "8,4b20"], "multiple of 16"),
    (["--min-psnr", "40", "--attempts", "0"], "--attempts"),
])
def test_quantize_bad_arguments_are_one_line(demo_onnx, tmp_path, args, message):
    done = _cli("quantize", str(demo_onnx), str(tmp_path / "bundle"), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bundle").exists()


def test_sensitivity_noise_adds_up(demo_onnx):
    """The allocation's premise: two layers' noises add (independent small weight errors)."""
    model = demo_onnx / "unet" / "model.onnx"
    layers = list(quantizable_layers(model).values())
    feeds = component_feeds(demo_onnx, "unet", SD15)[:1]
    session = OverridableModel(model, [layer.weight for layer in layers], threads=2)
    reference = [session.run(feeds[0])]
    a, b = layers[20], layers[50]
    weights = {layer.weight: quantized_weight(layer, load_weight(model, layer), LayerBits(4)) for layer in (a, b)}
    alone = [output_noise(reference, [session.run(feeds[0], {w: q})]) for w, q in weights.items()]
    both = output_noise(reference, [session.run(feeds[0], weights)])
    assert both == pytest.approx(sum(alone), rel=0.25)
    assert np.isfinite(both)


def test_sweep_puts_the_mixed_bundle_on_its_frontier_and_recommends_it(demo_onnx, quantized, tmp_path):
    import shutil

    from sd2mnn.measurement.sweep import resolve_variants, sweep

    out = tmp_path / "variants"
    out.mkdir()
    shutil.copytree(quantized[0] / ".sd2mnn" / "measured", out / "mixed" / ".sd2mnn" / "measured")  # measured once
    report = sweep(demo_onnx, out, "w8,w4,mixed", min_psnr=40, components="unet", runs=1)
    by_name = {v.name: v for v in report.variants}
    assert all(v.ok for v in by_name.values()), [v.error for v in by_name.values()]
    mixed = by_name["mixed"]
    assert mixed.flags == "quantize --min-psnr 40" and mixed.fidelity >= 40
    assert mixed.on_frontier and mixed.size_bytes < by_name["w8"].size_bytes
    assert report.recommended == "mixed" and "bits per layer" in report.recommendation
    assert "x the smallest one-width variant that meets it (w8)" in report.recommendation
    with pytest.raises(InputError, match="needs a floor in dB"):
        resolve_variants("m=quantize:abc")
    assert resolve_variants("m=quantize:35")[0].floor(40) == 35


def test_sd35_transformer_and_t5_get_bits_per_layer(tiny_sd3_onnx, tmp_path):
    from sd2mnn.quantization.quantize import quantize

    names = ("transformer", "text_encoder_3")
    for name in names:  # the layers MNN lists for SD3.5's MMDiT and T5 are the ones read from ONNX
        written = tmp_path / f"{name}.json"
        _mnnconvert(tiny_sd3_onnx / name / "model.onnx", tmp_path / f"{name}.mnn", "--weightQuantBits=8",
                    "--compressionParamsFile", str(written))
        assert set(read_compression_file(written)) == set(quantizable_layers(tiny_sd3_onnx / name / "model.onnx"))
    report = quantize(tiny_sd3_onnx, tmp_path / "bundle", min_psnr=38, components=",".join(names))
    for choice, checked in zip(report.components, report.verification.components):
        assert choice.name == checked.name
        assert choice.chosen.psnr >= 38 and min(o.psnr for o in checked.outputs) >= 38
        assert len(choice.histogram()) >= 2
    # The tiny model's shapes are off MNN's runtime contract; only that may fail.
    assert all("shape" in failure or "runtime expects" in failure for failure in report.verification.failures)


def test_every_component_needs_a_floor(demo_onnx, tmp_path):
    done = _cli("quantize", str(demo_onnx), str(tmp_path / "bundle"), "--min-psnr", "unet=35",
                "--components", "unet,vae_decoder")
    assert done.returncode == 2 and "gives no floor for vae_decoder" in done.stderr, done.stderr
    assert not (tmp_path / "bundle").exists()


def test_a_bias_shared_through_identity_is_folded_as_mnn_folds_it(tmp_path):
    """torch's exporter hands a bias it shares to Add through an Identity node (SD1.5's full-size
    text encoder does): MNN still folds the Add into the converted MatMul and names it after it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b")
    nodes = [helper.make_node("Identity", ["b"], ["b_shared"], name="/shared"),
             helper.make_node("MatMul", ["x", "w"], ["/proj/MatMul_output_0"], name="/proj/MatMul"),
             helper.make_node("Add", ["b_shared", "/proj/MatMul_output_0"], ["/proj/Add_output_0"], name="/proj/Add"),
             helper.make_node("Relu", ["/proj/Add_output_0"], ["y"], name="/act")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 48])], [weight, bias])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    written = tmp_path / "layers.json"
    _mnnconvert(model, tmp_path / "model.mnn", "--weightQuantBits=8", "--compressionParamsFile", str(written))
    assert list(read_compression_file(written)) == ["/proj/Add_output_0__matmul_converted"]
    layers = quantizable_layers(model)
    assert list(layers) == ["/proj/Add_output_0__matmul_converted"] and layers[list(layers)[0]].weight == "w"
