"""Wan2.1-T2V-1.3B's architecture at full size with seeded random weights, as a diffusers
WanPipeline folder (safetensors), built one model at a time; nothing is downloaded.

    python benchmarks/_wan_model.py OUT_DIR [--t5-layers 2] [--parts text_encoder,vae,transformer]

The transformer (1.42B parameters, 5.7 GB in fp32) and the VAE are Wan2.1-T2V-1.3B-Diffusers'
configs written out. Its text encoder, UMT5-XXL's encoder (24 layers, d_model 4096, d_ff 10240,
64 heads, vocabulary 256384: 5.7B parameters, 22.7 GB in fp32), does not fit this machine: it is
built at its full width and vocabulary with only --t5-layers blocks. The tokenizer is
tests/t5_tokenizer.py's umT5-like one (byte fallback, 2356 ids, all inside UMT5-XXL's vocabulary).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer/config.json and vae/config.json, written out.
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                   rope_max_seq_len=1024)
VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
           temperal_downsample=[False, True, True], dropout=0.0)
# google/umt5-xxl's encoder; built with num_layers cut (build_part).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                layer_norm_epsilon=1e-6, tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
PARTS = ("text_encoder", "vae", "transformer")
INDEX = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
         "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
         "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
         "transformer_2": [None, None], "boundary_ratio": None, "expand_timesteps": False}


def _build(name: str, t5_layers: int):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if name == "transformer":
        return WanTransformer3DModel(**TRANSFORMER)
    if name == "vae":
        return AutoencoderKLWan(**VAE)
    return UMT5EncoderModel(UMT5Config(**{**UMT5_XXL, "num_layers": t5_layers}))


def build_part(out: Path, name: str, t5_layers: int, seed: int = 0) -> None:
    """One model with seeded weights, saved as out/name (_sd35_model.save_seeded)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _sd35_model import save_seeded

    save_seeded(lambda: _build(name, t5_layers), out, name, seed + PARTS.index(name))


def build_pipeline(out: Path, t5_layers: int, parts=PARTS, seed: int = 0, say=print) -> Path:
    """Write what is missing of the pipeline folder ``out``; returns it."""
    from diffusers import UniPCMultistepScheduler

    sys.path.insert(0, str(ROOT / "tests"))
    from builders import WAN_SCHEDULER_CONFIG
    from t5_tokenizer import write_umt5_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer").is_dir():
        write_umt5_tokenizer(out / ".tokenizer").rename(out / "tokenizer")
    if not (out / "scheduler").is_dir():
        UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG).save_pretrained(str(out / "scheduler"))
    for name in parts:
        if not (out / name / "config.json").is_file():
            started = time.monotonic()
            build_part(out, name, t5_layers, seed)
            say(f"built {name} in {time.monotonic() - started:.0f} s")
    (out / "model_index.json").write_text(json.dumps(INDEX, indent=2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--t5-layers", type=int, default=2, help="UMT5-XXL blocks kept (of 24; default 2)")
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args()
    build_pipeline(args.out, args.t5_layers, tuple(p for p in args.parts.split(",") if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
