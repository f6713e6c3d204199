"""The bundle's ``manifest.json``: what was converted, from what, how, and with what result.

It is also the memory of incremental conversion: a component is reused only when its recorded
sources, flags and converter equal the current ones and its outputs are intact. Files whose size
and modification time are unchanged keep their recorded sha256, so deciding to skip never
re-hashes gigabytes. The same rule (``record_mismatch``) decides whether a bundle opened for use
still holds what was converted.

A manifest comes from a folder sd2mnn does not own: every path in it is confined to the bundle
(``sd2mnn.core.files.confined``) when it is read.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sd2mnn.conversion.converter_flags import quantizing_words
from sd2mnn.core.files import confined
from sd2mnn.core.onnx_scan import TensorSpec
from sd2mnn.errors import InputError
from sd2mnn.quantization.compression import FLOAT_LABEL

MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the folder it lives in (ONNX_DIR for sources, the bundle for outputs)
    size: int
    sha256: str
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, root: Path, known: "FileRecord | None" = None, hash_now: bool = True) -> "FileRecord":
        """Describe ``path``; reuse ``known``'s hash when size and mtime say it is the same file.
        With ``hash_now=False`` an unknown hash is left empty, for the caller to fill in later
        (off the critical path: a UNet's weights are 3.4 GB)."""
        stat = path.stat()
        rel = path.relative_to(root).as_posix()
        if known is not None and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
            return replace(known, path=rel)
        return cls(rel, stat.st_size, sha256_file(path) if hash_now else "", stat.st_mtime_ns)

    def at(self, root: Path, fix: str = "delete the record and reconvert the bundle (sd2mnn convert)") -> Path:
        """``root/path``, refused when the recorded path leaves ``root``."""
        return confined(root, self.path, fix)

    def hashed(self, root: Path) -> "FileRecord":
        """This record with its hash filled in (if it was left empty)."""
        return self if self.sha256 else replace(self, sha256=sha256_file(self.at(root)))

    def is_intact(self, root: Path) -> bool:
        """The file at ``root/path`` still has this content (hashing only if size/mtime moved)."""
        return self.at(root).is_file() and record_mismatch(self, root) is None


@dataclass(frozen=True)
class ComponentRecord:
    name: str
    flags: tuple[str, ...]
    converter: dict  # kind, path, version
    sources: tuple[FileRecord, ...]
    outputs: tuple[FileRecord, ...]
    inputs: tuple[TensorSpec, ...]
    output_tensors: tuple[TensorSpec, ...]
    wall_s: float
    peak_rss_bytes: int
    verification: dict | None = None
    # What sd2mnn put in front of the model before converting it ("" for nothing): the text
    # encoder's id rewrite (sd2mnn.tokenization.id_rewrite), by its version and tables' digest.
    prefix: str = ""
    # The bits per layer it was converted with (op name -> sd2mnn.quantization.compression.LayerBits
    # label, "4b64"); empty when every layer took the flags.
    compression: dict[str, str] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """Its weights are not all fp32: by a flag, or by a layer of its compression file."""
        return bool(quantizing_words(self.flags)) or any(v != FLOAT_LABEL for v in self.compression.values())

    def to_dict(self) -> dict:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["output_tensors"] = [t.to_dict() for t in self.output_tensors]
        data["flags"] = list(self.flags)
        if not self.compression:
            del data["compression"]  # a component converted by the flags alone: as before per-layer bits
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ComponentRecord":
        return cls(
            name=data["name"],
            flags=tuple(data["flags"]),
            converter=dict(data["converter"]),
            sources=tuple(FileRecord(**f) for f in data["sources"]),
            outputs=tuple(FileRecord(**f) for f in data["outputs"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            output_tensors=tuple(TensorSpec.from_dict(t) for t in data["output_tensors"]),
            wall_s=float(data["wall_s"]),
            peak_rss_bytes=int(data["peak_rss_bytes"]),
            verification=data.get("verification"),
            prefix=data.get("prefix", ""),
            compression={str(k): str(v) for k, v in data.get("compression", {}).items()},
        )


@dataclass
class Manifest:
    sd2mnn_version: str
    converter: dict
    converter_flags: list[str]
    onnx_dir: str
    components: dict[str, ComponentRecord] = field(default_factory=dict)
    tokenizer: tuple[FileRecord, ...] = ()
    format: int = MANIFEST_FORMAT
    # How the runtime's ids reach the text encoder: "diffusers" (tokenizer.mtok + text encoder
    # rewritten to condition as diffusers does) or "mnn" (MNN's own flow, byte for byte).
    tokenizer_scheme: str = "mnn"
    # The model family (sd2mnn.families) of the converted pipeline; "" in manifests written
    # before it was recorded (sd2mnn.families.detect then reads tokenizer.mtok).
    family: str = ""
    # LoRAs export fused into the weights: file name, sha256, scale, the components they changed.
    loras: list[dict] = field(default_factory=list)
    # The VAE export put in the pipeline's own's place (folder, class); {}: the pipeline's own.
    vae: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "sd2mnn_version": self.sd2mnn_version,
            "converter": self.converter,
            "converter_flags": self.converter_flags,
            "onnx_dir": self.onnx_dir,
            "components": {name: rec.to_dict() for name, rec in self.components.items()},
            "tokenizer": [asdict(f) for f in self.tokenizer],
            "tokenizer_scheme": self.tokenizer_scheme,
            "family": self.family,
            "loras": self.loras,
            "vae": self.vae,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        return cls(
            sd2mnn_version=data["sd2mnn_version"],
            converter=data["converter"],
            converter_flags=list(data["converter_flags"]),
            onnx_dir=data["onnx_dir"],
            components={n: ComponentRecord.from_dict(r) for n, r in data["components"].items()},
            tokenizer=tuple(FileRecord(**f) for f in data.get("tokenizer", [])),
            format=data.get("format", MANIFEST_FORMAT),
            tokenizer_scheme=data.get("tokenizer_scheme", "mnn"),
            family=data.get("family", ""),
            loras=list(data.get("loras", [])),
            vae=dict(data.get("vae", {})),
        )

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    def damaged(self, root: Path, names) -> list[tuple[str, FileRecord, str]]:
        """(owner, record, how it differs) for each recorded file of the components ``names`` and
        of the tokenizer ("tokenizer") that no longer is what was converted (``record_mismatch``)."""
        owned = [(n, f) for n in names if n in self.components for f in self.components[n].outputs]
        owned += [("tokenizer", f) for f in self.tokenizer]
        found = [(owner, record, record_mismatch(record, root)) for owner, record in owned]
        return [(owner, record, mismatch) for owner, record, mismatch in found if mismatch]

    def bundle_files(self) -> list[FileRecord]:
        """Every file in the bundle it records: the components' outputs and the tokenizer files."""
        return [*(f for record in self.components.values() for f in record.outputs), *self.tokenizer]


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON atomically: a temp file beside the target, then one rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or None when there is none."""
    if not path.exists():
        return None
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"{path} is not a manifest sd2mnn can read ({err}); delete it to rebuild the bundle from scratch"
        ) from None
    fix = f"{path} lists it: delete {path.name} and reconvert the bundle (sd2mnn convert)"
    for record in manifest.bundle_files():
        record.at(path.parent, fix)  # refused before anything outside is looked at
    return manifest


def record_mismatch(record: FileRecord, root: Path) -> str | None:
    """How ``root/record.path`` differs from what the manifest recorded: its size, or its sha256
    (hashed only when its mtime moved: a copied bundle with new mtimes is still the same bundle).
    None when it matches or is gone (a missing file is reported by whoever needs it)."""
    path = record.at(root)
    try:
        stat = path.stat()
    except OSError:
        return None
    if stat.st_size != record.size:
        return f"{stat.st_size} bytes where manifest.json records {record.size}"
    if stat.st_mtime_ns != record.mtime_ns and sha256_file(path) != record.sha256:
        return f"content changed (sha256 differs from manifest.json's {record.sha256[:12]}...)"
    return None
