"""``sd2mnn.measurement.bench``: how fast and how big each component of a bundle is on MNN, and on ONNX
Runtime beside it.

Per component and runtime, a child process (``python -m sd2mnn.measurement.bench ...``) imports the runtime,
loads the model, runs one input once (the first run: MNN sizes its buffers and packs weights
then), then ``runs`` more times (the steady runs). It reports

    load_s       constructing the session / module (the runtime's import is not counted)
    first_s      the first run after loading
    steady_s     every steady run; the table shows their median and min-max
    peak_rss     the child's peak resident memory (wait4's ru_maxrss)
    model_rss    peak_rss minus the child's peak before loading (the interpreter, numpy and the
                 runtime library): what the model itself costs

One child per runtime per component, because a process's peak memory only says something about
one model when it held nothing else: ONNX Runtime does not give memory back, and MNN's and
ONNX Runtime's peaks would mix. Both runtimes get the same input, the first of the ones
``sd2mnn verify`` uses (sd2mnn.verification.inputs); the unet's text embeddings are random here, which
changes nothing for timing. MNN runs on the CPU at ``precision``; ONNX Runtime on its CPU
provider (fp32), both with ``threads`` intra-op threads.

Sizes come from the models, so a bundle off MNN's runtime contract (other latents, another text
length) is measured all the same; ``BenchReport.off_contract`` says what the runtime would refuse.
A text encoder whose vocabulary cannot hold the ids the runtime feeds is refused before any run.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from sd2mnn.core.bundle import check_for_use
from sd2mnn.core.contract import check_contract, onnx_vocabulary, runtime_notes
from sd2mnn.core.layout import MANIFEST_NAME, folder_family, load_component, parse_components
from sd2mnn.core.manifest import read_manifest
from sd2mnn.core.runtime import PRECISIONS
from sd2mnn.errors import InputError
from sd2mnn.families import Family
from sd2mnn.verification.inputs import build_inputs, component_rng, prompt_ids, static_shape
from sd2mnn.verification.sources import check_sources

RUNTIMES = ("mnn", "onnxruntime")
MEMORY_METHOD = ("peak RSS (ru_maxrss) of a child process per runtime per component; "
                 "model = peak minus the child's peak before loading the model")
# Seconds one runtime may take on one component (load, first run, steady runs) when the caller
# sets no limit: a full-size unet takes minutes here; a child still running after an hour is stuck.
RUN_TIMEOUT_S = 3600.0


@dataclass
class Timing:
    """One runtime on one component."""

    runtime: str  # "mnn" or "onnxruntime"
    file_bytes: int  # the model's files on disk
    load_s: float | None = None
    first_s: float | None = None
    steady_s: list[float] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    model_rss_bytes: int | None = None
    error: str | None = None  # the runtime failed to load or run the model

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.steady_s) if self.steady_s else None

    def to_dict(self) -> dict:
        spread = [min(self.steady_s), max(self.steady_s)] if self.steady_s else None
        return {"runtime": self.runtime, "file_bytes": self.file_bytes, "load_s": self.load_s,
                "first_s": self.first_s, "steady_s": self.steady_s, "steady_median_s": self.median_s,
                "steady_min_max_s": spread, "peak_rss_bytes": self.peak_rss_bytes,
                "model_rss_bytes": self.model_rss_bytes, "error": self.error}


def _ratio(a, b) -> float | None:
    return round(a / b, 4) if a is not None and b else None


@dataclass
class ComponentBench:
    name: str
    inputs: str  # what was fed
    timings: dict[str, Timing] = field(default_factory=dict)  # by runtime

    def ratios(self) -> dict[str, float | None] | None:
        """MNN / ONNX Runtime for each measure (below 1: MNN is faster or smaller)."""
        mnn, ort = self.timings.get("mnn"), self.timings.get("onnxruntime")
        if mnn is None or ort is None or mnn.error or ort.error:
            return None
        return {"load": _ratio(mnn.load_s, ort.load_s), "first": _ratio(mnn.first_s, ort.first_s),
                "steady": _ratio(mnn.median_s, ort.median_s), "model_rss": _ratio(mnn.model_rss_bytes, ort.model_rss_bytes),
                "peak_rss": _ratio(mnn.peak_rss_bytes, ort.peak_rss_bytes), "file": _ratio(mnn.file_bytes, ort.file_bytes)}

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": self.inputs, "timings": {k: t.to_dict() for k, t in self.timings.items()},
                "mnn_over_onnxruntime": self.ratios()}


@dataclass
class BenchReport:
    bundle: Path
    onnx_dir: Path | None
    threads: int
    precision: str
    runs: int
    components: list[ComponentBench]
    memory_method: str = MEMORY_METHOD
    wall_s: float = 0.0
    off_contract: list[str] = field(default_factory=list)  # what MNN's runtime would refuse in the bundle
    warnings: list[str] = field(default_factory=list)  # what could not be checked (an ONNX folder's origin)

    @property
    def errors(self) -> list[str]:
        return [f"{c.name} on {t.runtime}: {t.error}" for c in self.components for t in c.timings.values() if t.error]

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle), "onnx_dir": str(self.onnx_dir) if self.onnx_dir else None,
                "threads": self.threads, "precision": self.precision, "runs": self.runs,
                "memory_method": self.memory_method, "wall_s": round(self.wall_s, 3),
                "components": [c.to_dict() for c in self.components], "errors": self.errors,
                "off_contract": self.off_contract, "warnings": self.warnings}


# -- choosing components and inputs ------------------------------------------------------------


def _select(bundle: Path, onnx_dir: Path | None, components, family: Family) -> tuple[str, ...]:
    specs = family.components
    if components is not None:
        names = parse_components(components, family)
    else:  # every component the bundle has (and the ONNX folder too, when given)
        names = tuple(n for n, s in specs.items() if (bundle / s.mnn_name).is_file()
                      and (onnx_dir is None or (onnx_dir / n / "model.onnx").is_file()))
        if not names:
            raise InputError(f"{bundle} has no component to benchmark; convert it first (sd2mnn convert)")
    for name in names:
        if not (bundle / specs[name].mnn_name).is_file():
            raise InputError(f"{bundle / specs[name].mnn_name} is missing; convert it or leave it out of --components")
    return names


def _input_specs(name: str, bundle: Path, onnx_dir: Path | None, manifest, family: Family):
    """Something with ``.summary.inputs`` (what build_inputs reads): the ONNX model's, or else
    the shapes and dtypes the manifest recorded when the component was converted."""
    if onnx_dir is not None:
        return load_component(onnx_dir, name, family)
    record = manifest.components.get(name) if manifest else None
    if record is None or not record.inputs:
        raise InputError(f"{bundle / MANIFEST_NAME} does not record {name}'s inputs; give the ONNX folder with --onnx")
    return SimpleNamespace(summary=SimpleNamespace(inputs=record.inputs))


def _feeds(names, bundle: Path, onnx_dir: Path | None, seed: int, family: Family) -> dict[str, tuple[dict, str]]:
    """Component -> (one feed, what it is): the first of verify's inputs, seeded as verify seeds them."""
    manifest = read_manifest(bundle / MANIFEST_NAME)
    feeds = {}
    for name in names:
        source = _input_specs(name, bundle, onnx_dir, manifest, family)
        ids = []
        if family.components[name].prompt_ids:  # the family's spec: fed the tokenizer's ids
            length = static_shape(name, source.summary.inputs[0], family)[1]
            model = onnx_dir / name / "model.onnx" if onnx_dir is not None else None
            vocabulary = onnx_vocabulary(model) if model is not None else None
            ids, _ = prompt_ids(bundle, onnx_dir or bundle, length, vocabulary, model, family, name)
        rng = component_rng(seed, name)
        feed = build_inputs(name, source.summary.inputs, rng, ids, None, family)[0][0]
        feeds[name] = (feed, "verify's first input: " + " ".join(f"{k}{list(v.shape)}" for k, v in feed.items()))
    return feeds


