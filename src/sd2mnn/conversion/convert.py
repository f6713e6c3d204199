"""``sd2mnn.convert``: an ONNX pipeline folder to an MNN bundle, checked, atomically.

plan (what to convert, reuse or resume) -> run (child converters, each output loaded in MNN)
-> commit (files into place, manifest last) -> report. See sd2mnn.core.bundle for the on-disk protocol.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from sd2mnn import families
from sd2mnn._version import __version__
from sd2mnn.conversion.converter import find_converter
from sd2mnn.conversion.plan import (OUTPUT_PER_SOURCE_BYTE, ComponentJob, ConversionPlan, ConvertOptions,
                                    check_extra_flags, converter_argv, converter_identity, default_jobs, expected_peak,
                                    plan_conversion)
from sd2mnn.core.bundle import WORK_AREA, BundleDir
from sd2mnn.core.children import Child, ChildResult, child_env, interrupts_deferred, log_tail
from sd2mnn.core.contract import runtime_input_shapes
from sd2mnn.core.layout import (LOGS_DIR, MANIFEST_NAME, MTOK_NAME, OnnxPipeline, bundle_mtok, bundle_mtoks,
                                check_component_names, open_onnx_pipeline, split_components, tokenizer_folder_files)
from sd2mnn.core.manifest import ComponentRecord, FileRecord, Manifest, read_manifest
from sd2mnn.core.onnx_scan import TensorSpec, check_external_data, check_mnn_computes_it
from sd2mnn.core.progress import NullProgress, Progress
from sd2mnn.errors import (ConversionError, ConversionTimeoutError, DiskSpaceError, InputError, Sd2MnnError,
                           os_errors_as_one_line)
from sd2mnn.quantization.compression import (LayerBits, check_against_model, layer_labels, read_compression_file,
                                             write_compression_file)
from sd2mnn.tokenization.id_rewrite import TextEncoderPrefix, load_rewrite
from sd2mnn.tokenization.writer import write_mtok

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentOutcome:
    name: str
    status: str  # "converted", "reused" (already in the bundle) or "resumed" (from an interrupted run)
    reason: str  # why it was converted, or why not
    record: ComponentRecord

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "reason": self.reason, **self.record.to_dict()}


@dataclass
class ConversionReport:
    onnx_dir: Path
    mnn_dir: Path
    converter: dict
    flags: list[str]
    jobs: int
    components: list[ComponentOutcome]
    wall_s: float
    manifest_path: Path
    files: list[FileRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "onnx_dir": str(self.onnx_dir),
            "mnn_dir": str(self.mnn_dir),
            "converter": self.converter,
            "flags": self.flags,
            "jobs": self.jobs,
            "wall_s": round(self.wall_s, 3),
            "manifest": str(self.manifest_path),
            "components": [c.to_dict() for c in self.components],
            "files": [{"path": f.path, "size": f.size} for f in self.files],
        }


# ConvertOptions fields under the names they had before: former name -> field.
FORMER_OPTION_NAMES = {"tokenizer": "tokenizer_scheme"}


def convert(
    onnx_dir: str | os.PathLike,
    mnn_dir: str | os.PathLike,
    options: ConvertOptions | None = None,
    progress: Progress | None = None,
    **overrides,
) -> ConversionReport:
    """Convert the ONNX pipeline in ``onnx_dir`` into an MNN bundle in ``mnn_dir``.

    Options come as a ``ConvertOptions`` or as its fields by keyword
    (``convert(src, dst, weight_quant_bits=8)``). Raises an ``Sd2MnnError`` subclass on bad
    input or a failed conversion, leaving ``mnn_dir`` as it was. Exporting a diffusers model
    first (``sd2mnn.export``) and verifying afterwards (``sd2mnn.verify``) are separate steps; the
    command line composes them.
    """
    if "components" in overrides:
        overrides["components"] = split_components(overrides["components"])
    for former, field_name in FORMER_OPTION_NAMES.items():  # scripts that pass a former name keep working
        if former in overrides:
            overrides[field_name] = overrides.pop(former)
    options = replace(options or ConvertOptions(), **overrides)
    progress = progress or NullProgress()
    for path, what in ((onnx_dir, "ONNX_DIR"), (mnn_dir, "MNN_DIR")):
        if not str(path).strip():  # Path("") is ".": an unset shell variable must not mean here
            raise InputError(f"{what} is an empty string; give a folder")
    started = time.monotonic()

    onnx = open_onnx_pipeline(onnx_dir, options.components)
    options = replace(options, components=tuple(onnx.components))  # the family's names (defaults: its own)
    for source in onnx.components.values():
        check_external_data(source.summary)
        check_mnn_computes_it(source.summary)
    _tokenizer_files(onnx)  # a tokenizer file the bundle cannot take is refused before anything runs
    compression = _compression(onnx, options)
    converter = find_converter(options.converter)
    for warning in check_extra_flags(options, converter):
        log.warning("warning: %s", warning)
    mnn_path = Path(mnn_dir)
    _check_output_folder(mnn_path)
    previous = _read_previous_manifest(mnn_path / MANIFEST_NAME)
    if mnn_path.resolve() == onnx.root.resolve():
        raise InputError(f"{mnn_path} is the ONNX folder itself; write the bundle to another folder")
    _check_same_family(onnx, mnn_path, previous)

    with os_errors_as_one_line(mnn_path, "the bundle is unchanged"), BundleDir(mnn_path) as bundle:
        # The tokenizers first: a tokenizer sd2mnn cannot write must fail before any converter
        # runs. Each text encoder's prefix graph is built from the very tokenizer.mtok staged.
        mtoks = bundle_mtoks(onnx.family)
        progress.update("tokenizer", "writing", ", ".join(mtoks))
        tokenizer_scheme = _tokenizer_scheme(onnx, mnn_path, options, previous)
        tokenizer_scratch = bundle.new_scratch("tokenizer")
        for target, folder in onnx.tokenizers.items():
            (tokenizer_scratch / target).mkdir(exist_ok=True)
            write_mtok(folder, tokenizer_scratch / target / MTOK_NAME, tokenizer_scheme)
        prefixes = _prefixes(onnx, options, tokenizer_scheme, tokenizer_scratch)
        plan = plan_conversion(onnx, mnn_path, converter, options, previous, bundle.pending(), prefixes, compression)
        _check_foreign_files(plan)
        _check_disk_space(plan, bundle)
        jobs = options.jobs or default_jobs([expected_peak(j) for j in plan.to_convert])
        tokenizer_staged: dict[str, Path] = {}
        tokenizer_files, family = _stage_tokenizer(plan, tokenizer_scratch, tokenizer_staged)
        progress.update("tokenizer", "done", ", ".join(mtoks))
        for name in plan.reused:
            progress.update(name, "reused", "up to date")
        for name in plan.resumed:
            progress.update(name, "resumed", "finished by an interrupted run")
        for job in plan.to_convert:
            progress.update(job.name, "waiting", job.reason)
        finished = _run_jobs(plan, bundle, jobs, progress)
        staged, records = _stage_components(plan, bundle, finished)
        staged.update(tokenizer_staged)
        manifest = _next_manifest(plan, records, tokenizer_files, tokenizer_scheme, family)
        bundle.commit(staged, manifest, _retired(plan, records))
    progress.close()

    outcomes = [
        ComponentOutcome(name, "reused", "up to date", rec) for name, rec in plan.reused.items()
    ] + [
        ComponentOutcome(name, "resumed", "finished by an interrupted run", rec) for name, rec in plan.resumed.items()
    ] + [
        ComponentOutcome(job.name, "converted", job.reason, manifest.components[job.name]) for job in plan.to_convert
    ]
    order = list(options.components)
    outcomes.sort(key=lambda o: order.index(o.name))
    report = ConversionReport(
        onnx_dir=onnx.root,
        mnn_dir=mnn_path,
        converter=converter.describe(),
        flags=list(plan.flags),
        jobs=jobs,
        components=outcomes,
        wall_s=time.monotonic() - started,
        manifest_path=mnn_path / "manifest.json",
        files=_bundle_files(mnn_path, manifest),
    )
    return report


def _compression(onnx: OnnxPipeline, options: ConvertOptions) -> dict[str, dict[str, LayerBits]]:
    """Each component's per-layer bits, read (from a file) and checked against its model: a layer
    the model lacks or MNN cannot quantize as asked is refused here, before anything runs (MNN
    would skip it without a word)."""
    chosen = {}
    for name, given in (options.compression or {}).items():
        if name not in onnx.components:
            raise InputError(f"--compression-file names {name}, which this run does not convert; "
                             f"give one of {', '.join(onnx.components)}, or add it to --components")
        model = onnx.components[name].model
        if isinstance(given, Mapping):
            layers, where = dict(given), Path(f"<{name} layer bits>")
        else:
            where = Path(given)
            layers = read_compression_file(where)
        check_against_model(where, layers, model)
        chosen[name] = layers
    return chosen


def check_before_export(mnn_dir: Path, options: ConvertOptions) -> None:
    """What would fail a conversion into ``mnn_dir`` with ``options`` and can be known before an
    export that takes minutes (the conversion repeats these checks and prints any warning)."""
    check_extra_flags(options, find_converter(options.converter))
    _check_output_folder(Path(mnn_dir))
    check_component_names(split_components(options.components))


# -- running the converters ------------------------------------------------------------------


class _Background:
    """A function run on a daemon thread: hashlib releases the GIL, so hashing a 3.4 GB UNet
    overlaps the converter instead of adding to the wall time. (Not a ThreadPoolExecutor: a
    Ctrl-C landing inside its submit() leaves its lock held, and its shutdown() then hangs.)"""

    def __init__(self, fn):
        self._result = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="sd2mnn-hash")
        with interrupts_deferred():  # the thread keeps that mask: Ctrl-C and SIGTERM go to the main thread
            self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._result = fn()
        except BaseException as err:  # re-raised in result()
            self._error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


@dataclass
class _Running:
    """A component being converted, then loaded back (two children in turn), its files hashed
    in the background meanwhile."""

    job: ComponentJob
    scratch: Path
    log: Path
    child: Child
    sources: _Background
    phase: str = "converting"  # then "loading"
    convert_result: ChildResult | None = None
    outputs: _Background | None = None

    @property
    def output(self) -> Path:
        return self.scratch / self.job.source.spec.mnn_name

    @property
    def peak(self) -> int:
        # Loading a model back takes about its size; converting, about 2.2x its ONNX size.
        return expected_peak(self.job) if self.phase == "converting" else expected_peak(self.job) // 2


def _tokenizer_scheme(onnx: OnnxPipeline, mnn_dir: Path, options: ConvertOptions, previous: Manifest | None) -> str:
    """The bundle's tokenizer scheme. It follows the text encoders (the components fed prompt
    ids): a run that leaves the bundle's text encoders alone keeps the .mtok files that go with
    them; one that converts some and keeps others must not change it under the kept ones."""
    if previous is None or options.tokenizer_scheme == previous.tokenizer_scheme:
        return options.tokenizer_scheme
    encoders = [n for n, spec in onnx.family.components.items() if spec.prompt_ids]
    kept = [n for n in encoders if n in previous.components and n not in options.components]
    if not kept:
        return options.tokenizer_scheme
    if not any(n in options.components for n in encoders):
        return previous.tokenizer_scheme
    what = ", ".join(kept)
    raise InputError(
        f"{mnn_dir}: its {what} {'was' if len(kept) == 1 else 'were'} converted with --tokenizer-scheme "
        f"{previous.tokenizer_scheme}, and this run's "
        f"--tokenizer-scheme {options.tokenizer_scheme} would change the tokenizers under {'it' if len(kept) == 1 else 'them'}; "
        f"add {what} to --components, "
        f"or pass --tokenizer-scheme {previous.tokenizer_scheme}")


def _prefixes(onnx: OnnxPipeline, options: ConvertOptions, tokenizer_scheme: str, scratch: Path) -> dict:
    """Each converted text encoder's prefix graph (sd2mnn.tokenization.id_rewrite), where the scheme needs
    one for its tokenizer (CLIP's end-of-word BPE), built from that tokenizer's staged .mtok."""
    prefixes = {}
    for name in options.components:
        spec = onnx.family.components[name]
        if not spec.prompt_ids:
            continue
        # The staged .mtok is read back (not free: T5's holds thousands of normalizer steps) only
        # for the tokenizers the scheme rewrites.
        rewrite = load_rewrite(onnx.root / spec.tokenizer, tokenizer_scheme, onnx.family.prompt_formats[spec.tokenizer],
                               mtok=scratch / bundle_mtok(onnx.family, name))
        if rewrite is not None:
            prefixes[name] = TextEncoderPrefix(rewrite)
    return prefixes


def _start(job: ComponentJob, plan: ConversionPlan, bundle: BundleDir, env: dict) -> _Running:
    scratch = bundle.new_scratch(job.name)
    log = scratch / f"{job.name}.log"
    output = scratch / job.source.spec.mnn_name
    model = job.source.model
    if job.name in plan.prefixes:
        model = plan.prefixes[job.name].prepend(model, scratch / "model.onnx")
    argv = plan.converter.argv(converter_argv(model, output, plan.flags))
    if job.compression:
        # MNN reads the file when it exists (and writes one when it does not): it is always written first.
        layers_file = scratch / job.source.spec.compression_name
        write_compression_file(layers_file, job.compression)
        argv += ["--compressionParamsFile", str(layers_file)]
    log.write_text(f"$ {' '.join(argv)}\n")
    # cwd=scratch: the converter drops .__convert_external_data.bin in its working directory.
    child = Child(argv, scratch, log, env=env, timeout=plan.options.timeout)
    sources = _Background(lambda: tuple(f.hashed(plan.onnx.root) for f in job.sources))
    return _Running(job, scratch, log, child, sources)


def _probe(running: _Running, plan: ConversionPlan, env: dict) -> Child:
    spec = running.job.source.spec
    argv = [
        sys.executable, "-m", "sd2mnn.conversion._probe", str(running.output), str(running.scratch / "probe.json"),
        "--inputs", ",".join(spec.inputs), "--outputs", ",".join(spec.outputs),
    ]
    sizes = runtime_input_shapes(spec.name, plan.onnx.family)
    if sizes:  # inputs declared free (Wan's) are sized as the runtime feeds them
        argv += ["--sizes", json.dumps(sizes)]
    return Child(argv, running.scratch, running.log, env=env, timeout=plan.options.timeout)


def _converted(running: _Running, result: ChildResult) -> bool:
    if result.returncode != 0 or result.timed_out or not running.output.exists():
        return False
    # The converter's return value means nothing (True on failure); its log does.
    return "Converted Failed" not in log_tail(running.log, lines=40)


_FULL_DISK_BYTES = 1 << 20


def _check_no_ignored_flags(running: _Running) -> None:
    """The converter skips a flag it does not know with a line in its log and converts anyway;
    EXTRA was checked against its --help, but a converter whose help sd2mnn cannot read is
    caught here."""
    with open(running.log, "rb") as stream:
        head = stream.read(65536).decode("utf-8", "replace")
    ignored = re.findall(r"^Not support option: (\S+)", head, re.MULTILINE)
    if ignored:
        raise ConversionError(
            f"{running.job.name}: the converter ignored the flag(s) {', '.join('--' + f for f in ignored)} "
            "it does not know; fix their spelling in EXTRA and run again"
        )


def _failure(running: _Running, result: ChildResult, what: str) -> Sd2MnnError:
    name = running.job.name
    tail = log_tail(running.log)
    # On a full disk the converter still says "Converted Success!" (its output cut short); the
    # load check or its log then fails, for want of space.
    if "No space left on device" in tail or shutil.disk_usage(running.scratch).free < _FULL_DISK_BYTES:
        return DiskSpaceError(
            f"{name}: the disk ran out of space during the {what} in {running.scratch.parents[2]}; "
            "free some space and run again"
        )
    if result.timed_out:
        return ConversionTimeoutError(
            f"{name}: the {what} ran past --timeout {running.child.timeout:g}s and was killed; "
            "raise --timeout or convert it alone with --components",
            tail,
        )
    return ConversionError(
        f"{name}: {running.job.source.model} did not convert ({what} failed); "
        "see the converter output below, fix the model or the flags, and run again",
        tail,
    )


def _run_jobs(plan: ConversionPlan, bundle: BundleDir, jobs: int, progress: Progress) -> dict[str, ComponentRecord]:
    """Convert and load-check every job, ``jobs`` conversions at a time within the memory
    budget; park each finished component in the bundle's pending area. A load check does not
    hold a conversion slot, so it overlaps the next conversion. Returns name -> record."""
    import psutil

    env = child_env()
    queue = sorted(plan.to_convert, key=expected_peak, reverse=True)  # longest first overlaps best
    budget = int(psutil.virtual_memory().available * 0.9)
    running: list[_Running] = []
    finished: dict[str, ComponentRecord] = {}
    try:
        while queue or running:
            converting = sum(r.phase == "converting" for r in running)
            in_use = sum(r.peak for r in running)
            while queue and converting < jobs and (not running or in_use + expected_peak(queue[0]) <= budget):
                job = queue.pop(0)
                running.append(_start(job, plan, bundle, env))
                converting, in_use = converting + 1, in_use + running[-1].peak
                progress.update(job.name, "converting", job.reason)
            for item in list(running):
                result = item.child.poll()
                if result is None:
                    continue
                if item.phase == "converting":
                    if not _converted(item, result):
                        raise _failure(item, result, "converter")
                    _check_no_ignored_flags(item)
                    item.convert_result = result
                    item.phase, item.child = "loading", _probe(item, plan, env)
                    item.outputs = _Background(
                        lambda s=item.scratch, names=item.job.outputs: tuple(FileRecord.of(s / n, s) for n in names))
                    progress.update(item.job.name, "loading", "checking the model loads in MNN")
                    continue
                if result.returncode != 0 or result.timed_out:
                    raise _failure(item, result, "load check")
                if not (item.outputs.done() and item.sources.done()):
                    continue  # still hashing: poll again
                running.remove(item)
                record = _record(item, plan)
                bundle.park(record, item.scratch)
                finished[record.name] = record
                progress.update(item.job.name, "done", f"peak {record.peak_rss_bytes / 2**30:.2f} GiB")
            progress.tick()
            if running:
                time.sleep(0.1)
    except BaseException as err:
        for item in running:
            item.child.kill()
            item.child.wait()
            failed = isinstance(err, ConversionError) and err.message.startswith(item.job.name + ":")
            progress.update(item.job.name, "failed" if failed else "cancelled")
        for job in queue:
            progress.update(job.name, "cancelled")
        progress.close()
        raise
    return finished


def _record(item: _Running, plan: ConversionPlan) -> ComponentRecord:
    probe = json.loads((item.scratch / "probe.json").read_text())
    (item.scratch / "probe.json").unlink()
    converted = item.convert_result
    return ComponentRecord(
        name=item.job.name,
        flags=plan.flags,
        converter=converter_identity(plan.converter),
        sources=item.sources.result(),
        outputs=item.outputs.result(),
        inputs=tuple(TensorSpec.from_dict(t) for t in probe["inputs"]),
        output_tensors=tuple(TensorSpec.from_dict(t) for t in probe["outputs"]),
        wall_s=round(converted.wall_s, 3),
        peak_rss_bytes=converted.peak_rss_bytes,
        prefix=plan.prefix_id(item.job.name),
        compression=layer_labels(item.job.compression),
    )


# -- staging the commit ----------------------------------------------------------------------


def _stage_components(
    plan: ConversionPlan, bundle: BundleDir, finished: dict[str, ComponentRecord]
) -> tuple[dict[str, Path], dict[str, ComponentRecord]]:
    """Bundle-relative name -> staged file, for every converted or resumed component."""
    staged: dict[str, Path] = {}
    records = dict(plan.resumed)
    records.update(finished)
    pending = bundle.pending()
    for name, record in records.items():
        _, folder = pending[name]
        for output in record.outputs:
            staged[output.path] = output.at(folder)
        staged[f"{LOGS_DIR}/{name}.log"] = folder / f"{name}.log"
        # The files keep their mtime through the renames, so the records stay exact.
    return staged, records


def _retired(plan: ConversionPlan, records: dict[str, ComponentRecord]) -> tuple[str, ...]:
    """Files the bundle's manifest records for a component this run converts and its new record
    does not (a compression file, when it is converted with the flags alone)."""
    if plan.previous is None:
        return ()
    retired = []
    for name, record in records.items():
        old = plan.previous.components.get(name)
        if old is not None:
            kept = {f.path for f in record.outputs}
            retired += [f.path for f in old.outputs if f.path not in kept]
    return tuple(retired)


def _tokenizer_files(onnx: OnnxPipeline) -> list[tuple[str, Path]]:
    """(bundle-relative name, ONNX file) of every tokenizer file the bundle gets a copy of. A
    tokenizer file named like a file of the bundle's own would replace it: refused."""
    own = {MANIFEST_NAME, LOGS_DIR, WORK_AREA, *bundle_mtoks(onnx.family),
           *(name for family in families.FAMILIES.values() for spec in family.components.values()
             for name in spec.output_names(compressed=True))}
    files = []
    for target, folder in onnx.tokenizers.items():
        for item in tokenizer_folder_files(folder):
            if item.name == MTOK_NAME:
                continue  # the .mtok is written, never copied
            rel = "/".join(p for p in (target, item.name) if p)
            if rel in own:
                raise InputError(f"{item} has the name of the bundle's own {rel}, which it would replace; "
                                 f"remove it from {folder}")
            files.append((rel, item))
    return files


def _stage_tokenizer(plan: ConversionPlan, scratch: Path, staged: dict[str, Path]) -> tuple[tuple[FileRecord, ...], str]:
    """Copy the tokenizer files into ``scratch``, beside the tokenizer.mtok written there (each
    tokenizer in the bundle folder it goes to); stage the ones whose content differs from the
    bundle's. Also the model family: the pipeline's where its tokenizer is of the family's kind,
    else the one its tokenizer.mtok makes MNN's runtime run ("" for one it has no runtime for)."""
    for rel, item in _tokenizer_files(plan.onnx):
        shutil.copy2(item, scratch / rel)
    family = plan.onnx.family.name if len(plan.onnx.tokenizers) > 1 else \
        families.runtime_family(plan.onnx.family, scratch / MTOK_NAME)
    known = {f.path: f for f in plan.previous.tokenizer} if plan.previous else {}
    records = []
    for path in sorted(p for p in scratch.rglob("*") if p.is_file()):
        record = FileRecord.of(path, scratch)
        old = known.get(record.path)
        if old is not None and old.sha256 == record.sha256 and old.is_intact(plan.mnn_dir):
            records.append(old)  # unchanged: leave the bundle's file (and its mtime) alone
        else:
            staged[record.path] = path
            records.append(record)
    return tuple(records), family


def _next_manifest(plan: ConversionPlan, records: dict[str, ComponentRecord], tokenizer: tuple[FileRecord, ...],
                   tokenizer_scheme: str, family: str) -> Manifest:
    components = dict(plan.previous.components) if plan.previous else {}
    components.update(plan.reused)
    components.update(records)
    order = list(plan.onnx.family.components)  # the family's order, not the order they finished in
    components = dict(sorted(components.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    return Manifest(
        sd2mnn_version=__version__,
        converter=plan.converter.describe(),
        converter_flags=list(plan.flags),
        onnx_dir=str(plan.onnx.root.resolve()),
        components=components,
        tokenizer=tokenizer,
        tokenizer_scheme=tokenizer_scheme,
        family=family,
        **dict(zip(("loras", "vae"), families.export_changes(plan.onnx.root))),
    )


def _bundle_files(root: Path, manifest: Manifest) -> list[FileRecord]:
    files = [f for rec in manifest.components.values() for f in rec.outputs]
    files += list(manifest.tokenizer)
    return sorted(files, key=lambda f: f.path)


# -- checks before anything is written -------------------------------------------------------


def _check_output_folder(mnn_dir: Path) -> None:
    """Refuse an output path that cannot be a folder: a link to nothing or a link loop."""
    try:
        os.stat(mnn_dir)
    except FileNotFoundError:
        if not mnn_dir.is_symlink():
            return  # a new folder
        raise InputError(f"{mnn_dir} is a link to nothing; remove the link or choose another output folder") from None
    except OSError as err:
        what = {errno.ELOOP: "is a symbolic link loop", errno.ENOTDIR: "has a file where a folder should be"}.get(
            err.errno, f"cannot be reached ({err.strerror})")
        raise InputError(f"{mnn_dir} {what}; choose another output folder") from None


def _check_same_family(onnx: OnnxPipeline, mnn_dir: Path, previous: Manifest | None) -> None:
    """Refuse to mix two families' components in one bundle (no runtime loads such a folder)."""
    others = [n for n in (previous.components if previous else ()) if n not in onnx.family.components]
    if others:
        what = f"an {previous.family} bundle" if previous.family else f"a bundle with {', '.join(others)}"
        raise InputError(f"{mnn_dir} holds {what}, and {onnx.root} is an {onnx.family.name} pipeline; "
                         "convert it into another folder")


def _read_previous_manifest(path: Path) -> Manifest | None:
    try:
        return read_manifest(path)
    except OSError as err:  # a folder in its place, unreadable
        raise InputError(f"cannot read {path} ({err.strerror}); move it out of the way and run again") from None


def _bundle_targets(plan: ConversionPlan) -> list[str]:
    """Every bundle-relative file this run may write."""
    targets = []
    for name in [*(job.name for job in plan.to_convert), *plan.resumed]:
        spec = plan.onnx.components[name].spec
        targets += [*spec.output_names(compressed=True), f"{LOGS_DIR}/{name}.log"]
    targets += [rel for rel, _ in _tokenizer_files(plan.onnx)]
    targets += bundle_mtoks(plan.onnx.family)
    return [*targets, MANIFEST_NAME]


def _check_foreign_files(plan: ConversionPlan) -> None:
    """Refuse to replace files that sd2mnn did not write (no manifest records them) unless
    --overwrite: a folder that is not a bundle may hold someone's own vocab.json or unet.mnn."""
    if plan.options.force:
        return
    ours = {MANIFEST_NAME} if plan.previous else set()
    if plan.previous:
        for name, record in plan.previous.components.items():
            ours.update(f.path for f in record.outputs)
            ours.add(f"{LOGS_DIR}/{name}.log")
        ours.update(f.path for f in plan.previous.tokenizer)
    foreign = [rel for rel in _bundle_targets(plan)
               if rel not in ours and (os.path.lexists(plan.mnn_dir / rel))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        what = "an sd2mnn bundle whose manifest does not list them" if plan.previous else "not an sd2mnn bundle (no manifest.json)"
        raise InputError(
            f"{plan.mnn_dir} is {what}, and the conversion would replace {shown}; "
            "choose an empty folder, or pass --overwrite to replace them"
        )


# The manifest, the logs and other small files: a generous bound.
_SMALL_FILES_BYTES = 1 << 20


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _check_disk_space(plan: ConversionPlan, bundle: BundleDir) -> None:
    """Refuse to start when everything the run writes cannot fit next to the bundle's current
    files: the converted outputs, the tokenizer files and tokenizer.mtok (about as big as the
    vocabulary and merges it is written from), the manifest and the logs, and the rewritten copy
    of a source that gets a graph put in front of it."""
    tokenizer = sum(item.stat().st_size for _, item in _tokenizer_files(plan.onnx))
    needed = 2 * tokenizer + _SMALL_FILES_BYTES
    for job in plan.to_convert:
        source_bytes = sum(f.size for f in job.sources)
        needed += int(source_bytes * OUTPUT_PER_SOURCE_BYTE)
        if job.name in plan.prefixes:
            needed += source_bytes
    free = shutil.disk_usage(bundle.root).free
    if free < needed:
        raise DiskSpaceError(
            f"{bundle.root} has {_size(free)} free but the conversion needs about "
            f"{_size(needed)}; free {_size(needed - free)} or choose another folder"
        )
