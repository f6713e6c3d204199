"""``sd2mnn.verification.verify``: does the MNN bundle compute what the ONNX pipeline computes?

For each component in both folders, deterministic inputs that look like the runtime's own are run
through ONNX Runtime (the reference) and MNN, and every output is compared:

    max_abs   max |mnn - ref|                 mean_abs  mean |mnn - ref|
    cosine    <mnn, ref> / (|mnn| |ref|)      psnr      10 log10(ptp(ref)^2 / mean((mnn - ref)^2)) dB

PSNR's peak is the reference's peak-to-peak range (max - min), so it means the same for an image
in [-1, 1] and for a text embedding with outliers near 30; identical outputs read 200 dB (capped).
Over several inputs per component the worst case counts: the highest max_abs, the lowest cosine
and PSNR, the mean of mean_abs.

The inputs (sd2mnn.verification.inputs; ``seed`` picks the random ones) look like the runtime's own:
prompts through the pipeline's tokenizer, unet latents ~N(0,1) at timesteps over 999..1 with the
ONNX text encoder's real embeddings, decoder latents ~N(0,1) / 0.18215, images in [-1, 1].

ONNX Runtime's outputs are those sd2mnn export kept in the ONNX folder for the very same files
and inputs (sd2mnn.verification.references: export runs verify's inputs in its own check), else,
or with ``fresh_references``, a pass of verify's own; each component's result says which.

A component passes when every output has PSNR >= min_psnr and cosine >= min_cosine. The defaults
(DEFAULT_THRESHOLDS) are stricter for fp32 bundles than for quantized ones (flags
--weightQuantBits, --fp16 or --hqq in the manifest; without a manifest, weights smaller than 3/4 of
the ONNX model's). The bundle must also meet the runtime contract (sd2mnn.core.contract).

MNN runs on the CPU at precision "high" (fp32 arithmetic): this checks the conversion, not the
device's low-precision kernels (MNN's SD runtime itself asks for Precision_Low). MNN's Winograd
convolutions and ONNX Runtime's blocked layouts are off for models over 1 GiB, where rewriting
their kernels at load costs more than it saves over verify's few runs (sd2mnn.verification._pass).

Memory: one runtime holds one model at a time: load, run all inputs, free. Components whose ONNX
files exceed ISOLATE_ABOVE_BYTES run each pass in a child process (sd2mnn.verification._pass), because
ONNX Runtime does not give memory back; the parent only ever holds inputs and outputs.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from sd2mnn._version import __version__
from sd2mnn.conversion.converter_flags import quantizing_words
from sd2mnn.core.bundle import BundleDir, confine_runtime_files
from sd2mnn.core.contract import ContractIssue, check_contract, contract_notes, onnx_vocabulary
from sd2mnn.core.layout import MANIFEST_NAME, bundle_mtok, folder_family, load_component, parse_components
from sd2mnn.core.manifest import read_manifest, write_json_atomic
from sd2mnn.core.progress import NullProgress, Progress
from sd2mnn.errors import InputError
from sd2mnn.families import FAMILIES, Family
from sd2mnn.verification import references
from sd2mnn.verification._pass import PassError, RunStats, kernel_transforms_pay, run_pass
from sd2mnn.verification.conditioning import MIN_MATCHING_COSINE, ConditioningReport, check_conditioning
from sd2mnn.verification.inputs import build_inputs, component_rng, prompt_ids, static_shape
from sd2mnn.verification.sources import check_sources

PSNR_CAP = 200.0
ISOLATE_ABOVE_BYTES = 64 << 20
DAMAGED = "damaged file"  # a ContractIssue kind: the file differs from manifest.json's record


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for every output of one component."""

    min_psnr: float  # dB, against the reference's peak-to-peak range
    min_cosine: float


# A cosine c means a relative RMS error of about sqrt(2 (1 - c)): 0.99999 -> 0.45%, 0.995 -> 10%.
# fp32: MNN and ONNX Runtime differ only by float rounding (demo pipeline: PSNR 96-143 dB, cosine
# > 0.9999999), so 60 dB / 0.99999 flag any real conversion error (the demo's vae_decoder with
# one conv 10% off scores 42 dB / 0.9997). Quantized: 8-bit weights score 49-58 dB / 0.9999 on the
# demo; 30 dB / 0.995 leave room for full-size and lower-bit models while a broken layer fails.
# Every family's components get the same limits.
_NAMES = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.components))
DEFAULT_THRESHOLDS: dict[str, dict[str, Thresholds]] = {
    "fp32": {name: Thresholds(min_psnr=60.0, min_cosine=0.99999) for name in _NAMES},
    "quantized": {name: Thresholds(min_psnr=30.0, min_cosine=0.995) for name in _NAMES},
}