# -- measuring -------------------------------------------------------------------------------


def _files_bytes(runtime: str, name: str, bundle: Path, onnx_dir: Path | None, family: Family) -> int:
    if runtime == "mnn":
        spec = family.components[name]
        return sum((bundle / f).stat().st_size for f in (spec.mnn_name, spec.weight_name) if (bundle / f).is_file())
    return load_component(onnx_dir, name, family).total_bytes


def measure(runtime: str, name: str, model: Path, feed: dict, threads: int, precision: str, runs: int,
            workdir: Path, file_bytes: int, family: Family, timeout: float | None = None) -> Timing:
    """Run one model on one runtime in a child process; see the module docstring."""
    from sd2mnn.core.children import log_tail, run_module

    spec = family.components[name]
    timeout = timeout or RUN_TIMEOUT_S
    feeds_path, out, log = workdir / f"{name}-{runtime}.npz", workdir / f"{name}-{runtime}.json", workdir / f"{name}-{runtime}.log"
    np.savez(feeds_path, **feed)
    args = [runtime, model.resolve(), feeds_path, out, ",".join(spec.inputs), ",".join(spec.outputs), threads,
            precision, runs]
    result = run_module("sd2mnn.measurement.bench", args, workdir, timeout, log)
    timing = Timing(runtime, file_bytes)
    if result.timed_out:
        timing.error = f"ran past {timeout:g}s and was killed"
    elif result.returncode != 0 or not out.is_file():
        timing.error = log_tail(log, 3).strip() or f"exit status {result.returncode}"
    else:
        data = json.loads(out.read_text())
        timing.load_s, timing.first_s, timing.steady_s = data["load_s"], data["first_s"], data["steady_s"]
        timing.peak_rss_bytes = result.peak_rss_bytes
        timing.model_rss_bytes = max(0, result.peak_rss_bytes - data["base_rss_bytes"])
    return timing


