"""sd2mnn sweep ONNX_DIR OUT_DIR [--variants ...]: convert several ways, compare, recommend one."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd2mnn.cli._checks import (check_at_least, check_finite, check_folder, check_output_folder, check_png_output,
                                check_positive, check_seed)
from sd2mnn.cli._common import add_overwrite_flag, print_json, table, terminate_as_interrupt
from sd2mnn.conversion.converter import find_converter
from sd2mnn.core.files import check_replaceable
from sd2mnn.core.images import write_failure
from sd2mnn.core.layout import component_choices
from sd2mnn.core.progress import make_progress
from sd2mnn.core.runtime import PRECISIONS
from sd2mnn.errors import InputError
from sd2mnn.measurement.sweep import DEFAULT_MIN_PSNR, DEFAULT_VARIANTS, VARIANTS, SweepReport, plot, sweep


def _variants_text() -> str:
    width = max(len(n) for n in VARIANTS)
    lines = [f"  {v.name:<{width}}  {v.flags or '(no flags)':<50} {v.about}" for v in VARIANTS.values()]
    return "named variants (MNNConvert flags):\n" + "\n".join(lines)


EPILOG = f"""{_variants_text()}

Define your own as NAME=FLAGS inside --variants (quote the flags); a variant's bundle stays in
OUT_DIR/NAME, so a rerun converts only what is new or changed.

fidelity = the worst component's PSNR (dB) against the ONNX models; latency = the sum over the
components of MNN's steady-run median. A variant is on the frontier (*) when no other is both
smaller and at least as faithful. The recommendation is the smallest variant whose fidelity
meets --min-psnr (default {DEFAULT_MIN_PSNR:g} dB: the floor sd2mnn verify applies to quantized bundles).

examples:
  sd2mnn sweep onnx/ variants/
  sd2mnn sweep onnx/ variants/ --variants fp32,w8,w8-fuse,w4-b64 --min-psnr 40 --plot sweep.png
  sd2mnn sweep onnx/ variants/ --variants 'fp32,mine=--weightQuantBits=6 --weightQuantBlock=128'
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="convert with several flag sets, verify and benchmark each, recommend one",
        description="Convert the ONNX pipeline once per variant (a named set of MNNConvert flags) into "
        "OUT_DIR/<variant>/, verify each against the ONNX models, benchmark it, and print one table: size, "
        "per-component PSNR/cosine, latency, the size/fidelity frontier and a recommendation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx_dir", metavar="ONNX_DIR", help="folder of a diffusers -> ONNX export")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder that keeps one bundle per variant")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), metavar="LIST",
                        help="comma-separated NAME or NAME=FLAGS (default: %(default)s)")
    parser.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR, metavar="DB",
                        help="fidelity floor for the recommendation (default: %(default)g)")
    parser.add_argument("--components",
                        help=f"comma-separated subset of the pipeline's components ({component_choices()}) "
                             "(default: the ones MNN's runtime loads)")
    run = parser.add_argument_group("how to run")
    run.add_argument("--threads", type=int, default=2, metavar="N", help="threads per runtime (default: %(default)s)")
    run.add_argument("--precision", choices=PRECISIONS, default="high", help="MNN's precision in the benchmark (default: %(default)s)")
    run.add_argument("--runs", type=int, default=3, metavar="N", help="steady runs per component (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    run.add_argument("--converter", metavar="PATH", help="MNNConvert executable (default: $MNNCONVERT, PATH, then the MNN package)")
    run.add_argument("--jobs", "-j", type=int, metavar="N", help="components converted at once (default: from cores and memory)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="limit per conversion and per benchmark run")
    out = parser.add_argument_group("output")
    out.add_argument("--plot", metavar="F.png", help="draw fidelity against size and latency into this PNG")
    out.add_argument("--markdown", action="store_true", help="print the table as markdown")
    out.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress")
    add_overwrite_flag(out, "an existing --plot picture")
    parser.set_defaults(func=run_command)


def print_sweep(report: SweepReport, markdown: bool = False) -> None:
    print(report.to_markdown() if markdown else table(*report.table()))
    print(f"\nPSNR/cos: the worst output of each component against ONNX Runtime; latency: sum of MNN's steady "
          f"medians ({report.runs} runs, {report.threads} threads, precision {report.precision}); size: the components' "
          f".mnn + .mnn.weight; * = size/fidelity frontier")
    for v in report.variants:
        if not v.ok:
            print(f"{v.name} failed at {v.stage}: {v.error}")
    print(f"\nrecommended for --min-psnr {report.min_psnr:g}: {report.recommendation}")


def run_command(args: argparse.Namespace) -> int:
    terminate_as_interrupt()
    if args.threads < 1 or args.runs < 1:
        raise InputError(f"--threads and --runs must be at least 1, got {args.threads} and {args.runs}")
    # Each variant's conversion reports its own failure; bad arguments fail every variant alike,
    # so refuse them here, before the first conversion.
    check_folder(args.onnx_dir, "ONNX pipeline")
    check_output_folder(args.out_dir, "OUT_DIR")
    check_finite(args.min_psnr, "--min-psnr", "30")
    check_seed(args.seed)
    check_at_least(args.jobs, 1, "--jobs")
    check_positive(args.timeout, "--timeout")
    if args.plot:
        check_png_output(args.plot, "--plot")
        check_replaceable(args.plot, args.overwrite, "the plot")
    find_converter(args.converter)  # a bad --converter would fail every variant the same way
    progress = make_progress(quiet=args.quiet or args.json)
    report = sweep(args.onnx_dir, args.out_dir, args.variants, args.min_psnr, components=args.components,
                   threads=args.threads, precision=args.precision, runs=args.runs, seed=args.seed,
                   converter=args.converter, jobs=args.jobs, timeout=args.timeout, progress=progress)
    for line in report.off_contract:
        print(f"warning: {line}", file=sys.stderr)
    picture = None
    if args.plot:
        try:
            picture = plot(report, args.plot)
        except OSError as err:
            raise write_failure(Path(args.plot), err) from None
    if args.json:
        print_json({**report.to_dict(), "plot": str(picture) if picture else None})
    else:
        print()
        print_sweep(report, args.markdown)
        if picture:
            print(f"wrote {picture}")
    return 0 if any(v.ok for v in report.variants) else 1
