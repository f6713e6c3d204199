"""``sd2mnn.measurement.sweep``: convert one ONNX pipeline several ways, and say which way to ship.

Each variant is a named set of MNNConvert flags (VARIANTS; add your own as NAME=FLAGS, or as a
dict in Python). For each one, in OUT_DIR/<variant>/:

    convert   sd2mnn.convert, incremental: a rerun reuses every component already converted
              with the same flags, so only new or changed variants cost a conversion
    verify    sd2mnn.verify against the ONNX models (per component, the worst
              output's PSNR and cosine)
    bench     sd2mnn.bench on MNN (steady-run median per component)

A variant that fails at any stage is reported with the stage and the reason, and the sweep goes
on. ONNX Runtime is benchmarked once, on the same inputs, as the reference row.

Fidelity of a variant = its worst component's PSNR (dB). A variant is on the size/fidelity
frontier when no other variant is at most its size and at least its fidelity (and better in one).
The recommendation for a floor ``min_psnr`` is the smallest variant whose fidelity meets it
(ties: higher fidelity, then lower latency); it is always on the frontier.

A pipeline off MNN's runtime contract (other latents, another text length) is swept all the same:
``SweepReport.off_contract`` says, once, what the runtime would refuse in every variant. A text
encoder whose vocabulary cannot hold the ids the runtime feeds is refused before any conversion.
"""
from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from sd2mnn.conversion.converter_flags import BY_SPELLING
from sd2mnn.conversion.plan import ConvertOptions
from sd2mnn.core.layout import folder_family, parse_components
from sd2mnn.core.progress import NullProgress, Progress
from sd2mnn.errors import InputError, Sd2MnnError
from sd2mnn.quantization.quantize import QuantizeOptions
from sd2mnn.verification.verify import DEFAULT_THRESHOLDS


@dataclass(frozen=True)
class Variant:
    name: str  # also the bundle's folder name under OUT_DIR
    flags: str  # MNNConvert flags, as `sd2mnn convert` takes them in EXTRA; or QUANTIZE[:DB]
    about: str = ""

    @property
    def quantized_per_layer(self) -> bool:
        """Made by sd2mnn quantize (bits per layer), not by flags."""
        return self.flags.split(":")[0].strip() == QUANTIZE

    def floor(self, sweep_floor: float) -> float:
        """The PSNR floor sd2mnn quantize gets: QUANTIZE:DB's, or the sweep's --min-psnr."""
        _, colon, value = self.flags.partition(":")
        if not colon:
            return sweep_floor
        try:
            return float(value)
        except ValueError:
            raise InputError(f"variant {self.name}: {self.flags!r} needs a floor in dB, e.g. {QUANTIZE}:35") from None

    def convert_fields(self) -> dict:
        """ConvertOptions fields for these flags: known flags to their fields (so the manifest
        records them as `sd2mnn convert --weight-quant-bits 8` would), the rest verbatim as extra."""
        try:
            tokens = shlex.split(self.flags)
        except ValueError as err:
            raise InputError(f"variant {self.name}: cannot parse its flags {self.flags!r}: {err}") from None
        fields, extra = {}, []
        while tokens:
            token = tokens.pop(0)
            key, has_value, value = token.partition("=")
            named = BY_SPELLING.get(key)
            if named is not None and named.kind is int:
                if not has_value:
                    value = tokens.pop(0) if tokens else ""
                try:
                    fields[named.field] = int(value)
                except ValueError:
                    raise InputError(f"variant {self.name}: {key} needs a whole number, got {value!r}") from None
            elif named is not None and not has_value:  # a switch; --fp16=1 goes to the converter as written
                fields[named.field] = True
            else:
                extra.append(token)
        fields["extra"] = shlex.join(extra)
        return fields


# A variant made by sd2mnn quantize: bits per layer meeting a floor (the sweep's, or QUANTIZE:DB).
QUANTIZE = "quantize"