def resolve_thresholds(name: str, quantized: bool, overrides: Mapping | None) -> Thresholds:
    """The default for ``name``, then overrides["*"], then overrides[name] (each a Thresholds or
    a dict with some of min_psnr / min_cosine)."""
    result = DEFAULT_THRESHOLDS["quantized" if quantized else "fp32"][name]
    for key in ("*", name):
        change = (overrides or {}).get(key)
        if change is not None:
            result = replace(result, **(asdict(change) if isinstance(change, Thresholds) else dict(change)))
    return result


# -- results ---------------------------------------------------------------------------------


def _clean(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(f"{value:.9g}")


@dataclass
class OutputMetrics:
    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    cosine: float
    psnr: float
    problem: str | None = None  # a shape mismatch or non-finite values

    def failures(self, limits: Thresholds) -> list[str]:
        if self.problem:
            return [self.problem]
        found = []
        if not self.psnr >= limits.min_psnr:
            found.append(f"PSNR {self.psnr:.1f} dB < {limits.min_psnr:g} dB")
        if not self.cosine >= limits.min_cosine:
            found.append(f"cosine {self.cosine:.8f} < {limits.min_cosine:g}")
        return found

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "max_abs": _clean(self.max_abs), "mean_abs": _clean(self.mean_abs),
                "cosine": _clean(self.cosine), "psnr": _clean(self.psnr), "problem": self.problem}


@dataclass
class ComponentResult:
    name: str
    quantized: bool
    precision_basis: str  # why quantized or not
    thresholds: Thresholds
    inputs: str = ""
    cases: int = 0
    outputs: list[OutputMetrics] = field(default_factory=list)
    runs: list[RunStats] = field(default_factory=list)
    contract: list[ContractIssue] = field(default_factory=list)
    error: str | None = None  # a runtime that failed to load or run
    # Where ONNX Runtime's outputs came from: a pass of verify's own, or those export kept
    # (sd2mnn.verification.references) for the same files and inputs.
    references: str = "onnxruntime"

    @property
    def failures(self) -> list[str]:
        """One line per failure: "<component>.<output>: <metric>" or the contract/runtime problem."""
        lines = [f"{self.name}: {issue.message}" for issue in self.contract]
        if self.error:
            lines.append(f"{self.name}: {self.error}")
        for out in self.outputs:
            lines += [f"{self.name}.{out.name}: {f}" for f in out.failures(self.thresholds)]
        return lines

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and not self.failures

    def to_dict(self) -> dict:
        return {
            "name": self.name, "passed": self.passed, "quantized": self.quantized,
            "precision_basis": self.precision_basis, "thresholds": asdict(self.thresholds),
            "inputs": self.inputs, "cases": self.cases, "references": self.references, "outputs": [o.to_dict() for o in self.outputs],
            "runs": [asdict(r) for r in self.runs], "contract": [i.to_dict() for i in self.contract],
            "error": self.error, "failures": self.failures,
        }


@dataclass
class VerificationReport:
    onnx_dir: Path
    mnn_dir: Path
    seed: int
    components: list[ComponentResult]
    contract: list[ContractIssue]  # every issue, the tokenizer's included
    wall_s: float = 0.0
    report_files: list[Path] = field(default_factory=list)
    # The prompts' check, one per text encoder verified whose tokenizer has a conditioning scheme.
    conditionings: list[ConditioningReport] = field(default_factory=list)
    family: str = ""
    notes: list[str] = field(default_factory=list)  # what the bundle means to the runtime, pass or fail
    warnings: list[str] = field(default_factory=list)  # what could not be checked (the ONNX folder's origin)

    @property
    def conditioning(self) -> ConditioningReport | None:
        """The first text encoder's conditioning check (the only one of a SD1.x bundle)."""
        return self.conditionings[0] if self.conditionings else None

    @property
    def failures(self) -> list[str]:
        lines = [line for c in self.components for line in c.failures]
        lines += [line for c in self.conditionings for line in c.failures]
        lines += [f"{i.component}: {i.message}" for i in self.contract if i.component not in {c.name for c in self.components}]
        return lines

    @property
    def passed(self) -> bool:
        return not self.failures and all(c.passed for c in self.components)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed, "onnx_dir": str(self.onnx_dir), "mnn_dir": str(self.mnn_dir), "seed": self.seed,
            "sd2mnn_version": __version__, "wall_s": round(self.wall_s, 3),
            "components": [c.to_dict() for c in self.components], "contract": [i.to_dict() for i in self.contract],
            "failures": self.failures, "report_files": [str(p) for p in self.report_files],
            "conditioning": self.conditioning.to_dict() if self.conditioning is not None else None,
            "conditionings": [c.to_dict() for c in self.conditionings], "family": self.family, "notes": self.notes,
            "warnings": self.warnings,
        }


