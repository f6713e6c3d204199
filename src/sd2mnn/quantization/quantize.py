"""``sd2mnn.quantize``: the smallest bundle whose components still meet a PSNR floor.

Per component:

    measure   each quantizable layer's cost on ONNX Runtime: the output noise with that layer
              alone at the probe setting, on verify's inputs (sd2mnn.quantization.sensitivity);
              kept in MNN_DIR/.sd2mnn/measured/, so a rerun with the same inputs measures nothing
    allocate  bits per layer: the fewest bytes whose predicted noise meets the floor
              (sd2mnn.quantization.allocate)
    trial     convert the component with that choice into a scratch bundle and verify it; the
              measured PSNR calibrates the prediction, and the budget is moved until a choice
              meets the floor within TOLERANCE_DB (at most ``attempts`` trials, each remembered)

then the bundle is converted once with every component's choice (MNN's compression file, kept
in the bundle as <component>.compression.json, its layers in manifest.json) and verified. A floor
no choice meets is refused, and the bundle is left as it was.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from sd2mnn._version import __version__
from sd2mnn.conversion.plan import ConvertOptions
from sd2mnn.core.bundle import WORK_AREA
from sd2mnn.core.layout import open_onnx_pipeline, split_components
from sd2mnn.core.manifest import FileRecord, write_json_atomic
from sd2mnn.core.progress import NullProgress, Progress
from sd2mnn.errors import ConversionError, InputError
from sd2mnn.quantization.allocate import Allocation, allocate
from sd2mnn.quantization.compression import LayerBits, OnnxLayer, layers_digest, quantizable_layers
from sd2mnn.quantization.sensitivity import LayerCost, measure, noise_psnr

DEFAULT_CHOICES = ("8", "7", "6", "5", "4b64", "4", "3b64")
DEFAULT_PROBE = "4"
TOLERANCE_DB = 0.5  # a choice this close above the floor is taken
DEFAULT_ATTEMPTS = 5
MEASURED = f"{WORK_AREA}/measured"  # the measurements a rerun reuses
TRIAL = f"{WORK_AREA}/trial"  # the scratch bundle trials convert into


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``sd2mnn.quantize`` is asked for; conversion settings come as ``convert``."""

    min_psnr: float | Mapping[str, float] = 40.0  # dB per component, or component -> dB
    choices: tuple[str, ...] = DEFAULT_CHOICES  # LayerBits labels a layer may get
    probe: str = DEFAULT_PROBE  # the setting each layer's sensitivity is measured at
    attempts: int = DEFAULT_ATTEMPTS
    sensitivity_cases: int = 1  # verify's first cases, fed to the sensitivity runs
    seed: int = 0
    threads: int | None = None
    convert: ConvertOptions = field(default_factory=ConvertOptions)

    def __post_init__(self):
        floors = self.min_psnr.values() if isinstance(self.min_psnr, Mapping) else [self.min_psnr]
        for floor in floors:
            if not (isinstance(floor, (int, float)) and math.isfinite(floor) and 0 < floor < 200):
                raise InputError(f"--min-psnr must be a number of dB between 0 and 200, got {floor!r}")
        if not self.choices:
            raise InputError("--choices is empty; give at least one, e.g. 8,6,4b64")
        for label in (*self.choices, self.probe):
            LayerBits.parse(label)  # a one-line error for a bad label
        if self.attempts < 1:
            raise InputError(f"--attempts must be at least 1, got {self.attempts}")
        if self.sensitivity_cases < 1:
            raise InputError(f"--sensitivity-cases must be at least 1, got {self.sensitivity_cases}")

    def floor(self, name: str) -> float:
        """``name``'s floor: its own, else the "*" one (quantize checks every component has one)."""
        if isinstance(self.min_psnr, Mapping):
            return float(self.min_psnr[name] if name in self.min_psnr else self.min_psnr["*"])
        return float(self.min_psnr)

    @property
    def settings(self) -> list[LayerBits]:
        return list(dict.fromkeys(LayerBits.parse(label) for label in self.choices))


@dataclass
class Trial:
    digest: str
    predicted_psnr: float
    psnr: float
    cosine: float
    weight_bytes: int  # the component's .mnn + .mnn.weight
    reused: bool = False  # taken from the kept measurements, not converted again

    def to_dict(self) -> dict:
        return vars(self).copy()