# The named variants. MNN documents --transformerFuse for OpenCL/Metal only: on the CPU it may
# fail, which the sweep then reports.
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", "", "float32 weights, as exported"),
    Variant("fp16", "--fp16", "weights stored as float16"),
    Variant("w8", "--weightQuantBits=8", "8-bit weights, per channel"),
    Variant("w8-asym", "--weightQuantBits=8 --weightQuantAsymmetric", "8-bit asymmetric weights"),
    Variant("w8-fuse", "--weightQuantBits=8 --transformerFuse", "8-bit weights, fused attention"),
    Variant("w6", "--weightQuantBits=6", "6-bit weights"),
    Variant("w4", "--weightQuantBits=4", "4-bit weights, per channel"),
    Variant("w4-b64", "--weightQuantBits=4 --weightQuantBlock=64", "4-bit weights, blocks of 64"),
    Variant("w4-hqq", "--weightQuantBits=4 --weightQuantBlock=64 --hqq", "4-bit HQQ weights, blocks of 64"),
    Variant("mixed", QUANTIZE, "bits per layer, the fewest bytes meeting --min-psnr (sd2mnn quantize)"),
)}
DEFAULT_VARIANTS = ("fp32", "fp16", "w8", "w4-b64")
# The floor `sd2mnn verify` applies to quantized bundles: below it a layer is likely broken.
DEFAULT_MIN_PSNR = DEFAULT_THRESHOLDS["quantized"]["unet"].min_psnr
def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"  # one unit for every row, so sizes compare at a glance


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def resolve_variants(spec: str | Mapping[str, str | None] | Iterable[str | Variant]) -> list[Variant]:
    """Variants from "fp32,w8,mine=--weightQuantBits=6", a dict {name: flags or None (a named
    variant)}, or a list of names / Variants. Flags are checked now, before anything converts."""
    if isinstance(spec, str):
        spec = [item.strip() for item in spec.split(",") if item.strip()]
    if isinstance(spec, Mapping):
        items = [(name, flags) for name, flags in spec.items()]
    else:
        items = [(v.name, v) if isinstance(v, Variant) else (v.partition("=")[0], v.partition("=")[2] if "=" in v else None)
                 for v in spec]
    variants = []
    for name, flags in items:
        if isinstance(flags, Variant):
            variant = flags
        elif flags is None:
            if name not in VARIANTS:
                raise InputError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)} or define it as NAME=FLAGS")
            variant = VARIANTS[name]
        else:
            variant = Variant(name, flags.strip().strip("'\""), "user-defined")
        if not _NAME.match(variant.name):
            raise InputError(f"variant name {variant.name!r} must be letters, digits, '_', '.', '+' or '-' (it names a folder)")
        if any(v.name == variant.name for v in variants):
            raise InputError(f"variant {variant.name!r} is named twice; give each variant once")
        try:
            if variant.quantized_per_layer:
                QuantizeOptions(min_psnr=variant.floor(DEFAULT_MIN_PSNR))
            else:
                ConvertOptions(**variant.convert_fields())
        except InputError as err:
            message = err.message if err.message.startswith("variant ") else f"variant {variant.name}: {err.message}"
            raise InputError(message) from None
        variants.append(variant)
    if not variants:
        raise InputError(f"no variant named; choose from {', '.join(VARIANTS)}")
    return variants


# -- results ---------------------------------------------------------------------------------


@dataclass
class ComponentScore:
    psnr: float  # the worst output's, dB
    cosine: float  # the worst output's
    passed: bool  # by sd2mnn verify's default thresholds
    steady_s: float | None = None  # MNN's steady-run median


