"""sd2mnn convert ONNX_DIR MNN_DIR [EXTRA]"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

from sd2mnn.cli._checks import check_output_folder
from sd2mnn.cli._common import (add_overwrite_flag, add_source_change_flags, human_bytes, loras_from_args, print_json, table,
                               terminate_as_interrupt)
from sd2mnn.conversion.convert import ConversionReport, check_before_export, convert
from sd2mnn.conversion.converter_flags import CONVERTER_FLAGS
from sd2mnn.conversion.plan import ConvertOptions
from sd2mnn.core.files import check_replaceable, is_inside
from sd2mnn.core.layout import component_choices, split_components
from sd2mnn.core.progress import make_progress
from sd2mnn.errors import InputError, os_errors_as_one_line
from sd2mnn.tokenization.diffusers_scheme import DEFAULT_SCHEME, SCHEMES

EXAMPLES = """examples:
  sd2mnn convert onnx/ mnn/                              fp32, every component the runtime loads
  sd2mnn convert sd35-onnx/ mnn/ --components text_encoder,text_encoder_2,transformer,vae_decoder
                                                         SD3.5 without T5 (the runtime feeds zeros)
  sd2mnn convert onnx/ mnn/ --weight-quant-bits 8        8-bit weights (about 4x smaller)
  sd2mnn convert onnx/ mnn/ "--weightQuantBits=8 --transformerFuse"   raw MNNConvert flags
  sd2mnn convert onnx/ mnn/ --components unet,vae_encoder --jobs 1
  sd2mnn convert onnx/ mnn/ --compression-file unet=unet.compression.json   bits per layer
  sd2mnn convert my-diffusers-model/ mnn/ --keep-onnx onnx/   export first (sd2mnn[export])
"""


def add_conversion_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose how components are converted (shared with sweep)."""
    group = parser.add_argument_group("conversion flags")
    for flag in CONVERTER_FLAGS:
        if flag.kind is int:
            group.add_argument(flag.cli, dest=flag.field, type=int, metavar=flag.metavar, help=flag.help)
        else:
            group.add_argument(flag.cli, dest=flag.field, action="store_true", help=flag.help)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an ONNX pipeline folder to an MNN bundle",
        description="Convert an SD ONNX pipeline folder (text_encoder/, unet/, vae_decoder/, tokenizer/; SD3.5: "
        "text_encoder/, text_encoder_2/, text_encoder_3/, transformer/, vae_decoder/, tokenizer/, tokenizer_2/, "
        "tokenizer_3/) into an MNN bundle: <component>.mnn + .mnn.weight, tokenizer.mtok (SD3.5: one in each "
        "tokenizer folder), manifest.json. "
        "Components whose sources, flags and converter are unchanged are reused.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx_dir", metavar="ONNX_DIR",
                        help="folder of a diffusers -> ONNX export; a diffusers folder or .safetensors/.ckpt is exported first")
    parser.add_argument("mnn_dir", metavar="MNN_DIR", help="bundle folder to create or update")
    parser.add_argument("extra", metavar="EXTRA", nargs="?", default="", help="raw MNNConvert flags, passed through verbatim")
    parser.add_argument(
        "--components",
        help=f"comma-separated subset of the pipeline's components ({component_choices()}) "
             "(default: the ones MNN's runtime loads)",
    )
    add_conversion_flags(parser)
    parser.add_argument("--compression-file", action="append", metavar="COMPONENT=FILE", default=[],
                        help="bits per layer for one component: an MNN compression file (.json, as MNNConvert's "
                             "--compressionParamsFile or sd2mnn quantize write it); layers it leaves out take the "
                             "flags; repeat for several components")
    parser.add_argument("--tokenizer-scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
                        help="diffusers (default): tokenizer.mtok and a text encoder that make MNN's runtime feed "
                             "the ids diffusers would (CLIP end-of-word tokens, CLIP padding); mnn: MNN's own "
                             "tokenizer.mtok and text encoder, byte for byte")
    # Its former spelling, so that existing commands keep working.
    parser.add_argument("--tokenizer", dest="tokenizer_scheme", choices=SCHEMES,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run = parser.add_argument_group("how to run")
    run.add_argument("--converter", metavar="PATH", help="MNNConvert executable (default: $MNNCONVERT, PATH, then the MNN package)")
    run.add_argument("--jobs", "-j", type=int, metavar="N", help="components converted at once (default: from cores and free memory)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="kill a component's conversion after this long")
    add_overwrite_flag(run, "files in MNN_DIR that sd2mnn did not write and a non-empty --keep-onnx folder, "
                            "reconverting every component even if up to date")
    run.add_argument("--verify", action="store_true", help="verify the bundle against the ONNX models afterwards")
    source = parser.add_argument_group("when ONNX_DIR is a diffusers model (exported first; needs sd2mnn[export])")
    source.add_argument("--config", metavar="DIR", help="local diffusers folder with the configs, for a single-file checkpoint")
    add_source_change_flags(source)
    source.add_argument("--keep-onnx", metavar="DIR", help="keep the exported ONNX folder here (default: a temporary "
                        "folder); a folder of its own: not MNN_DIR, nor in or around it or the model")
    out = parser.add_argument_group("output")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    out.add_argument("--json", action="store_true", help="print the run's report as JSON on stdout")
    parser.set_defaults(func=run_command)


def compression_files(given: list[str]) -> dict[str, Path]:
    """--compression-file COMPONENT=FILE, each component once."""
    files: dict[str, Path] = {}
    for item in given:
        name, equals, path = item.partition("=")
        if not equals or not name.strip() or not path.strip():
            raise InputError(f"--compression-file {item!r}: give COMPONENT=FILE, e.g. unet=unet.compression.json")
        if name.strip() in files:
            raise InputError(f"--compression-file names {name.strip()} twice; give one file per component")
        files[name.strip()] = Path(path.strip())
    return files


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        compression=compression_files(args.compression_file) or None,
        components=split_components(args.components),
        **{flag.field: getattr(args, flag.field) for flag in CONVERTER_FLAGS},
        extra=args.extra,
        converter=args.converter,
        force=args.overwrite,
        jobs=args.jobs,
        timeout=args.timeout,
        tokenizer_scheme=args.tokenizer_scheme,
    )


def print_report(report: ConversionReport) -> None:
    rows = []
    for c in report.components:
        size = sum(f.size for f in c.record.outputs)
        rows.append([c.name, c.status, c.reason if c.status == "converted" else "",
                     f"{c.record.wall_s:.1f}s", human_bytes(c.record.peak_rss_bytes), human_bytes(size)])
    print(table(["component", "status", "why", "convert time", "peak memory", "size"], rows))
    total = sum(f.size for f in report.files)
    print(f"\nwrote {report.mnn_dir} ({len(report.files)} files, {human_bytes(total)}) in {report.wall_s:.1f}s"
          f" with {report.converter['kind']} MNNConvert {report.converter['version']}"
          f"{' and flags ' + ' '.join(report.flags) if report.flags else ''}")


@contextlib.contextmanager
def onnx_source(args: argparse.Namespace, options: ConvertOptions, progress) -> Iterator[str | Path]:
    """ONNX_DIR itself (as given: convert judges it), or, for a diffusers model, its export:
    into --keep-onnx, else into a temporary folder beside MNN_DIR that is gone afterwards."""
    from sd2mnn.exporting.export import ExportOptions, export, is_diffusers_model

    if not str(args.onnx_dir).strip() or not is_diffusers_model(args.onnx_dir):
        if args.lora or args.vae:
            flag = "--lora" if args.lora else "--vae"
            raise InputError(f"{flag}: {args.onnx_dir} is already exported; LoRAs and VAEs change the pipeline at "
                             f"export: give the diffusers model (or sd2mnn export MODEL ONNX_DIR {flag} ...)")
        yield args.onnx_dir
        return
    # Not after minutes of exporting: every output is checked first.
    keep = check_keep_onnx(args)
    check_output_folder(args.mnn_dir, "MNN_DIR")
    check_before_export(Path(args.mnn_dir), options)
    # Only what the conversion takes: the family's defaults unless --components says.
    chosen = {"components": options.components} if options.components is not None else {"default_components_only": True}
    export_options = ExportOptions(config=Path(args.config) if args.config else None, overwrite=args.overwrite,
                                   loras=loras_from_args(args), vae=Path(args.vae) if args.vae else None, **chosen)
    scratch_parent = Path(args.mnn_dir).absolute().parent
    with os_errors_as_one_line(Path(args.mnn_dir), "nothing was written"):
        scratch_parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix=".sd2mnn-export-", dir=scratch_parent)
    with scratch as tmp:
        onnx_dir = keep or Path(tmp) / "onnx"
        export(args.onnx_dir, onnx_dir, export_options,
               progress=lambda name, message: progress.update(name, "exporting", message))
        yield onnx_dir


