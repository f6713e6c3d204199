"""sd2mnn demo [DIR]: convert the tiny pipeline shipped with sd2mnn."""
from __future__ import annotations

from pathlib import Path

from sd2mnn.cli._common import add_overwrite_flag, terminate_as_interrupt
from sd2mnn.cli.convert import print_report
from sd2mnn.conversion.convert import convert
from sd2mnn.core.demo import demo_pipeline_dir
from sd2mnn.core.files import OVERWRITE_FLAG
from sd2mnn.core.layout import MANIFEST_NAME
from sd2mnn.core.manifest import read_manifest
from sd2mnn.core.progress import make_progress
from sd2mnn.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="convert the tiny demo pipeline shipped with sd2mnn",
        description="Convert the tiny SD-architecture ONNX pipeline that ships inside sd2mnn "
        "(random weights) into an MNN bundle, and print what was written.",
    )
    parser.add_argument("out_dir", metavar="DIR", nargs="?", default="sd2mnn-demo", help="bundle folder (default: %(default)s)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    add_overwrite_flag(parser, "what DIR holds (another bundle, other files)")
    parser.set_defaults(func=run)


def _check_replaces_nothing(out: Path, source: Path) -> None:
    """DIR may be new, empty, or an earlier demo bundle (then the run reuses it): anything else
    would be replaced, so it needs --overwrite."""
    if not out.is_dir():
        return  # new; or not a folder, which convert refuses
    entries = sorted(p.name for p in out.iterdir() if p.name != ".sd2mnn")
    if not entries:
        return
    manifest = read_manifest(out / MANIFEST_NAME) if (out / MANIFEST_NAME).is_file() else None
    if manifest is not None and Path(manifest.onnx_dir) == source.resolve():
        return
    what = f"a bundle converted from {manifest.onnx_dir}" if manifest else f"{len(entries)} entries ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})"
    raise InputError(f"{out} already holds {what}; the demo would replace it: choose another folder, or pass {OVERWRITE_FLAG}")


def run(args) -> int:
    terminate_as_interrupt()
    source = demo_pipeline_dir()
    if not args.out_dir.strip():  # Path("") is ".": an unset shell variable must not mean here
        raise InputError("DIR is an empty string; give a folder for the demo bundle")
    out = Path(args.out_dir)
    if not args.overwrite:
        _check_replaces_nothing(out, source)
    print(f"converting the demo pipeline {source}")
    report = convert(source, out, progress=make_progress(args.quiet), force=args.overwrite)
    print_report(report)
    print()
    for record in report.files:
        print(f"  {Path(args.out_dir) / record.path}  ({record.size} bytes)")
    return 0
