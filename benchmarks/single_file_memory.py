"""A single-file SD3.5 checkpoint (Stability's layout, float16) turned into the diffusers folder
that export reads: sd2mnn's model-at-a-time reading against diffusers' whole-pipeline
``StableDiffusion3Pipeline.from_single_file`` + ``save_pretrained``, run in the same script, each
in a child process (its process tree's summed RSS sampled; wait4's ru_maxrss). Prints one JSON object.

    python benchmarks/single_file_memory.py WORK_DIR [--source DIR] [--transformer-layers 6]
                                            [--min-free-gib 1.0]

The checkpoint holds SD3.5 Medium's CLIP-L, CLIP-G and 16-channel VAE at full size (random
weights, benchmarks/_sd35_model.py) and its MMDiT at full width with --transformer-layers of its
24 layers (all 24 make a 5 GB float16 file and a 10 GB float32 folder per run, more than this
machine's disk spares twice); no T5. --source: a full-size folder from _sd35_model.py whose
CLIPs and VAE are reused (built into WORK_DIR/source when absent). Both outputs are compared
tensor by tensor (by digest, one on disk at a time). Results: WORK_DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import _sd35_model  # noqa: E402
from sd35_full_size import guarded_run  # noqa: E402

GiB = 2**30
FILE_MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2")

SD2MNN_READ = """
import sys
from pathlib import Path
from sd2mnn.exporting import checkpoint
ckpt, config, work = map(Path, sys.argv[1:4])
work.mkdir()
checkpoint.materialize(ckpt, config, work, None, lambda component, message: print(component, message, flush=True))
"""

DIFFUSERS_READ = """
import sys
import torch
from diffusers import StableDiffusion3Pipeline
ckpt, config, out = sys.argv[1:4]
pipe = StableDiffusion3Pipeline.from_single_file(ckpt, config=config, local_files_only=True, torch_dtype=torch.float32,
                                                 text_encoder_3=None, tokenizer_3=None)
pipe.save_pretrained(out, safe_serialization=True)
"""


def build_pipeline(work: Path, source: Path, layers: int) -> Path:
    """WORK/pipeline: the source's CLIPs, VAE, tokenizers and scheduler (linked) and a transformer
    of ``layers`` layers at full width (built here, seeded)."""
    pipeline = work / "pipeline"
    if (pipeline / "transformer" / "config.json").is_file():
        return pipeline
    _sd35_model.build_pipeline(source, parts=("text_encoder", "text_encoder_2", "vae"),
                               say=lambda m: print(m, file=sys.stderr, flush=True))
    shutil.rmtree(pipeline, ignore_errors=True)
    pipeline.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "transformer":
            (pipeline / entry.name).symlink_to(entry.resolve())
    if layers == _sd35_model.TRANSFORMER["num_layers"]:
        _sd35_model.build_pipeline(source, parts=("transformer",), say=lambda m: print(m, file=sys.stderr, flush=True))
        (pipeline / "transformer").symlink_to((source / "transformer").resolve())
        return pipeline
    _sd35_model.TRANSFORMER.update(num_layers=layers, dual_attention_layers=tuple(range(min(13, layers))))
    _sd35_model.build_part(pipeline, "transformer")
    return pipeline


def tensor_digests(folder: Path) -> dict[str, str]:
    """Per model folder: a digest of its tensors' names, dtypes, shapes and bytes (one model in
    memory at a time), so two outputs compare without both on disk at once."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    digests = {}
    for model in FILE_MODELS:
        state = {k: v for f in sorted((folder / model).glob("*.safetensors")) for k, v in load_file(f).items()}
        digest = hashlib.sha256()
        for key in sorted(state):
            tensor = state[key].contiguous()
            digest.update(f"{key}{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        digests[model] = digest.hexdigest()
        del state
    return digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--transformer-layers", type=int, default=6)
    parser.add_argument("--min-free-gib", type=float, default=1.0)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = (args.source or work / "source").resolve()

    from builders import make_config_folder, save_sd3_single_file
    import torch

    pipeline = build_pipeline(work, source, args.transformer_layers)
    ckpt = work / "sd3.5_medium_incl_clips.safetensors"
    if not ckpt.is_file():
        save_sd3_single_file(pipeline, ckpt, models=FILE_MODELS, dtype=torch.float16)
    config = work / "config"
    shutil.rmtree(config, ignore_errors=True)
    make_config_folder(pipeline, config)

    from sd2mnn.exporting import checkpoint
    from sd2mnn.families import SD35

    with checkpoint.Checkpoint(ckpt) as opened:
        estimates = checkpoint.reading_bytes(opened, SD35, list(FILE_MODELS))
    results = {"checkpoint_bytes": ckpt.stat().st_size, "transformer_layers": args.transformer_layers,
               "sd2mnn_estimate_gib": {m: round(v / GiB, 2) for m, v in estimates.items()}}
    runs = {"sd2mnn": (SD2MNN_READ, work / "sd2mnn-read"), "diffusers": (DIFFUSERS_READ, work / "diffusers-read")}
    digests = {}
    for name, (script, out) in runs.items():
        shutil.rmtree(out, ignore_errors=True)
        started = time.strftime("%H:%M:%S")
        print(f"{started} {name}: reading {ckpt.name}", file=sys.stderr, flush=True)
        results[name] = guarded_run([sys.executable, "-c", script, str(ckpt), str(config), str(out)],
                                    work / f"{name}.log", int(args.min_free_gib * GiB), timeout=3600)
        folder = out / "_diffusers" if name == "sd2mnn" else out
        if results[name]["returncode"] == 0:
            results[name]["folder_bytes"] = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
            digests[name] = tensor_digests(folder)
        shutil.rmtree(out, ignore_errors=True)  # the disk holds one output at a time
    if len(digests) == len(runs):
        results["same_tensors"] = {m: digests["sd2mnn"][m] == digests["diffusers"][m] for m in FILE_MODELS}
        results["peak_ratio_sd2mnn_over_diffusers"] = round(
            results["sd2mnn"]["tree_peak_gib"] / results["diffusers"]["tree_peak_gib"], 3)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
