"""Typed errors. Each carries a one-line message that names the file and the fix.

The CLI prints ``error: <message>`` and exits non-zero; the Python API raises these as they are,
so callers choose what is fatal (optimum's error_utils pattern).
"""
from __future__ import annotations


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
