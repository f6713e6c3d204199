"""Which weight quantization SD3.5's T5-XXL text encoder (text_encoder_3) tolerates in MNN, at
T5-XXL's full width, depth-truncated (seeded random weights). Prints one JSON object.

    python benchmarks/sd35_t5_quant.py WORK_DIR [--layers 1,2,4] [--variants fp32,fp16,w8,...]
                                       [--no-bench] [--keep] [--prompts 4] [--summary-only]
                                       [--min-free-gib 1.0] [--step-timeout SECONDS]

T5-XXL's encoder (24 layers, d_model 4096, d_ff 10240, 64 heads of 64, vocab 32128, gated-gelu,
relative attention; 4.7B parameters, ~19 GB in fp32) does not fit this machine to export, so each
depth in --layers builds it with T5-XXL's exact config but only that many layers
(benchmarks/_sd35_model.py's T5_XXL and build_t5: T5's own init, seeded). The rest of the SD3
pipeline is tests/builders.make_tiny_sd3_pipeline's (its transformer's joint width set to T5's
4096); tokenizer_3 is its T5 Unigram tokenizer. Per depth, each step a measured child process
(sd35_full_size.py's guarded_run: the process tree's summed RSS sampled, wait4's ru_maxrss), one
after another, smallest depth first:

  build      the pipeline folder with the depth-truncated T5
  export     sd2mnn export --components text_encoder_3 (checked against PyTorch)
  per variant (sd2mnn sweep's named variants, converted with the same flags sweep gives them):
    convert  sd2mnn convert --components text_encoder_3 --json (the converter's wall and peak RSS)
    verify   sd2mnn verify --components text_encoder_3 --json: MNN against ONNX Runtime on verify's
             inputs (PSNR, cosine; pass/fail by verify's default floors), and T5's conditioning
             check on the first --prompts prompts of the built-in corpus
    bench    sd2mnn bench --components text_encoder_3 --runs 1 (fp32 also ONNX Runtime)

A variant's bundle is deleted once measured, and a depth's export and diffusers T5 once its
variants are done (--keep keeps them): the disk holds one depth's ONNX and one bundle at a time.
Results are kept in WORK_DIR/results.json as each step ends (a rerun skips what is there) and
logged in WORK_DIR/progress.log; the printed JSON ends with the depth x variant table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from sd35_full_size import (GiB, SD2MNN, Run, add_guard_arguments, parse_bench, parse_convert,  # noqa: E402
                            parse_verify, run_then_print)

COMPONENT = "text_encoder_3"
DEFAULT_VARIANTS = ("fp32", "fp16", "w8", "w8-asym", "w6", "w4-b64", "w4")


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# ---------------------------------------------------------------------------------------------
# Children: the pipeline folders
# ---------------------------------------------------------------------------------------------
def build_base(out: Path) -> None:
    """The tiny SD3 pipeline, its transformer's joint width T5-XXL's, without its tiny T5's weights."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _sd35_model import T5_XXL
    from builders import make_tiny_sd3_pipeline

    tmp = out.with_name(out.name + ".partial")
    make_tiny_sd3_pipeline(tmp, transformer={"joint_attention_dim": T5_XXL["d_model"]})
    shutil.rmtree(tmp / COMPONENT)
    tmp.rename(out)


def build_depth(base: Path, out: Path, layers: int) -> None:
    """``base`` copied to ``out`` with the depth-truncated T5-XXL as its text_encoder_3."""
    from _sd35_model import build_t5

    if not out.is_dir():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        tmp.rename(out)
    if not (out / COMPONENT / "config.json").is_file():
        build_t5(out, layers)


