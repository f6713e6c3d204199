"""Wan2.1-T2V-1.3B at full size (random weights): sd2mnn export, convert fp32/w8/w4, verify and bench,
beside the converter calls of MNN's own wan_convert_mnn.py, run in the same script. Prints one JSON object.

    python benchmarks/wan_full_size.py WORK_DIR [--size 256x256x9] [--large 480x480x9] [--t5-layers 2]
                                       [--no-bench] [--min-free-gib 1.0] [--step-timeout SECONDS]

The pipeline is built by benchmarks/_wan_model.py: the real 1.3B transformer and VAE configs,
UMT5-XXL at its full width and vocabulary with --t5-layers of its 24 blocks (all 24 are 22.7 GB
in fp32). Every step is a child process (its process tree's summed RSS sampled, wait4's
ru_maxrss; sd35_full_size.py's guarded_run), run one after another:

  refuse           sd2mnn export of the 24-block UMT5-XXL, its weights a sparse file of their
                   size: export must refuse in one line before reading them
  export           sd2mnn export at --size (default: MNN's documented 256x256, 9 frames), each part
                   checked against PyTorch: the text encoder and VAE decoder, then the transformer
  flow             the converter calls of MNN's wan_convert_mnn.py (its flags: the text encoder
                   at 8 bits, block 128, unless told otherwise), through the converter sd2mnn uses
  convert          sd2mnn convert --json: fp32, --weight-quant-bits 8, --weight-quant-bits 4
  verify           sd2mnn verify --json of each: MNN against ONNX Runtime per part, the runtime
                   contract, the conditioning check (the text encoder's quantization tolerance)
  bench            sd2mnn bench --onnx on the fp32 bundle: a transformer step on MNN and ONNX Runtime
  large            the transformer and VAE decoder exported, converted (fp32) and benched at --large

A step that leaves less than --min-free-gib of memory available is killed and recorded as not
fitting; results are kept in WORK_DIR/results.json as each step ends (a rerun skips what is
there) and logged in WORK_DIR/progress.log.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from sd35_full_size import (GiB, SD2MNN, Run, _files, add_guard_arguments, export_figures, mnn_flow,  # noqa: E402
                            move_into, parse_bench, parse_convert, parse_verify, run_then_print)

SMALL = ("text_encoder", "vae_decoder")
VARIANTS = {"fp32": [], "w8": ["--weight-quant-bits", "8"], "w4": ["--weight-quant-bits", "4"]}
# wan_convert_mnn.py T5_DEFAULT_QUANT_ARGS: the text encoder's flags when the user gives no bit width.
FLOW_EXTRA = {"text_encoder": ["--weightQuantBits=8", "--weightQuantBlock=128"]}


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _size(text: str) -> tuple[int, int, int]:
    height, width, frames = (int(v) for v in text.lower().split("x"))
    return height, width, frames


def size_flags(text: str) -> list[str]:
    height, width, frames = _size(text)
    return ["--height", str(height), "--width", str(width), "--frames", str(frames)]


def unfit_text_encoder(diffusers: Path, out: Path) -> None:
    """The pipeline folder with all of UMT5-XXL as its text encoder: its config with 24 blocks,
    its weights a sparse file of their fp32 size (nothing real to read); the other models'
    configs only."""
    import shutil

    sys.path.insert(0, str(HERE))
    from _wan_model import UMT5_XXL

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(diffusers / "model_index.json", out)
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(diffusers / name, out / name, dirs_exist_ok=True)
    for name in ("transformer", "vae", "text_encoder"):
        (out / name).mkdir(exist_ok=True)
        shutil.copy(diffusers / name / "config.json", out / name)
    config = json.loads((diffusers / "text_encoder" / "config.json").read_text())
    (out / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_layers": UMT5_XXL["num_layers"]}))
    with open(out / "text_encoder" / "model.safetensors", "wb") as f:
        f.truncate(5_680_910_336 * 4)  # UMT5-XXL's encoder: 5.68e9 float32 parameters


def _bundle(run: Run, variant: str) -> Path:
    return run.work / f"mnn-{variant}"


def convert_and_verify(run: Run, components: tuple[str, ...], tag: str) -> None:
    names = ",".join(components)
    for variant, flags in VARIANTS.items():
        bundle = _bundle(run, variant)
        rec = run.step(f"convert_{variant}_{tag}", [*SD2MNN, "convert", str(run.onnx), str(bundle), "--components",
                                                     names, *flags, "--json"], parse_convert)
        if rec["returncode"] == 0:
            run.step(f"verify_{variant}_{tag}", [*SD2MNN, "verify", str(run.onnx), str(bundle), "--components", names,
                                                 "--threads", "2", "--json"], parse_verify, json_out=True)


def flow(run: Run, components: tuple[str, ...], tag: str) -> None:
    report = run.work / "mnn-flow-report.json"
    rec = run.step(f"flow_{tag}", me("--mnn-flow", str(run.onnx), str(run.flow), str(report), ",".join(components)))
    if "flow" not in rec and report.exists():
        rec["flow"] = {c: json.loads(report.read_text()).get(c) for c in components}
        run.save(f"flow_{tag}", rec)
    for component in components:  # sizes recorded; the disk is needed for sd2mnn's bundles
        for path in run.flow.glob(f"{component}.mnn*"):
            path.unlink()


def run_all(run: Run) -> None:
    args, work = run.args, run.work
    rec = run.step("build", [sys.executable, str(HERE / "_wan_model.py"), str(run.diffusers),
                             "--t5-layers", str(args.t5_layers)])
    if rec["returncode"] != 0:
        return
    unfit = work / "diffusers-umt5-xxl"
    run.step("build_unfit", me("--unfit-text-encoder", str(run.diffusers), str(unfit)))
    run.step("refuse_umt5_xxl", [*SD2MNN, "export", str(unfit), str(work / "onnx-refused"), "--components",
                                 "text_encoder", *size_flags(args.size)])
    log = work / "logs" / "refuse_umt5_xxl.log"
    if log.exists() and "said" not in run.results["refuse_umt5_xxl"]:
        run.results["refuse_umt5_xxl"]["said"] = log.read_text(errors="replace").strip().splitlines()[-1:]
        run.save("refuse_umt5_xxl", run.results["refuse_umt5_xxl"])

    for tag, components in (("small", SMALL), ("transformer", ("transformer",))):
        folder = work / f"onnx-{tag}"
        rec = run.step(f"export_{tag}", [*SD2MNN, "export", str(run.diffusers), str(folder), "--components",
                                         ",".join(components), *size_flags(args.size)])
        if rec["returncode"] != 0:
            return
        if "onnx" not in rec:
            rec["onnx"] = export_figures(folder, components)
            run.save(f"export_{tag}", rec)
        move_into(folder, run.onnx)
        flow(run, components, tag)
        convert_and_verify(run, components, tag)
    if not args.no_bench:
        run.step("bench", [*SD2MNN, "bench", str(_bundle(run, "fp32")), "--onnx", str(run.onnx), "--runs", "1",
                           "--threads", "2", "--json"], parse_bench, json_out=True)
    if args.large:
        large = work / "onnx-large"
        components = "transformer,vae_decoder"
        rec = run.step("export_large", [*SD2MNN, "export", str(run.diffusers), str(large), "--components", components,
                                        *size_flags(args.large)])
        if rec["returncode"] == 0:
            bundle = work / "mnn-fp32-large"
            rec = run.step("convert_fp32_large", [*SD2MNN, "convert", str(large), str(bundle), "--components",
                                                  components, "--json"], parse_convert)
            if rec["returncode"] == 0 and not args.no_bench:
                run.step("bench_large", [*SD2MNN, "bench", str(bundle), "--onnx", str(large), "--components",
                                         components, "--runs", "1", "--threads", "2", "--json"], parse_bench,
                         json_out=True)


def summary(run: Run) -> dict:
    import psutil

    out = {"conditions": {
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / GiB:.0f} GiB memory, no GPU",
        "model": f"Wan2.1-T2V-1.3B's transformer and VAE, UMT5-XXL at full width with {run.args.t5_layers} of 24 "
                 "blocks; seeded random weights (benchmarks/_wan_model.py)",
        "size": run.args.size, "large": run.args.large, "min_free_gib": run.args.min_free_gib,
    }, "steps": run.results}
    out["bundle_files"] = {name: _files(run.work / f"mnn-{name}") for name in (*VARIANTS, "flow", "fp32-large")
                           if (run.work / f"mnn-{name}").is_dir()}
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--mnn-flow":
        onnx_root, mnn_root, report, models = sys.argv[2:6]
        mnn_flow(Path(onnx_root), Path(mnn_root), models.split(","), False, Path(report), FLOW_EXTRA)
        return 0  # as wan_convert_mnn.py's calls: whatever the converter said is recorded
    if len(sys.argv) > 1 and sys.argv[1] == "--unfit-text-encoder":
        unfit_text_encoder(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--size", default="256x256x9", help="HEIGHTxWIDTHxFRAMES exported (default 256x256x9)")
    parser.add_argument("--large", default="", help="a larger HEIGHTxWIDTHxFRAMES for the transformer and VAE")
    parser.add_argument("--t5-layers", type=int, default=2, help="UMT5-XXL blocks kept (default 2)")
    parser.add_argument("--no-bench", action="store_true", help="leave out sd2mnn bench")
    add_guard_arguments(parser, 5400)
    return run_then_print(parser.parse_args(), run_all, summary)


if __name__ == "__main__":
    sys.exit(main())
