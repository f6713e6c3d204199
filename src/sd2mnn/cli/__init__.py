"""The ``sd2mnn`` command line: a thin shell over the Python API.

Each command lives in its own module with ``register(subparsers)``, which adds its parser and
sets ``func`` to a function taking the parsed arguments and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import sys

from sd2mnn._version import __version__
from sd2mnn.errors import Sd2MnnError

# Module names under sd2mnn.cli, in the order `sd2mnn --help` lists them.
COMMANDS = ["convert", "quantize", "verify", "bench", "sweep", "demo", "doctor", "export", "generate", "compare"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd2mnn",
        description="Turn a Stable Diffusion ONNX pipeline into a verified MNN deployment bundle.",
    )
    parser.add_argument("--version", action="version", version=f"sd2mnn {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sd2mnn.cli.{name}").register(subparsers)
    return parser


# A raw MNNConvert flag given unquoted (camelCase, e.g. --weightQuantBits=8): commands that take
# EXTRA converter flags accept these; kebab-case typos of sd2mnn's own flags still fail.
_CONVERTER_FLAG = re.compile(r"^--?[A-Za-z][A-Za-z0-9]*(=.*)?$")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse hands an EXTRA string given after the options here too ("--a=1 --b").
        if hasattr(args, "extra") and all(_CONVERTER_FLAG.match(t) for u in unknown for t in shlex.split(u)):
            args.extra = " ".join(filter(None, [args.extra, *unknown]))
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`sd2mnn compare a b | head`): not an error of ours. Point stdout
        # at /dev/null so Python's exit-time flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Sd2MnnError as err:
        # One line that names the file and the fix; the traceback only with SD2MNN_DEBUG=1.
        if os.environ.get("SD2MNN_DEBUG"):
            raise
        print(f"error: {err.message}", file=sys.stderr)
        if err.detail:
            print(err.detail.rstrip(), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        print("interrupted", file=sys.stderr)
        return getattr(err, "exit_code", 130)  # 128 + SIGINT; SIGTERM's is 143


def entry() -> None:
    """The ``sd2mnn`` program: ``main`` in a process whose large allocations use huge pages."""
    from sd2mnn.core.huge_pages import relaunch_with_huge_pages

    relaunch_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    entry()