def write_prompts(path: Path, count: int) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from sd2mnn.verification.conditioning import builtin_prompts

    path.write_text("\n".join(builtin_prompts()[:count]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# A variant's convert flags and the figures kept of each step
# ---------------------------------------------------------------------------------------------
def convert_flags(variant: str) -> list[str]:
    """sd2mnn convert's flags for a sweep variant, as sweep sets them (so the manifest records
    the quantization and verify applies its quantized floor)."""
    sys.path.insert(0, str(ROOT / "src"))
    from sd2mnn.measurement.sweep import VARIANTS

    argv = []
    for field, value in VARIANTS[variant].convert_fields().items():
        if field == "extra":
            argv += [value] if value else []
        elif value is True:
            argv.append(f"--{field.replace('_', '-')}")
        else:
            argv += [f"--{field.replace('_', '-')}", str(value)]
    return argv


def parse_verify_t5(text: str) -> dict:
    """parse_verify's figures plus the floor verify judged the component by."""
    out = parse_verify(text)
    for comp in json.loads(text)["components"]:
        out["components"][comp["name"]].update(quantized=comp["quantized"], thresholds=comp["thresholds"],
                                               failures=comp["failures"])
    return out


def row(results: dict, layers: int, variant: str) -> dict:
    """One line of the table: size, fidelity, verify's verdict, conversion and latency figures."""
    prefix = f"d{layers}_{variant}"
    conv, ver, ben = (results.get(f"{prefix}_{s}", {}) for s in ("convert", "verify", "bench"))
    out = {"layers": layers, "variant": variant}
    comp = (conv.get("components") or {}).get(COMPONENT)
    if comp:
        out["size_bytes"] = sum(comp["files"].values())
        out["convert_wall_s"], out["convert_peak_rss_gib"] = comp["wall_s"], comp["peak_rss_gib"]
    out["convert_tree_peak_gib"] = conv.get("tree_peak_gib")
    v = (ver.get("components") or {}).get(COMPONENT)
    if v:
        o = v["outputs"].get("last_hidden_state") or next(iter(v["outputs"].values()), {})
        out.update(psnr_db=o.get("psnr_db"), cosine=o.get("cosine"), max_abs=o.get("max_abs"),
                   verify_floor=v.get("thresholds"), verify_passed=v["passed"], verify_failures=v.get("failures"))
        cond = (ver.get("conditioning") or {}).get(COMPONENT)
        if cond:
            out["conditioning_matching_cosine"] = cond["matching_cosine"]
        # The whole verify: the component's floor above and the conditioning check's own, which
        # is the same for quantized bundles as for fp32 ones.
        out["verify_all_passed"], out["verify_all_failures"] = ver["passed"], ver["failures"]
        out["verify_run_wall_s"] = v["run_wall_s"]
    elif ver:
        out["verify_error"] = ver.get("error_tail") or ver.get("parse_error")
    b = (ben.get("components") or {}).get(COMPONENT)
    if b:
        out["mnn_steady_s"] = b.get("mnn", {}).get("steady_median_s")
        out["mnn_bench_peak_rss_gib"] = b.get("mnn", {}).get("peak_rss_gib")
        if "onnxruntime" in b:
            out["onnxruntime_steady_s"] = b["onnxruntime"].get("steady_median_s")
    if conv.get("returncode") not in (None, 0):
        out["convert_error"] = conv.get("does_not_fit") or conv.get("error_tail")
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def free_disk_gib(path: Path) -> float:
    return round(shutil.disk_usage(path).free / GiB, 1)


def t5_bytes(layers: int) -> int:
    """T5-XXL's encoder cut to ``layers``, in fp32: the embedding, then per layer q, k, v, o and
    the gated feed-forward's wi_0, wi_1, wo."""
    from _sd35_model import T5_XXL

    d, inner, ff = T5_XXL["d_model"], T5_XXL["num_heads"] * T5_XXL["d_kv"], T5_XXL["d_ff"]
    return 4 * (T5_XXL["vocab_size"] * d + layers * (4 * d * inner + 3 * d * ff))


def run_depth(run: Run, layers: int, base: Path, prompts: Path) -> None:
    args, work = run.args, run.work
    depth = work / f"d{layers}"
    diffusers, onnx = depth / "diffusers", depth / "onnx"
    # Three fp32 copies at once at most: the diffusers T5 beside its export, whose weights export
    # writes once per tensor and again into one weights.pb. A depth without room is recorded, not started.
    needed = 3 * t5_bytes(layers) + GiB
    if f"d{layers}_export" not in run.results and not depth.is_dir() and shutil.disk_usage(work).free < needed:
        run.say(f"d{layers}: needs {needed / GiB:.1f} GiB of disk, {free_disk_gib(work)} GiB free: skipped")
        run.save(f"d{layers}_disk", {"does_not_fit": f"needs {needed / GiB:.1f} GiB of disk, "
                                                     f"{free_disk_gib(work)} GiB free"})
        return
    run.results.pop(f"d{layers}_disk", None)
    rec = run.step(f"d{layers}_build", me("--build-depth", str(base), str(diffusers), str(layers)))
    if rec["returncode"] != 0:
        return
    if "t5_bytes" not in rec and (diffusers / COMPONENT).is_dir():
        rec["t5_bytes"] = sum(p.stat().st_size for p in (diffusers / COMPONENT).glob("*.safetensors"))
        run.save(f"d{layers}_build", rec)
    rec = run.step(f"d{layers}_export", [*SD2MNN, "export", str(diffusers), str(onnx), "--components", COMPONENT,
                                               "--overwrite"])
    if rec["returncode"] != 0:
        return
    if "onnx_bytes" not in rec and (onnx / COMPONENT).is_dir():
        rec["onnx_bytes"] = sum(p.stat().st_size for p in (onnx / COMPONENT).iterdir() if p.is_file())
        rec["free_disk_gib"] = free_disk_gib(work)
        run.save(f"d{layers}_export", rec)
    if not args.keep:
        shutil.rmtree(diffusers / COMPONENT, ignore_errors=True)
    for variant in args.variants:
        bundle = depth / f"mnn-{variant}"
        name = f"d{layers}_{variant}"
        rec = run.step(f"{name}_convert", [*SD2MNN, "convert", str(onnx), str(bundle), "--components", COMPONENT,
                                           *convert_flags(variant), "--json"], parse_convert)
        if rec["returncode"] == 0:
            run.step(f"{name}_verify", [*SD2MNN, "verify", str(onnx), str(bundle), "--components", COMPONENT,
                                        "--threads", "2", "--prompts", str(prompts), "--json"],
                     parse_verify_t5, json_out=True)
            if not args.no_bench:
                reference = ["--onnx", str(onnx)] if variant == "fp32" else []
                run.step(f"{name}_bench", [*SD2MNN, "bench", str(bundle), *reference, "--components", COMPONENT,
                                           "--runs", "1", "--threads", "2", "--json"], parse_bench, json_out=True)
        if not args.keep:
            shutil.rmtree(bundle, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(depth, ignore_errors=True)


def size_at_full_depth(table: list[dict], layers: int = 24) -> dict:
    """Per variant, the bundle size at T5-XXL's ``layers`` by arithmetic (file bytes are linear in
    the depth: the slope between the smallest and largest depth measured), not a measurement."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in table):
        sizes = {r["layers"]: r["size_bytes"] for r in table if r["variant"] == variant and r.get("size_bytes")}
        if len(sizes) >= 2:
            lo, hi = min(sizes), max(sizes)
            per_layer = (sizes[hi] - sizes[lo]) / (hi - lo)
            out[variant] = {"per_layer_bytes": round(per_layer), "layers": layers,
                            "bytes": round(sizes[lo] + per_layer * (layers - lo))}
    return out


def summary(run: Run) -> dict:
    import platform

    import psutil

    args = run.args
    table = [row(run.results, n, v) for n in args.layers for v in args.variants
             if any(k.startswith(f"d{n}_{v}_") for k in run.results)]
    return {
        "conditions": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
                       f"{psutil.virtual_memory().total / GiB:.0f} GiB memory, no GPU",
            "model": "T5-XXL encoder config (benchmarks/_sd35_model.py T5_XXL) cut to each depth in 'layers', "
                     "T5's seeded random init; the rest of the SD3 pipeline tiny (tests/builders.py)",
            "layers": args.layers, "variants": args.variants, "threads": 2,
            "verify": f"sd2mnn verify's inputs (seed 0), conditioning on the first {args.prompts} built-in prompts",
            "not_measured": "T5-XXL's 24 layers (4.7B parameters, ~19 GB fp32): does not fit this machine to export",
        },
        "steps": run.results,
        "table": table,
        "size_24_layers_by_arithmetic": size_at_full_depth(table),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--build-base":
        build_base(Path(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--build-depth":
        build_depth(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", default="1,2,4",
                        help="T5 depths to measure, smallest first (default 1,2,4; each needs 3 x 0.72 GiB per layer + 0.5 GiB of free disk)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"sd2mnn sweep's named variants (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--no-bench", action="store_true", help="leave out sd2mnn bench")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: print the table of what WORK_DIR/results.json holds for --layers and --variants")
    parser.add_argument("--keep", action="store_true", help="keep each depth's diffusers T5, export and bundles")
    parser.add_argument("--prompts", type=int, default=4,
                        help="built-in prompts for verify's conditioning check (default 4; verify's own: 660)")
    add_guard_arguments(parser, 1800)
    args = parser.parse_args()
    args.layers = sorted(int(n) for n in args.layers.split(",") if n)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        convert_flags(v)  # an unknown name fails now, before anything is built
    return run_then_print(args, (lambda run: None) if args.summary_only else run_depths, summary)


def run_depths(run: Run) -> None:
    base = run.work / "tiny-sd3"
    rec = run.step("build_base", me("--build-base", str(base)))
    if rec["returncode"] == 0:
        prompts = write_prompts(run.work / "prompts.txt", run.args.prompts)
        for layers in run.args.layers:
            run_depth(run, layers, base, prompts)


if __name__ == "__main__":
    sys.exit(main())
