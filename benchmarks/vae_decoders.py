"""The VAE decoder a bundle ships: the pipeline's AutoencoderKL against the tiny AutoencoderTiny
(TAESD's architecture, `sd2mnn export --vae`), on MNN and on ONNX Runtime, at full size.

    python benchmarks/vae_decoders.py WORK_DIR [--families sd15,sd35] [--runs 3]

For each family: a diffusers folder holding only what exporting its vae_decoder reads (every
model's config, the tokenizers, the VAE's weights; seeded random weights: SD1.5's VAE at 512x512,
SD3.5 Medium's 16-channel VAE at the 1024x1024 MNN's SD3.5 runtime draws), and TAESD's default
architecture with the family's latent channels (SD3's: scaling factor 1.5305, shift 0.0609, as
taesd3 ships). Each decoder is exported (`sd2mnn export --components vae_decoder [--vae taesd]`),
converted at fp32 and benched (`sd2mnn bench --onnx --components vae_decoder`): load, first and
steady run, and the child's peak RSS for the model, per runtime, each in its own process. Steps
are kept in WORK_DIR/results.json and skipped when rerun; the summary is printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

SD2MNN = [sys.executable, "-m", "sd2mnn.cli"]
# TAESD's published architecture (madebyollin/taesd), diffusers' AutoencoderTiny defaults.
TAESD = dict(encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
             num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1))
TAESD3 = dict(TAESD, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)


def _write_config(folder: Path, class_name: str, values: dict) -> None:
    """A diffusers model's config.json, for a model whose weights export never reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **values}, indent=2, default=list))


def _seeded(build, out: Path, seed: int) -> Path:
    from _sd35_model import save_seeded

    return save_seeded(build, out.parent, out.name, seed)


def sd15_folder(work: Path) -> Path:
    """SD1.5's pipeline folder: the full-size VAE's weights, the other models' configs only."""
    from diffusers import AutoencoderKL, PNDMScheduler
    from full_size import CLIP, UNET, VAE
    from transformers import CLIPTextConfig

    from builders import SCHEDULER_CONFIG, write_clip_tokenizer

    out = work / "sd15"
    if (out / "model_index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(out / "tokenizer")
    _write_config(out / "unet", "UNet2DConditionModel", UNET)
    CLIPTextConfig(**CLIP, architectures=["CLIPTextModel"]).save_pretrained(str(out / "text_encoder"))
    PNDMScheduler(**SCHEDULER_CONFIG).save_pretrained(str(out / "scheduler"))
    _seeded(lambda: AutoencoderKL(**VAE), out / "vae", 0)
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=2))
    return out


def sd35_folder(work: Path) -> Path:
    """SD3.5 Medium's pipeline folder: the full-size VAE's weights, the other models' configs only."""
    from _sd35_model import CLIP_L, CLIP_G, TRANSFORMER, build_pipeline
    from transformers import CLIPTextConfig

    out = work / "sd35"
    if (out / "model_index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out / "transformer", "SD3Transformer2DModel", TRANSFORMER)
    for name, config in (("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G)):
        CLIPTextConfig(**config, architectures=["CLIPTextModelWithProjection"]).save_pretrained(str(out / name))
    return build_pipeline(out, parts=("vae",), say=lambda m: print(m, file=sys.stderr, flush=True))


def taesd_folder(work: Path, family: str) -> Path:
    from diffusers import AutoencoderTiny

    config = TAESD3 if family == "sd35" else TAESD
    out = work / f"taesd-{family}"
    if not (out / "config.json").is_file():
        _seeded(lambda: AutoencoderTiny(**config), out, 7)
    return out


class Steps:
    """Each step a command, measured (benchmarks/_measure.py), recorded in results.json."""

    def __init__(self, work: Path):
        self.work, self.path = work, work / "results.json"
        self.results = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, argv: list[str], parse_json: bool = False) -> dict:
        from _measure import measure

        if name in self.results and self.results[name]["returncode"] == 0:
            print(f"{name}: kept", file=sys.stderr)
            return self.results[name]
        print(f"{name}: {' '.join(argv[2:])}", file=sys.stderr, flush=True)
        out = self.work / "logs" / f"{name}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        record = measure(argv, stdout_path=out, cwd=ROOT)
        if parse_json and record["returncode"] == 0:
            record["report"] = json.loads(out.read_text())
        self.results[name] = record
        self.path.write_text(json.dumps(self.results, indent=2))
        print(f"{name}: rc {record['returncode']}, {record['wall_s']} s", file=sys.stderr, flush=True)
        return record


def decoder(steps: Steps, family: str, source: Path, vae: str, taesd: Path, runs: int) -> dict:
    onnx, bundle = steps.work / f"onnx-{family}-{vae}", steps.work / f"mnn-{family}-{vae}"
    extra = ["--vae", str(taesd)] if vae == "taesd" else []
    steps.run(f"export_{family}_{vae}", [*SD2MNN, "export", str(source), str(onnx), "--components", "vae_decoder",
                                         "--overwrite", *extra])
    steps.run(f"convert_{family}_{vae}", [*SD2MNN, "convert", str(onnx), str(bundle), "--components", "vae_decoder",
                                          "--quiet"])
    bench = steps.run(f"bench_{family}_{vae}", [*SD2MNN, "bench", str(bundle), "--onnx", str(onnx), "--components",
                                                "vae_decoder", "--runs", str(runs), "--json", "--quiet"],
                      parse_json=True)
    return bench.get("report", {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--families", default="sd15,sd35")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work)
    import psutil

    summary = {"conditions": {"machine": f"{psutil.cpu_count()} cores, "
                              f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU",
                              "threads": 2, "runs": args.runs, "weights": "seeded random"}, "families": {}}
    for family in args.families.split(","):
        source = sd15_folder(work) if family == "sd15" else sd35_folder(work)
        taesd = taesd_folder(work, family)
        summary["families"][family] = {vae: decoder(steps, family, source, vae, taesd, args.runs)
                                       for vae in ("kl", "taesd")}
    summary["steps"] = steps.results
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
