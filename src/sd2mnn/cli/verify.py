"""sd2mnn verify ONNX_DIR MNN_DIR: compare a bundle with its ONNX pipeline and check the runtime contract."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sd2mnn.cli._common import add_overwrite_flag, print_json, table, terminate_as_interrupt
from sd2mnn.core.files import check_replaceable
from sd2mnn.core.layout import MANIFEST_NAME, component_choices
from sd2mnn.core.progress import make_progress
from sd2mnn.errors import InputError, VerificationError
from sd2mnn.verification import references
from sd2mnn.verification.conditioning import read_prompts
from sd2mnn.verification.verify import DEFAULT_THRESHOLDS, REPORT_FILES, VerificationReport, verify


def _defaults_text() -> str:
    lines = ["default thresholds (every output of the component must meet both):"]
    for kind, label in (("fp32", "fp32 bundles"), ("quantized", "quantized (--weightQuantBits, --fp16, --hqq)")):
        lines.append(f"  {label}:")
        for name, limits in DEFAULT_THRESHOLDS[kind].items():
            lines.append(f"    {name:<15} PSNR >= {limits.min_psnr:g} dB, cosine >= {limits.min_cosine:g}")
    return "\n".join(lines)


EPILOG = f"""metrics, per output, worst over the inputs: max and mean absolute error, cosine similarity,
PSNR in dB against the ONNX output's peak-to-peak range (max - min).

{_defaults_text()}

examples:
  sd2mnn verify onnx/ mnn/
  sd2mnn verify onnx/ mnn/ --components unet --min-psnr unet=40 --json
  sd2mnn verify onnx/ mnn/ --report out/        writes out/vae_decoder.png and out/verification.json
