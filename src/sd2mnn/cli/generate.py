"""sd2mnn generate BUNDLE PROMPT -o OUT.png   |   sd2mnn generate --onnx ONNX_DIR PROMPT -o OUT.png"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from sd2mnn.cli._common import add_overwrite_flag, native_stdout_to_stderr, print_json, terminate_as_interrupt
from sd2mnn.core.files import check_replaceable
from sd2mnn.core.images import check_png_path, check_video_folder, probe_folder, write_failure
from sd2mnn.errors import InputError
from sd2mnn.generation.noise import METHODS
from sd2mnn.schedulers import MAX_STEPS, MIN_STEPS
from sd2mnn.tokenization.diffusers_scheme import DEFAULT_SCHEME, SCHEMES

EXAMPLES = """examples:
  sd2mnn generate mnn/ "a photo of a cat" -o cat.png --seed 42
  sd2mnn generate mnn/ a photo of a cat -o cat.png              words are joined, as diffusion_demo does
  sd2mnn generate --onnx onnx/ "a photo of a cat" -o ref.png --seed 42
  sd2mnn compare cat.png ref.png

The defaults are those of MNN's C++ runtime (diffusion_demo <bundle> 0 <memory_mode> 0 <steps> <seed>
out.png <prompt>; for an SD3.5 bundle diffusion_sd35_demo <bundle> <memory_mode> 0 <steps> <seed> out.png
<prompt>; for a Wan bundle wan_diffusion_demo <bundle> <memory_mode> 0 <steps> <seed> <width> <height>
<frames> 5.0 <out folder> <prompt>, its size the bundle's): the image is the one it draws, given the same
MNN version, CPU backend, thread count and noise build (--noise mnn: a Linux/GCC build; mnn-libc++:
Android, iOS, macOS). These depart from it on purpose
and say so in a note and in the PNG's metadata: --negative-prompt (MNN always uses ""), --guidance other
than the runtime's (7.5; SD3.5, Wan: 5.0), --noise numpy/torch, --latents, --tokenizer hf, --schedule
diffusers. Steps outside 1..50 are refused: MNN would silently use 50 for more and 10 for fewer than 1
(its SD3.5 runtime runs any count; sd2mnn keeps to 1..50 there too).
The image size, and a video's frame count, are the models' (fixed at export; MNN's SD3.5 runtime draws
1024x1024 only): --height, --width and --frames only check them. An SD3.5 bundle without text_encoder_3
(T5) is conditioned on zeros in its place, as MNN's runtime does. A Wan bundle draws a video: -o names a
folder, which gets frame_0000.png... (as wan_diffusion_demo writes them) and video.webp.

  sd2mnn generate sd35/ "a photo of a cat" -o cat.png --seed 42 --steps 28
  sd2mnn generate --onnx sd35-onnx/ "a photo of a cat" -o diffusers.png --tokenizer hf --schedule diffusers
  sd2mnn generate wan/ "a cat walking in the snow" -o clip --steps 20 --frames 9
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="text to image from an MNN bundle (or its ONNX pipeline) as MNN's C++ runtime does it",
        usage="sd2mnn generate [options] BUNDLE PROMPT -o OUT.png\n"
        "       sd2mnn generate [options] --onnx ONNX_DIR PROMPT -o OUT.png",
        description="Draw an image from a prompt with an MNN bundle, following MNN's C++ SD runtime step\n"
        "for step (tokenizer, std::mt19937 noise, PLMS, guidance 7.5, rounding, PNG file; SD3.5: its three\n"
        "text encoders, flow-match Euler with truncated timesteps, guidance 5.0). With --onnx, run the\n"
        "ONNX pipeline on ONNX Runtime with the same recipe, to compare the two.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("words", nargs="+", metavar="BUNDLE PROMPT",
                        help="the bundle folder (left out with --onnx), then the prompt")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.png", help="PNG file to write")
    parser.add_argument("--onnx", metavar="ONNX_DIR", help="run this ONNX pipeline folder on ONNX Runtime instead")
    draw = parser.add_argument_group("what to draw")
    draw.add_argument("--steps", type=int, default=20, help=f"denoising steps, {MIN_STEPS}..{MAX_STEPS} (default: %(default)s)")
    draw.add_argument("--seed", type=int, default=0, help="noise seed, >= 0 (default: %(default)s)")
    draw.add_argument("--noise", choices=METHODS, default="mnn",
                      help="how the seed becomes noise: mnn = MNN's runtime built with libstdc++ (Linux), "
                      "mnn-libc++ = built with libc++ (Android/iOS/macOS), numpy, torch (default: %(default)s)")
    draw.add_argument("--latents", metavar="FILE", help="start from these latents (.npy, or a .txt of numbers in NCHW "
                      "order like MNN_DUMP_DATA's random.txt) instead of drawing noise")
    draw.add_argument("--save-latents", metavar="FILE.npy", help="also save the initial latents used")
    draw.add_argument("--guidance", type=float, default=None, help="guidance scale (default: MNN's runtime's, 7.5; "
                      "SD3.5: 5.0; others no longer match MNN's runtime)")
    draw.add_argument("--tokenizer", choices=("runtime", "hf"), default="runtime",
                      help="whose token ids condition the image: runtime (default): the ids MNN's runtime feeds, "
                           "from the bundle's tokenizer.mtok; hf: Hugging Face's, as diffusers would (not the "
                           "bundle's tokenizer scheme: that is --tokenizer-scheme)")
    draw.add_argument("--tokenizer-scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
                      help="with --onnx: imitate a bundle converted with sd2mnn convert --tokenizer-scheme SCHEME "
                           "(default: %(default)s)")
    draw.add_argument("--schedule", choices=("runtime", "diffusers"), default="runtime",
                      help="SD3.5 and Wan: whose scheduler: runtime (default): MNN's (SD3.5: timesteps truncated to "
                           "integers; Wan: flow-match Euler); diffusers: diffusers' pipeline's (SD3.5: "
                           "FlowMatchEulerDiscreteScheduler; Wan: UniPCMultistepScheduler, flow shift 3). With "
                           "--tokenizer hf: diffusers' recipe")
    draw.add_argument("--height", type=int, metavar="PIXELS",
                      help="the image height expected (default: the models'; they are fixed at export, so another "
                           "value is refused)")
    draw.add_argument("--width", type=int, metavar="PIXELS", help="the image width expected (as --height)")
    draw.add_argument("--frames", type=int, metavar="N",
                      help="a video's frame count expected (as --height; wan_diffusion_demo must be given the "
                           "bundle's size, which it does not check)")
    draw.add_argument("--negative-prompt", default="", metavar="TEXT",
                      help='unconditional prompt (default: "", MNN\'s; others no longer match MNN\'s runtime)')
    run = parser.add_argument_group("how to run")
    run.add_argument("--threads", type=int, default=4, help="CPU threads (default: %(default)s, MNN's; MNN "
                     "picks kernels by thread count, so pixels can move with it)")
    run.add_argument("--precision", choices=("high", "low"), default="low", help="MNN precision (default: %(default)s, MNN's)")
    run.add_argument("--backend", default="CPU", help="MNN backend: CPU, OPENCL, VULKAN, METAL... (default: %(default)s)")
    run.add_argument("--memory-mode", type=int, choices=(0, 1, 2), default=1,
                     help="diffusion_demo's memory_mode: its Winograd setting (0 off, 1 default, 2 level 1). Measured on "
                          "an SD1.5 unet on CPU: 0 loads 5x faster in half the memory but steps 1.3x slower; 2 "
                          "halves mode 1's load time and memory for steps within 5%% (default: %(default)s). SD3.5 "
                          "(diffusion_sd35_demo's): no Winograd level; each model is loaded just before its first "
                          "use, and 0 and 2 free it once used (one model held at a time: an SD3 of the C++'s shapes "
                          "peaks at 0.61x mode 1's memory), 1 keeps it; the pixels are the same in every mode. "
                          "Wan (wan_diffusion_demo's): SD1.5's Winograd setting, and 0 and 2 free each model "
                          "once used")
    run.add_argument("--cache-file", metavar="PATH", help="MNN cache file for GPU backends' tuned kernels")
    out = parser.add_argument_group("output")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    out.add_argument("--json", action="store_true", help="print timings and metadata as JSON on stdout")
    add_overwrite_flag(out, "an existing OUT.png or --save-latents file")
    parser.set_defaults(func=run_command)


