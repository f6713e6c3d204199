"""The README's variant table: ``sd2mnn sweep`` over fp32, w8, w8-fuse and w4 at full size.

    python benchmarks/sweep_full_size.py ONNX_DIR OUT_DIR [--threads 4] [--runs 3] [--min-psnr 30]

ONNX_DIR is a full-size SD1.5-architecture export (benchmarks/full_size.py WORK_DIR makes one in
WORK_DIR/onnx). Each variant's bundle stays in OUT_DIR/<variant>/, so a rerun converts nothing
that is up to date. Writes OUT_DIR/sweep.md (the markdown table, the settings and the
recommendation), OUT_DIR/sweep.json (the full report) and OUT_DIR/sweep.png, and prints sweep.md.
Each conversion of the unet peaks near 7.5 GB; MNN and ONNX Runtime run it one at a time.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from sd2mnn.core.progress import make_progress
from sd2mnn.measurement.sweep import DEFAULT_MIN_PSNR, VARIANTS, plot, sweep

FULL_SIZE_VARIANTS = ("fp32", "w8", "w8-fuse", "w4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--threads", type=int, default=4, help="threads per runtime, as MNN's SD runtime uses (default: 4)")
    parser.add_argument("--runs", type=int, default=3, help="steady runs per component (default: 3)")
    parser.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR)
    args = parser.parse_args(argv)

    report = sweep(args.onnx_dir, args.out_dir, FULL_SIZE_VARIANTS, args.min_psnr, threads=args.threads,
                   runs=args.runs, progress=make_progress())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    picture = plot(report, args.out_dir / "sweep.png")
    (args.out_dir / "sweep.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    flags = "; ".join(f"{name}: `{VARIANTS[name].flags or '(none)'}`" for name in FULL_SIZE_VARIANTS)
    text = "\n".join([
        report.to_markdown(),
        "",
        f"PSNR/cos: each component's worst output against ONNX Runtime (sd2mnn verify's inputs); latency: the sum "
        f"of MNN's steady-run medians over the components ({report.runs} runs, {report.threads} threads, CPU, "
        f"precision {report.precision}); the onnx row is ONNX Runtime on the same inputs. Size: the components' .mnn + .mnn.weight "
        f"(the onnx row: model.onnx + external data). * = size/fidelity frontier. "
        f"Flags: {flags}. Measured on {platform.machine()} with {platform.python_implementation()} "
        f"{platform.python_version()}.",
        "",
        f"Recommended for --min-psnr {report.min_psnr:g}: {report.recommendation}.",
        "",
    ])
    (args.out_dir / "sweep.md").write_text(text)
    print(text)
    print(f"wrote {args.out_dir / 'sweep.md'}, sweep.json and {picture.name}", file=sys.stderr)
    return 0 if any(v.ok for v in report.variants) else 1


if __name__ == "__main__":
    sys.exit(main())
