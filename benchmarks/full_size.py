"""A full-size SD1.5-architecture pipeline with random weights, for the benchmarks.

    python benchmarks/full_size.py WORK_DIR      # -> WORK_DIR/diffusers, WORK_DIR/onnx

Builds diffusers' UNet2DConditionModel, AutoencoderKL and transformers' CLIPTextModel with
SD1.5's configs (860M + 84M + 123M parameters) and seeded random weights, saves them as a
diffusers folder, and exports it with `sd2mnn export` (which checks each part against PyTorch).
Nothing is downloaded. Takes a few minutes and ~6-8 GB of memory; reuses what exists.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

# SD1.5's published configs (runwayml/stable-diffusion-v1-5), written out: nothing is fetched.
UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


def make_diffusers_pipeline(out: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from builders import SCHEDULER_CONFIG, write_clip_tokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_clip_tokenizer(tmp / "tokenizer_src")
    torch.manual_seed(seed)
    parts = dict(
        unet=UNet2DConditionModel(**UNET).eval(),
        vae=AutoencoderKL(**VAE).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(tmp / "tokenizer_src")),
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
    )
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer")
    shutil.move(tmp / "tokenizer_src", tmp / "tokenizer")  # the hub layout, as SD1.5 ships it
    tmp.rename(out)
    return out


def ensure_full_size(work: Path) -> tuple[Path, Path]:
    """(diffusers folder, ONNX folder) under ``work``, built once."""
    from sd2mnn.exporting.export import ExportOptions, export

    work.mkdir(parents=True, exist_ok=True)
    diffusers_dir, onnx_dir = work / "diffusers", work / "onnx"
    if not (diffusers_dir / "model_index.json").exists():
        started = time.monotonic()
        make_diffusers_pipeline(diffusers_dir)
        print(f"built {diffusers_dir} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    if not (onnx_dir / "unet" / "model.onnx").exists():
        started = time.monotonic()
        export(diffusers_dir, onnx_dir, ExportOptions(), progress=lambda c, m: print(f"  {c}: {m}", file=sys.stderr))
        print(f"exported {onnx_dir} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return diffusers_dir, onnx_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    print(ensure_full_size(parser.parse_args().work.resolve()))
