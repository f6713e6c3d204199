"""sd2mnn's own child processes (the contract's model reader, verify's and bench's runtime
passes): one entry point, each with a time limit that kills a stuck child."""
from __future__ import annotations

import time

import numpy as np
import pytest

from sd2mnn.verification._pass import PassError, run_pass
from sd2mnn.measurement.bench import measure
from sd2mnn.core.children import run_module
from sd2mnn.core.contract import read_tensors
from sd2mnn.families import SD15


def test_run_module_kills_at_the_timeout(tmp_path):
    done = run_module("sd2mnn.core.demo", [], tmp_path, timeout=60)  # a module without a main: exits 0
    assert done.returncode == 0 and not done.timed_out
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(60)\n")  # found in the child's cwd
    started = time.monotonic()
    slow = run_module("sleeper", [], tmp_path, timeout=0.5)
    assert slow.timed_out and time.monotonic() - started < 10


def test_contract_reader_has_a_time_limit(fp32_bundle):
    unet = fp32_bundle / SD15.components["unet"].mnn_name
    assert read_tensors({"unet": (unet, ["sample"])})["unet"]["tensors"]["sample"]["shape"] == [2, 4, 64, 64]
    started = time.monotonic()
    assert read_tensors({"unet": (unet, ["sample"])}, timeout=0.05) == {"unet": None}
    assert time.monotonic() - started < 10


def test_runtime_passes_have_a_time_limit(fp32_bundle, tmp_path):
    feeds = [{"latent_sample": np.zeros((1, 4, 64, 64), np.float32)}]
    spec = SD15.components["vae_decoder"]
    model = fp32_bundle / spec.mnn_name
    with pytest.raises(PassError, match="ran past 0.05s"):
        run_pass("mnn", model, list(spec.inputs), list(spec.outputs), feeds, 1, True, tmp_path, timeout=0.05)
    timing = measure("mnn", "vae_decoder", model, feeds[0], 1, "high", 1, tmp_path, 0, SD15, timeout=0.05)
    assert timing.error == "ran past 0.05s and was killed"


@pytest.mark.parametrize("runtime", ["mnn", "onnxruntime"])
def test_runtime_passes_turn_kernel_transforms_off_in_the_child_and_in_process(runtime, fp32_bundle, demo_onnx,
                                                                              tmp_path):
    # MNN's Winograd 3x3 convolutions and ONNX Runtime's blocked layouts round differently from
    # direct convolutions: the setting reaches the runtime when the outputs differ, and both stay
    # that runtime's result for the same decoder.
    rng = np.random.default_rng(0)
    feeds = [{"latent_sample": rng.standard_normal((1, 4, 64, 64), dtype=np.float32) / 0.18215}]
    spec = SD15.components["vae_decoder"]
    model = fp32_bundle / spec.mnn_name if runtime == "mnn" else demo_onnx / "vae_decoder" / "model.onnx"
    names = (list(spec.inputs), list(spec.outputs))
    outputs = {}
    for isolate in (True, False):
        for transforms in (True, False):
            got, _ = run_pass(runtime, model, *names, feeds, 1, isolate, tmp_path, kernel_transforms=transforms)
            outputs[isolate, transforms] = got[0]["sample"]
    for isolate in (True, False):
        on, off = outputs[isolate, True], outputs[isolate, False]
        assert not np.array_equal(on, off)
        assert np.abs(on - off).max() < 1e-3
    assert np.array_equal(outputs[True, False], outputs[False, False])
