"""The MNN converter backends: finding one, naming it, and building its command line.

Two kinds exist: an ``MNNConvert`` executable (built from MNN's sources, or found on PATH) and the
``MNN`` Python package's ``_tools.mnnconvert``. The package's ``mnnconvert`` console script is
never used: it pip-installs a logging SDK and uploads telemetry. The package backend runs in a
child Python (``sd2mnn.conversion._mnnconvert``) so its C++ output is captured at the file-descriptor level
and a crash cannot take sd2mnn down.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from sd2mnn.errors import ConverterNotFoundError

EXECUTABLE = "executable"
PYTHON_PACKAGE = "python-package"
ENV_VAR = "MNNCONVERT"


@dataclass(frozen=True)
class Converter:
    kind: str  # EXECUTABLE or PYTHON_PACKAGE
    location: str  # the executable, or the MNN package's _tools extension module
    found_by: str  # which rule picked it: "--converter", "$MNNCONVERT", "PATH", "MNN package"

    def argv(self, args: Sequence[str]) -> list[str]:
        """The child command line that runs the converter with ``args``."""
        if self.kind == EXECUTABLE:
            return [self.location, *args]
        return [sys.executable, "-m", "sd2mnn.conversion._mnnconvert", *args]

    @property
    def version(self) -> str:
        return converter_version(self)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.location, "version": self.version, "found_by": self.found_by}


def _executable(path: str, found_by: str) -> Converter:
    candidate = Path(path).expanduser()
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        raise ConverterNotFoundError(
            f"{candidate} (from {found_by}) is not an executable MNNConvert; "
            "point it at a built MNNConvert binary, or unset it to use the MNN Python package"
        )
    return Converter(EXECUTABLE, str(candidate.resolve()), found_by)


def find_converter(explicit: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Converter:
    """Resolve the converter, first hit wins: explicit path, $MNNCONVERT, MNNConvert on PATH,
    the MNN Python package."""
    environ = os.environ if environ is None else environ
    if explicit:
        return _executable(str(explicit), "--converter")
    if environ.get(ENV_VAR):
        return _executable(environ[ENV_VAR], f"${ENV_VAR}")
    on_path = shutil.which("MNNConvert", path=environ.get("PATH"))
    if on_path:
        return _executable(on_path, "PATH")
    spec = importlib.util.find_spec("_tools")
    if spec is not None and spec.origin:
        return Converter(PYTHON_PACKAGE, spec.origin, "MNN package")
    raise ConverterNotFoundError(
        "no MNN converter found; run 'pip install MNN', or pass --converter /path/to/MNNConvert "
        f"(or set ${ENV_VAR})"
    )


@functools.lru_cache(maxsize=None)
def converter_version(converter: Converter) -> str:
    """What the converter says its version is (``MNNConvert --version``), or "unknown"."""
    try:
        done = subprocess.run(
            converter.argv(["--version"]), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    versions = re.findall(r"^\s*(\d+\.\d+(?:\.\d+)*)\s*$", done.stdout + done.stderr, re.MULTILINE)
    return versions[-1] if versions else "unknown"
