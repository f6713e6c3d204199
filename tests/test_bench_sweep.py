"""sd2mnn bench and sd2mnn sweep on the tiny demo pipeline, plus the sweep's pure parts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sd2mnn.measurement.bench import bench
from sd2mnn.cli import main as cli_main
from sd2mnn.errors import InputError
from sd2mnn.measurement.sweep import (
    DEFAULT_MIN_PSNR, VARIANTS, ComponentScore, SweepReport, Variant, VariantResult, mark_frontier, plot, recommend,
    resolve_variants, sweep,
)

COMPONENTS = "text_encoder,unet"  # the vae_decoder is the slow one; two components show the shape


# -- bench -----------------------------------------------------------------------------------


def test_bench_mnn_and_onnxruntime(fp32_bundle, demo_onnx):
    report = bench(fp32_bundle, demo_onnx, components=COMPONENTS, runs=2)
    assert [c.name for c in report.components] == ["text_encoder", "unet"] and not report.errors
    for component in report.components:
        assert set(component.timings) == {"mnn", "onnxruntime"}
        for t in component.timings.values():
            assert t.load_s > 0 and t.first_s > 0 and len(t.steady_s) == 2 and t.median_s > 0
            assert t.peak_rss_bytes > 10 << 20 and 0 <= t.model_rss_bytes < t.peak_rss_bytes and t.file_bytes > 0
        ratios = component.ratios()
        assert ratios["steady"] == pytest.approx(component.timings["mnn"].median_s / component.timings["onnxruntime"].median_s, rel=1e-3)
    data = report.to_dict()
    assert data["components"][1]["timings"]["mnn"]["steady_min_max_s"][0] > 0
    assert data["components"][0]["mnn_over_onnxruntime"]["file"] > 0


def test_bench_without_onnx_uses_the_manifest_shapes(w8_bundle):
    report = bench(w8_bundle, components="unet", runs=1)
    (unet,) = report.components
    assert set(unet.timings) == {"mnn"} and unet.ratios() is None and not report.errors
    assert "sample[2, 4, 64, 64]" in unet.inputs


def test_bench_cli_table_and_json(fp32_bundle, demo_onnx, capsys):
    assert cli_main(["bench", str(fp32_bundle), "--onnx", str(demo_onnx), "--components", "text_encoder",
                     "--runs", "1", "-q"]) == 0
    out = capsys.readouterr().out
    for header in ("load ms", "first ms", "steady ms", "min-max ms", "peak", "model", "size"):
        assert header in out
    assert "MNN/ORT" in out and "onnxruntime" in out and "child process" in out
    assert cli_main(["bench", str(fp32_bundle), "--components", "text_encoder", "--runs", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"] == 1 and list(data["components"][0]["timings"]) == ["mnn"]


def test_bench_refuses_onnxruntime_without_onnx(fp32_bundle):
    with pytest.raises(InputError, match="--onnx"):
        bench(fp32_bundle, runtimes=("onnxruntime",))


# -- variants, frontier, recommendation (no runtime) ----------------------------------------------


def test_variants_from_names_flags_and_dicts():
    named, mine = resolve_variants('fp32,mine="--weightQuantBits 6 --weightQuantBlock=128" ')
    assert named == VARIANTS["fp32"] and mine.flags == "--weightQuantBits 6 --weightQuantBlock=128"
    assert mine.convert_fields() == {"weight_quant_bits": 6, "weight_quant_block": 128, "extra": ""}
    fields = Variant("x", "--weightQuantBits=8 --transformerFuse --someNewFlag=1").convert_fields()
    assert fields == {"weight_quant_bits": 8, "transformer_fuse": True, "extra": "--someNewFlag=1"}
    assert [v.name for v in resolve_variants({"w8": None, "custom": "--fp16"})] == ["w8", "custom"]
    for bad, message in (("nope", "unknown variant"), ("w8,w8", "named twice"), ("x=--weightQuantBits=9", "between 2 and 8"),
                         ("a/b=--fp16", "names a folder"), ("x=--weightQuantBlock=64", "need --weight-quant-bits")):
        with pytest.raises(InputError, match=message):
            resolve_variants(bad)


def _result(name, size, psnr, latency=0.1, status="ok"):
    v = VariantResult(name, "", Path(name), status=status, size_bytes=size)
    if status == "ok":
        v.components = {"unet": ComponentScore(psnr, 0.999, True, latency), "text_encoder": ComponentScore(psnr + 5, 0.999, True, latency)}
    return v


def test_frontier_and_recommendation():
    results = [_result("fp32", 400, 96), _result("w8", 100, 50), _result("w8-slow", 120, 45), _result("w4", 60, 25),
               _result("broken", 10, 0, status="failed")]
    mark_frontier(results)
    assert [v.name for v in results if v.on_frontier] == ["fp32", "w8", "w4"]  # w8-slow: bigger and worse than w8
    assert results[1].fidelity == 50 and results[1].latency_s == pytest.approx(0.2)
    assert recommend(results, 30)[0] == "w8"
    assert recommend(results, 60)[0] == "fp32"
    assert recommend(results, 20)[0] == "w4"
    picked, why = recommend(results, 120)
    assert picked is None and "no variant reaches 120 dB" in why and "fp32" in why


def test_plot_draws_a_png(tmp_path):
    from PIL import Image

    results = [_result("fp32", 4 << 20, 96, 0.4), _result("w8", 1 << 20, 50, 0.3), _result("w8-fuse", 1 << 20, 50, 0.35)]
    mark_frontier(results)
    report = SweepReport(tmp_path, tmp_path, ("text_encoder", "unet"), DEFAULT_MIN_PSNR, results, {"unet": 0.5},
                         8 << 20, "w8", "w8: smallest")
    with Image.open(plot(report, tmp_path / "sweep.png")) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # Each panel marks the recommended variant (w8) in red and the others (fp32; w8-fuse shares
    # w8's spot) in steel blue: an empty plot has neither.
    red = np.all(pixels == (255, 0, 0), axis=1).sum()
    blue = np.all(pixels == (70, 130, 180), axis=1).sum()
    assert red > 2 * 60 and blue > 2 * 60, (red, blue)  # a filled point is ~80 pixels, in both panels
    assert report.to_markdown().count("\n") == 1 + len(results) + 1  # header, rule, variants, the ONNX row


# -- sweep, end to end ---------------------------------------------------------------------------


@pytest.fixture
def sweep_dir(tmp_path, fp32_bundle, w8_bundle) -> Path:
    """OUT_DIR with the session's fp32 and w8 bundles already in place: the sweep must reuse them
    (convert skips up-to-date components), which keeps this test to verify + bench."""
    out = tmp_path / "variants"
    shutil.copytree(fp32_bundle, out / "fp32")
    shutil.copytree(w8_bundle, out / "w8")
    return out


def test_sweep_reuses_bundles_reports_failures_and_recommends(demo_onnx, sweep_dir):
    # MNNConvert accepts any flag at all, so this variant fails for real another way: a file
    # stands where its bundle folder should go.
    (sweep_dir / "broken").write_text("not a bundle\n")
    report = sweep(demo_onnx, sweep_dir, {"fp32": None, "w8": None, "broken": "--weightQuantBits=6"},
                   min_psnr=20, components=COMPONENTS, runs=1)
    fp32, w8, broken = report.variants
    assert fp32.ok and w8.ok and fp32.converted == [] and w8.converted == []  # reused, not reconverted
    assert broken.status == "failed" and broken.stage == "convert" and "is not a folder" in broken.error
    assert w8.size_bytes < fp32.size_bytes and w8.fidelity < fp32.fidelity
    assert set(w8.components) == {"text_encoder", "unet"} and all(c.steady_s > 0 for c in w8.components.values())
    assert fp32.on_frontier and w8.on_frontier
    assert report.recommended == "w8"  # a low floor: the smaller bundle
    assert report.reference_latency_s > 0 and report.reference_bytes > 0
    data = report.to_dict()
    assert data["variants"][1]["components"]["unet"]["psnr"] == w8.components["unet"].psnr
    headers, rows = report.table()
    assert "unet PSNR/cos" in headers and rows[1][-1].startswith("recommended") and "failed at convert" in rows[2][-1]


def test_sweep_cli_floor_above_w8_picks_fp32(demo_onnx, sweep_dir, tmp_path, capsys):
    # w8 scores ~49 dB on the demo and fp32 ~96 dB: a floor of 80 dB leaves only fp32.
    picture = tmp_path / "sweep.png"
    assert cli_main(["sweep", str(demo_onnx), str(sweep_dir), "--variants", "fp32,w8", "--components", COMPONENTS,
                     "--runs", "1", "--min-psnr", "80", "--plot", str(picture), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended"] == "fp32" and data["min_psnr"] == 80 and data["plot"] == str(picture)
    assert picture.stat().st_size > 1000
    w8 = data["variants"][1]
    assert w8["status"] == "ok" and w8["converted"] == [] and w8["fidelity_psnr"] < 80
    assert w8["latency_s"] > 0 and w8["components"]["unet"]["cosine"] > 0.99
