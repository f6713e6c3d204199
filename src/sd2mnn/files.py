"""Files sd2mnn reads from folders it does not own, and files it writes for the user.

Two rules hold for every command:
- a path read from a model, a bundle or a work area goes through ``confined``: resolved (links
  followed) and refused when it leaves the folder it belongs to;
- a file or folder the user already has is replaced only when they passed ``--overwrite``
  (``check_replaceable``; every command spells the flag the same, ``--force`` is its alias).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sd2mnn.errors import InputError, UnsafeModelError

OVERWRITE_FLAG = "--overwrite"


def read_json_object(path: Path, fix: str = "re-download the model") -> dict:
    """The JSON object in ``path``, or an InputError naming the file and ``fix``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object; {fix}")
    return data


def is_inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both taken as given: resolve them first)."""
    try:
        Path(path).relative_to(folder)
        return True
    except ValueError:
        return False


def confined(root: str | os.PathLike, relative: str | os.PathLike, fix: str) -> Path:
    """``root / relative`` when it stays inside ``root`` after every link is followed, else an
    UnsafeModelError that names it and ``fix``. Absolute paths, ``..`` and links that leave are
    refused alike; the path need not exist. The returned path is not resolved (names shown to the
    user stay theirs)."""
    root = Path(root)
    text = os.fspath(relative)
    rel = Path(text.replace("\\", "/"))
    if rel.is_absolute() or text.startswith(("/", "\\")) or (rel.parts and ":" in rel.parts[0]):
        raise UnsafeModelError(f"{root}: {text!r} is an absolute path, outside {root}; {fix}")
    if ".." in rel.parts:
        raise UnsafeModelError(f"{root}: {text!r} leads outside {root}; {fix}")
    path = root / rel
    if not is_inside(path.resolve(), root.resolve()):
        raise UnsafeModelError(f"{path} is a link that leaves {root}; {fix}")
    return path


def check_replaceable(path: str | os.PathLike, overwrite: bool, what: str = "it") -> None:
    """Refuse to write ``path`` over something that exists unless the user passed --overwrite.
    ``what`` says what the command would write there ("the image", "the report")."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return  # an empty folder holds nothing to lose
    kind = "folder" if path.is_dir() else "file"
    raise InputError(
        f"{path} already exists ({kind}); {what} would replace it: choose another path, "
        f"or pass {OVERWRITE_FLAG} to replace it"
    )


def confined_tree(root: str | os.PathLike, relative: str | os.PathLike, fix: str) -> Path:
    """``confined(root, relative, fix)``, and so is everything beneath it: a folder whose files
    link out of ``root`` is refused as a whole before anything in it is read."""
    top = confined(root, relative, fix)
    for folder, dirs, names in os.walk(top):
        for name in (*dirs, *names):
            confined(root, Path(folder, name).relative_to(root), fix)
    return top