@dataclass
class VariantResult:
    name: str
    flags: str
    bundle: Path
    status: str = "ok"  # or "failed"
    stage: str | None = None  # where it failed: "convert", "verify" or "bench"
    error: str | None = None
    converter_flags: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)  # components converted by this run (the rest reused)
    size_bytes: int = 0  # the components' .mnn + .mnn.weight
    bundle_bytes: int = 0  # every file of the bundle, tokenizer included
    components: dict[str, ComponentScore] = field(default_factory=dict)
    on_frontier: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def fidelity(self) -> float | None:
        """The worst component's PSNR (dB)."""
        return min(c.psnr for c in self.components.values()) if self.ok and self.components else None

    @property
    def latency_s(self) -> float | None:
        times = [c.steady_s for c in self.components.values()]
        return sum(times) if self.ok and times and None not in times else None

    def fail(self, stage: str, error: str) -> "VariantResult":
        self.status, self.stage, self.error = "failed", stage, error
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "flags": self.flags, "bundle": str(self.bundle), "status": self.status,
                "stage": self.stage, "error": self.error, "converter_flags": self.converter_flags,
                "converted": self.converted, "size_bytes": self.size_bytes, "bundle_bytes": self.bundle_bytes,
                "fidelity_psnr": self.fidelity, "latency_s": self.latency_s, "on_frontier": self.on_frontier,
                "components": {n: vars(c) for n, c in self.components.items()}}