def bench(bundle, onnx_dir=None, components=None, threads: int = 2, precision: str = "high", runs: int = 5,
          *, runtimes: tuple[str, ...] | None = None, seed: int = 0, timeout: float | None = None,
          progress=None) -> BenchReport:
    """Benchmark every component of ``bundle`` on MNN and, with ``onnx_dir``, on ONNX Runtime.

    ``runtimes`` narrows it ("mnn" and/or "onnxruntime"; default both when ``onnx_dir`` is given).
    A runtime that fails on a component is recorded in its Timing.error (see report.errors), not
    raised. ``timeout``: seconds per child. Raises InputError for missing folders or components.
    """
    from sd2mnn.core.progress import NullProgress

    started = time.monotonic()
    bundle, onnx_dir = Path(bundle), Path(onnx_dir) if onnx_dir is not None else None
    progress = progress or NullProgress()
    if not bundle.is_dir():
        raise InputError(f"{bundle} is not a folder; give the MNN bundle folder")
    if onnx_dir is not None and not onnx_dir.is_dir():
        raise InputError(f"{onnx_dir} is not a folder; give the ONNX pipeline folder")
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if threads < 1 or runs < 1:
        raise InputError(f"threads and runs must be at least 1, got {threads} and {runs}")
    runtimes = tuple(runtimes or (RUNTIMES if onnx_dir is not None else ("mnn",)))
    if "onnxruntime" in runtimes and onnx_dir is None:
        raise InputError("benchmarking ONNX Runtime needs the ONNX folder; give it with --onnx")
    family = folder_family(bundle)
    names = _select(bundle, onnx_dir, components, family)
    check_for_use(bundle, family, names)
    warnings = check_sources(onnx_dir, bundle, names) if onnx_dir is not None else []
    issues = check_contract(bundle, names, family)
    for issue in issues:
        if issue.kind == "vocabulary":  # the runtime's own ids overflow the embedding table: nothing can run
            raise InputError(f"{bundle / issue.file}: MNN's runtime feeds {issue.expected}, but the text encoder has "
                             f"{issue.found}")
    feeds = _feeds(names, bundle, onnx_dir, seed, family)
    results = []
    with tempfile.TemporaryDirectory(prefix="sd2mnn-bench-") as tmp:
        for name in names:
            feed, what = feeds[name]
            entry = ComponentBench(name, what)
            for runtime in runtimes:
                progress.update(f"{name} {runtime}", "running", f"1 + {runs} runs")
                spec = family.components[name]
                model = bundle / spec.mnn_name if runtime == "mnn" else onnx_dir / name / "model.onnx"
                timing = measure(runtime, name, model, feed, threads, precision, runs, Path(tmp),
                                 _files_bytes(runtime, name, bundle, onnx_dir, family), family, timeout)
                entry.timings[runtime] = timing
                detail = timing.error or f"steady {timing.median_s * 1e3:.1f} ms"
                progress.update(f"{name} {runtime}", "failed" if timing.error else "done", detail)
            results.append(entry)
    return BenchReport(bundle, onnx_dir, threads, precision, runs, results, wall_s=time.monotonic() - started,
                       off_contract=runtime_notes(issues), warnings=warnings)


# -- the child -------------------------------------------------------------------------------


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _child(argv: list[str]) -> int:
    """``python -m sd2mnn.measurement.bench RUNTIME MODEL FEEDS.npz OUT.json INPUTS OUTPUTS THREADS PRECISION RUNS``"""
    runtime, model, feeds_path, out, inputs, outputs, threads, precision, runs = argv
    from sd2mnn.core.runtime import MnnModel, OrtModel, RuntimeConfig

    with np.load(feeds_path) as data:
        feed = {k: data[k] for k in data.files}
    # Import the runtime before the baseline, so model_rss counts the model, not the library.
    if runtime == "mnn":
        import MNN.nn  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    base = _peak_rss()
    try:
        started = time.perf_counter()
        if runtime == "mnn":
            loaded = MnnModel(model, inputs.split(","), outputs.split(","),
                              RuntimeConfig(threads=int(threads), precision=precision))
        else:
            loaded = OrtModel(model, threads=int(threads))
        load_s = time.perf_counter() - started
        times = []
        for _ in range(1 + int(runs)):
            started = time.perf_counter()
            loaded.run(feed)
            times.append(time.perf_counter() - started)
    except Exception as err:  # both runtimes raise plain exceptions for bad models
        print(f"{Path(model).name}: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    result = {"load_s": round(load_s, 6), "first_s": round(times[0], 6),
              "steady_s": [round(t, 6) for t in times[1:]], "base_rss_bytes": base}
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