# -- metrics ---------------------------------------------------------------------------------


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float, float]:
    """(max_abs, mean_abs, cosine, psnr) of ``candidate`` against ``reference`` (float64 maths)."""
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    diff = np.abs(got - ref)
    norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
    if norms == 0.0:
        cosine = 1.0 if not diff.any() else 0.0
    else:
        cosine = float(np.clip(np.dot(ref, got) / norms, -1.0, 1.0))  # rounding can pass 1
    mse = float(np.mean(diff * diff))
    peak = float(np.ptp(ref))
    if mse == 0.0:
        psnr = PSNR_CAP
    elif peak == 0.0:
        psnr = 0.0
    else:
        psnr = min(PSNR_CAP, 10.0 * np.log10(peak * peak / mse))
    return float(diff.max()), float(diff.mean()), cosine, float(psnr)


def _worst_case(name: str, references: list[np.ndarray], candidates: list[np.ndarray]) -> OutputMetrics:
    shape = list(references[0].shape)
    for ref, got in zip(references, candidates):
        if ref.shape != got.shape:
            return OutputMetrics(name, shape, np.nan, np.nan, np.nan, np.nan,
                                 f"MNN gives shape {list(got.shape)}, ONNX Runtime {list(ref.shape)}")
        if not np.all(np.isfinite(got)):
            return OutputMetrics(name, shape, np.nan, np.nan, np.nan, np.nan, "MNN output has NaN or infinite values")
    per_case = [compare(r, c) for r, c in zip(references, candidates)]
    max_abs, mean_abs, cosine, psnr = zip(*per_case)
    return OutputMetrics(name, shape, max(max_abs), float(np.mean(mean_abs)), min(cosine), min(psnr))


# -- the verification ------------------------------------------------------------------------


def _select(onnx_dir: Path, mnn_dir: Path, components, family: Family) -> tuple[str, ...]:
    """Named components (each must be in the ONNX folder), or by default every ONNX component
    that the bundle has or the runtime needs (one it runs without only when the bundle has it)."""
    if components is not None:
        names = parse_components(components, family)
        for name in names:
            if not (onnx_dir / name / "model.onnx").is_file():
                raise InputError(f"{onnx_dir / name / 'model.onnx'} is missing, so {name} cannot be verified; "
                                 "leave it out of --components")
        return names
    needed = [n for n in family.runtime_components if not family.components[n].runtime_optional]
    names = tuple(n for n, spec in family.components.items() if (onnx_dir / n / "model.onnx").is_file()
                  and ((mnn_dir / spec.mnn_name).exists() or n in needed))
    if not names:
        raise InputError(f"{onnx_dir} and {mnn_dir} have no component in common; check the two folders")
    return names


def damaged_files(mnn_dir: Path, manifest, names) -> list[ContractIssue]:
    """A "damaged file" issue for each of the components' files (and the tokenizer's) whose size
    or content no longer is what manifest.json recorded; hashes only files whose mtime moved."""
    if manifest is None:
        return []
    return [ContractIssue(name, record.path, DAMAGED, "the file manifest.json records",
                          f"{mismatch}: reconvert it (sd2mnn convert)")
            for name, record, mismatch in manifest.damaged(mnn_dir, names)]


def _family(onnx_dir: Path, mnn_dir: Path, family: Family | None) -> Family:
    """The family both folders hold (the ONNX folder's, its tokenizer telling SD1.5 from Taiyi);
    a bundle of another family's components is refused."""
    if family is not None:
        return family
    onnx, bundle = folder_family(onnx_dir), folder_family(mnn_dir)
    if onnx.components is not bundle.components:
        raise InputError(f"{mnn_dir} is an {bundle.name} bundle but {onnx_dir} an {onnx.name} pipeline; "
                         "give the ONNX folder the bundle was converted from")
    return onnx


