"""What a conversion run will do: the options, the converter flags, and per component whether
it is converted (and why) or reused from the bundle or from an interrupted run."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from sd2mnn.converter import Converter
from sd2mnn.errors import InputError
from sd2mnn.layout import DEFAULT_COMPONENTS, ComponentSource, OnnxPipeline
from sd2mnn.manifest import ComponentRecord, FileRecord, Manifest

# Flags sd2mnn sets itself for every component; EXTRA may not override them.
_RESERVED_FLAGS = ("-f", "--framework", "--modelFile", "--MNNModel", "--saveExternalData", "--prototxt")


@dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion can be asked for. Paths are the only thing not in here."""

    components: tuple[str, ...] = DEFAULT_COMPONENTS
    weight_quant_bits: int | None = None
    weight_quant_block: int | None = None
    weight_quant_asymmetric: bool = False
    hqq: bool = False
    transformer_fuse: bool = False
    fp16: bool = False
    extra: str = ""  # raw converter flags, passed through verbatim like MNN's convert_mnn.py
    converter: str | None = None  # explicit MNNConvert path
    force: bool = False
    jobs: int | None = None  # None: from the cores and the free memory
    timeout: float | None = None  # seconds per component
    verify: bool = False

    def __post_init__(self):
        if self.weight_quant_bits is not None and not 2 <= self.weight_quant_bits <= 8:
            raise InputError(f"--weight-quant-bits must be between 2 and 8, got {self.weight_quant_bits}")
        if self.weight_quant_block is not None and self.weight_quant_block <= 0:
            raise InputError(f"--weight-quant-block must be positive, got {self.weight_quant_block}")
        needs_bits = self.weight_quant_block is not None or self.weight_quant_asymmetric or self.hqq
        if needs_bits and self.weight_quant_bits is None:
            raise InputError("--weight-quant-block, --weight-quant-asymmetric and --hqq need --weight-quant-bits N")
        if self.jobs is not None and self.jobs < 1:
            raise InputError(f"--jobs must be at least 1, got {self.jobs}")
        if self.timeout is not None and self.timeout <= 0:
            raise InputError(f"--timeout must be positive, got {self.timeout}")
        try:
            extra = shlex.split(self.extra)
        except ValueError as err:
            raise InputError(f"cannot parse the extra converter flags {self.extra!r}: {err}") from None
        for token in extra:
            if token.split("=", 1)[0] in _RESERVED_FLAGS:
                raise InputError(
                    f"extra converter flag {token!r} is set by sd2mnn itself; leave it out of EXTRA"
                )

    def converter_flags(self) -> tuple[str, ...]:
        """The flags every component is converted with, after sd2mnn's own file arguments."""
        flags: list[str] = []
        if self.weight_quant_bits is not None:
            flags.append(f"--weightQuantBits={self.weight_quant_bits}")
        if self.weight_quant_block is not None:
            flags.append(f"--weightQuantBlock={self.weight_quant_block}")
        if self.weight_quant_asymmetric:
            flags.append("--weightQuantAsymmetric")
        if self.hqq:
            flags.append("--hqq")
        if self.transformer_fuse:
            flags.append("--transformerFuse")
        if self.fp16:
            flags.append("--fp16")
        return (*flags, *shlex.split(self.extra))


def converter_argv(source_model: Path, output_model: Path, flags: tuple[str, ...]) -> list[str]:
    """MNNConvert's arguments for one component, as MNN's convert_mnn.py builds them."""
    return [
        "-f", "ONNX",
        "--modelFile", str(source_model.resolve()),
        "--MNNModel", str(output_model.resolve()),
        "--saveExternalData=1",
        *flags,
    ]


def converter_identity(converter: Converter) -> dict:
    return {"kind": converter.kind, "path": converter.location, "version": converter.version}


@dataclass(frozen=True)
class ComponentJob:
    source: ComponentSource
    reason: str  # why it is converted: "new", "flags changed", "source changed", ...
    sources: tuple[FileRecord, ...]  # the source files as they are now

    @property
    def name(self) -> str:
        return self.source.spec.name


@dataclass(frozen=True)
class ConversionPlan:
    onnx: OnnxPipeline
    mnn_dir: Path
    converter: Converter
    flags: tuple[str, ...]
    options: ConvertOptions
    previous: Manifest | None
    to_convert: tuple[ComponentJob, ...]
    # Up to date in the bundle already: name -> its manifest record.
    reused: dict[str, ComponentRecord] = field(default_factory=dict)
    # Finished by an earlier, interrupted run and still valid: name -> its record.
    resumed: dict[str, ComponentRecord] = field(default_factory=dict)


