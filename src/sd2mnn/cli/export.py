"""``sd2mnn export MODEL ONNX_DIR``: a diffusers pipeline (or single-file checkpoint) -> ONNX."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd2mnn import families
from sd2mnn.cli._common import add_overwrite_flag, add_source_change_flags, loras_from_args, terminate_as_interrupt
from sd2mnn.core.layout import component_choices
from sd2mnn.exporting.export import KNOWN_COMPONENTS, ExportOptions, export

EPILOG = """\
MODEL is a local diffusers folder (model_index.json) or a .safetensors/.ckpt checkpoint in the
original layout (CompVis's SD1.x files, Stability's SD3 files); nothing is downloaded. A single
file needs --config: a local diffusers folder of the same model with its configs, tokenizers and
scheduler (model_index.json, */config.json, tokenizer*/, scheduler/); weights there are needed
only for models the file lacks (Taiyi's BERT; the text encoders of sd3.5_medium.safetensors).
Models are read from the file one at a time, as diffusers' from_single_file converts them. The
size defaults to the model's own; MNN's runtime runs 64x64 latents only (512x512 for SD1.5).

An SD3 folder or file (StableDiffusion3Pipeline: SD3.5 Medium) exports text_encoder,
text_encoder_2, text_encoder_3, transformer and vae_decoder with tokenizer/, tokenizer_2/,
tokenizer_3/ (MNN's SD3.5 layout; the CLIPs' penultimate layer as last_hidden_state, as diffusers
conditions). --components without text_encoder_3 leaves T5 out: MNN's runtime then conditions on
zeros; so does a single file without T5 whose --config folder has no T5 weights (said on the way).
--lora FILE[:SCALE] fuses a LoRA (.safetensors only) into the weights it targets with diffusers'
own loaders; --vae DIR exports a diffusers AutoencoderKL or AutoencoderTiny (TAESD) folder in place
of the pipeline's VAE. Each is checked against the pipeline before anything is written.
Needs the export extra: pip install 'sd2mnn[export]'.
"""


def _components(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in KNOWN_COMPONENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown component(s) {', '.join(unknown) or '(none)'}; choose from {','.join(KNOWN_COMPONENTS)}"
        )
    return names


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a diffusers Stable Diffusion pipeline to the ONNX folder MNN expects",
        description="Export a diffusers SD1.5/Taiyi/SD3.5/Wan2.1 pipeline to ONNX (static shapes, MNN's "
        "tensor names), checking each part against PyTorch; optionally with LoRAs fused and another VAE.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, metavar="MODEL")
    parser.add_argument("onnx_dir", type=Path, metavar="ONNX_DIR")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--components", type=_components, default=None,
                        help=f"comma-separated subset of the model family's components: {component_choices()} "
                        "(default: all of the model's)")
    parser.add_argument("--height", type=int, default=None,
                        help="image height (default: the model's, unet sample_size x VAE factor; 512 for SD1.5)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's, as --height)")
    parser.add_argument("--frames", type=int, default=None,
                        help="video frames, 4n + 1 (a video model only; default: its runtime's, 9 for Wan2.1)")
    parser.add_argument("--config", type=Path, default=None, metavar="DIR",
                        help="local diffusers config folder for a single-file checkpoint")
    add_source_change_flags(parser)
    add_overwrite_flag(parser, "ONNX_DIR if it exists and is not empty")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    terminate_as_interrupt()  # SIGTERM removes the staging folder as Ctrl-C does
    options = ExportOptions(
        opset=args.opset, components=tuple(args.components) if args.components else None, height=args.height,
        width=args.width, frames=args.frames, config=args.config, overwrite=args.overwrite,
        loras=loras_from_args(args), vae=args.vae,
    )

    def progress(component: str, message: str) -> None:
        print(f"[export] {component}: {message}", file=sys.stderr, flush=True)

    report = export(args.model, args.onnx_dir, options, progress=progress)
    # SD3.5 feeds 77 tokens to its CLIPs and 256 to T5.
    lengths = "+".join(str(f.max_length) for f in dict.fromkeys(families.by_name(report.kind).prompt_formats.values()))
    size = f"{report.width}x{report.height}" + (f", {report.frames} frames" if report.frames else "")
    print(f"exported {report.kind} ({lengths} tokens, {size}, opset {report.opset}) "
          f"to {report.onnx_dir}")
    for record in report.loras:
        print(f"  merged LoRA {record.file} (sha256 {record.sha256[:12]}) at scale {record.scale:g} into "
              f"{', '.join(record.components) or 'no exported part'}")
    if report.vae:
        print(f"  VAE: {report.vae['class']} from {report.vae['folder']}")
    for comp in report.components:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in comp.max_abs_error.items())
        print(f"  {comp.name:14} {comp.size_bytes / 1e6:8.1f} MB  max abs error vs PyTorch: {errs}")
    return 0
