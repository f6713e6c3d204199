"""sd2mnn doctor: which converter and runtimes sd2mnn will use."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

from sd2mnn._version import __version__
from sd2mnn.conversion.converter import find_converter
from sd2mnn.errors import ConverterNotFoundError


def register(subparsers) -> None:
    parser = subparsers.add_parser("doctor", help="show the converter and library versions sd2mnn will use",
                                   description="Print which MNN converter sd2mnn would use and the versions of its libraries.")
    parser.add_argument("--converter", metavar="PATH", help="check this MNNConvert instead of the default search")
    parser.set_defaults(func=run)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args) -> int:
    print(f"sd2mnn       {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    for dist in ("MNN", "onnx", "onnxruntime", "numpy", "tokenizers"):
        print(f"{dist:<12} {_version(dist)}")
    try:
        converter = find_converter(args.converter)
    except ConverterNotFoundError as err:
        print(f"converter    none: {err.message}")
        return 1
    print(f"converter    {converter.kind} {converter.location}")
    print(f"             found by {converter.found_by}, version {converter.version}")
    return 0