"""


def _threshold(text: str, low: float = -math.inf, high: float = math.inf) -> tuple[str, float]:
    """ "30" (every component) or "unet=30" -> (component or "*", value), a finite number in
    [low, high]."""
    name, equals, value = text.rpartition("=")
    if equals and name not in DEFAULT_THRESHOLDS["fp32"]:
        raise argparse.ArgumentTypeError(f"unknown component {name!r} before '='; choose from {component_choices()}, "
                                         "or give the number alone for every component")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or not low <= number <= high:
        bounds = "a finite number" if math.isinf(low) else f"a number from {low:g} to {high:g}"
        raise argparse.ArgumentTypeError(f"{value!r} is not {bounds}")
    return name or "*", number


def psnr_threshold(text: str) -> tuple[str, float]:
    return _threshold(text)


def cosine_threshold(text: str) -> tuple[str, float]:
    return _threshold(text, -1.0, 1.0)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="compare an MNN bundle with its ONNX pipeline and check it against MNN's runtime",
        description="Run each component on ONNX Runtime and on MNN with the same realistic inputs, compare every "
        "output, and check that the bundle has the files, tensor names, dtypes and shapes MNN's Stable "
        "Diffusion runtime loads. Exits 1 when a check fails, naming the component and the metric.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx_dir", metavar="ONNX_DIR", help="the ONNX pipeline folder the bundle was converted from")
    parser.add_argument("mnn_dir", metavar="MNN_DIR", help="the MNN bundle folder")
    parser.add_argument("--components", help="comma-separated subset (default: every component in both folders)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    limits = parser.add_argument_group("thresholds (repeatable; COMPONENT= limits it to one component)")
    limits.add_argument("--min-psnr", type=psnr_threshold, action="append", default=[], metavar="[COMPONENT=]DB",
                        help="lowest PSNR that passes")
    limits.add_argument("--min-cosine", type=cosine_threshold, action="append", default=[], metavar="[COMPONENT=]X",
                        help="lowest cosine similarity that passes")
    parser.add_argument("--fresh-references", action="store_true",
                        help="run ONNX Runtime even where sd2mnn export kept its outputs on these inputs in ONNX_DIR "
                        "(.sd2mnn-references: used only for the same files and inputs)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="prompts for the conditioning check, one per line (default: sd2mnn's built-in set of 660)")
    out = parser.add_argument_group("output")
    out.add_argument("--report", metavar="DIR", help="write vae_decoder.png (ONNX | MNN | error map) and verification.json here")
    out.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress, no table")
    out.add_argument("--threads", type=int, metavar="N", help="threads per runtime (default: up to 4)")
    add_overwrite_flag(out, "the --report folder's vae_decoder.png and verification.json")
    parser.set_defaults(func=run_command)


def thresholds_from_args(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    overrides: dict[str, dict[str, float]] = {}
    for key, pairs in (("min_psnr", args.min_psnr), ("min_cosine", args.min_cosine)):
        for name, value in pairs:
            overrides.setdefault(name, {})[key] = value
    return overrides


def _g(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def print_verification(report: VerificationReport) -> None:
    rows = []
    for c in report.components:
        limits = f">={c.thresholds.min_psnr:g} dB, >={c.thresholds.min_cosine:g}"
        kind = "quantized" if c.quantized else "fp32"
        if not c.outputs:
            rows.append([c.name, "-", kind, "-", "-", "-", "-", limits, "FAIL"])
        for o in c.outputs:
            verdict = "FAIL" if o.failures(c.thresholds) else "pass"
            rows.append([c.name, o.name, kind, _g(o.max_abs, ".2e"), _g(o.mean_abs, ".2e"), _g(o.cosine, ".7f"),
                         _g(o.psnr, ".1f"), limits, verdict])
    print(table(["component", "output", "weights", "max abs", "mean abs", "cosine", "PSNR dB", "pass if", "result"], rows))
    if report.contract:
        print("\nruntime contract (what MNN's Stable Diffusion runtime loads):")
        for issue in report.contract:
            print(f"  - {issue.message}")
    for note in report.notes:
        print(f"\nnote: {note}")
    errors = [c for c in report.components if c.error]
    for c in errors:
        print(f"\n{c.name}: {c.error}")
    stored = [c.name for c in report.components if c.references == references.STORED]
    if stored:
        print(f"\nONNX Runtime's outputs for {', '.join(stored)}: {references.STORED} for these files and inputs "
              "(--fresh-references runs it again)")
    for conditioning in report.conditionings:
        print(f"\n{conditioning.summary()}")
    files = "".join(f"\nwrote {p}" for p in report.report_files)
    if report.passed:
        print(f"\nPASS: {len(report.components)} component(s) match ONNX Runtime and meet the runtime contract"
              f" (seed {report.seed}, {report.wall_s:.1f}s){files}")
    else:
        print(f"\nFAIL: {len(report.failures)} problem(s) (seed {report.seed}, {report.wall_s:.1f}s){files}")


def failure_message(report: VerificationReport) -> str:
    failures = report.failures or ["no output was compared"]
    more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
    return "verification failed: " + "; ".join(failures[:3]) + more + _no_manifest_hint(report)


def _no_manifest_hint(report: VerificationReport) -> str:
    """Without manifest.json the weights' size decides fp32 or quantized; say so when an
    fp32-judged component fails on a metric, since a quantized bundle's weights can be big."""
    judged = [c for c in report.components if not c.quantized and c.precision_basis.startswith("no manifest")
              and any(o.failures(c.thresholds) for o in c.outputs)]
    if not judged:
        return ""
    loose = DEFAULT_THRESHOLDS["quantized"][judged[0].name]
    return (f" ({report.mnn_dir / MANIFEST_NAME} is missing, so {', '.join(c.name for c in judged)} got the fp32 "
            f"thresholds; if the bundle is quantized, pass --min-psnr {loose.min_psnr:g} --min-cosine {loose.min_cosine:g})")


def run_command(args: argparse.Namespace) -> int:
    terminate_as_interrupt()
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    prompts = read_prompts(Path(args.prompts)) if args.prompts else None
    for name in REPORT_FILES if args.report else ():
        check_replaceable(Path(args.report) / name, args.overwrite, "the verification report")
    progress = make_progress(quiet=args.quiet or args.json)
    report = verify(args.onnx_dir, args.mnn_dir, components=args.components, seed=args.seed,
                    thresholds=thresholds_from_args(args), report_dir=args.report, progress=progress, threads=args.threads,
                    prompts=prompts, fresh_references=args.fresh_references)
    progress.close()
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        print_json(report.to_dict())
    elif not args.quiet:
        print()
        print_verification(report)
    if not report.passed:
        raise VerificationError(failure_message(report))
    return 0
