"""sd2mnn convert ONNX_DIR MNN_DIR [EXTRA]"""
from __future__ import annotations

import argparse

from sd2mnn.cli._common import human_bytes, print_json, table, terminate_as_interrupt
from sd2mnn.conversion import ConversionReport, convert
from sd2mnn.layout import COMPONENTS, DEFAULT_COMPONENTS, parse_components
from sd2mnn.plan import ConvertOptions
from sd2mnn.progress import make_progress

EXAMPLES = """examples:
  sd2mnn convert onnx/ mnn/                              fp32, text_encoder + unet + vae_decoder
  sd2mnn convert onnx/ mnn/ --weight-quant-bits 8        8-bit weights (about 4x smaller)
  sd2mnn convert onnx/ mnn/ "--weightQuantBits=8 --transformerFuse"   raw MNNConvert flags
  sd2mnn convert onnx/ mnn/ --components unet,vae_encoder --jobs 1
  sd2mnn convert my-diffusers-model/ mnn/ --keep-onnx onnx/   export first (sd2mnn[export])
"""


def add_conversion_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose how components are converted (shared with sweep)."""
    group = parser.add_argument_group("conversion flags")
    group.add_argument("--weight-quant-bits", type=int, metavar="N", help="quantize weights to N bits (2-8)")
    group.add_argument("--weight-quant-block", type=int, metavar="N", help="quantization block size (with --weight-quant-bits)")
    group.add_argument("--weight-quant-asymmetric", action="store_true", help="asymmetric weight quantization")
    group.add_argument("--hqq", action="store_true", help="HQQ weight quantization (with --weight-quant-bits)")
    group.add_argument("--transformer-fuse", action="store_true", help="fuse attention (MNN documents it for OpenCL/Metal)")
    group.add_argument("--fp16", action="store_true", help="store float weights as fp16")
    group.add_argument("--tokenizer", choices=("diffusers", "mnn"), default="diffusers",
                       help="diffusers (default): tokenizer.mtok and a text encoder that make MNN's runtime feed "
                            "the ids diffusers would (CLIP end-of-word tokens, CLIP padding); mnn: MNN's own "
                            "tokenizer.mtok and text encoder, byte for byte")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an ONNX pipeline folder to an MNN bundle",
        description="Convert an SD ONNX pipeline folder (text_encoder/, unet/, vae_decoder/, tokenizer/) "
        "into an MNN bundle: <component>.mnn + .mnn.weight, tokenizer.mtok, manifest.json. "
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
        default=",".join(DEFAULT_COMPONENTS),
        help=f"comma-separated subset of {', '.join(COMPONENTS)} (default: %(default)s)",
    )
    add_conversion_flags(parser)
    run = parser.add_argument_group("how to run")
    run.add_argument("--converter", metavar="PATH", help="MNNConvert executable (default: $MNNCONVERT, PATH, then the MNN package)")
    run.add_argument("--jobs", "-j", type=int, metavar="N", help="components converted at once (default: from cores and free memory)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="kill a component's conversion after this long")
    run.add_argument("--force", action="store_true",
                     help="reconvert every component, even if up to date, and replace files in MNN_DIR that sd2mnn did not write")
    run.add_argument("--verify", action="store_true", help="verify the bundle against the ONNX models afterwards")
    source = parser.add_argument_group("when ONNX_DIR is a diffusers model (exported first; needs sd2mnn[export])")
    source.add_argument("--config", metavar="DIR", help="local diffusers folder with the configs, for a single-file checkpoint")
    source.add_argument("--keep-onnx", metavar="DIR", help="keep the exported ONNX folder here (default: a temporary folder)")
    out = parser.add_argument_group("output")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    out.add_argument("--json", action="store_true", help="print the run's report as JSON on stdout")
    parser.set_defaults(func=run_command)


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        components=parse_components(args.components),
        weight_quant_bits=args.weight_quant_bits,
        weight_quant_block=args.weight_quant_block,
        weight_quant_asymmetric=args.weight_quant_asymmetric,
        hqq=args.hqq,
        transformer_fuse=args.transformer_fuse,
        fp16=args.fp16,
        extra=args.extra,
        converter=args.converter,
        force=args.force,
        jobs=args.jobs,
        timeout=args.timeout,
        verify=args.verify,
        tokenizer=args.tokenizer,
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


def run_command(args: argparse.Namespace) -> int:
    terminate_as_interrupt()
    options = options_from_args(args)
    progress = make_progress(quiet=args.quiet)
    export_options = None
    if args.config:
        from sd2mnn.export import ExportOptions

        export_options = ExportOptions(config=args.config)
    report = convert(args.onnx_dir, args.mnn_dir, options, progress=progress,
                     export_options=export_options, keep_onnx=args.keep_onnx)
    if args.json:
        print_json(report.to_dict())
    elif not args.quiet:
        print_report(report)
        if report.verification is not None:
            from sd2mnn.cli.verify import print_verification

            print()
            print_verification(report.verification)
    if report.verification is not None and not report.verification.passed:
        return 1
    return 0