def _precision(name: str, mnn_dir: Path, manifest, source) -> tuple[bool, str]:
    """Whether the component's weights were quantized, and how we know."""
    record = manifest.components.get(name) if manifest else None
    if record is not None:
        flags = quantizing_words(record.flags)
        if flags:
            return True, f"manifest flags {' '.join(flags)}"
        if record.quantized:
            return True, f"manifest: bits per layer ({source.spec.compression_name})"
        return False, "manifest: fp32 weights"
    weight = mnn_dir / source.spec.weight_name
    if not weight.is_file():
        return False, "unknown (no manifest, no weights)"
    ratio = weight.stat().st_size / max(1, source.total_bytes)
    return ratio < 0.75, f"no manifest; weights are {ratio:.2f}x the ONNX model's size"


@dataclass
class _Session:
    """What one verification shares across its components."""

    onnx_dir: Path
    mnn_dir: Path
    seed: int
    thresholds: Mapping | None
    threads: int
    isolate: bool | None
    workdir: Path
    progress: Progress
    contract: list[ContractIssue]
    manifest: object
    family: Family
    fresh_references: bool = False  # run ONNX Runtime even where export kept its outputs
    ids: dict[str, list[np.ndarray]] = field(default_factory=dict)  # text encoder -> ids per prompt
    ids_how: dict[str, str] = field(default_factory=dict)
    embeddings: list[np.ndarray] | None = None  # the ONNX text encoder's last_hidden_state per prompt
    decoded: tuple[np.ndarray, np.ndarray] | None = None  # the first vae_decoder output: ONNX, MNN

    @property
    def feeder(self) -> str | None:
        """The text encoder whose states the denoiser is fed as they come (SD1.x's one); with
        several (SD3.5) the family's feeds make the denoiser's conditioning themselves."""
        encoders = [n for n, s in self.family.components.items() if s.prompt_ids]
        return encoders[0] if len(encoders) == 1 else None

    def run(self, runtime: str, source, model: Path, feeds: list[dict]):
        big = source.total_bytes > ISOLATE_ABOVE_BYTES
        return run_pass(runtime, model, list(source.spec.inputs), list(source.spec.outputs), feeds, self.threads,
                        big if self.isolate is None else self.isolate, self.workdir,
                        kernel_transforms=kernel_transforms_pay(source.total_bytes))

    def references(self, source, feeds: list[dict], progress: bool = True) -> tuple[list[dict], RunStats | None]:
        """ONNX Runtime's outputs on ``feeds``: those export kept for these very files and feeds
        (stats None), else from a pass of its own (shown in the component's progress row)."""
        if not self.fresh_references:
            kept = references.load(self.onnx_dir, source.spec.name, source.files, feeds, list(source.spec.outputs))
            if kept is not None:
                return kept, None
        if progress:
            self.progress.update(source.spec.name, "onnxruntime", f"{len(feeds)} inputs")
        return self.run("onnxruntime", source, source.model, feeds)

    def prepare_text(self, names: tuple[str, ...]) -> None:
        """Token ids for the prompts, per text encoder verified, and, for a unet verified without
        its text encoder, the ONNX text encoder's embeddings of them."""
        specs = self.family.components
        conditioned = [n for n in names if specs[n].conditioned]
        encoders = [n for n in specs if specs[n].prompt_ids and (n in names or (n == self.feeder and conditioned))]
        for encoder in encoders:
            if not (self.onnx_dir / encoder / "model.onnx").is_file():
                continue
            text = load_component(self.onnx_dir, encoder, self.family)
            length = static_shape(encoder, text.summary.inputs[0], self.family)[1]
            # Ids the text encoder cannot take are a one-line error here, before either runtime runs.
            self.ids[encoder], self.ids_how[encoder] = prompt_ids(
                self.mnn_dir, self.onnx_dir, length, onnx_vocabulary(text.model), text.model, self.family, encoder)
            if encoder == self.feeder and conditioned and encoder not in names:
                self.progress.update(conditioned[0], "embedding", "running the ONNX text encoder for real text embeddings")
                outputs, _ = self.references(text, [{"input_ids": i} for i in self.ids[encoder]], progress=False)
                self.embeddings = [o[specs[encoder].conditioning_output] for o in outputs]

    def component(self, name: str) -> ComponentResult:
        source = load_component(self.onnx_dir, name, self.family)
        quantized, basis = _precision(name, self.mnn_dir, self.manifest, source)
        result = ComponentResult(name, quantized, basis, resolve_thresholds(name, quantized, self.thresholds),
                                 contract=[i for i in self.contract if i.component == name])
        if any(i.blocking or i.kind == DAMAGED for i in result.contract):
            self.progress.update(name, "failed", "the bundle breaks the runtime contract")
            return result
        rng = component_rng(self.seed, name)
        feeds, result.inputs = build_inputs(name, source.summary.inputs, rng, self.ids.get(name, []), self.embeddings,
                                            self.family)
        spec = self.family.components[name]
        if spec.prompt_ids:
            result.inputs += f", ids from {self.ids_how.get(name, '-')}"
        result.cases = len(feeds)
        try:
            expected, stats = self.references(source, feeds)
            if stats is None:
                result.references = references.STORED
            else:
                result.runs.append(stats)
            self.progress.update(name, "mnn", f"{len(feeds)} inputs")
            candidates, stats = self.run("mnn", source, self.mnn_dir / source.spec.mnn_name, feeds)
            result.runs.append(stats)
        except PassError as err:
            result.error = f"{'MNN' if result.runs else 'ONNX Runtime'} failed: {err}"
            self.progress.update(name, "failed", result.error)
            return result
        _check_outputs(source, expected, source.model)
        _check_outputs(source, candidates, self.mnn_dir / source.spec.mnn_name)
        for output in source.spec.outputs:
            result.outputs.append(_worst_case(output, [r[output] for r in expected], [c[output] for c in candidates]))
        if spec.conditioning_output and name == self.feeder:
            self.embeddings = [r[spec.conditioning_output] for r in expected]
        if spec.picture_output:
            self.decoded = (expected[0][spec.picture_output], candidates[0][spec.picture_output])
        worst = min(o.psnr for o in result.outputs)
        self.progress.update(name, "done" if result.passed else "failed", f"worst PSNR {worst:.1f} dB")
        return result


