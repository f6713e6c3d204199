"""What a conversion run will do: the options, the converter flags, and per component whether
it is converted (and why) or reused from the bundle or from an interrupted run."""
from __future__ import annotations

import difflib
import functools
import math
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from sd2mnn.conversion.converter import Converter
from sd2mnn.conversion.converter_flags import CONVERTER_FLAGS, check_extra_value, check_values, converter_words
from sd2mnn.core.layout import ComponentSource, OnnxPipeline
from sd2mnn.core.manifest import ComponentRecord, FileRecord, Manifest
from sd2mnn.errors import InputError
from sd2mnn.quantization.compression import layer_labels
from sd2mnn.tokenization.diffusers_scheme import DEFAULT_SCHEME, SCHEMES

# Flags sd2mnn sets itself for every component; EXTRA may not override them.
_RESERVED_FLAGS = ("-f", "--framework", "--modelFile", "--MNNModel", "--saveExternalData", "--prototxt")


def _extra_flags(extra: str, takes_value: dict[str, bool] | None = None) -> list[tuple[str, str | None, str]]:
    """EXTRA as (flag, value or None, as written) triples. A flag's value is ``--flag=V`` or
    the next word; ``takes_value`` (from the converter's --help) says which flags have one,
    and without it any word that is not a flag is taken as the previous flag's value."""
    try:
        words = shlex.split(extra)
    except ValueError as err:
        raise InputError(f"cannot parse the extra converter flags {extra!r}: {err}") from None
    flags: list[tuple[str, str | None, str]] = []
    for word in words:
        name, equals, value = word.partition("=")
        if re.match(r"^--?[A-Za-z]", word):
            flags.append((name, value if equals else None, word))
            continue
        previous = flags[-1] if flags else None
        wants = previous is not None and previous[1] is None and (
            takes_value is None or takes_value.get(previous[0], False))
        if not wants:
            raise InputError(
                f"{word!r} in the extra converter flags {extra!r} is not a converter flag; "
                "give flags like --weightQuantBits=8"
            )
        flags[-1] = (previous[0], word, f"{previous[2]} {word}")
    return flags


@dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion can be asked for. Paths are the only thing not in here."""

    components: tuple[str, ...] | None = None  # None: the pipeline family's defaults
    # The converter flags sd2mnn names (sd2mnn.conversion.converter_flags: one row each, unset by default).
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
    # "diffusers": tokenizer.mtok + text encoder that make MNN's runtime condition as diffusers
    # does (sd2mnn.tokenization); "mnn": MNN's own flow, byte for byte.
    tokenizer_scheme: str = DEFAULT_SCHEME
    # Bits per layer, per component: component -> an MNN compression file (its path) or
    # {op name: LayerBits} (sd2mnn.quantization.compression). A layer it leaves out takes the flags.
    compression: Mapping[str, object] | None = None

    def __post_init__(self):
        if self.tokenizer_scheme not in SCHEMES:
            raise InputError(f"--tokenizer-scheme must be diffusers or mnn, got {self.tokenizer_scheme!r}")
        check_values(self._flag_values())
        if self.jobs is not None and self.jobs < 1:
            raise InputError(f"--jobs must be at least 1, got {self.jobs}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise InputError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        for name, value, token in _extra_flags(self.extra):
            if name in _RESERVED_FLAGS:
                raise InputError(
                    f"extra converter flag {token!r} is set by sd2mnn itself; leave it out of EXTRA"
                )
            check_extra_value(name, value, token)
            if name == "--compressionParamsFile":
                raise InputError(f"extra converter flag {token!r}: a compression file belongs to one component; "
                                 "give it as --compression-file COMPONENT=FILE")

    def _flag_values(self) -> dict[str, object]:
        return {flag.field: getattr(self, flag.field) for flag in CONVERTER_FLAGS}

    def named_flags(self) -> tuple[str, ...]:
        """The converter flags sd2mnn's own options stand for."""
        return converter_words(self._flag_values())

    def converter_flags(self) -> tuple[str, ...]:
        """The flags every component is converted with, after sd2mnn's own file arguments."""
        return (*self.named_flags(), *shlex.split(self.extra))