@dataclass
class SweepReport:
    onnx_dir: Path
    out_dir: Path
    components: tuple[str, ...]
    min_psnr: float
    variants: list[VariantResult]
    reference: dict[str, float | None]  # ONNX Runtime's steady median per component, seconds
    reference_bytes: int  # the ONNX models' files
    recommended: str | None
    recommendation: str  # one sentence: what and why
    threads: int = 2
    precision: str = "high"
    runs: int = 3
    wall_s: float = 0.0
    off_contract: list[str] = field(default_factory=list)  # what MNN's runtime would refuse, in every variant

    @property
    def reference_latency_s(self) -> float | None:
        times = list(self.reference.values())
        return sum(times) if times and None not in times else None

    def to_dict(self) -> dict:
        return {"onnx_dir": str(self.onnx_dir), "out_dir": str(self.out_dir), "components": list(self.components),
                "min_psnr": self.min_psnr, "threads": self.threads, "precision": self.precision, "runs": self.runs,
                "variants": [v.to_dict() for v in self.variants],
                "reference": {"runtime": "onnxruntime", "steady_s": self.reference, "latency_s": self.reference_latency_s,
                              "size_bytes": self.reference_bytes},
                "recommended": self.recommended, "recommendation": self.recommendation, "wall_s": round(self.wall_s, 3),
                "off_contract": self.off_contract}

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the summary (the CLI prints them aligned, to_markdown as markdown)."""
        headers = ["variant", "flags", "size", *[f"{n} PSNR/cos" for n in self.components], "latency ms", "frontier", "note"]
        rows = []
        for v in self.variants:
            cells = [f"{c.psnr:.1f} / {c.cosine:.6f}" if (c := v.components.get(n)) else "-" for n in self.components]
            if v.ok:
                note = f"recommended (>= {self.min_psnr:g} dB)" if v.name == self.recommended else ""
                if any(not c.passed for c in v.components.values()):
                    note = (note + "; " if note else "") + "below verify's defaults"
            else:
                note = f"failed at {v.stage}: {v.error.splitlines()[0][:80] if v.error else ''}"
            latency = f"{v.latency_s * 1e3:.1f}" if v.latency_s is not None else "-"
            rows.append([v.name, v.flags or "(none)", _mib(v.size_bytes) if v.size_bytes else "-", *cells,
                         latency, "*" if v.on_frontier else "", note])
        ref = self.reference_latency_s
        rows.append(["onnx", "(ONNX Runtime)", _mib(self.reference_bytes), *["reference"] * len(self.components),
                     f"{ref * 1e3:.1f}" if ref is not None else "-", "", "the source models"])
        return headers, rows

    def to_markdown(self) -> str:
        headers, rows = self.table()
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)


# -- frontier and recommendation ---------------------------------------------------------------


def mark_frontier(variants: list[VariantResult]) -> None:
    ok = [v for v in variants if v.ok and v.fidelity is not None]
    for v in ok:
        v.on_frontier = not any(
            w.size_bytes <= v.size_bytes and w.fidelity >= v.fidelity
            and (w.size_bytes < v.size_bytes or w.fidelity > v.fidelity) for w in ok)


def recommend(variants: list[VariantResult], min_psnr: float) -> tuple[str | None, str]:
    """The smallest variant whose worst PSNR meets ``min_psnr``, and why."""
    ok = [v for v in variants if v.ok and v.fidelity is not None]
    if not ok:
        return None, "no variant converted, verified and ran; see the failures"
    meeting = [v for v in ok if v.fidelity >= min_psnr]
    if not meeting:
        best = max(ok, key=lambda v: v.fidelity)
        return None, (f"no variant reaches {min_psnr:g} dB; the most faithful is {best.name} "
                      f"({best.fidelity:.1f} dB): lower --min-psnr or add a variant with more bits")
    pick = min(meeting, key=lambda v: (v.size_bytes, -v.fidelity, v.latency_s or 0.0))
    why = (f"{pick.name}: the smallest variant ({_mib(pick.size_bytes)}) whose worst component "
           f"PSNR ({pick.fidelity:.1f} dB) meets the {min_psnr:g} dB floor")
    if pick.flags.startswith(QUANTIZE):
        uniform = [v for v in meeting if not v.flags.startswith(QUANTIZE)]
        smallest = min(uniform, key=lambda v: v.size_bytes) if uniform else None
        against = (f", {pick.size_bytes / smallest.size_bytes:.2f}x the smallest one-width variant that meets it "
                   f"({smallest.name})" if smallest else "; no one-width variant meets it")
        why += f"; bits per layer (sd2mnn {pick.flags}){against}"
    return pick.name, why


# -- the sweep -------------------------------------------------------------------------------


def _run_variant(variant: Variant, onnx_dir: Path, out_dir: Path, names: tuple[str, ...], settings: dict,
                 progress: Progress) -> VariantResult:
    from sd2mnn.conversion.convert import convert
    from sd2mnn.measurement.bench import bench
    from sd2mnn.quantization.quantize import quantize
    from sd2mnn.verification.verify import verify

    result = VariantResult(variant.name, variant.flags, out_dir / variant.name)
    progress.update(variant.name, "converting", variant.flags or "no flags")
    try:
        common = dict(components=names, converter=settings["converter"], jobs=settings["jobs"], timeout=settings["timeout"])
        if variant.quantized_per_layer:
            floor = variant.floor(settings["min_psnr"])
            result.flags = f"{QUANTIZE} --min-psnr {floor:g}"
            converted = quantize(onnx_dir, result.bundle, QuantizeOptions(min_psnr=floor, seed=settings["seed"],
                                                                          threads=settings["threads"],
                                                                          convert=ConvertOptions(**common))).conversion
        else:
            converted = convert(onnx_dir, result.bundle, ConvertOptions(**common, **variant.convert_fields()))
    except Sd2MnnError as err:
        return result.fail("convert", err.message + (f"\n{err.detail}" if err.detail else ""))
    result.converter_flags = converted.flags
    result.converted = [c.name for c in converted.components if c.status == "converted"]
    result.size_bytes = sum(f.size for c in converted.components for f in c.record.outputs)
    result.bundle_bytes = sum(f.size for f in converted.files)

    progress.update(variant.name, "verifying")
    try:
        checked = verify(onnx_dir, result.bundle, components=names, seed=settings["seed"], threads=settings["threads"])
    except Sd2MnnError as err:
        return result.fail("verify", err.message)
    broken = [c for c in checked.components if c.error or not c.outputs or any(o.problem for o in c.outputs)]
    if broken:
        return result.fail("verify", "; ".join(c.failures[0] if c.failures else f"{c.name}: not run" for c in broken))
    for c in checked.components:
        # Fidelity only: the runtime contract is reported once for the sweep (off_contract).
        passed = not any(o.failures(c.thresholds) for o in c.outputs)
        result.components[c.name] = ComponentScore(min(o.psnr for o in c.outputs), min(o.cosine for o in c.outputs), passed)

    progress.update(variant.name, "benchmarking", f"1 + {settings['runs']} runs per component")
    try:
        timed = bench(result.bundle, onnx_dir, names, settings["threads"], settings["precision"], settings["runs"],
                      runtimes=("mnn",), seed=settings["seed"], timeout=settings["timeout"])
    except Sd2MnnError as err:
        return result.fail("bench", err.message)
    if timed.errors:
        return result.fail("bench", "; ".join(timed.errors))
    for c in timed.components:
        result.components[c.name].steady_s = c.timings["mnn"].median_s
    return result


def sweep(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike,
          variants: str | Mapping[str, str | None] | Iterable[str | Variant] = DEFAULT_VARIANTS,
          min_psnr: float = DEFAULT_MIN_PSNR, *, components=None, threads: int = 2, precision: str = "high",
          runs: int = 3, seed: int = 0, converter: str | None = None, jobs: int | None = None,
          timeout: float | None = None, progress: Progress | None = None) -> SweepReport:
    """Convert, verify and benchmark each variant into ``out_dir``/<variant>/; see the module docstring.

    ``variants``: names of VARIANTS, NAME=FLAGS strings, a dict {name: flags or None}, or
    Variants. ``components`` defaults to what `sd2mnn convert` converts (the folder's family's
    defaults). Raises InputError for
    bad arguments; a variant that fails is reported in the result, not raised.
    """
    from sd2mnn.core.layout import load_component
    from sd2mnn.measurement.bench import bench

    started = time.monotonic()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    chosen = resolve_variants(variants)
    if not onnx_dir.is_dir():
        raise InputError(f"{onnx_dir} is not a folder; give the ONNX pipeline folder")
    if out_dir.resolve() == onnx_dir.resolve():
        raise InputError(f"{out_dir} is the ONNX folder itself; write the variants to another folder")
    family = folder_family(onnx_dir)
    names = parse_components(components, family)
    off_contract = _check_sources(onnx_dir, names, family)
    progress = progress or NullProgress()
    for v in chosen:
        progress.update(v.name, "waiting")
    settings = dict(converter=converter, jobs=jobs, timeout=timeout, threads=threads, precision=precision,
                    runs=runs, seed=seed, min_psnr=min_psnr)
    results = []
    for v in chosen:
        result = _run_variant(v, onnx_dir, out_dir, names, settings, progress)
        summary = f"{result.fidelity:.1f} dB" if result.ok else f"{result.stage}: {(result.error or '').splitlines()[0][:60]}"
        progress.update(v.name, "done" if result.ok else "failed", summary)
        results.append(result)

    # ONNX Runtime once, as the reference, on the inputs the variants ran (any ok bundle has them).
    reference: dict[str, float | None] = {n: None for n in names}
    first_ok = next((r for r in results if r.ok), None)
    if first_ok is not None:
        progress.update("onnx", "benchmarking", "ONNX Runtime, the reference")
        timed = bench(first_ok.bundle, onnx_dir, names, threads, precision, runs, runtimes=("onnxruntime",),
                      seed=seed, timeout=timeout)
        reference = {c.name: c.timings["onnxruntime"].median_s for c in timed.components}
        progress.update("onnx", "failed" if timed.errors else "done", "; ".join(timed.errors))
    progress.close()
    mark_frontier(results)
    picked, why = recommend(results, min_psnr)
    return SweepReport(onnx_dir, out_dir, names, min_psnr, results, reference,
                       sum(load_component(onnx_dir, n, family).total_bytes for n in names), picked, why,
                       threads=threads, precision=precision, runs=runs, wall_s=time.monotonic() - started,
                       off_contract=off_contract)


def _check_sources(onnx_dir: Path, names: tuple[str, ...], family) -> list[str]:
    """What MNN's runtime would refuse in every variant (read from the ONNX models, named by the
    bundle file each becomes); an InputError, before any conversion, for ids a text encoder
    cannot take."""
    from sd2mnn.core.contract import check_tensors, onnx_vocabulary, runtime_notes, tensor_infos
    from sd2mnn.core.layout import load_component
    from sd2mnn.verification.inputs import prompt_ids, static_shape

    sources = {n: load_component(onnx_dir, n, family) for n in names}
    for name, text in sources.items():
        if family.components[name].prompt_ids:  # the family's spec: fed the tokenizer's ids
            length = static_shape(name, text.summary.inputs[0], family)[1]
            prompt_ids(onnx_dir, onnx_dir, length, onnx_vocabulary(text.model), text.model, family, name)
    infos = tensor_infos({n: (s.summary.inputs, s.summary.outputs) for n, s in sources.items()})
    return runtime_notes(check_tensors(infos, family, {n: family.components[n].mnn_name for n in names}))


# -- the picture -----------------------------------------------------------------------------


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    import math

    span = (hi - lo) or abs(hi) or 1.0
    raw = span / count
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def plot(report: SweepReport, path: str | os.PathLike) -> Path:
    """A PNG: worst-component PSNR against bundle size (frontier joined) and against latency,
    the --min-psnr floor dashed, the recommended variant in red."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    ok = [v for v in report.variants if v.ok and v.fidelity is not None and v.latency_s is not None]
    panel_w, panel_h, margin = 520, 420, 60
    image = Image.new("RGB", (2 * panel_w, panel_h + 20), "white")
    draw = ImageDraw.Draw(image)
    failed = [v.name for v in report.variants if not v.ok]
    title = f"sd2mnn sweep of {report.onnx_dir.name}: floor {report.min_psnr:g} dB (dashed), recommended {report.recommended or 'none'} (red)"
    draw.text((10, 6), title + (f"; failed: {', '.join(failed)}" if failed else ""), fill="black", font=font)
    panels = (("bundle size (MiB)", lambda v: v.size_bytes / 2**20), ("latency, sum of components (ms)", lambda v: v.latency_s * 1e3))
    psnrs = [v.fidelity for v in ok] + [report.min_psnr]
    y_ticks = _ticks(min(psnrs) - 2, max(psnrs) + 2)
    for i, (label, x_of) in enumerate(panels):
        left, top = i * panel_w + margin, 50
        right, bottom = (i + 1) * panel_w - 20, panel_h - 30
        xs = [x_of(v) for v in ok] or [0.0, 1.0]
        pad = 0.1 * (max(xs) - min(xs)) or 0.1 * max(xs) or 1.0
        x_ticks = _ticks(max(0.0, min(xs) - pad), max(xs) + pad)

        def at(x, y, xt=x_ticks):
            px = left + (x - xt[0]) / (xt[-1] - xt[0]) * (right - left)
            py = bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)
            return round(px), round(py)

        draw.rectangle((left, top, right, bottom), outline="black")
        for x in x_ticks:
            px, _ = at(x, y_ticks[0])
            draw.line((px, bottom, px, bottom + 4), fill="black")
            draw.text((px - 10, bottom + 6), f"{x:g}", fill="black", font=font)
        for y in y_ticks:
            _, py = at(x_ticks[0], y)
            draw.line((left - 4, py, left, py), fill="black")
            draw.text((left - 40, py - 7), f"{y:g}", fill="black", font=font)
        draw.text(((left + right) / 2 - 80, bottom + 22), label, fill="black", font=font)
        draw.text((left - 55, top - 18), "worst component PSNR (dB)", fill="black", font=font)
        _, floor_y = at(x_ticks[0], report.min_psnr)
        for x0 in range(left, right, 12):  # dashed floor
            draw.line((x0, floor_y, min(x0 + 6, right), floor_y), fill="gray")
        if i == 0:  # the size/fidelity frontier, by size
            frontier = sorted((v for v in ok if v.on_frontier), key=lambda v: v.size_bytes)
            if len(frontier) > 1:
                draw.line([at(x_of(v), v.fidelity) for v in frontier], fill="steelblue", width=2)
        # Variants that land on the same spot (w8 and w8-fuse often do) share one labelled point.
        spots: dict[tuple[int, int], list[VariantResult]] = {}
        for v in ok:
            px, py = at(x_of(v), v.fidelity)
            near = next((s for s in spots if abs(s[0] - px) <= 8 and abs(s[1] - py) <= 8), (px, py))
            spots.setdefault(near, []).append(v)
        for (px, py), group in spots.items():
            color = "red" if any(v.name == report.recommended for v in group) else "steelblue"
            draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=color, outline="black")
            draw.text((px + 7, py - 16), ", ".join(v.name for v in group), fill=color, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
