"""--vae DIR: a VAE exported in place of the pipeline's own, a replaced AutoencoderKL or the tiny
AutoencoderTiny (TAESD's architecture) phones decode with.

MNN's unmodified runtime multiplies latents by its own constant (1/0.18215 for SD1.5; 1/1.5305, then
+0.0609 for SD3.5) before the decoder; the tiny VAE decodes diffusers' latents divided by its own
scaling factor (1.0), so the exported graph folds the difference in. Checked here against diffusers'
AutoencoderTiny.decode on the runtime's latents, through verify, on both runtimes, and (opt-in)
in MNN's own diffusion_demo.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from builders import make_tiny_pipeline, make_tiny_taesd, make_tiny_vae  # noqa: E402
from mnn_demo import DIFFUSION_DEMO, SKIP_REASON, demo_against_generate  # noqa: E402

from conftest import assert_export_refuses  # noqa: E402
from sd2mnn.cli import main  # noqa: E402
from sd2mnn.core.images import psnr  # noqa: E402
from sd2mnn.exporting.export import ExportOptions, check_onnx, export  # noqa: E402
from sd2mnn.families import SD15, SD35  # noqa: E402
from sd2mnn.generation.noise import initial_noise  # noqa: E402
from sd2mnn.generation.pipeline import GenerationParams, Pipeline  # noqa: E402
from sd2mnn.verification.verify import verify  # noqa: E402

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("vae-sd15") / "diffusers", seed=0)


@pytest.fixture(scope="module")
def taesd(sd15) -> Path:
    return make_tiny_taesd(sd15.parent / "taesd", seed=3)


@pytest.fixture(scope="module")
def tiny_bundle(sd15, taesd):
    """The one-command convert with the tiny VAE, its export kept."""
    onnx, bundle = sd15.parent / "tiny-onnx", sd15.parent / "tiny-bundle"
    assert main(["convert", str(sd15), str(bundle), "--vae", str(taesd), "--keep-onnx", str(onnx), "--quiet"]) == 0
    return onnx, bundle


def _diffusers_decode(vae_dir: Path, latents: np.ndarray, cls: str = "AutoencoderTiny") -> np.ndarray:
    """diffusers' own decode of ``latents`` as its pipelines call it: divided by the VAE's scaling
    factor, plus its shift factor."""
    import diffusers
    import torch

    vae = getattr(diffusers, cls).from_pretrained(str(vae_dir)).eval()
    shift = vae.config.get("shift_factor") or 0.0
    with torch.no_grad():
        return vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor + shift).sample.numpy()


def _decoder_error(onnx: Path, latents: np.ndarray, scale: float, shift: float, expected: np.ndarray) -> float:
    """The exported decoder fed what MNN's runtime feeds (float32 latents * scale + shift) against
    ``expected``: its max abs error."""
    fed = (latents * np.float32(scale) + np.float32(shift)).astype(np.float32)
    return check_onnx(onnx / "vae_decoder" / "model.onnx", {"latent_sample": fed},
                      {"sample": expected.astype(np.float64)}, in_process=True)["sample"]


def test_tiny_vae_decodes_the_runtimes_latents_as_diffusers_does(tiny_bundle, taesd):
    onnx, _ = tiny_bundle
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    expected = _diffusers_decode(taesd, latents)
    assert _decoder_error(onnx, latents, SD15.recipe.latent_scale, 0.0, expected) < 1e-4
    # Without the fold it would decode latents 5.5x too large.
    assert np.abs(_diffusers_decode(taesd, latents / np.float32(0.18215)) - expected).max() > 0.1


def test_tiny_vae_bundle_verifies_and_both_runtimes_draw_it(tiny_bundle, sd15):
    onnx, bundle = tiny_bundle
    report = verify(onnx, bundle, threads=2)
    assert report.passed, report.failures
    mnn, ort = Pipeline(bundle), Pipeline.from_onnx(onnx, threads=2)
    base = Pipeline.from_onnx(export(sd15, sd15.parent / "base-onnx", ExportOptions(components=("text_encoder", "unet",
                                                                                               "vae_decoder"))).onnx_dir,
                              threads=2)
    params = GenerationParams(PROMPT, steps=3, latents=initial_noise(7, ort.latent_shape, "mnn"))
    drawn = ort.run(params).pixels
    assert psnr(mnn.run(params).pixels, drawn) >= 40
    assert psnr(base.run(params).pixels, drawn) < 20  # another decoder altogether
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["vae"] == {"folder": str(sd15.parent.resolve() / "taesd"), "class": "AutoencoderTiny"}


def test_replaced_autoencoder_kl_is_exported_as_it_is(sd15, tmp_path):
    fixed = make_tiny_vae(tmp_path / "fixed-vae", seed=9)
    out = export(sd15, tmp_path / "onnx", ExportOptions(components=("vae_decoder",), vae=fixed)).onnx_dir
    latents = np.random.default_rng(1).standard_normal((1, 4, 64, 64)).astype(np.float32)
    fed = latents * np.float32(SD15.recipe.latent_scale)
    expected = _diffusers_decode(fixed, fed * np.float32(0.18215), "AutoencoderKL")
    assert _decoder_error(out, latents, SD15.recipe.latent_scale, 0.0, expected) < 1e-4
    own = _diffusers_decode(sd15 / "vae", fed * np.float32(0.18215), "AutoencoderKL")
    assert np.abs(own - expected).max() > 0.1


def test_sd3_tiny_vae_folds_scale_and_shift(tiny_sd3_onnx, tmp_path):
    """An SD3 TAESD saved with scaling factor 1 and no shift: the graph undoes the runtime's
    1/1.5305 and +0.0609."""
    taesd3 = make_tiny_taesd(tmp_path / "taesd3", seed=4, latent_channels=16)
    out = export(tiny_sd3_onnx.parent / "diffusers", tmp_path / "onnx",
                 ExportOptions(components=("vae_decoder",), vae=taesd3)).onnx_dir
    size = json.loads((tiny_sd3_onnx.parent / "diffusers" / "transformer" / "config.json").read_text())["sample_size"]
    latents = np.random.default_rng(2).standard_normal((1, 16, size, size)).astype(np.float32)
    error = _decoder_error(out, latents, SD35.recipe.latent_scale, SD35.recipe.latent_shift,
                           _diffusers_decode(taesd3, latents))
    assert error < 1e-4


# ---------------------------------------------------------------------------------------------
# Bad VAEs: one line naming the folder, nothing written
# ---------------------------------------------------------------------------------------------
BAD_VAES = {
    "other latent channels": (lambda d, p: make_tiny_taesd(d / "taesd3", latent_channels=16),
                              "latent_channels 16; a Stable Diffusion 1.x pipeline draws 4 latent channels"),
    "not a VAE": (lambda d, p: p / "unet", "a UNet2DConditionModel, not a VAE sd2mnn loads"),
    "no config": (lambda d, p: _mkdir(d / "empty"), "config.json: not found; --vae takes a diffusers VAE folder"),
    "not there": (lambda d, p: d / "missing", "not a folder"),
    "no weights": (lambda d, p: _without_weights(make_tiny_taesd(d / "taesd")), "no weights"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _without_weights(folder: Path) -> Path:
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return folder


@pytest.mark.parametrize("case", list(BAD_VAES))
def test_bad_vae_is_one_line_before_anything_is_written(case, sd15, tmp_path, capsys):
    make, message = BAD_VAES[case]
    vae = make(tmp_path, sd15)
    assert_export_refuses(sd15, "--vae", vae, message, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------
# MNN's own runtime (opt-in, as tests/test_mnn_runtime_match.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not DIFFUSION_DEMO, reason=SKIP_REASON)
def test_diffusion_demo_draws_with_the_tiny_vae_as_sd2mnn_does(tiny_bundle, tmp_path):
    result = demo_against_generate(tiny_bundle[1], tmp_path, PROMPT, 3, 42)
    assert result.identical, f"PSNR {result.psnr_db:.1f} dB, max diff {result.max_abs_diff}"
