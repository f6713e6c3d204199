"""Conversion, generation and verification of the demo pipeline give exactly what they gave
before the model family facts moved into sd2mnn.families (tests/data/demo_behaviour.json).

What is exact stays exact: file hashes, token ids, pixels, verify's verdicts, counts, shapes and
thresholds. Verify's error figures are not: they measure the difference between MNN's and ONNX
Runtime's float32 kernels, which take other SIMD paths on other CPUs of this machine kind.
Measured between two AMD EPYC machines: max_abs moved by up to 17% (4.7e-4 vs 5.7e-4), mean_abs
by 0.8%, PSNR by 0.05 dB, the conditioning cosines by 4e-9. Each figure is compared within a
stated tolerance a few times that spread (ERROR_FIGURE_TOLERANCES); any other float to 1e-9."""
from __future__ import annotations

import json
import math

from behaviour import FIXTURE, fingerprint


def test_demo_behaviour_is_unchanged(tmp_path):
    recorded = json.loads(FIXTURE.read_text())
    now = fingerprint(tmp_path)
    assert now["manifest"]["family"] == "sd15"
    assert now["files"] == recorded["files"]
    # New in the manifest: what export changed in the pipeline (nothing in the demo's ONNX folder).
    assert now["manifest"].pop("loras") == [] and now["manifest"].pop("vae") == {}
    assert now["manifest"] == recorded["manifest"]
    assert now["pixels"] == recorded["pixels"]
    # New in verify's report for families of several text encoders: the family, notes, and the
    # conditioning check of each text encoder (SD1.5's one is "conditioning", as recorded); and
    # the warnings of what could not be checked (none: the manifest vouches for the sources).
    verification = now["verification"]
    assert verification.pop("family") == "sd15" and verification.pop("notes") == []
    assert verification.pop("warnings") == []
    assert verification.pop("conditionings") == [verification["conditioning"]]
    assert verification["conditioning"].pop("component") == "text_encoder"
    # New: the states past the prompt, checked where diffusers zeroes them (Wan); not SD1.5's.
    assert verification["conditioning"].pop("padding_max") is None
    # New: where ONNX Runtime's outputs came from (the demo's ONNX folder keeps none from an export).
    assert [c.pop("references") for c in verification["components"]] == ["onnxruntime"] * 3
    assert_same_report(now["verification"], recorded["verification"])


FLOAT_REL_TOL = 1e-9
# key -> (relative, absolute) tolerance of a figure that measures float32 kernels' disagreement.
ERROR_FIGURE_TOLERANCES = {
    "max_abs": (0.5, 0.0),
    "mean_abs": (0.05, 0.0),
    "psnr": (0.0, 0.5),  # dB
    "cosine": (0.0, 1e-7),
    "matching_cosine": (0.0, 1e-7),
    "worst_cosine": (0.0, 1e-7),
}


def assert_same_report(now, recorded, where: str = "verification", key: str = "") -> None:
    """``now`` equals ``recorded`` key for key and item for item; an error figure within its
    tolerance, any other float within FLOAT_REL_TOL."""
    if isinstance(recorded, dict):
        assert isinstance(now, dict) and now.keys() == recorded.keys(), (where, now, recorded)
        for key in recorded:
            assert_same_report(now[key], recorded[key], f"{where}.{key}", key)
    elif isinstance(recorded, list):
        assert isinstance(now, list) and len(now) == len(recorded), (where, now, recorded)
        for index, (a, b) in enumerate(zip(now, recorded)):
            assert_same_report(a, b, f"{where}[{index}]", key)
    elif isinstance(recorded, float) and not isinstance(now, bool):
        rel_tol, abs_tol = ERROR_FIGURE_TOLERANCES.get(key, (FLOAT_REL_TOL, 0.0))
        assert isinstance(now, (int, float)) and math.isclose(now, recorded, rel_tol=rel_tol, abs_tol=abs_tol), \
            (where, now, recorded)
    else:
        assert type(now) is type(recorded) and now == recorded, (where, now, recorded)


def test_report_comparison_is_exact_but_for_kernel_rounding():
    recorded = {"cosine": 0.9999999999998997, "passed": True, "share": 0.25,
                "cases": [{"psnr": 95.62, "max_abs": 5.66e-4, "n": 3}]}
    assert_same_report({"cosine": 0.9999999999998996, "passed": True, "share": 0.25,
                        "cases": [{"psnr": 95.57, "max_abs": 4.72e-4, "n": 3}]}, recorded)
    for changed in ({"cosine": 0.9999, "passed": True, "share": 0.25, "cases": recorded["cases"]},
                    {"cosine": 0.9999999999998997, "passed": False, "share": 0.25, "cases": recorded["cases"]},
                    {"cosine": 0.9999999999998997, "passed": True, "share": 0.26, "cases": recorded["cases"]},
                    {**recorded, "cases": [{"psnr": 93.0, "max_abs": 5.66e-4, "n": 3}]},
                    {**recorded, "cases": [{"psnr": 95.62, "max_abs": 1.2e-3, "n": 3}]},
                    {**recorded, "cases": [{"psnr": 95.62, "max_abs": 5.66e-4, "n": 4}]},
                    {**recorded, "cases": []}):
        try:
            assert_same_report(changed, recorded)
        except AssertionError:
            continue
        raise AssertionError(f"{changed} was taken for {recorded}")