def component_feeds(onnx_dir: Path, name: str, family: Family, seed: int = 0, threads: int = 2,
                    inputs=None) -> list[dict]:
    """The inputs verify feeds ``name`` (its cases, in order), made from the ONNX folder alone:
    ids from its tokenizer, a denoiser's text embeddings from its ONNX text encoder. ``inputs``
    (TensorSpecs) stand for those of the component's model, which need not exist then (not for a
    text encoder, whose ids are checked against its model's vocabulary)."""
    with tempfile.TemporaryDirectory(prefix="sd2mnn-feeds-") as tmp:
        session = _Session(Path(onnx_dir), Path(onnx_dir), seed, None, threads, None, Path(tmp), NullProgress(), [],
                           None, family)
        session.prepare_text((name,))
        if inputs is None:
            inputs = load_component(Path(onnx_dir), name, family).summary.inputs
        feeds, _ = build_inputs(name, inputs, component_rng(seed, name), session.ids.get(name, []),
                                session.embeddings, family)
    return feeds


def _matching_cosine(result: ComponentResult) -> float:
    """What the conditioning check holds a text encoder's embeddings to where the ids agree:
    its own cosine limit when its weights are quantized (their error is judged there), else
    MIN_MATCHING_COSINE (only the conversion may differ)."""
    return min(MIN_MATCHING_COSINE, result.thresholds.min_cosine) if result.quantized else MIN_MATCHING_COSINE


def _check_outputs(source, results: list[dict], model: Path) -> None:
    """Refuse a model that gave no output of the name the runtime reads (one of another pipeline,
    whose tensors differ): nothing can be compared."""
    for outputs in results:
        missing = [name for name in source.spec.outputs if name not in outputs]
        if missing:
            raise InputError(
                f"{model}: gives no {', '.join(map(repr, missing))} output for the inputs {source.model} takes "
                f"(it gives {sorted(outputs) or 'none'}); its inputs and outputs do not match: give the ONNX folder "
                "the bundle was converted from, or reconvert the bundle from this one")


