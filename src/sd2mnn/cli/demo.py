"""sd2mnn demo [DIR]: convert the tiny pipeline shipped with sd2mnn."""
from __future__ import annotations

from pathlib import Path

from sd2mnn.cli._common import terminate_as_interrupt
from sd2mnn.cli.convert import print_report
from sd2mnn.conversion import convert
from sd2mnn.demo import demo_pipeline_dir
from sd2mnn.progress import make_progress


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="convert the tiny demo pipeline shipped with sd2mnn",
        description="Convert the tiny SD-architecture ONNX pipeline that ships inside sd2mnn "
        "(random weights) into an MNN bundle, and print what was written.",
    )
    parser.add_argument("out_dir", metavar="DIR", nargs="?", default="sd2mnn-demo", help="bundle folder (default: %(default)s)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    parser.set_defaults(func=run)


def run(args) -> int:
    terminate_as_interrupt()
    source = demo_pipeline_dir()
    print(f"converting the demo pipeline {source}")
    report = convert(source, Path(args.out_dir), progress=make_progress(args.quiet))
    print_report(report)
    print()
    for record in report.files:
        print(f"  {Path(args.out_dir) / record.path}  ({record.size} bytes)")
    return 0