@functools.lru_cache(maxsize=None)
def converter_options(converter: Converter) -> dict[str, bool]:
    """The converter's own flags (``--long`` and ``-s``) -> whether each takes a value, as its
    ``--help`` lists them (cxxopts: "  -f, --framework arg   model type"). Empty when the help
    cannot be read: then only the converter's log can tell an unknown flag."""
    try:
        done = subprocess.run(converter.argv(["--help"]), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    options: dict[str, bool] = {}
    for short, long, arg in re.findall(r"^ {1,8}(?:-(\w), )?--(\w+)( arg)?", done.stdout + done.stderr, re.MULTILINE):
        options[f"--{long}"] = bool(arg)
        if short:
            options[f"-{short}"] = bool(arg)
    return options


def check_extra_flags(options: ConvertOptions, converter: Converter) -> list[str]:
    """Refuse EXTRA flags the converter does not have (it ignores them, and the bundle comes
    out fp32 where --weightQuantBit=8 meant 8 bits). Returns warnings for flags that EXTRA and
    a named option both set (the converter takes the later one: EXTRA's)."""
    if not options.extra.strip():
        return []
    known = converter_options(converter)
    flags = _extra_flags(options.extra, known or None)
    for name, value, token in flags:
        if known and name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            lister = " ".join(converter.argv(["--help"]))
            raise InputError(
                f"the converter has no flag {name} (in EXTRA {options.extra!r}); {hint}"
                f"'{lister}' lists its flags"
            )
        if known and known[name] and value is None:
            raise InputError(f"extra converter flag {name} needs a value ({name}=VALUE)")
    named = {flag.split("=", 1)[0]: flag for flag in options.named_flags()}
    return [
        f"{named[name]} (from sd2mnn's options) and {token} (from EXTRA) both set {name}; "
        f"the converter takes EXTRA's {token}"
        for name, _, token in flags if name in named
    ]


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
    compression: dict = field(default_factory=dict)  # op name -> LayerBits: MNN's per-layer file

    @property
    def name(self) -> str:
        return self.source.spec.name

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.source.spec.output_names(bool(self.compression))


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
    # Graphs put in front of a component before converting it: name -> an object with
    # ``prefix_id`` (recorded) and ``prepend(source, target)`` (sd2mnn.tokenization.id_rewrite.TextEncoderPrefix).
    prefixes: dict[str, object] = field(default_factory=dict)

    def prefix_id(self, name: str) -> str:
        prefix = self.prefixes.get(name)
        return prefix.prefix_id if prefix is not None else ""


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
    prefix: str = "",
    output_names: tuple[str, ...] = (),
    compression: dict[str, str] | None = None,
) -> str | None:
    """Why ``record`` cannot stand for a conversion with these inputs, or None if it can.
    ``output_names``: the files a conversion writes; a record of others is not this component's."""
    if record is None:
        return "new"
    if record.compression != (compression or {}):
        return "layer bits changed"
    if output_names and sorted(f.path for f in record.outputs) != sorted(output_names):
        return "outputs changed"
    if record.flags != flags:
        return "flags changed"
    if record.prefix != prefix:
        return "tokenizer scheme changed"
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
    prefixes: dict[str, object] | None = None,
    compression: dict[str, dict] | None = None,
) -> ConversionPlan:
    """Decide per component: reuse the bundle's, resume an interrupted run's, or convert.
    ``prefixes``: graphs put in front of components before converting (see ConversionPlan);
    ``compression``: component -> {op name: LayerBits}, read and checked."""
    prefixes = prefixes or {}
    compression = compression or {}
    flags = options.converter_flags()
    identity = converter_identity(converter)
    jobs, reused, resumed = [], {}, {}
    for name in options.components:
        source = onnx.components[name]
        old = previous.components.get(name) if previous else None
        waiting, waiting_root = pending.get(name, (None, None))
        sources = source_records(source, onnx.root, old or waiting)
        layers = compression.get(name, {})
        if options.force:
            jobs.append(ComponentJob(source, "forced", sources, layers))
            continue
        sources = _hash_where_needed(old or waiting, sources, onnx.root)
        prefix = prefixes[name].prefix_id if name in prefixes else ""
        outputs = source.spec.output_names(bool(layers))
        labels = layer_labels(layers)
        reason = _stale_reason(old, sources, flags, identity, mnn_dir, prefix, outputs, labels)
        if reason is None:
            reused[name] = replace(old, sources=sources)  # new mtimes: no re-hash next time
        elif waiting is not None and _stale_reason(waiting, sources, flags, identity, waiting_root, prefix,
                                                   outputs, labels) is None:
            resumed[name] = replace(waiting, sources=sources)
        else:
            jobs.append(ComponentJob(source, reason, sources, layers))
    return ConversionPlan(onnx, mnn_dir, converter, flags, options, previous, tuple(jobs), reused, resumed, prefixes)


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


# A conversion peaks at about 2.2x its ONNX model with weights: measured on a full-size SD1.5
# unet (3.4 GB of ONNX), MNNConvert peaked at 7.5 GB RSS on a 2-core, 24 GiB machine.
PEAK_PER_SOURCE_BYTE = 2.2
# The outputs are about as big as the sources (fp32); quantization only shrinks them.
OUTPUT_PER_SOURCE_BYTE = 1.05


def expected_peak(job: ComponentJob) -> int:
    return int(sum(f.size for f in job.sources) * PEAK_PER_SOURCE_BYTE) + (200 << 20)
