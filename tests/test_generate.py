"""sd2mnn generate / compare and sd2mnn.Pipeline on the tiny demo pipeline (2 steps: fast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sd2mnn
from sd2mnn.families import SD15
from sd2mnn.cli import main
from sd2mnn.errors import InputError
from sd2mnn.core.images import compare, psnr, read_image, write_png
from sd2mnn.generation.noise import initial_noise
from sd2mnn.generation.pipeline import GenerationParams, Pipeline, content_hash, mnn_runtime_config

PROMPT = "a photo of a cat"
STEPS = 2
MIN_PSNR_FP32 = 35.0


@pytest.fixture(scope="module")
def mnn_pipe(fp32_bundle):
    return Pipeline(fp32_bundle, config=mnn_runtime_config(threads=2, family=SD15))


@pytest.fixture(scope="module")
def ort_pipe(demo_onnx):
    return Pipeline.from_onnx(demo_onnx, threads=2)


def generate_cli(*args: str) -> int:
    return main(["generate", *map(str, args), "--threads", "2"])


# ---------------------------------------------------------------------------------------------
# The two runtimes, seeds, latents
# ---------------------------------------------------------------------------------------------
def test_mnn_and_onnxruntime_agree_from_the_same_noise(mnn_pipe, ort_pipe):
    params = GenerationParams(PROMPT, steps=STEPS, seed=3)
    a, b = mnn_pipe.run(params), ort_pipe.run(params)
    shape = SD15.recipe.latent_shape
    np.testing.assert_array_equal(a.params.initial_latents(shape), b.params.initial_latents(shape))
    assert psnr(a.pixels, b.pixels) >= MIN_PSNR_FP32
    assert a.pixels.std() > 5  # a picture, not a flat field that would agree trivially


def test_same_latents_file_on_both_runtimes_via_cli(fp32_bundle, demo_onnx, tmp_path, capsys):
    noise = tmp_path / "noise.npy"
    assert generate_cli(fp32_bundle, PROMPT, "-o", tmp_path / "mnn.png", "--steps", STEPS, "--seed", 11,
                        "--save-latents", noise, "-q") == 0
    np.testing.assert_array_equal(np.load(noise), initial_noise(11, SD15.recipe.latent_shape))
    assert generate_cli("--onnx", demo_onnx, PROMPT, "-o", tmp_path / "ort.png", "--steps", STEPS,
                        "--latents", noise, "-q") == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "mnn.png"), str(tmp_path / "ort.png"), "--min-psnr",
                 str(MIN_PSNR_FP32), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["ssim"] > 0.99
    assert Path(report["diff_path"]).is_file()


def test_seeds_are_reproducible_and_matter(mnn_pipe):
    first = mnn_pipe.run(GenerationParams(PROMPT, steps=1, seed=5)).pixels
    again = mnn_pipe.run(GenerationParams(PROMPT, steps=1, seed=5)).pixels
    other = mnn_pipe.run(GenerationParams(PROMPT, steps=1, seed=6)).pixels
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_given_latents_equal_drawn_noise(mnn_pipe, tmp_path):
    drawn = mnn_pipe.run(GenerationParams(PROMPT, steps=STEPS, seed=9))
    np.savetxt(tmp_path / "random.txt", initial_noise(9, SD15.recipe.latent_shape).reshape(-1))  # MNN_DUMP_DATA's format
    given = mnn_pipe.generate(PROMPT, steps=STEPS, latents=tmp_path / "random.txt")
    np.testing.assert_array_equal(np.asarray(given), drawn.pixels)
    assert given.info["noise"] == "latents random.txt" and "seed" not in given.info


def test_noise_methods_are_recorded_and_flagged(fp32_bundle, tmp_path, capsys):
    out = tmp_path / "numpy.png"
    assert generate_cli(fp32_bundle, PROMPT, "-o", out, "--steps", 1, "--noise", "numpy") == 0
    _, meta = read_image(out)
    assert meta["noise"] == "numpy" and meta["matches_mnn_runtime"].startswith("no:")
    assert "note: the image will not match MNN's C++ runtime: numpy noise" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# CLI output: PNG metadata, progress, Ctrl-C
# ---------------------------------------------------------------------------------------------
def test_png_carries_prompt_seed_steps_and_bundle_hash(fp32_bundle, mnn_pipe, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert generate_cli(fp32_bundle, "a", "photo", "of", "a", "cat", "-o", out, "--steps", STEPS, "--seed", 42) == 0
    pixels, meta = read_image(out)
    assert pixels.shape == (512, 512, 3)
    assert meta["prompt"] == PROMPT  # words joined as diffusion_demo joins argv
    assert (meta["seed"], meta["steps"], meta["noise"], meta["guidance"]) == ("42", "2", "mnn", "7.5")
    assert meta["bundle_hash"] == mnn_pipe.model_hash and meta["runtime"] == "mnn"
    assert meta["matches_mnn_runtime"] == "yes"
    err = capsys.readouterr().err
    assert "unet step  1/2" in err and "unet step  2/2" in err and "vae_decoder:" in err
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_json_output_is_clean(fp32_bundle, tmp_path, capfd):
    assert generate_cli(fp32_bundle, PROMPT, "-o", tmp_path / "x.png", "--steps", 1, "--json") == 0
    out = capfd.readouterr().out  # file descriptor level: MNN's own prints must not land here
    report = json.loads(out)
    assert report["timings"]["first_step_s"] > 0 and len(report["timings"]["step_s"]) == 1


def test_ctrl_c_leaves_no_png(fp32_bundle, tmp_path, monkeypatch, capsys):
    from sd2mnn.core.runtime import MnnModel

    real_run = MnnModel.run
    calls = []

    def interrupted(self, feeds):
        if "sample" in feeds:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real_run(self, feeds)

    monkeypatch.setattr(MnnModel, "run", interrupted)
    out = tmp_path / "never.png"
    assert generate_cli(fp32_bundle, PROMPT, "-o", out, "--steps", 3) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import sd2mnn.core.images as images

    def stop(pixels, scratch):
        scratch.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "encode_png_like_mnn", stop)
    with pytest.raises(KeyboardInterrupt):
        write_png(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8), {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["{bundle}", PROMPT, "--steps", "0"], "steps must be a whole number from 1 to 50, got 0 (MNN's runtime would quietly use 10)"),
        (["{bundle}", PROMPT, "--steps", "51"], "would quietly use 50"),
        (["{bundle}", "   "], "the prompt is empty"),
        (["{bundle}", PROMPT, "--seed", "-1"], "seed must be a whole number from 0"),
        (["{tmp}/nope", PROMPT], "nope does not exist; give an MNN bundle (convert one with sd2mnn convert"),
        (["{bundle}/manifest.json", PROMPT], "is not a folder"),
        (["{bundle}", PROMPT, "-o", "{tmp}/x.jpg"], "does not end in .png"),
        (["{bundle}", PROMPT, "-o", "{tmp}/missing/x.png"], "missing does not exist; create it first"),
        (["{bundle}", PROMPT, "--latents", "{tmp}/none.npy"], "none.npy does not exist"),
        (["{bundle}", PROMPT, "--latents", "{tmp}/bad.npy"], "bad.npy holds float32 [1, 4, 32, 32]"),
        (["{bundle}"], "give the bundle folder and the prompt"),
        (["--onnx", "{tmp}/nope", PROMPT], "give an ONNX pipeline folder"),
        (["{bundle}", PROMPT, "--memory-mode", "1", "--precision", "high", "--guidance", "nan"], "guidance must be a finite number"),
    ],
)
def test_bad_input_is_a_clear_error(fp32_bundle, tmp_path, capsys, args, message):
    np.save(tmp_path / "bad.npy", np.zeros((1, 4, 32, 32), np.float32))
    args = [a.format(bundle=fp32_bundle, tmp=tmp_path) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.png")]
    assert generate_cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out.png").exists()


def test_bundle_without_tokenizer_or_weights(bundle_copy, tmp_path, capsys):
    (bundle_copy / "unet.mnn.weight").unlink()
    assert generate_cli(bundle_copy, PROMPT, "-o", tmp_path / "x.png") == 2
    assert "unet.mnn.weight is missing" in capsys.readouterr().err
    (bundle_copy / "tokenizer.mtok").unlink()
    assert generate_cli(bundle_copy, PROMPT, "-o", tmp_path / "x.png") == 2
    assert "tokenizer.mtok is missing" in capsys.readouterr().err


def test_python_api_errors_are_typed():
    with pytest.raises(InputError, match="steps must be"):
        GenerationParams(PROMPT, steps=2.5).validate(SD15)
    with pytest.raises(InputError, match="unknown noise"):
        GenerationParams(PROMPT, noise="curand").validate(SD15)
    with pytest.raises(InputError, match="the prompt must be text"):
        GenerationParams(None).validate(SD15)


# ---------------------------------------------------------------------------------------------
# Python API, bundle hash, compare
# ---------------------------------------------------------------------------------------------
def test_pipeline_is_exported_lazily():
    code = ("import sys, sd2mnn; assert 'sd2mnn.generation.pipeline' not in sys.modules; "
            "from sd2mnn import Pipeline; assert 'Pipeline' in sd2mnn.__all__; print(Pipeline.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "sd2mnn.generation.pipeline"


def test_generate_returns_a_pil_image_with_metadata(fp32_bundle, tmp_path):
    image = sd2mnn.Pipeline(fp32_bundle, config=mnn_runtime_config(threads=2, family=SD15)).generate(PROMPT, steps=1, seed=1)
    assert isinstance(image, Image.Image) and image.size == (512, 512) and image.mode == "RGB"
    assert image.info["seed"] == "1" and image.info["prompt"] == PROMPT
    path = write_png(tmp_path / "api.png", image)  # the info becomes the PNG's text chunks
    assert read_image(path)[1]["bundle_hash"] == image.info["bundle_hash"]


def test_bundle_hash_uses_the_manifest_and_follows_content(bundle_copy, monkeypatch):
    files = ["tokenizer.mtok", "unet.mnn", "unet.mnn.weight"]
    reference, exact = content_hash(bundle_copy, files)
    assert exact
    import sd2mnn.core.manifest as manifest  # content_hash hashes through FileRecord.of

    def no_hashing(path):
        raise AssertionError(f"re-hashed {path}")

    with monkeypatch.context() as patch:
        patch.setattr(manifest, "sha256_file", no_hashing)
        assert content_hash(bundle_copy, files)[0] == reference  # all from manifest.json
    weight = bundle_copy / "unet.mnn.weight"
    os.utime(weight, ns=(0, 0))  # touched, same bytes: hashed again, same id
    assert content_hash(bundle_copy, files)[0] == reference
    data = bytearray(weight.read_bytes())
    data[-1] ^= 1
    weight.write_bytes(bytes(data))
    assert content_hash(bundle_copy, files)[0] != reference


def test_compare_identical_different_and_mismatched(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = a.copy()
    b[10:20, 10:20] ^= 8
    write_png(tmp_path / "a.png", a)
    write_png(tmp_path / "b.png", b)
    write_png(tmp_path / "small.png", a[:32])
    same = compare(tmp_path / "a.png", tmp_path / "a.png")
    assert same.identical and same.ssim == pytest.approx(1.0) and same.psnr_db == float("inf")
    assert main(["compare", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--min-psnr", "60"]) == 1
    out = capsys.readouterr().out
    assert "PSNR" in out and "SSIM" in out and "below --min-psnr 60" in out
    diff, _ = read_image(tmp_path / "a_vs_b.diff.png")
    assert diff[15, 15].max() == 255 and diff[0, 0].max() == 0
    assert main(["compare", str(tmp_path / "a.png"), str(tmp_path / "small.png"), "--no-diff"]) == 2
    assert "compare images of the same size" in capsys.readouterr().err


def test_compare_into_a_closed_pipe_is_quiet(tmp_path):
    """`sd2mnn compare a b | head -1`: the reader leaves early; no traceback, exit 0."""
    write_png(tmp_path / "a.png", np.zeros((32, 32, 3), dtype=np.uint8))
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write the child makes now fails with EPIPE
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "compare", str(tmp_path / "a.png"),
                           str(tmp_path / "a.png"), "--no-diff"], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, timeout=60)
    os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_mnn_runs_quantized_weights_in_the_memory_mode_asked_for(w8_bundle, demo_onnx):
    """MNN's low-memory mode computes with the 8-bit weights as they are (MNN's SD runtime runs it);
    normal mode widens them to float first: the outputs differ, so the mode reached MNN."""
    from sd2mnn.core.runtime import DYNAMIC_QUANT_OPTIONS, MnnModel, RuntimeConfig
    from sd2mnn.families import FAMILIES
    from sd2mnn.verification.verify import component_feeds

    feeds = component_feeds(demo_onnx, "unet", FAMILIES["sd15"])[0]
    outputs = {}
    for memory in ("normal", "low"):
        config = RuntimeConfig(threads=2, precision="high", memory=memory, hints=((DYNAMIC_QUANT_OPTIONS, 2),))
        model = MnnModel(w8_bundle / "unet.mnn", list(feeds), ["out_sample"], config)
        outputs[memory] = model.run(feeds)["out_sample"]
        del model
    assert np.isfinite(outputs["low"]).all()
    assert not np.array_equal(outputs["normal"], outputs["low"])
