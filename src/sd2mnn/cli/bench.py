"""sd2mnn bench BUNDLE [--onnx ONNX_DIR]: load time, latency, memory and size per component."""
from __future__ import annotations

import argparse
import sys

from sd2mnn.cli._checks import check_at_least, check_folder, check_positive, check_seed
from sd2mnn.cli._common import human_bytes, print_json, table, terminate_as_interrupt
from sd2mnn.core.progress import make_progress
from sd2mnn.core.runtime import PRECISIONS
from sd2mnn.measurement.bench import BenchReport, Timing, bench

EPILOG = """measures, per component and runtime, each in its own child process:
  load      building the MNN module / ONNX Runtime session (the library import not counted)
  first     the first run after loading;  steady: median (and min-max) of the next --runs runs
  peak      the child's peak RSS;  model: peak minus the child's peak before loading the model
  size      the model's files on disk
with --onnx, a "MNN/ORT" row per component divides MNN's numbers by ONNX Runtime's (<1: MNN wins).

examples:
  sd2mnn bench mnn/
  sd2mnn bench mnn/ --onnx onnx/ --threads 4 --precision low --runs 10 --json
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time and measure each component on MNN (and on ONNX Runtime with --onnx)",
        description="Benchmark an MNN bundle per component: load time, first and steady run latency, peak memory "
        "and file size; with --onnx, the same for ONNX Runtime on the same input, and the ratio MNN/ORT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", metavar="BUNDLE", help="the MNN bundle folder")
    parser.add_argument("--onnx", metavar="ONNX_DIR", help="also benchmark ONNX Runtime on this ONNX pipeline folder")
    parser.add_argument("--components", help="comma-separated subset (default: every component in the bundle)")
    parser.add_argument("--threads", type=int, default=2, metavar="N", help="threads per runtime (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="high", help="MNN's precision (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, metavar="N", help="steady runs after the first (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="stop a runtime on a component after this long")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress")
    parser.set_defaults(func=run_command)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _row(name: str, t: Timing) -> list[str]:
    if t.error:
        return [name, t.runtime, human_bytes(t.file_bytes), "-", "-", "-", "-", "-", "-"]
    spread = f"{_ms(min(t.steady_s))}-{_ms(max(t.steady_s))}"
    return [name, t.runtime, human_bytes(t.file_bytes), _ms(t.load_s), _ms(t.first_s), _ms(t.median_s), spread,
            human_bytes(t.peak_rss_bytes), human_bytes(t.model_rss_bytes)]


def bench_table(report: BenchReport) -> str:
    rows = []
    for c in report.components:
        rows += [_row(c.name, t) for t in c.timings.values()]
        ratios = c.ratios()
        if ratios:
            r = ratios
            rows.append([c.name, "MNN/ORT", _x(r["file"]), _x(r["load"]), _x(r["first"]), _x(r["steady"]), "",
                         _x(r["peak_rss"]), _x(r["model_rss"])])
    headers = ["component", "runtime", "size", "load ms", "first ms", "steady ms", "min-max ms", "peak", "model"]
    return table(headers, rows)


def print_bench(report: BenchReport) -> None:
    print(bench_table(report))
    print(f"\n{report.runs} steady runs after the first, {report.threads} threads, MNN precision {report.precision}; "
          f"memory: {report.memory_method}")
    for line in report.errors:
        print(f"failed: {line}")


def run_command(args: argparse.Namespace) -> int:
    terminate_as_interrupt()
    check_folder(args.bundle, "MNN bundle")
    if args.onnx is not None:
        check_folder(args.onnx, "ONNX pipeline", "--onnx")
    check_seed(args.seed)
    check_at_least(args.threads, 1, "--threads")
    check_at_least(args.runs, 1, "--runs")
    check_positive(args.timeout, "--timeout")
    progress = make_progress(quiet=args.quiet or args.json)
    report = bench(args.bundle, args.onnx, components=args.components, threads=args.threads,
                   precision=args.precision, runs=args.runs, seed=args.seed, timeout=args.timeout, progress=progress)
    progress.close()
    for line in report.off_contract + report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        print_json(report.to_dict())
    else:
        print()
        print_bench(report)
    return 1 if report.errors else 0
