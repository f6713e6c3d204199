"""MNN's own SD1.5 runtime (diffusion_demo, built from MNN's source; opt-in via
SD2MNN_DIFFUSION_DEMO) against `sd2mnn generate` on the same bundle, seed, prompt and steps."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sd2mnn.core.images import Comparison, compare

DIFFUSION_DEMO = os.environ.get("SD2MNN_DIFFUSION_DEMO")
SKIP_REASON = "set SD2MNN_DIFFUSION_DEMO to a diffusion_demo built from MNN's source to compare against it"


def demo_against_generate(bundle: Path, workdir: Path, prompt: str, steps: int, seed: int,
                          generate_args: tuple[str, ...] = ("--noise", "mnn")) -> Comparison:
    """diffusion_demo's image against `sd2mnn generate ... generate_args`'s, both drawn in fresh
    processes with 4 threads and memory mode 1 (the C++ always runs 4 threads; MNN picks kernels
    by thread count, and its output moved by 1 level on ~2% of pixels after other 2-thread
    pipelines in the same process)."""
    demo = Path(DIFFUSION_DEMO).expanduser()
    assert demo.is_file(), f"SD2MNN_DIFFUSION_DEMO={DIFFUSION_DEMO} is not a file"
    # diffusion_demo <resource_path> <model_type 0: SD1.5> <memory_mode 1> <backend 0: CPU>
    #                <iteration_num> <random_seed> <output_image_name> <prompt_text>
    done = subprocess.run([str(demo), str(bundle), "0", "1", "0", str(steps), str(seed), "cpp.png", prompt],
                          cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and (workdir / "cpp.png").is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "sd2mnn.cli", "generate", str(bundle), prompt,
                           "-o", str(workdir / "py.png"), "--steps", str(steps), "--seed", str(seed), *generate_args,
                           "--memory-mode", "1", "--threads", "4", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return compare(workdir / "cpp.png", workdir / "py.png")