class StepProgress:
    """Per-step times on stderr: one redrawn line on a terminal, a line per step otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.live = stream.isatty()
        self.step_times: list[float] = []

    def __call__(self, event) -> None:
        if not event.denoising:
            self._line(f"{event.stage}: {event.seconds:.2f}s")
            return
        self.step_times.append(event.seconds)
        done, total = event.index + 1, event.total
        steady = self.step_times[1:] or self.step_times
        eta = (total - done) * sorted(steady)[len(steady) // 2]
        bar = "#" * (20 * done // total) + "." * (20 - 20 * done // total)
        text = f"{event.stage} step {done:>2}/{total} [{bar}] {event.seconds:.2f}s  eta {eta:.0f}s"
        if self.live:
            self.stream.write(f"\r\x1b[2K{text}" + ("\n" if done == total else ""))
            self.stream.flush()
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def abort(self) -> None:
        if self.live and self.step_times:
            self.stream.write("\n")


def split_words(args: argparse.Namespace) -> tuple[Path, str]:
    words = list(args.words)
    if args.onnx is None:
        if len(words) < 2:
            raise InputError("give the bundle folder and the prompt: sd2mnn generate BUNDLE \"a prompt\" -o out.png")
        source = Path(words.pop(0))
    else:
        source = Path(args.onnx)
    return source, " ".join(words)  # diffusion_demo joins argv[8:] with spaces


def run_command(args: argparse.Namespace) -> int:
    terminate_as_interrupt()
    source, prompt = split_words(args)
    video = _draws_video(source)
    output = check_video_folder(args.output) if video else check_png_path(args.output)
    check_replaceable(output, args.overwrite, "the video" if video else "the image")
    if args.save_latents:
        check_npy_path(args.save_latents)
        check_replaceable(args.save_latents, args.overwrite, "the latents")
    if args.cache_file:
        check_file_beside(Path(args.cache_file), "--cache-file")
    progress = None if args.quiet else StepProgress(sys.stderr)
    with native_stdout_to_stderr(discard=args.quiet):
        pipeline, generation = _generate(args, source, prompt, output, progress)
    for line in generation.off_contract:  # shown even with --quiet: the bundle cannot ship as it is
        print(f"warning: {line}", file=sys.stderr)
    if not args.quiet:
        for note in generation.notes:
            print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json({"output": str(output), "metadata": generation.metadata,
                    "timings": generation.timings.to_dict(), "notes": generation.notes})
    elif not args.quiet:
        t = generation.timings
        height, width = generation.pixels.shape[-3:-1]
        frames = f", {len(generation.pixels)} frames" if generation.is_video else ""
        print(f"wrote {output} ({width}x{height}{frames}) with {pipeline.runtime} "
              f"in {t.total_s:.1f}s (+{t.load_s:.1f}s load): text encoder {t.text_encoder_s:.2f}s, "
              f"{len(t.step_s)} steps (first {t.first_step_s:.2f}s, then {t.steady_step_s:.2f}s/step), "
              f"VAE decoder {t.vae_decoder_s:.2f}s")
    return 0


def _draws_video(source: Path) -> bool:
    """Whether ``source`` holds a video family's models (its output is then a folder); what is
    wrong with a source that says nothing is told when the pipeline loads."""
    from sd2mnn import families

    try:
        return bool(families.detect(source).recipe.frames)
    except InputError:
        return False


def _generate(args: argparse.Namespace, source: Path, prompt: str, output: Path, progress: StepProgress | None):
    from sd2mnn import families
    from sd2mnn.generation.pipeline import (GenerationParams, Pipeline, check_image_size, check_source,
                                            declared_image_size, load_latents, mnn_runtime_config)

    runtime = "mnn" if args.onnx is None else "onnxruntime"
    check_source(source, runtime)
    family = families.detect(source)
    # A .txt holds bare numbers: its shape is the models', known once they are loaded.
    text_latents = bool(args.latents) and Path(args.latents).suffix.lower() == ".txt"
    latents = load_latents(args.latents) if args.latents and not text_latents else None
    params = GenerationParams(prompt, args.negative_prompt, args.steps, args.seed, args.guidance, args.noise,
                              latents, args.latents, args.tokenizer, args.schedule, args.height, args.width,
                              args.frames)
    params.validate(family)  # before minutes of loading
    if text_latents and not Path(args.latents).is_file():
        load_latents(args.latents)  # its one-line error
    if args.height or args.width or args.frames:  # before minutes of loading
        size = declared_image_size(source, runtime, family)
        if size is not None:
            decoder = family.components["vae_decoder"]
            check_image_size(params, size, source / (decoder.mnn_name if args.onnx is None else "vae_decoder/model.onnx"),
                             family)
    if args.onnx is None:
        config = mnn_runtime_config(args.backend, args.threads, args.precision, args.memory_mode, args.cache_file,
                                    family=family)
        pipeline = Pipeline(source, "mnn", config, memory_mode=args.memory_mode)
    else:
        pipeline = Pipeline.from_onnx(source, threads=args.threads, tokenizer_scheme=args.tokenizer_scheme)
    pipeline.check_size(params)
    if text_latents:
        params = dataclasses.replace(params, latents=load_latents(args.latents, pipeline.latent_shape))
    if args.save_latents:
        save_npy(Path(args.save_latents), params.initial_latents(pipeline.latent_shape))
    try:
        generation = pipeline.run(params, progress)
    except KeyboardInterrupt:
        if progress:
            progress.abort()
        raise  # nothing written: the PNG only appears once the image is complete
    generation.save(output)
    return pipeline, generation


def save_npy(target: Path, array: np.ndarray) -> None:
    """np.save through a temporary file beside ``target``: a full disk leaves no partial file."""
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, target)
    except OSError as err:
        raise write_failure(target, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def check_npy_path(path: str) -> None:
    target = Path(path)
    if target.suffix != ".npy":
        raise InputError(f"{target} does not end in .npy; --save-latents writes a numpy file")
    check_file_beside(target, "--save-latents")


def check_file_beside(target: Path, flag: str) -> None:
    """A file to write: not a folder, in a folder that exists."""
    if target.is_dir():
        raise InputError(f"{flag} {target} is a folder; give a file name")
    if target.parent.exists() and not target.parent.is_dir():
        raise InputError(f"{flag} {target}: {target.parent} is a file, not a folder; give a path inside a folder")
    if not target.parent.is_dir():
        raise InputError(f"{flag} {target}: {target.parent} does not exist; create it first")
    probe_folder(target.parent, target)
