"""Typed errors. Each carries a one-line message that names the file and the fix.

The CLI prints ``error: <message>`` and exits non-zero; the Python API raises these as they are,
so callers choose what is fatal (optimum's error_utils pattern).
"""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path


class Sd2MnnError(Exception):
    """Base class: a problem the user can fix. ``detail`` is optional extra text (a log tail)."""

    exit_code = 1

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail


class InputError(Sd2MnnError):
    """A bad input: a missing folder, file or component, a file that is not what it should be."""

    exit_code = 2


class UnsafeModelError(InputError):
    """A model that points outside its own folder (external data, symlinks)."""


class ConverterNotFoundError(Sd2MnnError):
    """No MNN converter could be found."""


class ConversionError(Sd2MnnError):
    """The converter ran but did not produce a loadable model."""


class ConversionTimeoutError(ConversionError):
    """The converter ran past --timeout and was killed."""


class DiskSpaceError(Sd2MnnError):
    """The target filesystem has too little room for the expected outputs."""


class BundleLockedError(Sd2MnnError):
    """Another sd2mnn run holds the bundle's lock."""


class VerificationError(Sd2MnnError):
    """A bundle failed verification (fidelity or runtime contract)."""


class MissingExtraError(Sd2MnnError):
    """An optional dependency is missing; the message says what to install."""


@contextlib.contextmanager
def os_errors_as_one_line(target: Path, unchanged: str):
    """A full disk or an unwritable file met while ``target`` is written: a one-line error that
    says what was left as it was (``unchanged``, e.g. "the bundle is unchanged")."""
    try:
        yield
    except OSError as err:
        where, reason, no_space = err.filename or target, err.strerror or str(err), err.errno == errno.ENOSPC
        if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
            # copytree gathers (source, destination, message) per file; the first one says it.
            _, where, reason = err.args[0][0]
            no_space = f"[Errno {errno.ENOSPC}]" in reason
        if no_space:
            raise DiskSpaceError(
                f"{target} ran out of disk space ({where}); {unchanged}: free some space and run again"
            ) from err
        raise InputError(
            f"{where}: {reason}; {unchanged}: fix that file or folder (or choose another output folder) and run again"
        ) from err
