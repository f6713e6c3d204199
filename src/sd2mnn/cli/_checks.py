"""Argument checks the command modules share. Each raises InputError with one line naming the
flag and the fix, and runs before any model is loaded or converted."""
from __future__ import annotations

import math
from pathlib import Path

from sd2mnn.core.images import probe_folder
from sd2mnn.errors import InputError


def check_folder(path: str | Path, what: str, flag: str = "") -> Path:
    """An existing folder: say whether it is missing or a file, as the fix differs."""
    folder = Path(path)
    if not folder.is_dir():
        state = "it is a file" if folder.exists() else "it does not exist"
        raise InputError(f"{flag + ' ' if flag else ''}{folder} is not a folder ({state}); give the {what} folder")
    return folder


def check_output_folder(path: str | Path, flag: str) -> Path:
    """A folder to write into: it or its nearest existing parent must be a folder."""
    folder = Path(path)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        which = "" if existing == folder else f" ({existing} is a file)"
        raise InputError(f"{flag} {folder} is not a folder{which}; give a folder to write into")
    probe_folder(existing, folder)
    return folder


def check_seed(seed: int, flag: str = "--seed") -> int:
    if seed < 0:
        raise InputError(f"{flag} must be a whole number >= 0, got {seed}")
    return seed


def check_at_least(value: int | None, minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {value}")


def check_positive(value: float | None, flag: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{flag} must be a positive number of seconds, got {value:g}")


def check_finite(value: float | None, flag: str, example: str) -> None:
    if value is not None and not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number, got {value:g}; e.g. {flag} {example}")


def check_png_output(path: str | Path, flag: str) -> Path:
    """A PNG file to write, whose folder may not exist yet (it is created)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise InputError(f"{flag} {target} does not end in .png; give a PNG file name")
    if target.is_dir():
        raise InputError(f"{flag} {target} is a folder; give a file name such as {target / 'out.png'}")
    check_output_folder(target.parent, flag)
    return target
