"""The real thing for Wan2.1: MNN's own C++ runtime (`wan_diffusion_demo`) and `sd2mnn generate`
draw the same frames from the same bundle, seed, prompt, steps and memory mode.

The runtime fixes the text length (512), the latent channels (16), the 2x2 patches and the VAE's
factors; the tiny Wan of tests/builders.py has them (its widths the runtime reads from the
models). The stock demo of MNN 3.6.1 runs on the CPU backend: the bundle declares one input size
of each model free, so the demo's early Session_Resize_Fix frees nothing (sd2mnn.exporters.wan).

Opt-in: it needs wan_diffusion_demo built from MNN's source (MNN 3.6.1, -DMNN_BUILD_DIFFUSION=ON
-DMNN_BUILD_LLM=ON -DMNN_IMGCODECS=ON; `make wan_diffusion_demo`), so CI does not build one:

    SD2MNN_WAN_DEMO=~/MNN/build/wan_diffusion_demo pytest tests/test_wan_demo_match.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builders import make_tiny_wan_pipeline

DEMO = os.environ.get("SD2MNN_WAN_DEMO")
pytestmark = pytest.mark.skipif(not DEMO, reason="set SD2MNN_WAN_DEMO to a wan_diffusion_demo built from MNN's source")

FRAMES, HEIGHT, WIDTH = 5, 64, 64


def sd2mnn(*args):
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def wan_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan-demo")
    model = make_tiny_wan_pipeline(root / "diffusers", seed=3)
    sd2mnn("export", model, root / "onnx", "--frames", FRAMES, "--height", HEIGHT, "--width", WIDTH)
    sd2mnn("convert", root / "onnx", root / "bundle", "--quiet")
    return root / "bundle"


def frames(folder: Path) -> np.ndarray:
    from PIL import Image

    names = sorted(p.name for p in folder.glob("frame_*.png"))
    assert names == [f"frame_{i:04d}.png" for i in range(FRAMES)], names
    return np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names])


def run_demo(bundle: Path, out: Path, memory_mode: int, steps: int, seed: int, prompt: str) -> np.ndarray:
    demo = Path(DEMO).expanduser()
    assert demo.is_file(), f"SD2MNN_WAN_DEMO={DEMO} is not a file"
    # wan_diffusion_demo <resource_path> <memory_mode> <backend 0: CPU> <steps> <seed> <width> <height>
    #                    <frames> <cfg_scale> <output_dir> <prompt...>
    done = subprocess.run([str(demo), str(bundle), str(memory_mode), "0", str(steps), str(seed), str(WIDTH),
                           str(HEIGHT), str(FRAMES), "5.0", str(out), *prompt.split()],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return frames(out)


@pytest.mark.parametrize("memory_mode, seed, steps", [(0, 7, 4), (1, 42, 3)])
def test_generate_matches_wan_diffusion_demo_pixel_for_pixel(wan_bundle, tmp_path, memory_mode, seed, steps):
    prompt = "a cat walking in the snow"
    cpp = run_demo(wan_bundle, tmp_path / "cpp", memory_mode, steps, seed, prompt)
    # The C++ always runs 4 threads; MNN picks kernels by thread count; the memory mode sets Winograd.
    sd2mnn("generate", wan_bundle, prompt, "-o", tmp_path / "py", "--steps", steps, "--seed", seed,
           "--threads", 4, "--memory-mode", memory_mode)
    py = frames(tmp_path / "py")
    assert (cpp == py).all(), f"{int((cpp != py).any(axis=-1).sum())} pixels differ, max {np.abs(cpp.astype(int) - py).max()}"


def test_the_demo_conditions_as_diffusers_ids_do(wan_bundle, tmp_path):
    """The runtime feeds ids without EOS; the bundle's text encoder adds it, so the demo's frames
    are those of diffusers' ids (a prompt the two tokenizers split alike)."""
    prompt = "a red car on a bridge at night"
    cpp = run_demo(wan_bundle, tmp_path / "cpp", 1, 3, 5, prompt)
    sd2mnn("generate", wan_bundle, prompt, "-o", tmp_path / "hf", "--steps", 3, "--seed", 5, "--threads", 4,
           "--memory-mode", 1, "--tokenizer", "hf")
    assert (cpp == frames(tmp_path / "hf")).all()
