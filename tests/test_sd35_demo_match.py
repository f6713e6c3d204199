"""The real thing for SD3.5: MNN's own C++ runtime (`diffusion_sd35_demo`) and `sd2mnn generate
--noise mnn` draw the same pixels from the same bundle, seed, prompt and steps.

The C++ fixes every shape (CLIP-L 768 and CLIP-G 1280 wide, T5 4096, [2,333,4096] conditioning,
16x128x128 latents, a 1024x1024 image), so the pipeline here has exactly those widths, built from
diffusers/transformers classes with seeded weights and as few layers, heads and channels as the
shapes allow: exported by sd2mnn's export, converted by `sd2mnn convert`.

Opt-in: it needs a diffusion_sd35_demo built from MNN's source (MNN 3.6.1, -DMNN_BUILD_DIFFUSION=ON
-DMNN_BUILD_LLM=ON -DMNN_IMGCODECS=ON), so CI does not build one. MNN 3.6.1's own demo segfaults
on the CPU backend at its first forward (an early Session_Resize_Fix in DiffusionSD35::loadModule);
scripts/build_sd35_demo.sh builds it without that call, which changes no arithmetic. Point
SD2MNN_DIFFUSION_SD35_DEMO at the binary to run it:

    scripts/build_sd35_demo.sh ~/MNN ~/MNN/build /tmp/sd35-demo
    SD2MNN_DIFFUSION_SD35_DEMO=/tmp/sd35-demo/diffusion_sd35_demo pytest tests/test_sd35_demo_match.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sd2mnn.core.images import compare, read_image

DEMO = os.environ.get("SD2MNN_DIFFUSION_SD35_DEMO")
pytestmark = pytest.mark.skipif(
    not DEMO, reason="set SD2MNN_DIFFUSION_SD35_DEMO to a diffusion_sd35_demo built from MNN's source to compare against it")

# The widths diffusion_sd35.cpp hard-codes; everything else as small as they allow.
CLIP_L = dict(hidden_size=768, projection_dim=768, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
CLIP_G = dict(hidden_size=1280, projection_dim=1280, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              hidden_act="gelu")
T5 = dict(d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
TRANSFORMER = dict(sample_size=128, joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=64,
                   num_layers=1, dual_attention_layers=())
# 8x (four blocks): 128x128 latents -> 1024x1024; no mid-block attention over 16384 positions.
VAE = dict(mid_block_add_attention=False)


def make_runtime_shaped_sd3(out: Path) -> Path:
    """A StableDiffusion3Pipeline folder whose models have the C++ runtime's shapes."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    from builders import SD3_CLIP_G_CONFIG, SD3_CLIP_L_CONFIG, SD3_T5_CONFIG, jittered, make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(out, seed=5, transformer=TRANSFORMER, vae=VAE)
    t5_vocab = len(T5TokenizerFast.from_pretrained(str(out / "tokenizer_3")))
    encoders = {
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**SD3_CLIP_L_CONFIG, **CLIP_L})),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**SD3_CLIP_G_CONFIG, **CLIP_G})),
        "text_encoder_3": lambda: T5EncoderModel(T5Config(vocab_size=t5_vocab, **{**SD3_T5_CONFIG, **T5})),
    }
    for i, (name, build) in enumerate(encoders.items()):
        torch.manual_seed(100 + i)
        model = jittered(build(), 200 + i)
        shutil.rmtree(out / name)
        model.save_pretrained(str(out / name), safe_serialization=True)
    return out


def sd2mnn(*args, timeout=900):
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runtime_shaped_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd35-runtime-shaped")
    from sd2mnn.exporting.export import export

    model = make_runtime_shaped_sd3(root / "diffusers")
    export(model, root / "onnx")
    shutil.rmtree(model)
    sd2mnn("convert", root / "onnx", root / "bundle", "--quiet")
    return root / "bundle"  # beside the ONNX folder it was converted from


def run_demo(bundle: Path, cwd: Path, steps: int, seed: int, prompt: str) -> Path:
    demo = Path(DEMO).expanduser()
    assert demo.is_file(), f"SD2MNN_DIFFUSION_SD35_DEMO={DEMO} is not a file"
    # diffusion_sd35_demo <resource_path> <memory_mode 1> <backend 0: CPU> <iteration_num> <random_seed>
    #                     <output_image_name> <prompt_text>
    done = subprocess.run([str(demo), str(bundle), "1", "0", str(steps), str(seed), "cpp.png", prompt],
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    crashed = " (SIGSEGV: MNN 3.6.1's own demo; build it with scripts/build_sd35_demo.sh)" if done.returncode == -11 else ""
    assert done.returncode == 0 and (cwd / "cpp.png").is_file(), crashed + done.stdout[-2000:] + done.stderr[-2000:]
    assert "T5 text encoder failed to load" not in done.stdout + done.stderr
    return cwd / "cpp.png"


@pytest.mark.parametrize("seed, steps", [(42, 2), (7, 3)])
def test_generate_matches_diffusion_sd35_demo_pixel_for_pixel(runtime_shaped_bundle, tmp_path, seed, steps):
    prompt = "a photo of a cat"
    cpp = run_demo(runtime_shaped_bundle, tmp_path, steps, seed, prompt)
    # The C++ always runs 4 threads; MNN picks kernels by thread count.
    done = sd2mnn("generate", runtime_shaped_bundle, prompt, "-o", tmp_path / "py.png", "--steps", steps, "--seed", seed,
                  "--noise", "mnn", "--threads", "4")
    pixels, meta = read_image(tmp_path / "py.png")
    assert pixels.shape == (1024, 1024, 3) and meta["matches_mnn_runtime"] == "yes", (meta, done.stderr)
    result = compare(cpp, tmp_path / "py.png")
    assert result.identical, f"PSNR {result.psnr_db:.1f} dB, max diff {result.max_abs_diff}"


def test_without_t5_both_condition_on_zeros(runtime_shaped_bundle, tmp_path):
    """A bundle converted without text_encoder_3: the C++ warns and uses zeros; sd2mnn says so and
    does the same. (One whose manifest lists the T5 but whose files are gone is refused instead.)"""
    bundle = tmp_path / "no-t5"
    sd2mnn("convert", runtime_shaped_bundle.parent / "onnx", bundle, "--components",
           "text_encoder,text_encoder_2,transformer,vae_decoder", "--quiet")
    assert not (bundle / "text_encoder_3.mnn").exists()
    demo = Path(DEMO).expanduser()
    done = subprocess.run([str(demo), str(bundle), "1", "0", "2", "42", "cpp.png", "a photo of a cat"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and (tmp_path / "cpp.png").is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    assert "Will use zeros" in done.stdout + done.stderr
    made = sd2mnn("generate", bundle, "a photo of a cat", "-o", tmp_path / "py.png", "--steps", 2, "--seed", 42,
                  "--threads", "4")
    assert "conditioned on zeros" in made.stderr
    result = compare(tmp_path / "cpp.png", tmp_path / "py.png")
    assert result.identical, f"PSNR {result.psnr_db:.1f} dB, max diff {result.max_abs_diff}"
