"""Bits per layer (sd2mnn quantize) against uniform weight bits, on the full-size SD1.5 architecture.

    python benchmarks/mixed_precision_full_size.py ONNX_DIR OUT_DIR [--floors 45,35] [--steps 20] [--threads 2]

ONNX_DIR is a full-size export (benchmarks/full_size.py WORK_DIR makes WORK_DIR/onnx). Stages, each
result kept in OUT_DIR/results.json so a rerun goes on where it stopped:

 1. uniform  bits 8 down to 3, per output channel and in blocks of 32/64/128 input channels
             (MNNConvert --weightQuantBits/--weightQuantBlock; a layer whose channels a block does
             not divide stays per channel, as MNN does): convert into OUT_DIR/uniform/<name>,
             verify (each component's worst output PSNR against ONNX Runtime, verify's inputs);
             all but fp32, w8 and w4 are deleted once measured
 2. mixed    `sd2mnn quantize --min-psnr F` for each floor F in --floors and for uniform w8's
             worst PSNR minus 3 dB, into OUT_DIR/mixed-<F>; wall time and the process tree's
             peak RSS of the whole command, and the sensitivity analysis's own time and peak
             from its report. The first floor measures; the others start from its measurements.
 3. images   `sd2mnn generate` after --steps steps (seed 0, MNN's noise) with fp32 (OUT_DIR/uniform/fp32),
             w8, w4 and each mixed bundle; each image's PSNR against fp32's
 4. speed    `sd2mnn bench` (MNN, --threads threads, precision low as MNN's runtime runs): each
             component's steady median and peak RSS, w8 against each mixed bundle
 5. probe    the sensitivity analysis alone, in a child process per component, on --probe-layers
             layers spread over the component: its set-up (session, reference outputs), its time per
             layer, the whole analysis's time that gives, and the child's peak RSS (stage 2's own
             figures are those of its measuring run, whatever else the machine ran then)

Writes OUT_DIR/mixed_precision.md and prints it. Each unet conversion peaks near 7.5 GB and runs
one at a time; the whole run takes hours on 2 cores (the sensitivity analysis of the unet, the
24 uniform variants); stop it at any point and run it again to continue.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import measure  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
BLOCKS = (0, 32, 64, 128)
# The uniform bundles kept for the later stages (the floors, images and speed), made first.
KEPT = ("w8", "w4", "fp32")


def uniform_variants() -> dict[str, dict]:
    variants = {}
    for bits in range(8, 2, -1):
        for block in BLOCKS:
            name = f"w{bits}" + (f"-b{block}" if block else "")
            variants[name] = {"weight_quant_bits": bits, **({"weight_quant_block": block} if block else {})}
    return variants


def sizes(bundle: Path) -> int:
    return sum((bundle / f"{c}{suffix}").stat().st_size for c in COMPONENTS for suffix in (".mnn", ".mnn.weight"))


def worst_psnr(verification) -> dict[str, float]:
    return {c.name: min(o.psnr for o in c.outputs) for c in verification.components}


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, stage: str, name: str):
        return self.data.get(stage, {}).get(name)

    def put(self, stage: str, name: str, value) -> None:
        self.data.setdefault(stage, {})[name] = value
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def run_uniform(onnx: Path, out: Path, results: Results, threads: int, names: list[str]) -> None:
    from sd2mnn import convert
    from sd2mnn.verification.verify import verify

    variants = {"fp32": {}, **uniform_variants()}
    for name in names:
        flags = variants[name]
        if results.get("uniform", name):
            continue
        bundle = out / "uniform" / name
        started = time.monotonic()
        convert(onnx, bundle, components=COMPONENTS, **flags)
        converted = time.monotonic() - started
        psnr = worst_psnr(verify(onnx, bundle, components=COMPONENTS, threads=threads)) if name != "fp32" else {}
        results.put("uniform", name, {"flags": flags, "bytes": sizes(bundle), "psnr": psnr,
                                      "convert_s": round(converted, 1)})
        print(f"uniform {name}: {sizes(bundle) / 2**20:.1f} MiB, {psnr}", file=sys.stderr, flush=True)
        if name not in KEPT:  # 24 bundles of up to 1.1 GB each; the later stages read only these
            shutil.rmtree(bundle)


def run_mixed(onnx: Path, out: Path, results: Results, floors: list[float], threads: int) -> list[str]:
    names = []
    first = None
    for floor in floors:
        name = f"mixed-{floor:g}"
        names.append(name)
        bundle = out / name
        if not results.get("mixed", name):
            if first is not None and not (bundle / ".sd2mnn" / "measured").exists():
                shutil.copytree(first / ".sd2mnn" / "measured", bundle / ".sd2mnn" / "measured")
            report_path = out / f"{name}.json"
            argv = [sys.executable, "-m", "sd2mnn.cli", "quantize", str(onnx), str(bundle), "--min-psnr", f"{floor:g}",
                    "--threads", str(threads), "--json"]
            measured = measure(argv, stdout_path=report_path)
            if measured["returncode"] != 0:
                print(f"{name}: sd2mnn quantize exited {measured['returncode']}", file=sys.stderr, flush=True)
                continue
            report = json.loads(report_path.read_text())
            results.put("mixed", name, {
                "floor": floor, "bytes": sizes(bundle), "wall_s": measured["wall_s"],
                "tree_peak_bytes": measured["tree_peak_bytes"],
                "psnr": {c["name"]: c["chosen"]["psnr"] for c in report["components"]},
                "bits": {c["name"]: c["bits"] for c in report["components"]},
                "trials": {c["name"]: len(c["trials"]) for c in report["components"]},
                # From the kept measurements, so a rerun that reused them still reports them.
                "sensitivity_s": {c["name"]: _measured(bundle, c["name"], "sensitivity_s") for c in report["components"]},
                "sensitivity_peak_bytes": max(_measured(bundle, c["name"], "sensitivity_peak_bytes")
                                              for c in report["components"]),
            })
        first = first or bundle
        print(f"{name}: {results.get('mixed', name)}", file=sys.stderr, flush=True)
    return names


def _measured(bundle: Path, name: str, field: str) -> float:
    """A figure sd2mnn quantize keeps with its measurements (0 where it kept none)."""
    measured = bundle / ".sd2mnn" / "measured" / f"{name}.json"
    return round(json.loads(measured.read_text()).get(field, 0), 1) if measured.is_file() else 0


def run_probe(onnx: Path, out: Path, results: Results, threads: int, layers: int) -> None:
    for name in COMPONENTS:
        if results.get("probe", name):
            continue
        argv = [sys.executable, __file__, str(onnx), str(out), "--probe-child", name, "--threads", str(threads),
                "--probe-layers", str(layers)]
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"probe {name}: exited {done.returncode}: {done.stderr.strip()[-300:]}", file=sys.stderr, flush=True)
            continue
        results.put("probe", name, json.loads(done.stdout.splitlines()[-1]))
        print(f"probe {name}: {results.get('probe', name)}", file=sys.stderr, flush=True)


def probe_child(name: str, onnx: Path, threads: int, count: int) -> dict:
    """The sensitivity analysis of ``count`` of the component's layers, as sd2mnn quantize runs it."""
    import resource

    from sd2mnn.families import detect
    from sd2mnn.quantization.compression import LayerBits, quantizable_layers
    from sd2mnn.quantization.quantize import QuantizeOptions
    from sd2mnn.quantization.sensitivity import measure
    from sd2mnn.verification.verify import component_feeds

    options = QuantizeOptions()
    model = onnx / name / "model.onnx"
    layers = list(quantizable_layers(model).values())
    picked = layers[::max(1, len(layers) // count)][:count]
    feeds = component_feeds(onnx, name, detect(onnx), options.seed, threads)[:options.sensitivity_cases]
    marks = []
    started = time.monotonic()
    measure(model, picked, feeds, LayerBits.parse(options.probe), options.settings, threads,
            lambda done, total, op: marks.append(time.monotonic()))
    setup = marks[0] - started
    per_layer = (marks[-1] - marks[0]) / len(picked)
    return {"layers": len(layers), "probed": len(picked), "setup_s": round(setup, 1),
            "per_layer_s": round(per_layer, 2), "estimated_s": round(setup + per_layer * len(layers), 1),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_images(out: Path, results: Results, bundles: dict[str, Path], steps: int, threads: int) -> None:
    from sd2mnn.core.images import compare

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, bundle in bundles.items():
        if results.get("images", name) or not bundle.is_dir():
            continue
        png = images / f"{name}.png"
        png.unlink(missing_ok=True)  # from a run that stopped before recording it
        argv = [sys.executable, "-m", "sd2mnn.cli", "generate", str(bundle), "a photo of an astronaut riding a horse on mars",
                "-o", str(png), "--steps", str(steps), "--seed", "0", "--threads", str(threads)]
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"image {name}: sd2mnn generate exited {done.returncode}: {done.stderr.strip()[-300:]}",
                  file=sys.stderr, flush=True)
            continue
        psnr = None if name == "fp32" else compare(images / "fp32.png", png).psnr_db
        results.put("images", name, {"png": str(png), "psnr_vs_fp32": psnr})
        print(f"image {name}: {psnr}", file=sys.stderr, flush=True)


def run_speed(onnx: Path, results: Results, bundles: dict[str, Path], threads: int) -> None:
    from sd2mnn.measurement.bench import bench

    for name, bundle in bundles.items():
        if results.get("speed", name) or not bundle.is_dir():
            continue
        report = bench(bundle, onnx, COMPONENTS, threads, "low", 3, runtimes=("mnn",))
        results.put("speed", name, {c.name: {"steady_s": c.timings["mnn"].median_s,
                                             "peak_rss_bytes": c.timings["mnn"].peak_rss_bytes}
                                    for c in report.components})
        print(f"speed {name}: {results.get('speed', name)}", file=sys.stderr, flush=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary(results: Results, floors: list[float], mixed: list[str], args) -> str:
    uniform = {n: r for n, r in results.data.get("uniform", {}).items() if n != "fp32"}
    w8 = uniform["w8"]
    lines = ["| bundle | size | " + " | ".join(f"{c} PSNR" for c in COMPONENTS) + " | worst |", "|---" * 5 + "|---|"]
    for name, r in sorted(uniform.items(), key=lambda item: -item[1]["bytes"]):
        cells = [f"{r['psnr'][c]:.1f}" for c in COMPONENTS]
        lines.append(f"| {name} | {mib(r['bytes'])} | " + " | ".join(cells) + f" | {min(r['psnr'].values()):.1f} |")
    for name in mixed:
        r = results.get("mixed", name)
        if r and "bytes" in r:
            cells = [f"{r['psnr'][c]:.1f}" for c in COMPONENTS]
            lines.append(f"| **{name}** | {mib(r['bytes'])} | " + " | ".join(cells) + f" | {min(r['psnr'].values()):.1f} |")
    lines += ["", "| floor | mixed | smallest uniform meeting it | mixed / that | mixed / w8 | sensitivity (unet) | quantize wall, peak |",
              "|---|---|---|---|---|---|---|"]
    for floor, name in zip(floors, mixed):
        r = results.get("mixed", name)
        if not r or "bytes" not in r:
            lines.append(f"| {floor:g} | {name}: not measured | | | | | |")
            continue
        meeting = [(n, u) for n, u in uniform.items() if min(u["psnr"].values()) >= floor]
        best = min(meeting, key=lambda item: item[1]["bytes"]) if meeting else None
        against = f"{best[0]} ({mib(best[1]['bytes'])})" if best else "none"
        ratio = f"{r['bytes'] / best[1]['bytes']:.3f}x" if best else "-"
        lines.append(f"| {floor:.2f} | {mib(r['bytes'])} | {against} | {ratio} | {r['bytes'] / w8['bytes']:.3f}x "
                     f"| {r['sensitivity_s'].get('unet', 0):.0f} s, process peak {mib(r['sensitivity_peak_bytes'])} "
                     f"| {r['wall_s']:.0f} s, {mib(r['tree_peak_bytes'])} |")
    images = results.data.get("images", {})
    if images:
        lines += ["", f"Image after {args.steps} steps against the fp32 bundle's (PSNR, dB): " + ", ".join(
            f"{n} {r['psnr_vs_fp32']:.1f}" for n, r in images.items() if r.get("psnr_vs_fp32") is not None)]
    speed = results.data.get("speed", {})
    if speed:
        lines += ["", "| bundle | " + " | ".join(f"{c} steady, peak RSS" for c in COMPONENTS) + " |", "|---" * 4 + "|"]
        for name, r in speed.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{r[c]['steady_s'] * 1e3:.0f} ms, {mib(r[c]['peak_rss_bytes'] or 0)}" for c in COMPONENTS) + " |")
    probe = results.data.get("probe", {})
    if probe:
        lines += ["", "| sensitivity analysis | layers | set-up | per layer | whole analysis | peak RSS |",
                  "|---|---|---|---|---|---|"]
        for name, r in probe.items():
            lines.append(f"| {name} | {r['layers']} | {r['setup_s']:.1f} s | {r['per_layer_s']:.2f} s "
                         f"| {r['estimated_s']:.0f} s (from {r['probed']} layers) | {mib(r['peak_rss_bytes'])} |")
    lines += ["", f"Measured on {platform.machine()}, {platform.python_version()}, {args.threads} threads, "
                  f"`python benchmarks/mixed_precision_full_size.py` (SD1.5 architecture, random weights)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--floors", default="45,35", help="floors in dB besides w8's worst - 3 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="uniform,mixed,images,speed,probe")
    parser.add_argument("--probe-layers", type=int, default=6, help="layers per component the probe stage measures")
    parser.add_argument("--probe-child", metavar="COMPONENT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_child:
        print(json.dumps(probe_child(args.probe_child, args.onnx_dir, args.threads, args.probe_layers)))
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = Results(args.out_dir / "results.json")
    stages = args.stages.split(",")
    floors = [float(f) for f in args.floors.split(",")]
    # The baselines the floors and the images need first; the rest of the grid last (the longest part).
    first = list(KEPT)
    if "uniform" in stages:
        run_uniform(args.onnx_dir, args.out_dir, results, args.threads, first)
    w8 = results.get("uniform", "w8")
    if w8:
        floors.append(round(min(w8["psnr"].values()) - 3.0, 2))
    mixed = run_mixed(args.onnx_dir, args.out_dir, results, floors, args.threads) if "mixed" in stages else \
        [f"mixed-{f:g}" for f in floors]
    picked = {"fp32": args.out_dir / "uniform" / "fp32", "w8": args.out_dir / "uniform" / "w8",
              "w4": args.out_dir / "uniform" / "w4", **{n: args.out_dir / n for n in mixed}}
    if "images" in stages:
        run_images(args.out_dir, results, picked, args.steps, args.threads)
    if "speed" in stages:
        run_speed(args.onnx_dir, results, {n: p for n, p in picked.items() if n != "fp32" and n != "w4"}, args.threads)
    if "probe" in stages:
        run_probe(args.onnx_dir, args.out_dir, results, args.threads, args.probe_layers)
    if "uniform" in stages:
        run_uniform(args.onnx_dir, args.out_dir, results, args.threads, [n for n in uniform_variants() if n not in first])
    text = summary(results, floors, mixed, args)
    (args.out_dir / "mixed_precision.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