def verify(
    onnx_dir: str | os.PathLike,
    mnn_dir: str | os.PathLike,
    components=None,
    seed: int = 0,
    thresholds: Mapping | None = None,
    report_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    *,
    threads: int | None = None,
    isolate: bool | None = None,
    prompts: list[str] | None = None,
    family: Family | None = None,
    fresh_references: bool = False,
) -> VerificationReport:
    """Compare the bundle in ``mnn_dir`` with the ONNX pipeline in ``onnx_dir`` and check the
    runtime contract. A failed check does not raise: see ``report.passed`` and ``.failures``.

    ``components``: names or "a,b" (default: every ONNX component the bundle has or the runtime
    needs). ``thresholds`` overrides DEFAULT_THRESHOLDS: {"*": {"min_psnr": 30}, "unet":
    Thresholds(...)}. ``report_dir`` receives verification.json and vae_decoder.png (ONNX | MNN |
    error map). ``isolate`` runs each runtime pass in a child process (default: for models over
    ISOLATE_ABOVE_BYTES). With the text encoder, ``prompts`` (default: the built-in set) go
    through the conditioning check (sd2mnn.verification.conditioning), each with its own tokenizer.
    ``family`` (default: the folders') says which components there are, which are fed prompt
    ids, condition the denoiser and draw the picture. ONNX Runtime's outputs that sd2mnn export
    kept in ``onnx_dir`` for the same files and inputs stand in for a pass of its own
    (sd2mnn.verification.references), unless ``fresh_references``. Raises InputError for missing folders,
    folders of two families or unusable ONNX models.
    """
    started = time.monotonic()
    onnx_dir, mnn_dir = Path(onnx_dir), Path(mnn_dir)
    for folder, what in ((onnx_dir, "ONNX pipeline"), (mnn_dir, "MNN bundle")):
        if not folder.is_dir():
            state = "it is a file" if folder.exists() else "it does not exist"
            raise InputError(f"{folder} is not a folder ({state}); give the {what} folder")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")
    if report_dir is not None:
        check_report_dir(Path(report_dir))  # before minutes of work, not after
    progress = progress or NullProgress()
    family = _family(onnx_dir, mnn_dir, family)
    names = _select(onnx_dir, mnn_dir, components, family)
    for name in names:
        progress.update(name, "waiting")
    confine_runtime_files(mnn_dir, family, names)
    warnings = check_sources(onnx_dir, mnn_dir, names)  # before any number is computed from them
    manifest = read_manifest(mnn_dir / MANIFEST_NAME)
    contract = (check_contract(mnn_dir, None if components is None else names, family)
                + damaged_files(mnn_dir, manifest, names))
    conditionings = []
    with tempfile.TemporaryDirectory(prefix="sd2mnn-verify-") as tmp:
        session = _Session(onnx_dir, mnn_dir, seed, thresholds, threads or min(4, os.cpu_count() or 1), isolate,
                           Path(tmp), progress, contract, manifest, family, fresh_references)
        session.prepare_text(names)
        results = [session.component(name) for name in names]
        for result in results:
            # The runtime's ids come from the bundle's tokenizer.mtok: without it, the contract says so.
            spec = family.components[result.name]
            if not (spec.prompt_ids and result.outputs and (mnn_dir / bundle_mtok(family, result.name)).is_file()):
                continue
            label = "conditioning" if session.feeder else f"conditioning {result.name}"
            progress.update(label, "running", "prompts through both tokenizers and text encoders")
            big = load_component(onnx_dir, result.name, family).total_bytes > ISOLATE_ABOVE_BYTES
            tokenizer_scheme = manifest.tokenizer_scheme if manifest is not None else None
            conditionings.append(check_conditioning(onnx_dir, mnn_dir, prompts, session.threads,
                                                    big if isolate is None else isolate, Path(tmp),
                                                    family=family, component=result.name, tokenizer_scheme=tokenizer_scheme,
                                                    min_matching_cosine=_matching_cosine(result)))
            progress.update(label, "done", conditionings[-1].summary())
    report = VerificationReport(onnx_dir, mnn_dir, seed, results, contract, conditionings=conditionings,
                                family=family.name, notes=contract_notes(mnn_dir, family), warnings=warnings)
    report.wall_s = time.monotonic() - started
    if report_dir is not None:
        report.report_files = write_report(Path(report_dir), report, session.decoded)
    return report


# -- the report folder -----------------------------------------------------------------------