def _hash_where_needed(known: ComponentRecord | None, current: tuple[FileRecord, ...], root: Path) -> tuple[FileRecord, ...]:
    """Hash the files only content can decide on: same size as recorded, but a new mtime. A file
    of another size has changed whatever its content; one with the same mtime is vouched for."""
    if known is None:
        return current
    sizes = {f.path: f.size for f in known.sources}
    return tuple(f.hashed(root) if sizes.get(f.path) == f.size else f for f in current)


def _stale_reason(
    record: ComponentRecord | None,
    sources: tuple[FileRecord, ...],
    flags: tuple[str, ...],
    converter: dict,
    outputs_root: Path,
) -> str | None:
    """Why ``record`` cannot stand for a conversion with these inputs, or None if it can."""
    if record is None:
        return "new"
    if record.flags != flags:
        return "flags changed"
    if record.converter != converter:
        return "converter changed"
    if [(f.path, f.sha256) for f in record.sources] != [(f.path, f.sha256) for f in sources]:
        return "source changed"
    if not all(f.is_intact(outputs_root) for f in record.outputs):
        return "outputs changed"
    return None


def source_records(source: ComponentSource, onnx_root: Path, known: ComponentRecord | None) -> tuple[FileRecord, ...]:
    """The source files as they are now; a hash is filled in only where ``known`` vouches for it
    (same size and mtime), the rest are hashed later, while the converter runs."""
    by_path = {f.path: f for f in known.sources} if known else {}
    return tuple(
        FileRecord.of(path, onnx_root, by_path.get(path.relative_to(onnx_root).as_posix()), hash_now=False)
        for path in source.files
    )


def plan_conversion(
    onnx: OnnxPipeline,
    mnn_dir: Path,
    converter: Converter,
    options: ConvertOptions,
    previous: Manifest | None,
    pending: dict[str, tuple[ComponentRecord, Path]],
) -> ConversionPlan:
    """Decide per component: reuse the bundle's, resume an interrupted run's, or convert."""
    flags = options.converter_flags()
    identity = converter_identity(converter)
    jobs, reused, resumed = [], {}, {}
    for name in options.components:
        source = onnx.components[name]
        old = previous.components.get(name) if previous else None
        waiting, waiting_root = pending.get(name, (None, None))
        sources = source_records(source, onnx.root, old or waiting)
        if options.force:
            jobs.append(ComponentJob(source, "forced", sources))
            continue
        sources = _hash_where_needed(old or waiting, sources, onnx.root)
        reason = _stale_reason(old, sources, flags, identity, mnn_dir)
        if reason is None:
            reused[name] = replace(old, sources=sources)  # new mtimes: no re-hash next time
        elif waiting is not None and _stale_reason(waiting, sources, flags, identity, waiting_root) is None:
            resumed[name] = replace(waiting, sources=sources)
        else:
            jobs.append(ComponentJob(source, reason, sources))
    return ConversionPlan(onnx, mnn_dir, converter, flags, options, previous, tuple(jobs), reused, resumed)


def default_jobs(expected_peaks: list[int], cpu_count: int | None = None, available: int | None = None) -> int:
    """Concurrent conversions that fit: at most one per core, and the largest expected peaks
    together within 90% of the available memory (always at least one)."""
    import psutil

    cpu_count = cpu_count or os.cpu_count() or 1
    available = psutil.virtual_memory().available if available is None else available
    budget = int(available * 0.9)
    jobs, used = 0, 0
    for peak in sorted(expected_peaks, reverse=True):
        if jobs >= cpu_count or (jobs and used + peak > budget):
            break
        jobs, used = jobs + 1, used + peak
    return max(1, jobs)


# A conversion peaks at about 2.2x its ONNX model with weights (MNN_FACTS.md: unet 3.4 GB -> 7.5 GB).
PEAK_PER_SOURCE_BYTE = 2.2
# The outputs are about as big as the sources (fp32); quantization only shrinks them.
OUTPUT_PER_SOURCE_BYTE = 1.05


def expected_peak(job: ComponentJob) -> int:
    return int(sum(f.size for f in job.sources) * PEAK_PER_SOURCE_BYTE) + (200 << 20)
