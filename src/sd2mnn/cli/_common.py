"""Helpers shared by the command modules: output formatting, signals, native output."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Iterable, Sequence


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells):
        out = []
        for i, cell in enumerate(cells):
            numeric = cell.replace(".", "", 1).replace("-", "", 1).replace("x", "").strip().isdigit()
            out.append(cell.rjust(widths[i]) if numeric else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C; the exit status is the shell's for it (128 + 15)."""

    exit_code = 128 + signal.SIGTERM


def terminate_as_interrupt() -> None:
    """Make SIGTERM unwind like Ctrl-C so every command cleans up the same way."""

    def handler(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def native_stdout_to_stderr(discard: bool = False):
    """MNN's C++ code prints ("MNN use low precision") to file descriptor 1: send it to stderr
    (or nowhere, for --quiet) while MNN runs, so stdout carries only the command's own output."""
    sys.stdout.flush()
    saved = os.dup(1)
    target = os.open(os.devnull, os.O_WRONLY) if discard else os.dup(2)
    try:
        os.dup2(target, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(target)


def add_overwrite_flag(parser, replaces: str) -> None:
    """The one flag every command takes to replace what the user already has (``replaces`` says
    what); ``--force`` is its alias."""
    from sd2mnn.core.files import OVERWRITE_FLAG

    parser.add_argument(OVERWRITE_FLAG, "--force", dest="overwrite", action="store_true",
                        help=f"replace {replaces} (without it an existing file or folder is refused; alias --force)")


def add_source_change_flags(parser) -> None:
    """--lora and --vae: what export changes in the pipeline before exporting it."""
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA .safetensors (diffusers/PEFT or kohya keys) fused into the weights it targets "
                        "before export, at SCALE (default 1); repeat for several")
    parser.add_argument("--vae", type=Path, default=None, metavar="DIR",
                        help="a diffusers VAE folder exported in place of the pipeline's: an AutoencoderKL (e.g. a "
                        "fixed VAE) or an AutoencoderTiny (TAESD: a fraction of the decoder's time and memory)")


def loras_from_args(args) -> tuple:
    """--lora FILE[:SCALE], each parsed (a scale that is not a number is a one-line error)."""
    from sd2mnn.exporting.lora import Lora

    return tuple(Lora.parse(text) for text in args.lora)
