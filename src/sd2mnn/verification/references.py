"""ONNX Runtime's outputs on verify's inputs, kept in the ONNX folder by the export that wrote it.

sd2mnn export runs every model it writes in ONNX Runtime (its check against PyTorch). It feeds
that session verify's own inputs (sd2mnn.verification.verify.component_feeds) and keeps what
comes out here, so that verify, later or in the same ``convert --verify``, compares MNN with them
instead of loading and running each model in ONNX Runtime a second time (for a full-size SD1.5
unet and VAE decoder, about a minute here).

A record is used only for the very computation verify would run: the same ONNX files (path, size
and modification time, as manifest.json vouches for a source), the same feeds (a sha256 of their
names, dtypes, shapes and bytes) and the same ONNX Runtime version. Anything else, a missing or
unreadable record included, and verify runs ONNX Runtime itself, as it does with
``fresh_references`` (``sd2mnn verify --fresh-references``): the records are as trustworthy as
the folder they sit in.

    ONNX_DIR/.sd2mnn-references/<component>.npz   outputs per case: "<case>/<output>"
    ONNX_DIR/.sd2mnn-references/<component>.json  {"key": ..., "sources": [...], "cases": N}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from sd2mnn.core.files import confined
from sd2mnn.core.manifest import write_json_atomic

REFERENCES_DIR = ".sd2mnn-references"
STORED = "stored by sd2mnn export"  # how a component's references were obtained, for the report


def feeds_digest(feeds: list[dict[str, np.ndarray]]) -> str:
    """A sha256 over every feed's names, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for index, feed in enumerate(feeds):
        for name in sorted(feed):
            value = np.ascontiguousarray(feed[name])
            digest.update(f"{index}/{name}/{value.dtype.str}/{value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def _key(feeds: list[dict[str, np.ndarray]]) -> dict:
    import onnxruntime

    return {"feeds_sha256": feeds_digest(feeds), "onnxruntime": onnxruntime.__version__}


def _identity(onnx_dir: Path, files: tuple[Path, ...]) -> list[list]:
    """[path in the folder, size, mtime in ns] per ONNX file of a component."""
    return [[f.relative_to(onnx_dir).as_posix(), (s := f.stat()).st_size, s.st_mtime_ns] for f in files]


def _paths(onnx_dir: Path, name: str) -> tuple[Path, Path]:
    """The component's two files; refused (UnsafeModelError) where a link leads out of ``onnx_dir``."""
    fix = f"delete {Path(onnx_dir) / REFERENCES_DIR} (export writes it again) or pass --fresh-references"
    return tuple(confined(onnx_dir, f"{REFERENCES_DIR}/{name}{suffix}", fix) for suffix in (".npz", ".json"))


def save(onnx_dir: Path, name: str, files: tuple[Path, ...], feeds: list[dict], outputs: list[dict]) -> None:
    """Keep ``outputs`` (ONNX Runtime's, one dict per feed) of the component ``name`` whose ONNX
    ``files`` lie in ``onnx_dir``: export's staging folder, renamed into place only when every
    part passed, so a half-written record never reaches a user's folder."""
    arrays, meta = _paths(onnx_dir, name)
    arrays.parent.mkdir(exist_ok=True)
    np.savez(arrays, **{f"{i}/{k}": v for i, case in enumerate(outputs) for k, v in case.items()})
    write_json_atomic(meta, {"key": _key(feeds), "sources": _identity(Path(onnx_dir), files), "cases": len(outputs)})


def load(onnx_dir: Path, name: str, files: tuple[Path, ...], feeds: list[dict],
         outputs: list[str]) -> list[dict] | None:
    """The outputs kept for the component ``name`` on exactly these ``feeds``, if its ONNX
    ``files`` are the ones they were computed from; else None."""
    arrays, meta = _paths(onnx_dir, name)
    if not (arrays.is_file() and meta.is_file()):  # absent, or not a regular file to read (a FIFO)
        return None
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        if (record["key"] != _key(feeds) or record["cases"] != len(feeds)
                or record["sources"] != _identity(Path(onnx_dir), files)):
            return None
        with np.load(arrays, allow_pickle=False) as data:
            return [{k: data[f"{i}/{k}"] for k in outputs} for i in range(len(feeds))]
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, or not what save wrote
        return None
