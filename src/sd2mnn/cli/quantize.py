"""sd2mnn quantize ONNX_DIR MNN_DIR --min-psnr DB: bits per layer, the smallest bundle that meets a floor."""
from __future__ import annotations

import argparse

from sd2mnn.cli._common import human_bytes, print_json, table, terminate_as_interrupt
from sd2mnn.conversion.plan import ConvertOptions
from sd2mnn.core.layout import component_choices, split_components
from sd2mnn.core.progress import make_progress
from sd2mnn.errors import InputError
from sd2mnn.quantization.quantize import DEFAULT_ATTEMPTS, DEFAULT_CHOICES, DEFAULT_PROBE, QuantizeOptions, QuantizeReport
from sd2mnn.tokenization.diffusers_scheme import DEFAULT_SCHEME, SCHEMES

EPILOG = f"""how it chooses:
  1. each layer MNN quantizes (Conv, MatMul, Gemm) is measured on ONNX Runtime: the component's
     output PSNR with that layer alone at --probe bits, on sd2mnn verify's inputs, its weights
     exactly as MNN would store them (kept in MNN_DIR/.sd2mnn/measured: a rerun measures nothing)
  2. bits per layer from --choices: the fewest bytes whose predicted PSNR meets --min-psnr
  3. a trial conversion is verified; its PSNR corrects the prediction until a choice meets the
     floor within 0.5 dB (at most --attempts trials)
  4. the bundle is converted with MNN's compression file per component (kept beside each model
     as <component>.compression.json, its layers in manifest.json) and verified

choices: BITS (per output channel), BITSbBLOCK (a scale per BLOCK input channels), an "s" suffix
for symmetric, "float" to keep a layer float; default {','.join(DEFAULT_CHOICES)}.

examples:
  sd2mnn quantize onnx/ mnn/ --min-psnr 40
  sd2mnn quantize onnx/ mnn/ --min-psnr 35,text_encoder=45 --choices 8,6,4b64,3b32
  sd2mnn convert onnx/ other/ --compression-file unet=mnn/unet.compression.json   reuse a choice
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="choose bits per layer: the smallest bundle whose components meet a PSNR floor",
        description="Convert the ONNX pipeline into MNN_DIR with each layer's weight bits chosen by measured "
        "sensitivity, so that every component's worst output PSNR against ONNX Runtime (as sd2mnn verify "
        "reads it) meets --min-psnr with the fewest bytes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx_dir", metavar="ONNX_DIR", help="folder of a diffusers -> ONNX export")
    parser.add_argument("mnn_dir", metavar="MNN_DIR", help="bundle folder to create or update")
    parser.add_argument("--min-psnr", required=True, metavar="DB[,COMPONENT=DB...]",
                        help="the floor per component, in dB (e.g. 40, or 35,text_encoder=45)")
    parser.add_argument("--components", help=f"comma-separated subset ({component_choices()}) "
                                             "(default: the ones MNN's runtime loads)")
    parser.add_argument("--choices", default=",".join(DEFAULT_CHOICES), metavar="LIST",
                        help="the settings a layer may get (default: %(default)s)")
    parser.add_argument("--probe", default=DEFAULT_PROBE, metavar="BITS",
                        help="the setting each layer's sensitivity is measured at (default: %(default)s)")
    parser.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS, metavar="N",
                        help="trial conversions per component at most (default: %(default)s)")
    parser.add_argument("--sensitivity-cases", type=int, default=1, metavar="N",
                        help="verify's inputs fed to the sensitivity runs, first N (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="verify's inputs (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime and MNN threads (default: up to 4)")
    run = parser.add_argument_group("how to convert")
    run.add_argument("--converter", metavar="PATH", help="MNNConvert executable (default: $MNNCONVERT, PATH, then the MNN package)")
    run.add_argument("--jobs", "-j", type=int, metavar="N", help="components converted at once (default: from cores and free memory)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="kill a component's conversion after this long")
    run.add_argument("--tokenizer-scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
                     help="as sd2mnn convert's (default: %(default)s)")
    out = parser.add_argument_group("output")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    out.add_argument("--json", action="store_true", help="print the run's report as JSON on stdout")
    parser.set_defaults(func=run_command)


def parse_floors(text: str) -> float | dict[str, float]:
    """"40" -> 40.0; "35,text_encoder=45" -> {"*": 35.0, "text_encoder": 45.0}."""
    floors: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        name, equals, value = item.rpartition("=") if "=" in item else ("*", "", item)
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"--min-psnr {text!r}: {item!r} is not DB or COMPONENT=DB, e.g. 40 or unet=35") from None
        if name.strip() in floors:
            raise InputError(f"--min-psnr {text!r} gives {name.strip() if name.strip() != '*' else 'the default'} twice")
        floors[name.strip()] = number
    return floors["*"] if list(floors) == ["*"] else floors


def print_report(report: QuantizeReport) -> None:
    rows = []
    for choice in report.components:
        chosen = choice.chosen
        bits = ", ".join(f"{label}: {count}" for label, count in choice.histogram().items())
        rows.append([choice.name, f"{choice.min_psnr:g}", f"{chosen.psnr:.1f}", human_bytes(chosen.weight_bytes),
                     len(choice.trials), "reused" if choice.reused_measurements else f"{choice.sensitivity_s:.1f}s", bits])
    print(table(["component", "floor dB", "PSNR dB", "size", "trials", "measuring", "layers by bits"], rows))
    total = sum(f.size for f in report.conversion.files)
    verdict = "passed" if report.verification.passed else "FAILED: " + "; ".join(report.verification.failures[:3])
    print(f"\nwrote {report.mnn_dir} ({human_bytes(total)}) in {report.wall_s:.1f}s; verify {verdict}")


def run_command(args: argparse.Namespace) -> int:
    from sd2mnn.quantization.quantize import quantize

    terminate_as_interrupt()
    convert = ConvertOptions(components=split_components(args.components), converter=args.converter, jobs=args.jobs,
                             timeout=args.timeout, tokenizer_scheme=args.tokenizer_scheme)
    options = QuantizeOptions(min_psnr=parse_floors(args.min_psnr), choices=tuple(c for c in args.choices.split(",") if c.strip()),
                              probe=args.probe, attempts=args.attempts, sensitivity_cases=args.sensitivity_cases,
                              seed=args.seed, threads=args.threads, convert=convert)
    report = quantize(args.onnx_dir, args.mnn_dir, options, progress=make_progress(quiet=args.quiet))
    if args.json:
        print_json(report.to_dict())
    elif not args.quiet:
        print_report(report)
    return 0 if report.verification.passed else 1
