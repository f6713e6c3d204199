"""From a diffusers folder to an MNN bundle: sd2mnn's verified path against MNN's own, unchecked
flow, on the same machine, in one script.

    python benchmarks/verified_flow.py WORK_DIR --mnn-export MNN_SRC/transformers/diffusion/export/onnx_export.py
                                       [--runs 3] [--flows mnn,sd2mnn,sd2mnn-steps,mnn-huge-pages]

The pipeline is full-size SD1.5 architecture with seeded random weights and the real CLIP
tokenizer (benchmarks/full_size.py builds it into WORK_DIR/diffusers once). Three flows, each
started on empty output folders after a sync, the order rotating each round so that drift in the
machine's speed does not always land on the same flow:

  mnn           MNN's flow: its onnx_export.py (--opset 18), then the MNN package's converter on
                text_encoder, unet and vae_decoder one after another, as its convert_mnn.py runs it
                (minus its telemetry script). Where the converter writes no text_encoder.mnn (with
                today's torch that exporter's text encoder holds IsNaN, which MNN cannot convert,
                though the converter exits 0), the converter runs on sd2mnn's exported text encoder
                (WORK_DIR/reference-onnx, exported once) and that time is added.
  mnn-huge-pages  the same with the environment sd2mnn gives itself and its children (large
                allocations on transparent huge pages, sd2mnn.core.huge_pages): what MNN's flow would
                take with that one change. MNN's flow proper runs without it.
  sd2mnn        sd2mnn convert WORK_DIR/diffusers OUT --verify
  sd2mnn-steps  sd2mnn export, then convert, then verify, three commands (each phase's time); and
                beside them, not in the total, convert again with --jobs 1 (the one phase --jobs
                changes: the default must not be the slower)

Each command is measured by benchmarks/_measure.py (wall, peak summed RSS of its process tree).
Reported: each flow's median wall and worst peak, each phase's median, and the medians of the
per-round ratios against MNN's flow (the ratio taken between runs of the same round). Rounds are
kept in WORK_DIR/results.json; a rerun adds rounds until --runs are there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from _measure import measure, raw_converter_argv

ROOT = Path(__file__).resolve().parent.parent
SD2MNN = [sys.executable, "-m", "sd2mnn.cli"]
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def step(name: str, argv: list[str], logs: Path, env: dict | None = None) -> dict:
    """One command, measured after a sync; its stdout kept in logs/."""
    os.sync()
    logs.mkdir(parents=True, exist_ok=True)
    record = measure(argv, stdout_path=logs / f"{name}.out", cwd=ROOT, env=env)
    if record["returncode"] != 0:
        raise SystemExit(f"{name}: exit code {record['returncode']} ({' '.join(argv[:6])} ...); see {logs}")
    print(f"    {name}: {record['wall_s']:.1f} s, {record['tree_peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return {"wall_s": record["wall_s"], "peak_bytes": record["tree_peak_bytes"]}


def mnn_flow(work: Path, source: Path, exporter: Path, reference_onnx: Path, huge_pages: bool = False) -> dict:
    from sd2mnn.core.huge_pages import huge_page_env

    label = "mnn-huge-pages" if huge_pages else "mnn"
    out = work / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "mnn").mkdir(parents=True)
    logs = work / "logs" / label
    plain = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")}
    env = huge_page_env(plain) if huge_pages else plain
    phases = {"export": step("export", [sys.executable, str(exporter), "--model_path", str(source),
                                        "--output_path", str(out / "onnx"), "--opset", "18"], logs, env)}
    for name in COMPONENTS:
        target = out / "mnn" / f"{name}.mnn"
        phases[f"convert {name}"] = step(f"convert_{name}", raw_converter_argv(out / "onnx" / name / "model.onnx", target),
                                         logs, env)
        if not target.is_file():  # the converter exits 0 when it fails
            again = step(f"convert_{name}_sd2mnn_onnx",
                         raw_converter_argv(reference_onnx / name / "model.onnx", target), logs, env)
            phases[f"convert {name}"]["wall_s"] += again["wall_s"]
            phases[f"convert {name}"]["peak_bytes"] = max(phases[f"convert {name}"]["peak_bytes"], again["peak_bytes"])
            phases[f"convert {name}"]["note"] = "its own export failed to convert; converted sd2mnn's"
            if not target.is_file():
                raise SystemExit(f"MNN's converter wrote no {target}, even from {reference_onnx}")
    return phases


def sd2mnn_flow(work: Path, source: Path) -> dict:
    out = work / "out-sd2mnn"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs = work / "logs" / "sd2mnn"
    return {"convert --verify": step("convert_verify", [*SD2MNN, "convert", str(source), str(out / "mnn"), "--verify",
                                                        "--json", "--quiet"], logs)}


def sd2mnn_steps(work: Path, source: Path) -> dict:
    out = work / "out-steps"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs = work / "logs" / "steps"
    onnx, mnn = out / "onnx", out / "mnn"
    return {
        "export": step("export", [*SD2MNN, "export", str(source), str(onnx), "--components", ",".join(COMPONENTS)], logs),
        "convert": step("convert", [*SD2MNN, "convert", str(onnx), str(mnn), "--json", "--quiet"], logs),
        "verify": step("verify", [*SD2MNN, "verify", str(onnx), str(mnn), "--json", "--quiet"], logs),
        # Beside the flow, not in its total: the one phase --jobs changes, with one conversion at a time.
        "convert --jobs 1": {**step("convert_jobs1", [*SD2MNN, "convert", str(onnx), str(out / "mnn-jobs1"), "--jobs", "1",
                                                      "--json", "--quiet"], logs), "aside": True},
    }


def total(phases: dict) -> tuple[float, int]:
    counted = [p for p in phases.values() if not p.get("aside")]
    return sum(p["wall_s"] for p in counted), max(p["peak_bytes"] for p in counted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--mnn-export", type=Path, required=True,
                        help="MNN's transformers/diffusion/export/onnx_export.py (the tag the MNN package pins)")
    parser.add_argument("--runs", type=int, default=3, help="rounds of every flow (default: 3)")
    parser.add_argument("--flows", default="mnn,sd2mnn,sd2mnn-steps,mnn-huge-pages")
    args = parser.parse_args()
    work = args.work.resolve()
    from full_size import ensure_full_size, make_diffusers_pipeline

    source = work / "diffusers"
    if not (source / "model_index.json").is_file():
        make_diffusers_pipeline(source)
    reference_onnx = ensure_full_size(work)[1] if any(f.startswith("mnn") for f in args.flows.split(",")) else None
    flows = {"mnn": lambda: mnn_flow(work, source, args.mnn_export.resolve(), reference_onnx),
             "mnn-huge-pages": lambda: mnn_flow(work, source, args.mnn_export.resolve(), reference_onnx, True),
             "sd2mnn": lambda: sd2mnn_flow(work, source),
             "sd2mnn-steps": lambda: sd2mnn_steps(work, source)}
    names = [n for n in args.flows.split(",") if n]
    unknown = [n for n in names if n not in flows]
    if unknown:
        parser.error(f"--flows: unknown {unknown}; choose from {','.join(flows)}")
    path = work / "results.json"
    rounds = json.loads(path.read_text()) if path.is_file() else []
    while len(rounds) < args.runs:
        index, record = len(rounds), {}
        for name in names[len(rounds) % len(names):] + names[:len(rounds) % len(names)]:
            print(f"round {index + 1}, {name}", file=sys.stderr, flush=True)
            record[name] = flows[name]()
        rounds.append(record)
        path.write_text(json.dumps(rounds, indent=2))

    print("| flow | median wall | worst peak RSS | wall vs MNN's | peak vs MNN's |")
    print("|---|---|---|---|---|")
    for name in names:
        got = [total(r[name]) for r in rounds if name in r]
        vs = [total(r[name])[0] / total(r["mnn"])[0] for r in rounds if name in r and "mnn" in r]
        peak_vs = [total(r[name])[1] / total(r["mnn"])[1] for r in rounds if name in r and "mnn" in r]
        ratio = f"{statistics.median(vs):.2f}x" if vs else "-"
        peak_ratio = f"{statistics.median(peak_vs):.2f}x" if peak_vs else "-"
        print(f"| {name} | {statistics.median(w for w, _ in got):.1f} s | {max(p for _, p in got) / 2**30:.2f} GiB "
              f"| {ratio} | {peak_ratio} |")
        for phase in next(r[name] for r in rounds if name in r):
            walls = [r[name][phase]["wall_s"] for r in rounds if name in r]
            aside = " (beside the flow)" if next(r[name] for r in rounds if name in r)[phase].get("aside") else ""
            print(f"|   {phase}{aside} | {statistics.median(walls):.1f} s | "
                  f"{max(r[name][phase]['peak_bytes'] for r in rounds if name in r) / 2**30:.2f} GiB | | |")
    print(f"({len(rounds)} rounds; ratios: median over rounds of the ratio within each round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
