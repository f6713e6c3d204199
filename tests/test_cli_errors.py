"""Bad input and faults across the commands, through real processes: one `error:` line, a non-zero
exit, no traceback, and nothing lost (no partial file, inputs untouched)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import on_full_disk, tree_state

from sd2mnn.core.images import write_png

PROMPT = "a photo of a cat"


def sd2mnn(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd2mnn.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_clean_error(done: subprocess.CompletedProcess, message: str = "") -> None:
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert message in errors[0], done.stderr


@pytest.fixture
def files(tmp_path) -> Path:
    """A scratch folder with two small PNGs and a plain file."""
    write_png(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    write_png(tmp_path / "b.png", np.full((32, 32, 3), 9, np.uint8))
    (tmp_path / "file.txt").write_text("not a folder\n")
    return tmp_path


# Each case fails before any model is loaded or converted.
BAD_ARGUMENTS = [
    # verify
    (["verify", "{tmp}/nope", "{bundle}"], "nope is not a folder (it does not exist)"),
    (["verify", "{onnx}", "{tmp}/file.txt"], "file.txt is not a folder (it is a file)"),
    (["verify", "{onnx}", "{bundle}", "--seed", "-1"], "seed must be a whole number >= 0"),
    (["verify", "{onnx}", "{bundle}", "--components", "refiner"], "unknown component 'refiner'"),
    (["verify", "{onnx}", "{bundle}", "--threads", "0"], "--threads must be at least 1"),
    (["verify", "{onnx}", "{bundle}", "--report", "{tmp}/file.txt"], "--report"),
    (["verify", "{onnx}", "{bundle}", "--report", "/proc/sd2mnn-report"], "/proc"),  # access() says yes
    (["verify", "{onnx}", "{bundle}", "--min-psnr", "nan"], "not a finite number"),
    (["verify", "{onnx}", "{bundle}", "--min-psnr", "=5"], "unknown component ''"),
    (["verify", "{onnx}", "{bundle}", "--min-psnr", "unet=x"], "'x' is not a number"),
    (["verify", "{onnx}", "{bundle}", "--min-cosine", "2"], "not a number from -1 to 1"),
    (["verify", "{onnx}", "{bundle}", "--min-cosine", "vae_decoder=-1.5"], "not a number from -1 to 1"),
    # bench
    (["bench", "{tmp}/nope"], "nope is not a folder (it does not exist)"),
    (["bench", "{tmp}/file.txt"], "is not a folder (it is a file)"),
    (["bench", "{bundle}", "--onnx", "{tmp}/file.txt"], "--onnx"),
    (["bench", "{bundle}", "--seed", "-1"], "--seed must be a whole number >= 0"),
    (["bench", "{bundle}", "--runs", "0"], "--runs must be at least 1"),
    (["bench", "{bundle}", "--timeout", "-1"], "--timeout must be a positive number"),
    (["bench", "{bundle}", "--precision", "ultra"], "invalid choice"),
    # sweep
    (["sweep", "{tmp}/file.txt", "{tmp}/out"], "is not a folder (it is a file)"),
    (["sweep", "{onnx}", "{tmp}/file.txt"], "OUT_DIR"),
    (["sweep", "{onnx}", "/proc/sd2mnn-sweep"], "/proc"),
    (["sweep", "{onnx}", "{tmp}/out", "--converter", "{tmp}/file.txt"], "is not an executable MNNConvert"),
    (["sweep", "{onnx}", "{tmp}/out", "--variants", "w99"], "unknown variant 'w99'"),
    (["sweep", "{onnx}", "{tmp}/out", "--min-psnr", "nan"], "--min-psnr must be a finite number"),
    (["sweep", "{onnx}", "{tmp}/out", "--seed", "-1"], "--seed must be a whole number >= 0"),
    (["sweep", "{onnx}", "{tmp}/out", "--jobs", "0"], "--jobs must be at least 1"),
    (["sweep", "{onnx}", "{tmp}/out", "--timeout", "0"], "--timeout must be a positive number"),
    (["sweep", "{onnx}", "{tmp}/out", "--plot", "{tmp}/plot.txt"], "does not end in .png"),
    (["sweep", "{onnx}", "{tmp}/out", "--runs", "many"], "invalid int value"),
    # generate
    (["generate", "{tmp}/nope", PROMPT, "-o", "{tmp}/x.png"], "nope does not exist"),
    (["generate", "{tmp}/file.txt", PROMPT, "-o", "{tmp}/x.png"], "is not a folder"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/file.txt/x.png"], "file.txt is a file, not a folder"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}"], "does not end in .png"),
    (["generate", "{bundle}", PROMPT, "-o", "/proc/sd2mnn.png"], "/proc"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--save-latents", "/proc/sd2mnn.npy"], "/proc"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--backend", "FOO"], "unknown MNN backend 'FOO'"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--guidance", "1e38"], "guidance must be from 0 to 100"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--guidance", "-3"], "guidance must be from 0 to 100"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--seed", "-1"], "seed must be a whole number"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--threads", "0"], "threads must be at least 1"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--latents", "{tmp}"], "is a folder"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--save-latents", "{tmp}/file.txt/l.npy"], "is a file"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--cache-file", "{tmp}"], "--cache-file"),
    (["generate", "{bundle}", PROMPT, "-o", "{tmp}/x.png", "--noise", "curand"], "invalid choice"),
    (["generate", "--onnx", "{bundle}", PROMPT, "-o", "{tmp}/x.png"], "model.onnx is missing"),
    # compare
    (["compare", "{tmp}/a.png", "{tmp}/nope.png"], "nope.png does not exist"),
    (["compare", "{tmp}/a.png", "{tmp}"], "is a folder"),
    (["compare", "{tmp}/a.png", "{tmp}/file.txt"], "not an image"),
    (["compare", "{tmp}/a.png", "{tmp}/b.png", "--diff", "{tmp}/file.txt/d.png"], "file.txt is a file, not a folder"),
    (["compare", "{tmp}/a.png", "{tmp}/b.png", "--diff", "{tmp}/d.jpg"], "does not end in .png"),
    (["compare", "{tmp}/a.png", "{tmp}/b.png", "--min-psnr", "nan"], "--min-psnr nan is not a number"),
    # export (fails on its arguments before torch is imported)
    (["export", "{tmp}/nope", "{tmp}/out"], "not found"),
    (["export", "{tmp}/file.txt", "{tmp}/out"], "not a diffusers pipeline"),
    (["export", "{tmp}/nope", "{tmp}/out", "--opset", "0"], "--opset 0"),
    # doctor
    (["doctor", "--converter", "{tmp}/nope"], ""),
    (["doctor", "--converter", "{tmp}"], ""),
    # convert and demo: plain bad arguments only
    (["convert", "{tmp}/nope", "{tmp}/out"], "nope does not exist"),
    (["convert", "{onnx}", "{tmp}/file.txt"], "is not a folder"),
    (["convert", "{onnx}", "{tmp}/out", "--weight-quant-bits", "99"], "--weight-quant-bits"),
    (["convert", "{onnx}", "{tmp}/out", "--jobs", "0"], "--jobs"),
    (["convert", "{onnx}", "{tmp}/out", "--components", "refiner"], "unknown component"),
    (["demo", "{tmp}/file.txt"], "is not a folder"),
]


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS,
                         ids=[" ".join(a).replace(PROMPT, "PROMPT").replace("{", "").replace("}", "") for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_fail_cleanly(fp32_bundle, demo_onnx, files, args, message):
    bundle_before, files_before = tree_state(fp32_bundle), tree_state(files)
    done = sd2mnn(*[a.format(bundle=fp32_bundle, onnx=demo_onnx, tmp=files) for a in args], timeout=120)
    if args[0] == "doctor":  # a report, not a run: it says what is wrong on stdout
        assert done.returncode == 1 and "converter    none:" in done.stdout and "Traceback" not in done.stderr
    else:
        assert_clean_error(done, message)
    assert tree_state(fp32_bundle) == bundle_before
    assert tree_state(files) == files_before  # nothing written, nothing changed


# ---------------------------------------------------------------------------------------------
# compare: the diff picture never replaces an input
# ---------------------------------------------------------------------------------------------
def test_compare_refuses_a_diff_path_that_is_an_input(files):
    os.link(files / "b.png", files / "b_link.png")
    before = tree_state(files)
    for diff in (files / "a.png", files / "b.png", files / "." / "a.png", files / "b_link.png"):
        done = sd2mnn("compare", files / "a.png", files / "b.png", "--diff", diff)
        assert_clean_error(done, "is the input image")
        assert done.returncode == 2
    assert tree_state(files) == before
    done = sd2mnn("compare", files / "a.png", files / "b.png", "--diff", files / "d.png")
    assert done.returncode == 0 and (files / "d.png").is_file()


# ---------------------------------------------------------------------------------------------
# A full disk while writing: one line, no partial file, the earlier file intact
# ---------------------------------------------------------------------------------------------
def test_generate_on_a_full_disk(fp32_bundle, files):
    done, left = on_full_disk(files, files / "a.png", lambda disk: [
        "generate", fp32_bundle, PROMPT, "-o", disk / "out.png", "--steps", 1, "--threads", 2, "-q", "--overwrite"])
    assert_clean_error(done, "out.png: No space left on device")
    assert sorted(left) == ["fill", "out.png"]  # no temporary file, the earlier PNG unchanged


def test_compare_diff_on_a_full_disk(files):
    done, left = on_full_disk(files, files / "a.png", lambda disk: [
        "compare", files / "a.png", files / "b.png", "--diff", disk / "out.png", "--overwrite"])
    assert_clean_error(done, "No space left on device")
    assert sorted(left) == ["fill", "out.png"]


def test_verify_report_on_a_full_disk(fp32_bundle, demo_onnx, files):
    done, left = on_full_disk(files, files / "a.png", lambda disk: [
        "verify", demo_onnx, fp32_bundle, "--components", "vae_decoder", "--report", disk, "-q"])
    assert_clean_error(done, "No space left on device")
    assert sorted(left) == ["fill", "out.png"]


# ---------------------------------------------------------------------------------------------
# Outputs are checked before the work
# ---------------------------------------------------------------------------------------------
def test_verify_report_onto_a_file_fails_before_running(fp32_bundle, demo_onnx, files):
    done = sd2mnn("verify", demo_onnx, fp32_bundle, "--report", files / "file.txt")
    assert_clean_error(done, f"--report {files / 'file.txt'} is a file, not a folder")
    assert "vae_decoder" not in done.stderr  # refused before any component ran
    assert (files / "file.txt").read_text() == "not a folder\n"


def test_generate_noise_torch_without_torch(fp32_bundle, tmp_path):
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('No module named torch (blocked by the test)')\n")
    done = sd2mnn("generate", fp32_bundle, PROMPT, "-o", tmp_path / "x.png", "--noise", "torch", "--steps", 1,
                  env={"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])})
    assert_clean_error(done, "noise 'torch' needs PyTorch")
    assert "unet step" not in done.stderr  # refused before loading
    assert not (tmp_path / "x.png").exists()


def _mnn_has_backend(name: str) -> bool:
    """Whether the installed MNN runs ``name`` (MNN itself says when it falls back to the CPU)."""
    code = f"import MNN.nn as nn; nn.create_runtime_manager(({{'backend': '{name}'}},))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return "Can't Find type=" not in done.stdout + done.stderr


def test_generate_refuses_a_backend_mnn_does_not_have(fp32_bundle, tmp_path):
    if _mnn_has_backend("OPENCL"):
        pytest.skip("this MNN build has OpenCL")
    done = sd2mnn("generate", fp32_bundle, PROMPT, "-o", tmp_path / "x.png", "--backend", "opencl", "--steps", 1)
    assert_clean_error(done, "this MNN build (MNN 3.6.1) has no OPENCL backend")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# Damaged bundles
# ---------------------------------------------------------------------------------------------
def test_generate_refuses_a_truncated_weight_file(bundle_copy, tmp_path):
    weight = bundle_copy / "unet.mnn.weight"
    size = weight.stat().st_size
    os.truncate(weight, size // 2)
    done = sd2mnn("generate", bundle_copy, PROMPT, "-o", tmp_path / "x.png", "--steps", 1, "--threads", 2)
    assert_clean_error(done, f"{weight} is damaged: {size // 2} bytes where manifest.json records {size}")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_verify_names_the_damaged_file(bundle_copy, demo_onnx, damage):
    weight = bundle_copy / "unet.mnn.weight"
    data = bytearray(weight.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0x40  # same size: only the hash tells
    weight.write_bytes(bytes(data))
    done = sd2mnn("verify", demo_onnx, bundle_copy, "--components", "unet,vae_decoder", "--json")
    assert_clean_error(done, "unet: unet.mnn.weight: damaged file")
    report = json.loads(done.stdout)
    assert [c["name"] for c in report["components"] if not c["passed"]] == ["unet"]
    assert [i["file"] for i in report["contract"]] == ["unet.mnn.weight"]


def test_quantized_bundle_without_manifest_says_how_to_pass(w8_bundle, demo_onnx, tmp_path):
    bundle = tmp_path / "w8"
    shutil.copytree(w8_bundle, bundle)
    (bundle / "manifest.json").unlink()
    done = sd2mnn("verify", demo_onnx, bundle, "--components", "text_encoder", "-q")
    assert_clean_error(done, "manifest.json is missing, so text_encoder got the fp32 thresholds")
    assert "pass --min-psnr 30 --min-cosine 0.995" in done.stderr
    done = sd2mnn("verify", demo_onnx, bundle, "--components", "text_encoder", "-q", "--min-psnr", "30",
                  "--min-cosine", "0.995")
    assert done.returncode == 0, done.stderr


def test_overflowing_latents_write_no_white_image(fp32_bundle, tmp_path):
    np.save(tmp_path / "huge.npy", np.full((1, 4, 64, 64), 3e38, np.float32))  # finite, but not for long
    done = sd2mnn("generate", fp32_bundle, PROMPT, "-o", tmp_path / "x.png", "--latents", tmp_path / "huge.npy",
                  "--steps", 1, "--threads", 2)
    assert_clean_error(done, "overflowed to NaN or infinity")
    assert "RuntimeWarning" not in done.stderr
    assert not (tmp_path / "x.png").exists()