def _to_image(sample: np.ndarray) -> np.ndarray:
    """[1,3,H,W] in [-1,1] -> HxWx3 uint8, as MNN's runtime does: clamp(x*0.5+0.5)*255."""
    return np.round(np.clip(sample[0].transpose(1, 2, 0) * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)


def _heat(values: np.ndarray) -> np.ndarray:
    """Values in [0,1] -> a black-red-yellow-white heat map (HxWx3 uint8)."""
    x = np.clip(values, 0, 1)[..., None] * 3.0
    return (np.clip(np.concatenate([x, x - 1, x - 2], axis=-1), 0, 1) * 255).astype(np.uint8)


def decoder_picture(reference: np.ndarray, candidate: np.ndarray):
    """ONNX | MNN | |error| (per pixel, scaled to the largest), captioned; a PIL image."""
    from PIL import Image, ImageDraw

    ref_img, got_img = _to_image(reference), _to_image(candidate)
    error = np.abs(reference[0] - candidate[0]).mean(axis=0)
    peak = float(error.max())
    panels = [ref_img, got_img, _heat(error / peak if peak > 0 else error)]
    height, width = ref_img.shape[:2]
    canvas = Image.new("RGB", (3 * width, height + 20), "white")
    draw = ImageDraw.Draw(canvas)
    captions = ["ONNX Runtime", "MNN", f"|MNN - ONNX|, white = {peak:.3g} (output units)"]
    for i, (panel, caption) in enumerate(zip(panels, captions)):
        canvas.paste(Image.fromarray(panel), (i * width, 20))
        draw.text((i * width + 4, 4), caption, fill="black")
    return canvas


REPORT_FILES = ("vae_decoder.png", "verification.json")


def check_report_dir(folder: Path) -> None:
    """Refuse a --report folder that cannot receive the report, before any work."""
    from sd2mnn.core.images import probe_folder

    if folder.exists() and not folder.is_dir():
        raise InputError(f"--report {folder} is a file, not a folder; give a folder for the report")
    parent = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise InputError(f"--report {folder}: {parent} is a file, not a folder; give another report folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--report {folder}: {parent} is not writable; give another report folder")
    probe_folder(parent, folder)
    for name in REPORT_FILES:
        if (folder / name).is_dir():
            raise InputError(f"--report {folder}: {folder / name} is a folder; remove it or give another report folder")


def write_report(folder: Path, report: VerificationReport, decoded) -> list[Path]:
    from sd2mnn.core.images import write_failure, write_png

    written = []
    target = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if decoded is not None:
            target = folder / REPORT_FILES[0]
            write_png(target, decoder_picture(*decoded), {})  # atomic, like every PNG sd2mnn writes
            written.append(target)
        target = folder / REPORT_FILES[1]
        written.append(target)
        report.report_files = written
        write_json_atomic(target, report.to_dict())
    except OSError as err:
        raise write_failure(target, err) from None
    return written


# -- after sd2mnn convert --verify -------------------------------------------------------------


class _Prefixed:
    """Progress rows named "verify <component>", beside the conversion's rows."""

    def __init__(self, inner: Progress, prefix: str):
        self.inner, self.prefix = inner, prefix

    def update(self, name: str, state: str, detail: str = "") -> None:
        self.inner.update(self.prefix + name, state, detail)

    def tick(self) -> None:
        self.inner.tick()

    def close(self) -> None:
        self.inner.close()


def verify_after_convert(onnx_root: Path, mnn_path: Path, components, progress: Progress | None = None,
                         thresholds: Mapping | None = None, seed: int = 0) -> VerificationReport:
    """Verify the components just converted and record each result in manifest.json."""
    progress = progress or NullProgress()
    report = verify(onnx_root, mnn_path, components=components, seed=seed, thresholds=thresholds,
                    progress=_Prefixed(progress, "verify "))
    progress.close()
    with BundleDir(Path(mnn_path)) as bundle:  # the bundle's lock: no other run rewrites the manifest meanwhile
        manifest = read_manifest(bundle.manifest_path)
        if manifest is not None:
            for result in report.components:
                record = manifest.components.get(result.name)
                if record is not None:
                    entry = {**result.to_dict(), "seed": report.seed, "sd2mnn_version": __version__}
                    manifest.components[result.name] = replace(record, verification=entry)
            manifest.write(bundle.manifest_path)
    return report