@dataclass
class ComponentChoice:
    name: str
    min_psnr: float
    layers: dict[str, LayerBits]
    trials: list[Trial]
    sensitivity_s: float  # measuring (0 when reused)
    measured_layers: int
    reused_measurements: bool
    sensitivity_peak_bytes: int = 0  # this process's peak RSS right after measuring (0 when reused)

    @property
    def chosen(self) -> Trial:
        return min((t for t in self.trials if t.psnr >= self.min_psnr), key=lambda t: t.weight_bytes)

    def histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for setting in self.layers.values():
            counts[setting.label] = counts.get(setting.label, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    def to_dict(self) -> dict:
        return {"name": self.name, "min_psnr": self.min_psnr, "layers": len(self.layers),
                "bits": self.histogram(), "chosen": self.chosen.to_dict(),
                "trials": [t.to_dict() for t in self.trials], "sensitivity_s": round(self.sensitivity_s, 3),
                "measured_layers": self.measured_layers, "reused_measurements": self.reused_measurements,
                "sensitivity_peak_bytes": self.sensitivity_peak_bytes}


@dataclass
class QuantizeReport:
    onnx_dir: Path
    mnn_dir: Path
    components: list[ComponentChoice]
    conversion: object  # sd2mnn.conversion.convert.ConversionReport
    verification: object  # sd2mnn.verification.verify.VerificationReport
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"onnx_dir": str(self.onnx_dir), "mnn_dir": str(self.mnn_dir), "wall_s": round(self.wall_s, 3),
                "components": [c.to_dict() for c in self.components],
                "conversion": self.conversion.to_dict(), "verification": self.verification.to_dict()}


# -- the measurements a rerun reuses -----------------------------------------------------------


class _Measurements:
    """MNN_DIR/.sd2mnn/measured/<component>.json: layer costs and trials, for one set of inputs
    (the source files, the seed, the cases, the probe, the choices and sd2mnn's version)."""

    def __init__(self, mnn_dir: Path, name: str, key: dict, sources: list[Path], onnx_root: Path):
        self.path = mnn_dir / MEASURED / f"{name}.json"
        self.key, self.sources, self.onnx_root = key, sources, onnx_root
        saved = self._read()
        known = {f["path"]: FileRecord(**f) for f in saved.get("sources", [])} if saved else {}
        # Size and mtime vouch for a source as in manifest.json; the rest is hashed.
        self.records = [FileRecord.of(p, onnx_root, known.get(p.relative_to(onnx_root).as_posix())) for p in sources]
        same = saved is not None and saved.get("key") == key and saved.get("sources") == [vars(r) for r in self.records]
        self.costs = [LayerCost.from_dict(c) for c in saved["costs"]] if same and saved.get("costs") else None
        self.trials: dict[str, dict] = saved.get("trials", {}) if same else {}
        self.sensitivity_s = float(saved.get("sensitivity_s", 0.0)) if same else 0.0
        # The measuring process's peak RSS, kept so a run that reuses them can still report it.
        self.sensitivity_peak_bytes = int(saved.get("sensitivity_peak_bytes", 0)) if same else 0

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # none yet, or damaged: measured again
        return data if isinstance(data, dict) else None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"key": self.key, "sources": [vars(r) for r in self.records],
                                      "costs": [c.to_dict() for c in self.costs or []],
                                      "sensitivity_s": self.sensitivity_s,
                                      "sensitivity_peak_bytes": self.sensitivity_peak_bytes, "trials": self.trials})


# -- the search --------------------------------------------------------------------------------


def _trial(onnx_dir: Path, trial_dir: Path, spec, layers: dict[str, LayerBits], options: QuantizeOptions,
           threads: int) -> tuple[float, float, int]:
    """Convert the component ``spec`` with ``layers`` into the scratch bundle and verify it:
    (worst PSNR, worst cosine, its .mnn + .mnn.weight bytes)."""
    from sd2mnn.conversion.convert import convert
    from sd2mnn.verification.verify import verify

    name = spec.name
    converted = convert(onnx_dir, trial_dir, replace(options.convert, components=(name,), compression={name: layers},
                                                     force=False))
    size = sum(f.size for f in converted.components[0].record.outputs if f.path in (spec.mnn_name, spec.weight_name))
    checked = verify(onnx_dir, trial_dir, components=(name,), seed=options.seed, threads=threads).components[0]
    if checked.error or not checked.outputs or any(o.problem for o in checked.outputs):
        raise ConversionError(f"{name}: the trial bundle did not run: {(checked.failures or ['no output'])[0]}")
    return min(o.psnr for o in checked.outputs), min(o.cosine for o in checked.outputs), size


