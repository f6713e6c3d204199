"""Regenerate the tiny demo ONNX pipeline shipped in src/sd2mnn/data/demo_pipeline/.

    python scripts/make_demo_pipeline.py [--out DIR] [--seed 0]

Builds a tiny diffusers StableDiffusionPipeline (tests/builders.py: real SD1.5 architectures at a few
channels, seeded random weights, a tiny CLIP BPE tokenizer with MNN's BOS/EOS ids), exports it
with sd2mnn.exporting.export (each part checked against PyTorch), and prints sizes and errors. Same seed,
same bytes: the script is deterministic and replaces the folder atomically. Needs the export extra.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sd2mnn.exporting.export import ExportOptions, export

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tiny-pipeline builders live with the tests
from builders import make_tiny_pipeline  # noqa: E402
DEFAULT_OUT = REPO / "src" / "sd2mnn" / "data" / "demo_pipeline"
MAX_BYTES = 6_000_000


def _timed_run(model: Path, feeds: dict) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)  # warm-up
    start = time.perf_counter()
    sess.run(None, feeds)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1].strip())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sd2mnn-demo-") as tmp:
        pipeline = make_tiny_pipeline(Path(tmp) / "pipeline", seed=args.seed, kind="sd15")
        report = export(pipeline, args.out, ExportOptions(overwrite=True, seed=args.seed),
                        progress=lambda c, m: print(f"  {c}: {m}", flush=True))

    total = 0
    print(f"\n{args.out}")
    for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"  {path.relative_to(args.out)!s:32} {size:>9} B  sha256 {digest}")
    print(f"  total {total} B ({total / 1e6:.2f} MB)")
    for comp in report.components:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in comp.max_abs_error.items())
        print(f"  {comp.name:12} max abs error vs PyTorch: {errs}")

    rng = np.random.default_rng(args.seed)
    latent = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)
    seconds = _timed_run(args.out / "vae_decoder" / "model.onnx", {"latent_sample": latent})
    print(f"  vae_decoder on 1 thread (ONNX Runtime): {seconds * 1000:.0f} ms")
    feeds = {
        "sample": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
        "timestep": np.array([981], dtype=np.int32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 16)).astype(np.float32),
    }
    seconds = _timed_run(args.out / "unet" / "model.onnx", feeds)
    print(f"  unet step on 1 thread (ONNX Runtime): {seconds * 1000:.0f} ms")
    if total > MAX_BYTES:
        print(f"error: {args.out} is {total} B, over the {MAX_BYTES} B budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
