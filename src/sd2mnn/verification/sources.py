"""Is this ONNX folder the one the bundle was converted from?

verify and bench (and sweep, through them) compare a bundle with ONNX models; models of another
pipeline give meaningless numbers (an MNN time against another model's, PSNR between two
unrelated networks). The bundle's manifest.json records, per component, each source file's path,
size, mtime and sha256: a file whose size and mtime match is vouched for, else it is hashed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from sd2mnn.core.layout import MANIFEST_NAME
from sd2mnn.core.manifest import read_manifest, record_mismatch
from sd2mnn.errors import InputError


def check_sources(onnx_dir: Path, mnn_dir: Path, names: Iterable[str]) -> list[str]:
    """Refuse (InputError) a component of ``names`` whose ONNX files in ``onnx_dir`` are not those
    the bundle in ``mnn_dir`` was converted from. Returns warnings for what cannot be checked: a
    bundle without manifest.json, a component it does not record."""
    onnx_dir, mnn_dir = Path(onnx_dir), Path(mnn_dir)
    manifest = read_manifest(mnn_dir / MANIFEST_NAME)
    if manifest is None:
        return [f"{mnn_dir / MANIFEST_NAME} is missing, so {onnx_dir} cannot be checked to be the bundle's "
                "ONNX source; the numbers mean something only if it is"]
    unrecorded = []
    for name in names:
        record = manifest.components.get(name)
        if record is None or not record.sources:
            unrecorded.append(name)
            continue
        for source in record.sources:
            mismatch = _mismatch(source, onnx_dir, mnn_dir)
            if mismatch:
                raise InputError(
                    f"{onnx_dir / source.path}: {mismatch}, so it is not the {name} the bundle {mnn_dir} was "
                    f"converted from ({manifest.onnx_dir}): give that ONNX folder, or reconvert the bundle "
                    f"from {onnx_dir}")
    if unrecorded:
        return [f"{mnn_dir / MANIFEST_NAME} records no sources for {', '.join(unrecorded)}, so {onnx_dir} "
                "cannot be checked to be their ONNX source"]
    return []


def _mismatch(source, onnx_dir: Path, mnn_dir: Path) -> str | None:
    """How ``onnx_dir``'s copy of the recorded ``source`` differs from it (None: the same file)."""
    path = source.at(onnx_dir, f"{mnn_dir / MANIFEST_NAME} is damaged: reconvert the bundle")
    if not path.is_file():
        return "missing" if not path.exists() else "not a file"
    return record_mismatch(source, onnx_dir)