def _search(spec, onnx_dir: Path, trial_dir: Path, layers: list[OnnxLayer], costs: list[LayerCost],
            store: _Measurements, options: QuantizeOptions, threads: int, progress: Progress) -> list[tuple[Trial, dict]]:
    """Trials until one meets the floor within TOLERANCE_DB (or the attempts run out)."""
    name = spec.name
    floor = options.floor(name)
    by_name = {c.op_name: c for c in costs}
    settings = options.settings
    converter = options.convert.converter or ""
    budget = 10 ** (-floor / 10)
    trials: list[tuple[Trial, dict]] = []
    for attempt in range(options.attempts):
        chosen = allocate(layers, by_name, settings, budget)
        digest = layers_digest(chosen.layers)
        if any(t.digest == digest for t, _ in trials):
            break  # the budget moved too little to change a layer
        predicted = noise_psnr(chosen.predicted_noise)
        key = f"{digest}:{converter}"
        remembered = store.trials.get(key)
        if remembered is not None:
            trial = Trial(digest, predicted, remembered["psnr"], remembered["cosine"], remembered["weight_bytes"], True)
        else:
            progress.update(name, "trial", f"{attempt + 1}: predicted {predicted:.1f} dB, converting and verifying")
            psnr, cosine, size = _trial(onnx_dir, trial_dir, spec, chosen.layers, options, threads)
            trial = Trial(digest, predicted, psnr, cosine, size)
            store.trials[key] = {"psnr": psnr, "cosine": cosine, "weight_bytes": size}
            store.save()
        trials.append((trial, chosen.layers))
        progress.update(name, "trial", f"{attempt + 1}: {trial.psnr:.1f} dB (predicted {predicted:.1f}), "
                                       f"{trial.weight_bytes / 2**20:.2f} MiB")
        if floor <= trial.psnr < floor + TOLERANCE_DB:
            break
        budget = _next_budget(chosen, trial, floor)
    return trials


def _next_budget(chosen: Allocation, trial: Trial, floor: float) -> float:
    """The budget whose prediction, corrected by this trial's measured/predicted noise, lands a
    quarter of the tolerance above the floor."""
    measured_noise = 10 ** (-trial.psnr / 10)
    ratio = measured_noise / max(chosen.predicted_noise, 1e-30)
    return 10 ** (-(floor + TOLERANCE_DB / 4) / 10) / max(ratio, 1e-12)


def _choose(name, onnx, mnn_dir: Path, trial_dir: Path, options: QuantizeOptions, threads: int,
            progress: Progress) -> ComponentChoice:
    from sd2mnn.verification.verify import component_feeds

    source = onnx.components[name]
    layers = list(quantizable_layers(source.model).values())
    if not layers:
        raise InputError(f"{source.model} has no layer MNN quantizes (Conv, MatMul or Gemm with constant weights); "
                         f"leave {name} out of --components")
    probe = LayerBits.parse(options.probe)
    names_digest = hashlib.sha256("\n".join(layer.op_name for layer in layers).encode()).hexdigest()[:16]
    key = {"sd2mnn": __version__, "seed": options.seed, "cases": options.sensitivity_cases, "probe": probe.label,
           "choices": [s.label for s in options.settings], "layers": names_digest}
    store = _Measurements(mnn_dir, name, key, list(source.files), onnx.root)
    reused = store.costs is not None
    if not reused:
        progress.update(name, "measuring", f"{len(layers)} layers on ONNX Runtime")
        feeds = component_feeds(onnx.root, name, onnx.family, options.seed, threads)[:options.sensitivity_cases]
        started = time.monotonic()
        store.costs = measure(source.model, layers, feeds, probe, options.settings, threads,
                              lambda done, total, op: progress.update(name, "measuring", f"layer {done}/{total}"))
        store.sensitivity_s = time.monotonic() - started
        store.sensitivity_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        store.trials = {}
        store.save()
    trials = _search(source.spec, onnx.root, trial_dir, layers, store.costs, store, options, threads, progress)
    meeting = [(t, chosen) for t, chosen in trials if t.psnr >= options.floor(name)]
    if not meeting:
        best = max(trials, key=lambda item: item[0].psnr)[0]
        raise InputError(
            f"{name}: no choice of bits from {','.join(options.choices)} meets --min-psnr {options.floor(name):g}: "
            f"the most faithful tried reached {best.psnr:.1f} dB; lower the floor or add a more precise choice "
            f"(e.g. --choices 8,float); the bundle is unchanged and the measurements are kept for the next run")
    pick, layers_chosen = min(meeting, key=lambda item: item[0].weight_bytes)
    return ComponentChoice(name, options.floor(name), layers_chosen, [t for t, _ in trials],
                           0.0 if reused else store.sensitivity_s, len(store.costs), reused,
                           0 if reused else store.sensitivity_peak_bytes)


