"""The bundle folder on disk: its private work area, its lock, and the atomic commit.

Nothing a run converts touches the bundle's visible files until every requested component has
converted and loaded. Until then the outputs live in ``MNN_DIR/.sd2mnn/``:

    .sd2mnn/lock                 flock()ed by the running sd2mnn; the kernel drops it if we die
    .sd2mnn/work/<name>-XXXX/    a converter's working directory and outputs while it runs
    .sd2mnn/pending/<name>/      a finished component waiting for the commit, with record.json

A run that fails keeps ``pending/`` so the next run resumes from it; everything else it made is
removed. The commit moves each file into place with one rename, the manifest last.
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

from sd2mnn.errors import BundleLockedError, InputError
from sd2mnn.layout import LOGS_DIR, MANIFEST_NAME
from sd2mnn.manifest import ComponentRecord, Manifest

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
        try:
            self.work_area.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create {self.root} ({err.strerror}); choose a writable output folder") from None
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
        """Components an earlier run finished but never committed: name -> (record, folder)."""
        found = {}
        if not self.pending_dir.is_dir():
            return found
        for folder in sorted(self.pending_dir.iterdir()):
            try:
                record = ComponentRecord.from_dict(json.loads((folder / RECORD_NAME).read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                shutil.rmtree(folder, ignore_errors=True)  # unreadable: it cannot be trusted
                continue
            found[record.name] = (record, folder)
        return found

    def park(self, record: ComponentRecord, scratch: Path) -> Path:
        """Move a finished component's scratch folder to pending/ (record written last)."""
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        target = self.pending_dir / record.name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
        (target / RECORD_NAME).write_text(json.dumps(record.to_dict()))
        return target

    # -- the commit ----------------------------------------------------------------------

    def commit(self, staged: dict[str, Path], manifest: Manifest) -> None:
        """Move staged files (bundle-relative name -> file) into place, then the manifest."""
        for rel, path in staged.items():
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        manifest.write(self.manifest_path)
        shutil.rmtree(self.pending_dir, ignore_errors=True)

    def logs_dir(self) -> Path:
        return self.root / LOGS_DIR


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
