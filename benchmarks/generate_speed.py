"""Text-to-image speed: MNN bundle vs the ONNX pipeline it came from, on ONNX Runtime.

    python benchmarks/generate_speed.py ONNX_DIR BUNDLE [--steps 20] [--threads 2] [--memory-mode 1,2]
                                        [--json out.json]

Each runtime runs in a child process of its own (so its peak RSS is its own), from the same
prompt and seed (the same initial latents), through sd2mnn.Pipeline: load, text encoder, N UNet
steps, VAE decoder, PNG. Reported per runtime: tokenizer and model load, first and steady
(median of the others) UNet step, text encoder, VAE decoder, end to end (model load + generate +
PNG, in the child; not the tokenizer) and peak RSS; then MNN end to end / ONNX Runtime end to end
against the target (<= 0.8) and the PSNR of the two images. ``--memory-mode`` takes a list: one MNN
run per diffusion_demo memory mode (0: no Winograd, cheap load, small memory, slower steps; 1:
MNN's default Winograd; 2: Winograd at memory level 1), each against the same ONNX Runtime run.
A markdown table, then JSON on stdout.

Full size is SD1.5 at 512x512 with 20 steps and 2 threads; the demo pipeline
(sd2mnn.core.demo.demo_pipeline_dir() and a bundle converted from it) runs it in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 0.8
RUNTIMES = ("onnxruntime", "mnn")


def child(args: argparse.Namespace) -> int:
    """Run one generation on one runtime; write the measurements to args.result as JSON."""
    started = time.perf_counter()
    from sd2mnn import families
    from sd2mnn.generation.pipeline import GenerationParams, Pipeline, mnn_runtime_config

    imported = time.perf_counter()
    if args.child == "mnn":
        config = mnn_runtime_config(threads=args.threads, precision=args.precision, memory_mode=args.memory_mode,
                                    family=families.detect(args.source))
        pipeline = Pipeline(args.source, "mnn", config)
    else:
        pipeline = Pipeline.from_onnx(args.source, threads=args.threads)
    generation = pipeline.run(GenerationParams(args.prompt, steps=args.steps, seed=args.seed))
    generation.save(args.image)
    done = time.perf_counter()
    result = {
        "runtime": args.child,
        "source": str(args.source),
        "import_s": imported - started,
        # Models load + generate + PNG. Not the tokenizer: the ONNX side builds its .mtok from
        # tokenizer/ (about a second) where a real ONNX pipeline would load its HF tokenizer.
        "end_to_end_s": done - imported - generation.timings.tokenizer_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        **generation.timings.to_dict(),
        "config": generation.metadata.get("mnn_config") or f"threads={args.threads}",
    }
    Path(args.result).write_text(json.dumps(result))
    return 0


def run_child(runtime: str, source: Path, args: argparse.Namespace, work: Path, memory_mode: int = 1) -> dict:
    label = runtime if runtime == "onnxruntime" else f"mnn-mode{memory_mode}"
    result, image = work / f"{label}.json", work / f"{label}.png"
    argv = [sys.executable, __file__, "--child", runtime, "--source", str(source), "--result", str(result),
            "--image", str(image), "--steps", str(args.steps), "--threads", str(args.threads),
            "--seed", str(args.seed), "--prompt", args.prompt, "--precision", args.precision,
            "--memory-mode", str(memory_mode)]
    started = time.perf_counter()
    # The child's own output (MNN prints to stdout) goes to stderr: stdout is the report.
    done = subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{runtime} run failed (exit {done.returncode}); see the output above")
    data = json.loads(result.read_text())
    data["process_wall_s"] = time.perf_counter() - started
    data["image"] = str(image)
    return data


def markdown(results: dict[str, dict]) -> str:
    head = ("| runtime | tokenizer | model load | first step | steady step | first/steady | text encoder "
            "| VAE decoder | end to end | peak RSS |")
    lines = [head, "|" + "---|" * 10]
    for name, r in results.items():
        ratio = r["first_step_s"] / r["steady_step_s"] if r["steady_step_s"] else float("nan")
        lines.append(
            f"| {name} | {r['tokenizer_s']:.2f} s | {r['load_s']:.2f} s | {r['first_step_s']:.3f} s | {r['steady_step_s']:.3f} s | {ratio:.2f}x "
            f"| {r['text_encoder_s']:.3f} s | {r['vae_decoder_s']:.2f} s | {r['end_to_end_s']:.2f} s "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} MiB |"
        )
    return "\n".join(lines)


def _memory_modes(text: str) -> list[int]:
    modes = [int(part) for part in text.split(",")]
    if any(mode not in (0, 1, 2) for mode in modes):
        raise argparse.ArgumentTypeError(f"memory modes are 0, 1 or 2, got {text}")
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", nargs="?", type=Path, help="ONNX pipeline folder (ONNX Runtime side)")
    parser.add_argument("bundle", nargs="?", type=Path, help="MNN bundle converted from it (MNN side)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    parser.add_argument("--precision", choices=("high", "low"), default="low", help="MNN precision (MNN's runtime: low)")
    parser.add_argument("--memory-mode", type=_memory_modes, default=[1],
                        help="diffusion_demo's memory_mode for MNN, or a comma-separated list of them (default: 1)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the JSON report here")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the two PNGs in this folder")
    # Internal: one measured run.
    parser.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.memory_mode = args.memory_mode[0]
        return child(args)
    if args.onnx_dir is None or args.bundle is None:
        parser.error("give ONNX_DIR and BUNDLE")

    with tempfile.TemporaryDirectory(prefix="sd2mnn-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {"onnxruntime": run_child("onnxruntime", args.onnx_dir, args, work)}
        for mode in args.memory_mode:
            results[f"mnn (memory mode {mode})"] = run_child("mnn", args.bundle, args, work, mode)
        from sd2mnn.core.images import compare

        baseline = results["onnxruntime"]
        mnn_runs = {}
        for name, result in results.items():
            if name == "onnxruntime":
                continue
            comparison = compare(result["image"], baseline["image"])
            ratio = result["end_to_end_s"] / baseline["end_to_end_s"]
            mnn_runs[name] = {"mnn_over_onnxruntime_end_to_end": ratio, "target_met": ratio <= TARGET_RATIO,
                              "psnr_db": None if comparison.identical else comparison.psnr_db,
                              "ssim": comparison.ssim}
    report = {
        "steps": args.steps, "threads": args.threads, "seed": args.seed, "prompt": args.prompt,
        "cpu_count": os.cpu_count(), "results": results, "target": TARGET_RATIO, "mnn_vs_onnxruntime": mnn_runs,
    }
    print(f"{args.steps} steps, {args.threads} threads, seed {args.seed}, {os.cpu_count()} CPUs\n")
    print(markdown(results))
    print()
    for name, got in mnn_runs.items():
        psnr = "identical" if got["psnr_db"] is None else f"{got['psnr_db']:.1f} dB"
        verdict = "met" if got["target_met"] else "NOT met"
        print(f"{name}: end to end = {got['mnn_over_onnxruntime_end_to_end']:.2f}x ONNX Runtime "
              f"(target <= {TARGET_RATIO}: {verdict}); image vs ONNX Runtime: PSNR {psnr}, SSIM {got['ssim']:.4f}")
    print()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