def quantize(onnx_dir: str | os.PathLike, mnn_dir: str | os.PathLike, options: QuantizeOptions | None = None,
             progress: Progress | None = None, **overrides) -> QuantizeReport:
    """Convert ``onnx_dir`` into ``mnn_dir`` with bits per layer chosen to meet ``min_psnr``
    (see the module docstring). ``options`` or its fields by keyword; ``components`` (names or
    "a,b") and the other ConvertOptions fields by keyword go to the conversion. Raises an
    Sd2MnnError for bad input, a floor no choice meets or a failed conversion, leaving the
    bundle as it was."""
    from sd2mnn.conversion.convert import convert
    from sd2mnn.verification.verify import Thresholds, verify_after_convert

    convert_fields = {k: overrides.pop(k) for k in list(overrides) if k in ConvertOptions.__dataclass_fields__}
    options = replace(options or QuantizeOptions(), **overrides)
    if "components" in convert_fields:
        convert_fields["components"] = split_components(convert_fields["components"])
    if convert_fields:
        options = replace(options, convert=replace(options.convert, **convert_fields))
    if options.convert.compression:
        raise InputError("sd2mnn quantize writes the compression files itself; convert with --compression-file instead")
    progress = progress or NullProgress()
    started = time.monotonic()
    onnx = open_onnx_pipeline(onnx_dir, options.convert.components)
    names = tuple(onnx.components)
    mnn_path = Path(mnn_dir)
    if mnn_path.exists() and not mnn_path.is_dir():
        raise InputError(f"{mnn_path} exists and is not a folder; choose another output folder")
    if mnn_path.resolve() == onnx.root.resolve():
        raise InputError(f"{mnn_path} is the ONNX folder itself; write the bundle to another folder")
    if isinstance(options.min_psnr, Mapping):
        unknown = [n for n in options.min_psnr if n != "*" and n not in names]
        if unknown:
            raise InputError(f"--min-psnr names {', '.join(unknown)}, which this run does not convert; "
                             f"give floors for {', '.join(names)}")
        missing = [n for n in names if n not in options.min_psnr and "*" not in options.min_psnr]
        if missing:
            raise InputError(f"--min-psnr gives no floor for {', '.join(missing)}; add one for each (COMPONENT=DB) "
                             "or a default (a plain DB, e.g. 40,unet=35)")
    threads = options.threads or min(4, os.cpu_count() or 1)
    created = not mnn_path.exists()
    trial_dir = mnn_path / TRIAL
    choices: list[ComponentChoice] = []
    try:
        for name in names:
            progress.update(name, "waiting")
        for name in names:
            choices.append(_choose(name, onnx, mnn_path, trial_dir, options, threads, progress))
            progress.update(name, "chosen", f"{choices[-1].chosen.psnr:.1f} dB, "
                                            f"{choices[-1].chosen.weight_bytes / 2**20:.2f} MiB")
    finally:
        shutil.rmtree(trial_dir, ignore_errors=True)
        if created and not any(mnn_path.glob(f"{WORK_AREA}/measured/*")):
            shutil.rmtree(mnn_path, ignore_errors=True)
    progress.update("bundle", "converting", ", ".join(names))
    conversion = convert(onnx.root, mnn_path, replace(options.convert, components=names,
                                                      compression={c.name: c.layers for c in choices}))
    progress.update("bundle", "verifying", ", ".join(names))
    # Each component is held to its own floor (a PSNR floor below 45 dB goes with cosines under
    # verify's default 0.995 for quantized weights).
    floors = {name: Thresholds(min_psnr=options.floor(name), min_cosine=0.0) for name in names}
    verification = verify_after_convert(onnx.root, mnn_path, names, thresholds=floors, seed=options.seed)
    progress.update("bundle", "done" if verification.passed else "failed", f"{sum(f.size for f in conversion.files) / 2**20:.1f} MiB")
    progress.close()
    return QuantizeReport(onnx.root, mnn_path, choices, conversion, verification, time.monotonic() - started)
