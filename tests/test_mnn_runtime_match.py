"""The real thing: MNN's own C++ runtime (`diffusion_demo`) and `sd2mnn generate --noise mnn`
draw the same pixels from the same bundle, seed, prompt and steps.

Opt-in: it needs a diffusion_demo built from MNN's source (README, "Checking against MNN's own
runtime"; about 25 minutes on 2 cores), so CI does not build one. Point SD2MNN_DIFFUSION_DEMO at
the binary to run it:

    SD2MNN_DIFFUSION_DEMO=~/MNN/build/diffusion_demo pytest tests/test_mnn_runtime_match.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from clip_tokenizer import with_sd15_tokenizer
from mnn_demo import DIFFUSION_DEMO, SKIP_REASON, demo_against_generate

pytestmark = pytest.mark.skipif(not DIFFUSION_DEMO, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def bits_per_layer_bundle(demo_onnx, tmp_path_factory) -> Path:
    """The demo pipeline with bits per layer (sd2mnn quantize, 40 dB floor per component)."""
    from sd2mnn.quantization.quantize import quantize

    bundle = tmp_path_factory.mktemp("quantized") / "bundle"
    report = quantize(demo_onnx, bundle, min_psnr=40)
    assert all(len(choice.histogram()) >= 2 for choice in report.components)
    return bundle


@pytest.mark.parametrize("seed, steps", [(42, 3), (7, 5)])
@pytest.mark.parametrize("which", ["fp32", "w8", "bits per layer"])
def test_generate_matches_diffusion_demo_pixel_for_pixel(fp32_bundle, w8_bundle, bits_per_layer_bundle, tmp_path, seed,
                                                         steps, which):
    # Quantized weights run as the C++ runs them only with its low-memory mode (int8 compute).
    bundle = {"fp32": fp32_bundle, "w8": w8_bundle, "bits per layer": bits_per_layer_bundle}[which]
    result = demo_against_generate(bundle, tmp_path, "a photo of a cat", steps, seed)
    assert result.identical, f"PSNR {result.psnr_db:.1f} dB, max diff {result.max_abs_diff}"


@pytest.fixture(scope="module")
def sd15_tokenizer_bundle(demo_onnx, tmp_path_factory) -> Path:
    """A default bundle of the demo pipeline with SD1.5's real tokenizer."""
    import sd2mnn

    onnx = with_sd15_tokenizer(demo_onnx, tmp_path_factory.mktemp("sd15-tokenizer") / "onnx")
    bundle = onnx.parent / "bundle"
    sd2mnn.convert(onnx, bundle)
    return bundle


# MNN's own flow feeds other ids than diffusers for each of these; a default bundle does not. The
# last one ends in a word whose end-of-word BPE has other tokens than the runtime's, and more.
@pytest.mark.parametrize("prompt", ["a photo of a cat", "an astronaut riding a horse on mars, 8k, trending on artstation",
                                    "a wizard's tower, oil painting by greg rutkowski", "a poster in duotone"])
def test_diffusion_demo_conditions_as_diffusers_with_a_default_bundle(sd15_tokenizer_bundle, tmp_path, prompt):
    # sd2mnn feeding Hugging Face's ids (diffusers' conditioning) to the same bundle.
    result = demo_against_generate(sd15_tokenizer_bundle, tmp_path, prompt, 3, 42, ("--tokenizer", "hf"))
    assert result.identical, f"PSNR {result.psnr_db:.1f} dB, max diff {result.max_abs_diff}"
