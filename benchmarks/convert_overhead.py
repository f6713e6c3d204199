"""What sd2mnn's safety costs: its wall time and peak memory against calling the converter
directly, for the same three components and flags, in one run.

    python benchmarks/convert_overhead.py ONNX_DIR WORK_DIR [--flags "--weightQuantBits=8"]

Three measurements, each a child process tree sampled for its summed RSS every 20 ms, each
started on an empty output folder after a sync (so no run pays for another's writeback), all
repeated --repeat times, the order rotating each round so that drift in the machine's speed
(page cache, writeback, a neighbour) does not always land on the same run. Reported: the median
wall time and the worst peak of each, and the median of the per-round ratios (each ratio taken
between runs of the same round, minutes apart rather than half an hour):
  direct       the MNN package's converter called directly for text_encoder, unet, vae_decoder
               one after another (what MNN's convert_mnn.py does, minus its telemetry script)
  sequential   sd2mnn convert --jobs 1 --force
  default      sd2mnn convert --force (default --jobs)
Targets, judged on the median per-round ratios: sequential <= 1.03x direct wall and
<= 1.05x direct peak memory; default --jobs <= 0.92x sequential wall.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from _measure import measure, raw_converter_argv

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def run(argv: list[str], cwd: Path) -> tuple[float, int]:
    """(wall seconds, peak summed RSS of the process tree) of one command."""
    os.sync()
    result = measure(argv, cwd=cwd)
    if result["returncode"] != 0:
        raise SystemExit(f"{argv[:5]} failed with exit code {result['returncode']}")
    return result["wall_s"], result["tree_peak_bytes"]


def direct(onnx_dir: Path, out: Path, flags: list[str]) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wall, peak = 0.0, 0
    for name in COMPONENTS:
        argv = raw_converter_argv(onnx_dir / name / "model.onnx", out / f"{name}.mnn", flags)
        w, p = run(argv, out)
        wall, peak = wall + w, max(peak, p)
        print(f"  direct {name}: {w:.1f}s, {p / 2**30:.2f} GiB", file=sys.stderr)
    return wall, peak


def sd2mnn(onnx_dir: Path, out: Path, flags: list[str], jobs: int | None) -> tuple[float, int]:
    # Start from an empty folder, as the direct run does: replacing an earlier bundle would add
    # the unlinking of its 4 GB of files (about 6 s here) to sd2mnn's time alone.
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "sd2mnn.cli", "convert", str(onnx_dir), str(out), shlex.join(flags),
            "--force", "--quiet", *(["--jobs", str(jobs)] if jobs else [])]
    return run(argv, out.parent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--flags", default="", help="converter flags for every run")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the three runs (default: 5)")
    args = parser.parse_args()
    flags = shlex.split(args.flags)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    onnx_dir = args.onnx_dir.resolve()
    runs = {
        "direct": lambda: direct(onnx_dir, work / "direct", flags),
        "sequential": lambda: sd2mnn(onnx_dir, work / "sequential", flags, jobs=1),
        "default jobs": lambda: sd2mnn(onnx_dir, work / "default", flags, jobs=None),
    }
    names = list(runs)
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}
    for round_ in range(args.repeat):
        for name in names[round_ % 3:] + names[:round_ % 3]:
            samples[name].append(runs[name]())
            print(f"round {round_ + 1} {name}: {samples[name][-1][0]:.1f}s", file=sys.stderr)

    def ratios(run: str, base: str, field: int) -> list[float]:
        return [a[field] / b[field] for a, b in zip(samples[run], samples[base])]

    wall_vs_direct = {name: statistics.median(ratios(name, "direct", 0)) for name in runs}
    peak_vs_direct = {name: statistics.median(ratios(name, "direct", 1)) for name in runs}
    wall_vs_sequential = {name: statistics.median(ratios(name, "sequential", 0)) for name in runs}
    print("| run | median wall | worst peak RSS | wall vs direct | peak vs direct | wall vs sequential |")
    print("|---|---|---|---|---|---|")
    for name, got in samples.items():
        wall = statistics.median(w for w, _ in got)
        peak = max(p for _, p in got)
        print(f"| {name} | {wall:.1f} s | {peak / 2**30:.2f} GiB | {wall_vs_direct[name]:.3f}x | "
              f"{peak_vs_direct[name]:.3f}x | {wall_vs_sequential[name]:.3f}x |")
    print("(ratios: median over rounds of the ratio within each round)")
    print(json.dumps({name: {"walls": [round(w, 2) for w, _ in got], "peaks": [p for _, p in got],
                             "wall_vs_direct": [round(r, 4) for r in ratios(name, "direct", 0)],
                             "wall_vs_sequential": [round(r, 4) for r in ratios(name, "sequential", 0)]}
                      for name, got in samples.items()}))
    ok = wall_vs_direct["sequential"] <= 1.03 and peak_vs_direct["sequential"] <= 1.05 \
        and wall_vs_sequential["default jobs"] <= 0.92
    print("targets met" if ok else "targets NOT met", file=sys.stderr)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
