"""SD3.5 Medium's architecture at full size with seeded random weights, as a diffusers
StableDiffusion3Pipeline folder (safetensors), built one model at a time; nothing is downloaded.

    python benchmarks/_sd35_model.py OUT_DIR [--parts text_encoder,text_encoder_2,vae,transformer]

T5-XXL (4.7B parameters, ~19 GB in fp32) is left out, as MNN's runtime allows (it conditions on
zeros without it): text_encoder_3 is null in model_index.json; tokenizer_3 (a small T5 tokenizer)
is still written, since the runtime loads it. Tokenizers: SD1.5's real CLIP BPE for both CLIPs
(tokenizer_2 pads with "!", as SD3's does), tests/t5_tokenizer.py's Unigram for tokenizer_3.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# stabilityai/stable-diffusion-3.5-medium's configs, written out.
TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
CLIP_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# text_encoder_3's config (T5 v1.1 XXL's encoder). Built only depth-truncated (build_t5): all 24
# layers are 4.7B parameters, which do not fit this machine to export.
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, initializer_factor=1.0, dropout_rate=0.0,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
    use_cache=False,
)
PARTS = ("text_encoder", "text_encoder_2", "vae", "transformer")
INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": [None, None],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def _build(name: str):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if name == "transformer":
        return SD3Transformer2DModel(**TRANSFORMER)
    if name == "vae":
        return AutoencoderKL(**VAE)
    return CLIPTextModelWithProjection(CLIPTextConfig(**(CLIP_L if name == "text_encoder" else CLIP_G)))


def save_seeded(build, out: Path, name: str, seed: int) -> Path:
    """``build()`` under torch seed ``seed``, its constant parameters jittered, saved as out/name
    (written beside, then renamed)."""
    import torch

    torch.manual_seed(seed)
    model = build().eval()
    # Parameters left at a constant by their initializer (norm scales, zero biases) get a little
    # noise, so none is trivially quantized.
    gen = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool(p.min() == p.max()):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    tmp = out / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    # 2 GB shards: safetensors copies a shard's bytes while writing it, so peak memory stays the
    # model plus one shard.
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="2GB")
    del model
    tmp.rename(out / name)
    return out / name


def build_part(out: Path, name: str, seed: int = 0) -> None:
    """Build one model with seeded weights and save it as out/name."""
    save_seeded(lambda: _build(name), out, name, seed + PARTS.index(name))


def build_t5(out: Path, layers: int, seed: int = 0) -> Path:
    """T5-XXL's encoder (T5_XXL) cut to its first ``layers`` blocks, with T5's own seeded init
    (norm scales then jittered as build_part does), saved as out/text_encoder_3."""
    from transformers import T5Config, T5EncoderModel

    return save_seeded(lambda: T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": layers})), out, "text_encoder_3",
                       seed + len(PARTS))


def build_pipeline(out: Path, parts=PARTS, seed: int = 0, say=print) -> Path:
    """Write what is missing of the pipeline folder ``out``; returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sys.path.insert(0, str(ROOT / "tests"))
    from builders import write_sd3_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    if not all((out / t).is_dir() for t in ("tokenizer", "tokenizer_2", "tokenizer_3")):
        tmp = out / ".tokenizers"
        shutil.rmtree(tmp, ignore_errors=True)
        write_sd3_tokenizers(tmp)
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            shutil.rmtree(out / name, ignore_errors=True)
            (tmp / name).rename(out / name)
        shutil.rmtree(tmp)
    if not (out / "scheduler").is_dir():
        FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(str(out / "scheduler"))
    for name in parts:
        if not (out / name / "config.json").is_file():
            started = time.monotonic()
            build_part(out, name, seed)
            say(f"built {name} in {time.monotonic() - started:.0f} s")
    import diffusers

    (out / "model_index.json").write_text(json.dumps({**INDEX, "_diffusers_version": diffusers.__version__}, indent=2))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args()
    build_pipeline(args.out.resolve(), tuple(p for p in args.parts.split(",") if p),
                   say=lambda m: print(m, file=sys.stderr, flush=True))
