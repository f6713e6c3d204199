"""How long sd2mnn takes to draw MNN's initial latents (std::mt19937 + normal_distribution,
emulated bit for bit in numpy), against numpy's own normal generator in the same script.

    python benchmarks/noise_speed.py [--repeat 20] [--max-ms 500]

Each method draws the runtime's [1,4,64,64] latents ``--repeat`` times from different seeds;
the median is reported with the ratio to numpy's (the baseline: what drawing 16384 normals costs
without emulating C++). Target: the emulated draw stays under ``--max-ms`` per image, a small
part of one unet step (about 14 s at full size here); exits 1 when it does not.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from sd2mnn.families import SD15
from sd2mnn.generation.noise import initial_noise


def _median_s(draw, repeat: int) -> float:
    times = []
    for seed in range(repeat):
        started = time.perf_counter()
        draw(seed)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--max-ms", type=float, default=500.0)
    args = parser.parse_args(argv)
    shape = SD15.recipe.latent_shape  # the latent MNN's SD1.5 runtime draws

    baseline = _median_s(lambda seed: np.random.default_rng(seed).standard_normal(shape, dtype=np.float32),
                         args.repeat)
    rows = [("numpy (baseline)", baseline)]
    for method in ("mnn-libstdc++", "mnn-libc++"):
        rows.append((method, _median_s(lambda seed, m=method: initial_noise(seed, shape, m), args.repeat)))
    print(f"{'method':<18} {'median ms':>10} {'vs numpy':>9}")
    for name, seconds in rows:
        print(f"{name:<18} {seconds * 1e3:>10.2f} {seconds / baseline:>8.1f}x")
    worst = max(seconds for _, seconds in rows[1:])
    met = worst * 1e3 <= args.max_ms
    print(f"target: MNN noise <= {args.max_ms:g} ms per image: {'met' if met else 'NOT met'} ({worst * 1e3:.1f} ms)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
