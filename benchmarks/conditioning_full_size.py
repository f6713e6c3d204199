"""Conditioning on a full-size SD1.5 text encoder: MNN's own flow against sd2mnn's default.

    python benchmarks/conditioning_full_size.py WORK_DIR [--prompts FILE]

Uses the full-size SD1.5-architecture pipeline of benchmarks/full_size.py (random weights) with
SD1.5's real CLIP tokenizer (tests/clip_tokenizer.py), converts its text encoder twice in this
script, with ``--tokenizer-scheme mnn`` (MNN's flow, the baseline) and with the default
``--tokenizer-scheme diffusers``, and verifies each: conversion fidelity (MNN against ONNX Runtime on the
same ids) and conditioning (share of prompts and token positions whose ids equal diffusers', and
the text embeddings through both chains). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--prompts", type=Path, help="one prompt per line (default: sd2mnn's built-in 660)")
    args = parser.parse_args()

    import sd2mnn
    from clip_tokenizer import write_sd15_tokenizer
    from full_size import make_diffusers_pipeline
    from sd2mnn.exporting.export import ExportOptions, export
    from sd2mnn.verification.verify import verify
    from sd2mnn.verification.conditioning import read_prompts

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    diffusers_dir = work / "diffusers"
    if not (diffusers_dir / "model_index.json").exists():
        make_diffusers_pipeline(diffusers_dir)
    # Its text encoder alone, with SD1.5's real tokenizer (the full-size pipeline has a tiny one).
    pipeline = work / "onnx-text-encoder-sd15-tokenizer"
    if not (pipeline / "text_encoder" / "model.onnx").exists():
        export(diffusers_dir, pipeline, ExportOptions(components=("text_encoder",)))
        shutil.rmtree(pipeline / "tokenizer")
        write_sd15_tokenizer(pipeline / "tokenizer")
    prompts = read_prompts(args.prompts) if args.prompts else None

    results = {}
    for scheme in ("mnn", "diffusers"):  # the baseline first
        bundle = work / f"bundle-tokenizer-{scheme}"
        shutil.rmtree(bundle, ignore_errors=True)
        started = time.monotonic()
        report = sd2mnn.convert(pipeline, bundle, components=["text_encoder"], tokenizer_scheme=scheme, jobs=1)
        convert_s = time.monotonic() - started
        record = report.components[0].record
        started = time.monotonic()
        checked = verify(pipeline, bundle, components=["text_encoder"], threads=2, prompts=prompts)
        results[scheme] = {
            "convert_s": round(convert_s, 1),
            "converter_peak_rss_gib": round(record.peak_rss_bytes / 2**30, 2),
            "text_encoder_bytes": sum(f.size for f in record.outputs),
            "verify_s": round(time.monotonic() - started, 1),
            "fidelity": {o.name: {"max_abs": o.max_abs, "cosine": o.cosine, "psnr": o.psnr}
                         for o in checked.components[0].outputs},
            "conditioning": checked.conditioning.to_dict(),
        }
    base, new = results["mnn"], results["diffusers"]
    results["diffusers_vs_mnn"] = {
        "convert_wall": round(new["convert_s"] / base["convert_s"], 3),
        "text_encoder_size": round(new["text_encoder_bytes"] / base["text_encoder_bytes"], 4),
    }
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
