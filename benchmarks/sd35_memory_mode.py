"""Peak memory of ``sd2mnn generate`` on an SD3.5 bundle in each memory mode, and of MNN's
``diffusion_sd35_demo`` in the same mode.

    python benchmarks/sd35_memory_mode.py BUNDLE [--demo DEMO] [--modes 0,1,2] [--steps 2] [--threads 4]
                                          [--json OUT.json]
    python benchmarks/sd35_memory_mode.py --build DIR

One child process per run, one after another: ``python -m sd2mnn.cli generate BUNDLE PROMPT
--memory-mode N``, then (``--demo``) ``diffusion_sd35_demo BUNDLE N 0 STEPS SEED out.png PROMPT``.
Reported per run: wall time, wait4's ru_maxrss (the largest single process: generate itself, or
the child that reads the models' shapes) and the sampled peak of the whole process tree's summed
RSS (every 20 ms), and whether the image is identical to sd2mnn's in mode 1 (it must be: the mode
only changes when models are loaded and freed; the C++ runs 4 threads, so --threads 4 for it to
match). A markdown table, then JSON.

``--build DIR``: tests/test_sd35_demo_match.py's SD3 with the C++ runtime's fixed shapes (CLIP-L
768 and CLIP-G 1280 wide with their full 49408-id tables, T5 4096 wide, one transformer layer,
1024x1024 images; seeded random weights), exported and converted at fp32 into DIR/bundle.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _measure import measure

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a cat"
SEED = 42


def build(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sd35_demo_match import make_runtime_shaped_sd3

    import sd2mnn
    from sd2mnn.exporting.export import export

    export(make_runtime_shaped_sd3(out / "diffusers"), out / "onnx")
    sd2mnn.convert(out / "onnx", out / "bundle")
    return out / "bundle"


def run(bundle: Path, modes: list[int], steps: int, threads: int, demo: Path | None) -> list[dict]:
    from sd2mnn.core.images import compare

    results = []
    with tempfile.TemporaryDirectory(prefix="sd35-memory-") as tmp:
        for runner in ("sd2mnn", "diffusion_sd35_demo") if demo else ("sd2mnn",):
            for mode in modes:
                image = Path(tmp) / f"{runner}-mode{mode}.png"
                if runner == "sd2mnn":
                    argv = [sys.executable, "-m", "sd2mnn.cli", "generate", str(bundle), PROMPT, "-o", str(image),
                            "--steps", str(steps), "--seed", str(SEED), "--threads", str(threads), "--memory-mode",
                            str(mode), "--quiet"]
                else:  # <resource_path> <memory_mode> <backend_type> <iteration_num> <random_seed> <image> <prompt>
                    argv = [str(demo), str(bundle.resolve()), str(mode), "0", str(steps), str(SEED), str(image), PROMPT]
                result = {"runner": runner, "mode": mode, **measure(argv, cwd=Path(tmp))}
                if result["returncode"] != 0 or not image.is_file():
                    raise SystemExit(f"{runner} in memory mode {mode} failed ({result['returncode']}): {' '.join(argv)}")
                results.append(result)
        reference = Path(tmp) / "sd2mnn-mode1.png"
        for result in results:
            image = Path(tmp) / f"{result['runner']}-mode{result['mode']}.png"
            result["same_image_as_sd2mnn_mode_1"] = compare(image, reference).identical if reference.is_file() else None
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--build", type=Path, metavar="DIR")
    parser.add_argument("--demo", type=Path, help="a diffusion_sd35_demo binary (scripts/build_sd35_demo.sh)")
    parser.add_argument("--modes", default="0,1,2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.build:
        print(build(args.build))
        return 0
    if args.bundle is None:
        parser.error("give a BUNDLE, or --build DIR")
    sizes = {p.name: p.stat().st_size for p in sorted(args.bundle.glob("*.mnn.weight"))}
    results = run(args.bundle, [int(m) for m in args.modes.split(",")], args.steps, args.threads, args.demo)
    mib = 1 << 20
    print(f"{args.bundle}: " + ", ".join(f"{n.removesuffix('.mnn.weight')} {s / mib:.0f} MiB" for n, s in sizes.items()))
    print(f"{args.steps} steps, seed {SEED}, sd2mnn --threads {args.threads}, CPU\n")
    print("| runner | memory mode | wall | ru_maxrss | process tree peak | image |")
    print("|---|---|---|---|---|---|")
    for r in results:
        same = {True: "= sd2mnn mode 1", False: "DIFFERS", None: "-"}[r["same_image_as_sd2mnn_mode_1"]]
        print(f"| {r['runner']} | {r['mode']} | {r['wall_s']:.1f} s | {r['maxrss_bytes'] / mib:.0f} MiB | "
              f"{r['tree_peak_bytes'] / mib:.0f} MiB | {same} |")
    report = {"bundle": str(args.bundle), "weights_bytes": sizes, "steps": args.steps, "seed": SEED,
              "threads": args.threads, "demo": str(args.demo) if args.demo else None, "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
