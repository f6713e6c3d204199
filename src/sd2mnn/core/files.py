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


# A text file the user names (prompts, latents as numbers) is read up to these limits: a device
# such as /dev/zero or a runaway file is refused after this much, never read to the end.
TEXT_LIMIT_BYTES = 4 << 20
TEXT_LINE_LIMIT = 10_000


def read_user_text(path: str | os.PathLike, what: str, fix: str, limit: int = TEXT_LIMIT_BYTES,
                   line_limit: int | None = TEXT_LINE_LIMIT) -> str:
    """The UTF-8 text of ``path`` (``what`` it holds, e.g. "the prompts"), read at most ``limit``
    bytes deep; a pipe or device is read the same bounded way. A folder, a missing or unreadable
    file, one over ``limit`` bytes or with a line over ``line_limit`` characters: an InputError
    that names it and ``fix``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file of {what} ({fix})")
    try:
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; give a file of {what} ({fix})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read {what} ({err.strerror or err}); {fix}") from None
    if len(data) > limit:
        raise InputError(f"{path} holds more than {limit >> 20} MiB, more than {what} ever need; {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give a text file of {what} ({fix})") from None
    if line_limit is not None and any(len(line) > line_limit for line in text.split("\n")):
        raise InputError(f"{path} has a line over {line_limit} characters, longer than {what} take; {fix}")
    return text
