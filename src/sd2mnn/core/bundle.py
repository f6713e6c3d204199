"""The bundle folder on disk: its private work area, its lock, and the atomic commit.

Nothing a run converts touches the bundle's visible files until every requested component has
converted and loaded. Until then the outputs live in ``MNN_DIR/.sd2mnn/``:

    .sd2mnn/lock                 flock()ed by the running sd2mnn; the kernel drops it if we die
    .sd2mnn/work/<name>-XXXX/    a converter's working directory and outputs while it runs
    .sd2mnn/pending/<name>/      a finished component waiting for the commit, with record.json

A run that fails keeps ``pending/`` so the next run resumes from it; everything else it made is
removed. The commit moves each file into place with one rename, the manifest last.

A bundle comes from a folder the user may have been handed: the work area, each pending record
and every path they name are confined to the bundle (``sd2mnn.core.files.confined``), and a bundle is
checked against its manifest before it is used (``check_for_use``).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sd2mnn.core.files import confined
from sd2mnn.core.layout import MANIFEST_NAME, bundle_mtoks
from sd2mnn.core.manifest import ComponentRecord, Manifest, read_manifest
from sd2mnn.errors import BundleLockedError, DiskSpaceError, InputError, Sd2MnnError, UnsafeModelError

WORK_AREA = ".sd2mnn"
RECORD_NAME = "record.json"


@dataclass
class BundleDir:
    """An MNN bundle folder held for one run (use as a context manager)."""

    root: Path
    created: bool = False  # the run made the folder: remove it again if nothing lands
    _lock_fd: int | None = field(default=None, repr=False)

    def __post_init__(self):
        # Children run in scratch folders: every path handed to them must be absolute.
        self.root = Path(self.root).absolute()

    @property
    def work_area(self) -> Path:
        return self.root / WORK_AREA

    @property
    def pending_dir(self) -> Path:
        return self.work_area / "pending"

    @property
    def scratch_dir(self) -> Path:
        return self.work_area / "work"

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def __enter__(self) -> "BundleDir":
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root} exists and is not a folder; choose another output folder")
        self.created = not self.root.exists()
        self._check_work_area()
        try:
            self.work_area.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            action = f"cannot create {self.root}" if self.created else f"cannot write into {self.root}"
            raise InputError(f"{action} ({err.strerror}: {err.filename}); choose a writable output folder") from None
        fd = os.open(self.work_area / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BundleLockedError(
                    f"{self.root} is being written by another sd2mnn run; wait for it to finish "
                    "(a killed run's lock is released by the system)"
                ) from None
            raise
        self._lock_fd = fd
        # A scratch folder left by a run that was killed is garbage: it never finished.
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        return self

    def _check_work_area(self) -> None:
        """The work area is removed and rewritten freely: none of it may lead out of the bundle."""
        fix = f"remove it (sd2mnn keeps its work area in {WORK_AREA}/ and recreates it)"
        for rel in (WORK_AREA, f"{WORK_AREA}/lock", f"{WORK_AREA}/pending", f"{WORK_AREA}/work",
                    f"{WORK_AREA}/replaced", f"{WORK_AREA}/{MANIFEST_NAME}"):
            confined(self.root, rel, fix)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        if self.pending_dir.exists() and not any(self.pending_dir.iterdir()):
            self.pending_dir.rmdir()
        keep_work_area = self.pending_dir.exists()
        if not keep_work_area:
            (self.work_area / "lock").unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if not keep_work_area:
            _rmdir_if_empty(self.work_area)
            if self.created:
                _rmdir_if_empty(self.root)

    def new_scratch(self, name: str) -> Path:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch_dir))

    # -- finished components waiting for the commit --------------------------------------

    def pending(self) -> dict[str, tuple[ComponentRecord, Path]]:
        """Components an interrupted run finished but never committed: name -> (record, folder)."""
        found = {}
        if not self.pending_dir.is_dir():
            return found
        for folder in sorted(self.pending_dir.iterdir()):
            try:
                record = ComponentRecord.from_dict(json.loads((folder / RECORD_NAME).read_text()))
                self._check_pending(record, folder)
            except (OSError, ValueError, KeyError, TypeError, UnsafeModelError):
                _discard(folder)  # unreadable, or naming paths outside: it cannot be trusted
                continue
            found[record.name] = (record, folder)
        return found

    def _check_pending(self, record: ComponentRecord, folder: Path) -> None:
        """A pending record names its own folder and outputs that stay in it and in the bundle
        (the commit moves each from the one to the other)."""
        if record.name != folder.name:
            raise ValueError(f"{folder / RECORD_NAME} names {record.name!r}")
        confined(self.pending_dir, folder.name, "")
        for output in record.outputs:
            output.at(folder, "")
            output.at(self.root, "")

    def park(self, record: ComponentRecord, scratch: Path) -> Path:
        """Move a finished component's scratch folder to pending/ (record written last)."""
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        target = self.pending_dir / record.name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
        (target / RECORD_NAME).write_text(json.dumps(record.to_dict()))
        return target

    # -- the commit ----------------------------------------------------------------------

    def commit(self, staged: dict[str, Path], manifest: Manifest, retired: tuple[str, ...] = ()) -> None:
        """Move staged files (bundle-relative name -> file) into place, remove the ``retired`` ones
        (files the old manifest records and the new one does not), then the manifest: all
        or nothing. Everything that needs disk space is written first (the manifest into the
        work area); the commit itself is renames. Each file it replaces is first moved aside into
        the work area, so a failure at any step is undone rename by rename: the bundle is as it
        was, and the staged files are back where the next run resumes from."""
        fix = "move it out of the way and run again (the bundle is unchanged)"
        targets = {rel: confined(self.root, rel, fix) for rel in [*staged, *retired, MANIFEST_NAME]}
        aside = self.work_area / "replaced"
        shutil.rmtree(aside, ignore_errors=True)
        new_manifest = self.work_area / MANIFEST_NAME
        moves: list[tuple[Path, Path]] = []  # (from, to), in the order done
        made: list[Path] = []  # folders the commit created
        current = self.work_area
        try:
            aside.mkdir()
            manifest.write(new_manifest)
            for index, (rel, path) in enumerate([*staged.items(), (MANIFEST_NAME, new_manifest)]):
                for folder in reversed(Path(rel).parents[:-1]):
                    current = self.root / folder
                    if not current.is_dir():
                        current.mkdir()
                        made.append(current)
                current = targets[rel]
                # A folder in a file's place is not ours to move aside: the rename below fails.
                if current.is_symlink() or current.is_file():
                    _move(current, aside / str(index), moves)
                _move(path, current, moves)
            for index, rel in enumerate(retired):
                current = targets[rel]
                if current.is_symlink() or current.is_file():
                    _move(current, aside / f"retired-{index}", moves)
        except BaseException as err:
            left = _undo(moves, made)
            new_manifest.unlink(missing_ok=True)
            _rmdir_if_empty(aside)
            if not isinstance(err, OSError):
                raise
            raise _commit_error(self.root, current, err, left) from None
        new_manifest.unlink(missing_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(self.pending_dir, ignore_errors=True)


def check_for_use(root: Path, family, names) -> None:
    """Refuse a bundle that no longer holds what was converted, before generate or bench uses
    ``names`` (components of ``family``): a file the runtime reads that is a link leaving the
    bundle; a component manifest.json lists whose model is gone (a runtime that runs without it
    would condition on zeros); a recorded file whose size changed, or whose sha256 did where its
    mtime moved (``record_mismatch``, as convert decides reuse). A bundle without a readable
    manifest is checked for links only: it still runs."""
    root = Path(root)
    confine_runtime_files(root, family, names)
    manifest = _manifest_for_use(root)
    if manifest is None:
        return
    listed = [n for n in names if n in manifest.components]
    for name in listed:
        model = root / family.components[name].mnn_name
        if not model.is_file():
            raise InputError(f"{model} is missing, but {root / MANIFEST_NAME} lists {name}; copy the file back, or "
                             f"reconvert it (sd2mnn convert ONNX_DIR {root} --components {name})")
    damaged = manifest.damaged(root, listed)
    if damaged:
        _, record, mismatch = damaged[0]
        raise InputError(f"{record.at(root)} is damaged: {mismatch}; reconvert the bundle "
                         f"(sd2mnn convert ONNX_DIR {root}) or copy the file again")


def confine_runtime_files(root: Path, family, names) -> None:
    """Refuse a file the runtime reads for ``names`` (models, weights, every tokenizer.mtok) that
    is a link leaving the bundle."""
    fix = "replace the link with the file itself, or reconvert the bundle (sd2mnn convert)"
    for rel in [*(f for n in names for f in (family.components[n].mnn_name, family.components[n].weight_name)),
                *bundle_mtoks(family)]:
        confined(root, rel, fix)


def _manifest_for_use(root: Path) -> Manifest | None:
    try:
        return read_manifest(root / MANIFEST_NAME)
    except UnsafeModelError:
        raise
    except (InputError, OSError):
        return None  # an unreadable manifest is convert's business; the runtime needs none


def _discard(path: Path) -> None:
    """Remove a work-area entry; a link is removed, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _move(source: Path, target: Path, moves: list[tuple[Path, Path]]) -> None:
    os.rename(source, target)
    moves.append((source, target))


def _undo(moves: list[tuple[Path, Path]], made: list[Path]) -> list[Path]:
    """Reverse the renames newest first; the files that could not go back."""
    left = []
    for source, target in reversed(moves):
        try:
            os.rename(target, source)
        except OSError:
            left.append(target)
    for folder in reversed(made):
        _rmdir_if_empty(folder)
    return left


def _commit_error(root: Path, where: Path, err: OSError, left: list[Path]) -> Sd2MnnError:
    """The one-line error for a commit that failed at ``where`` (and was undone, unless
    ``left`` names what could not be put back)."""
    if err.errno == errno.ENOSPC:
        message = f"{root} ran out of disk space while the bundle was written; free some space and run again"
        error = DiskSpaceError
    else:
        message = (f"cannot put the new files into {root}: {where}: {err.strerror or err}; "
                   "move it out of the way or make it writable, and run again")
        error = InputError
    if left:
        message += f" (could not restore {', '.join(map(str, left))}: run again to finish the bundle)"
    else:
        message += " (the bundle is unchanged; finished components wait in .sd2mnn/ for the next run)"
    return error(message)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
