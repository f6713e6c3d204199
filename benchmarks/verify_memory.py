"""Peak memory and wall time of ``sd2mnn verify`` against one runtime running the UNet alone.

    python benchmarks/verify_memory.py ONNX_DIR MNN_DIR [--threads N] [--json OUT.json]

Made for a full-size SD1.5-architecture pipeline (unet 3.4 GB). Three child processes run one
after another:
  1. ONNX Runtime alone: load unet/model.onnx, run one input of the contract's shapes, exit;
  2. MNN alone: the same with unet.mnn;
  3. ``python -m sd2mnn.cli verify ONNX_DIR MNN_DIR --json``.
For 1 and 2 the peak is the child's ru_maxrss (wait4). For 3 it is the larger of the sampled sum
of RSS over verify's whole process tree (every 20 ms) and its largest descendant's ru_maxrss.
Target: verify's peak <= 1.2x the larger of 1 and 2 (it must never hold two copies of the unet).
Prints a table, then the numbers as JSON (also written to --json OUT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _measure import measure

TARGET_RATIO = 1.2


def baseline_child(runtime: str, onnx_dir: str, mnn_dir: str, threads: int) -> int:
    """One runtime, the unet alone: load, run one contract-shaped input, exit."""
    import numpy as np

    from sd2mnn.families import SD15
    from sd2mnn.core.layout import load_component
    from sd2mnn.core.runtime import MnnModel, OrtModel, RuntimeConfig
    from sd2mnn.verification.inputs import static_shape

    source = load_component(Path(onnx_dir), "unet", SD15)
    rng = np.random.default_rng(0)
    feeds = {}
    for tensor in source.summary.inputs:
        shape = static_shape("unet", tensor, SD15)
        if tensor.name == "timestep":
            feeds[tensor.name] = np.array([500], dtype=np.dtype(tensor.dtype))
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    spec = SD15.components["unet"]
    if runtime == "onnxruntime":
        model = OrtModel(source.model, threads=threads)
    else:
        model = MnnModel(Path(mnn_dir) / spec.mnn_name, spec.inputs, spec.outputs,
                         RuntimeConfig(threads=threads, precision="high"))
    model.run(feeds)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_dir")
    parser.add_argument("mnn_dir")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    parser.add_argument("--baseline-child", choices=["onnxruntime", "mnn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        return baseline_child(args.baseline_child, args.onnx_dir, args.mnn_dir, args.threads)

    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"verify-memory-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    runs = {}
    for runtime in ("onnxruntime", "mnn"):
        print(f"{runtime} alone on the unet ...", file=sys.stderr, flush=True)
        runs[f"{runtime} unet alone"] = measure(
            [*me, args.onnx_dir, args.mnn_dir, "--threads", str(args.threads), "--baseline-child", runtime],
            scratch / f"{runtime}.out")
    print("sd2mnn verify ...", file=sys.stderr, flush=True)
    verify_out = scratch / "verify.json"
    runs["sd2mnn verify"] = measure(
        [sys.executable, "-m", "sd2mnn.cli", "verify", args.onnx_dir, args.mnn_dir, "--json", "--threads", str(args.threads)],
        verify_out)

    failed = [name for name, run in runs.items() if run["returncode"] not in (0, 1)]  # verify exits 1 on a failed check
    if failed:
        print(f"error: {', '.join(failed)} did not finish; see {scratch}", file=sys.stderr)
        return 2
    report = json.loads(verify_out.read_text())
    baseline = max(runs["onnxruntime unet alone"]["maxrss_bytes"], runs["mnn unet alone"]["maxrss_bytes"])
    verify_peak = max(runs["sd2mnn verify"]["tree_peak_bytes"], runs["sd2mnn verify"]["maxrss_bytes"])
    ratio = verify_peak / baseline
    result = {
        "onnx_dir": args.onnx_dir, "mnn_dir": args.mnn_dir, "threads": args.threads,
        "runs": runs,
        "verify_components": {
            c["name"]: {r["runtime"]: {"wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"], "isolated": r["isolated"]}
                        for r in c["runs"]} for c in report["components"]},
        "verify_passed": report["passed"],
        "largest_single_runtime_peak_bytes": baseline,
        "verify_peak_bytes": verify_peak,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
    }

    gib = 2 ** 30
    print(f"{'run':<24} {'wall':>8} {'peak (tree)':>12} {'maxrss':>10}")
    for name, run in runs.items():
        print(f"{name:<24} {run['wall_s']:>7.1f}s {run['tree_peak_bytes'] / gib:>9.2f} GiB {run['maxrss_bytes'] / gib:>6.2f} GiB")
    print("\nverify per component (child peaks):")
    for name, passes in result["verify_components"].items():
        cells = ", ".join(f"{rt} {p['wall_s']:.1f}s {(p['peak_rss_bytes'] or 0) / gib:.2f} GiB" for rt, p in passes.items())
        print(f"  {name:<13} {cells}")
    print(f"\nverify peak {verify_peak / gib:.2f} GiB = {ratio:.2f}x the largest single runtime "
          f"({baseline / gib:.2f} GiB); target <= {TARGET_RATIO}x: {'met' if result['meets_target'] else 'MISSED'}"
          f"; verification {'passed' if report['passed'] else 'failed'}")
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