def check_keep_onnx(args: argparse.Namespace) -> Path | None:
    """--keep-onnx DIR, checked before the export: never MNN_DIR, a folder in or around it, or one
    overlapping the model the export reads (--overwrite or not); a non-empty one only with
    --overwrite."""
    if args.keep_onnx is None:
        return None
    if not args.keep_onnx.strip():  # Path("") is ".": an unset shell variable must not mean here
        raise InputError("--keep-onnx is an empty string; give a folder for the exported ONNX pipeline")
    keep = check_output_folder(args.keep_onnx, "--keep-onnx")
    _refuse_overlap(keep, Path(args.mnn_dir), "MNN_DIR", "the bundle")
    for source, name in ((args.onnx_dir, "the model"), (args.config, "the --config folder")):
        if source:
            _refuse_overlap(keep, Path(source), name, "what the export reads")
    check_replaceable(keep, args.overwrite, "the exported ONNX pipeline")
    return keep


def _refuse_overlap(keep: Path, other: Path, name: str, what: str) -> None:
    """Refuse --keep-onnx ``keep`` when it is ``other``, lies inside it or holds it."""
    target, against = keep.resolve(), other.resolve()
    relation = ("is" if target == against else "lies inside" if is_inside(target, against)
                else "holds" if is_inside(against, target) else None)
    if relation:
        raise InputError(f"--keep-onnx {keep} {relation} {name} {other}; the exported ONNX pipeline needs a folder "
                         f"apart from {what}: choose another --keep-onnx folder")


def run_command(args: argparse.Namespace) -> int:
    """export (a diffusers model) -> convert -> verify (--verify), each its own engine."""
    terminate_as_interrupt()
    options = options_from_args(args)
    progress = make_progress(quiet=args.quiet)
    verification = None
    with onnx_source(args, options, progress) as onnx_dir:
        report = convert(onnx_dir, args.mnn_dir, options, progress=progress)
        if args.verify:
            from sd2mnn.verification.verify import verify_after_convert

            verification = verify_after_convert(onnx_dir, report.mnn_dir, [c.name for c in report.components], progress)
    if args.json:
        print_json({**report.to_dict(), "verification": verification.to_dict() if verification else None})
    elif not args.quiet:
        print_report(report)
        if verification is not None:
            from sd2mnn.cli.verify import print_verification

            print()
            print_verification(verification)
    return 1 if verification is not None and not verification.passed else 0
