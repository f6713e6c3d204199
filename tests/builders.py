"""Tiny Stable Diffusion pipelines for the tests and the demo bundle (scripts/make_demo_pipeline.py).

The models have the real architectures (UNet2DConditionModel with cross-attention blocks,
AutoencoderKL with four blocks so a [1,4,64,64] latent decodes to [1,3,512,512], CLIPTextModel or,
for Taiyi, BertModel) at a few channels each, with seeded random weights. Nothing is fetched:
the tokenizers are built here from a handful of English (or Chinese) words.

Pipelines off MNN's runtime contract come from the same builders: ``make_tiny_pipeline`` takes
config overrides (a unet with other latents, a 2x VAE, a text encoder with a small vocabulary) and
``write_small_clip_tokenizer`` writes a CLIP tokenizer of a few dozen ids.

Needs the export extra (torch, diffusers, transformers); import it only where they are installed.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from sd2mnn.tokenization.reader import BYTE_TO_CHAR

# The ids MNN's runtime hard-codes (stable_diffusion.cpp): CLIP BOS/EOS and BERT CLS/SEP.
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_VOCAB_SIZE = 49408
BERT_CLS_ID = 101
BERT_SEP_ID = 102

# Words the tiny CLIP BPE learns its merges from, so common prompts tokenize to whole words.
CLIP_CORPUS = (
    "a photo of a cat . a photo of a dog . an astronaut riding a horse on the moon . "
    "a painting of a castle in the style of van gogh . a red apple on a wooden table . "
    "a cute corgi wearing a hat . a beautiful landscape with mountains and a lake at sunset . "
    "portrait of an old man , oil painting , high quality , detailed . city street at night"
)
# Characters and words for the tiny Taiyi (Chinese BERT) vocabulary.
BERT_CHARS = "一只猫的照片狗在月亮上骑马宇航员中国山水画风格红色苹果桌子美丽湖日落城市夜晚街道高清"
BERT_WORDS = ("a", "photo", "of", "cat", "dog", "the", "##s", "##ing", "moon", "horse")

CLIP_TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=16,
    hidden_act="quick_gelu",
    bos_token_id=CLIP_BOS_ID,
    eos_token_id=CLIP_EOS_ID,
    pad_token_id=1,
)
BERT_TEXT_CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=512,
    type_vocab_size=2,
    pad_token_id=0,
)
# Two levels: no attention at 64x64 (SD1.5 has it there, but 4096 tokens of self-attention
# would make a "tiny" step slow), cross-attention at 32x32 and in the mid block.
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=8,
)
# Four blocks, like SD1.5's VAE: 8x down/upsampling, so 64x64 latents <-> 512x512 images.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=512,
)
# SD1.5's scheduler config (PNDM, scaled_linear betas 0.00085..0.012, steps_offset 1).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)

KINDS = ("sd15", "taiyi")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def learn_bpe_merges(corpus: str, max_merges: int = 1000) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (last symbol of a word carries "</w>") from ``corpus``.

    Deterministic: the most frequent pair wins, ties go to the smallest pair. Stops when every
    word is one symbol or after ``max_merges``.
    """
    words = Counter(
        "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8")) for word in corpus.lower().split()
    )
    symbols = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            syms = symbols[word]
            for pair in zip(syms, syms[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, syms in symbols.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            symbols[word] = tuple(out)
    return merges


def write_clip_tokenizer(out_dir: str | Path, corpus: str = CLIP_CORPUS) -> Path:
    """Write a tiny byte-level CLIP BPE tokenizer in SD1.5's diffusers layout.

    Files: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json (no
    tokenizer.json, like the SD1.5 repository). Ids: the 256 byte characters, their "</w>"
    variants, the learned merges, placeholders "<uN>" for the unused ids (MNN's loader needs
    dense ids), then <|startoftext|>=49406 and <|endoftext|>=49407 as MNN's runtime expects.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Printable bytes first, as CLIP's vocab lists them: the characters in code point order.
    byte_chars = sorted(BYTE_TO_CHAR)
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges = learn_bpe_merges(corpus)
    vocab: dict[str, int] = {}
    for token in tokens + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    # MNN's tokenizer loader stores token i in slot i of a len(vocab) array: ids must be dense.
    # Fill the ids up to BOS with placeholders no merge can produce.
    for i in range(len(vocab), CLIP_BOS_ID):
        vocab[f"<u{i}>"] = i
    vocab["<|startoftext|>"] = CLIP_BOS_ID
    vocab["<|endoftext|>"] = CLIP_EOS_ID
    assert sorted(vocab.values()) == list(range(CLIP_VOCAB_SIZE))
    text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))  # compact: 49408 entries
    (out / "vocab.json").write_text(text + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def special(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    specials = {
        "bos_token": special("<|startoftext|>"),
        "eos_token": special("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
        "unk_token": special("<|endoftext|>"),
    }
    _write_json(out / "special_tokens_map.json", specials)
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **specials["bos_token"]},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **specials["eos_token"]},
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **specials["unk_token"]},
    }
    _write_json(out / "tokenizer_config.json", config)
    return out


def write_small_clip_tokenizer(out_dir: str | Path, size: int = 64) -> Path:
    """A CLIP tokenizer of ``size`` ids: the letters a-z alone and with "</w>", a space's byte
    character, no merges, placeholders, then <|startoftext|> and <|endoftext|> as the last two ids
    (not MNN's 49406/49407)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + "</w>" for c in letters] + [BYTE_TO_CHAR[ord(" ")]]  # a space's byte character too
    if size < len(tokens) + 2:
        raise ValueError(f"a small CLIP tokenizer needs at least {len(tokens) + 2} ids")
    tokens += [f"<u{i}>" for i in range(len(tokens), size - 2)] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(out / "tokenizer_config.json", {**specials, "do_lower_case": True, "model_max_length": 77,
                                                 "tokenizer_class": "CLIPTokenizer"})
    return out


def write_bert_tokenizer(out_dir: str | Path) -> Path:
    """Write a tiny Chinese BERT WordPiece tokenizer in Taiyi's layout ([CLS]=101, [SEP]=102)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
    vocab += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab.index("[CLS]") == BERT_CLS_ID and vocab.index("[SEP]") == BERT_SEP_ID
    vocab += [chr(c) for c in range(ord("!"), ord("~") + 1) if not chr(c).isupper()]
    vocab += [c for c in dict.fromkeys(BERT_CHARS)] + list(BERT_WORDS)
    vocab = list(dict.fromkeys(vocab))  # one id per token ("a" is a character and a word): dense ids
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    specials = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                "sep_token": "[SEP]", "unk_token": "[UNK]"}
    _write_json(out / "special_tokens_map.json", specials)
    config = {**specials, "do_lower_case": True, "model_max_length": 512,
              "tokenize_chinese_chars": True, "strip_accents": None,
              "tokenizer_class": "BertTokenizer"}
    _write_json(out / "tokenizer_config.json", config)
    return out


def write_bert_tokenizer_json(out_dir: str | Path) -> Path:
    """The tiny Taiyi tokenizer as current transformers saves a fast BERT tokenizer: tokenizer.json
    and its configs, no vocab.txt."""
    import tempfile

    from transformers import BertTokenizerFast

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = BertTokenizerFast.from_pretrained(str(write_bert_tokenizer(Path(tmp) / "slow")))
        tokenizer.save_pretrained(str(out), legacy_format=False)
    (out / "vocab.txt").unlink(missing_ok=True)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def build_tiny_components(seed: int = 0, kind: str = "sd15", tokenizer_dir: str | Path = None, *,
                          unet: dict | None = None, vae: dict | None = None, text: dict | None = None):
    """The tiny pipeline's components as a dict (unet, vae, text_encoder, tokenizer, scheduler).

    ``tokenizer_dir`` must hold the files written by write_clip_tokenizer (sd15) or
    write_bert_tokenizer (taiyi). ``unet``, ``vae``, ``text``: entries replacing those of
    UNET_CONFIG, VAE_CONFIG and the text encoder's config.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    if kind == "sd15":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        text_config = CLIPTextConfig(**{**CLIP_TEXT_CONFIG, **(text or {})})
        text_cls = CLIPTextModel
    else:
        from transformers import BertConfig, BertModel, BertTokenizer

        tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir))
        text_config = BertConfig(**{"vocab_size": len(tokenizer.get_vocab()), **BERT_TEXT_CONFIG, **(text or {})})
        text_cls = BertModel

    # One generator per component, so changing one config leaves the others' weights alone.
    torch.manual_seed(seed)
    text_encoder = text_cls(text_config).eval()
    torch.manual_seed(seed + 1)
    unet_model = UNet2DConditionModel(**{**UNET_CONFIG, **(unet or {})}).eval()
    torch.manual_seed(seed + 2)
    vae_model = AutoencoderKL(**{**VAE_CONFIG, **(vae or {})}).eval()
    # Random init leaves some parameters at exact constants (norm weights 1, some biases 0);
    # jitter everything so every weight matters in the PyTorch-vs-ONNX/MNN checks.
    with torch.no_grad():
        for i, model in enumerate((text_encoder, unet_model, vae_model)):
            gen = torch.Generator().manual_seed(seed + 10 + i)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    return {"unet": unet_model, "vae": vae_model, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def make_tiny_pipeline(out_dir: str | Path, seed: int = 0, kind: str = "sd15", *, unet: dict | None = None,
                       vae: dict | None = None, text: dict | None = None, write_tokenizer=None) -> Path:
    """Save a tiny diffusers StableDiffusionPipeline folder at ``out_dir`` and return it.

    Layout as on the hub: model_index.json, unet/, vae/, text_encoder/ (safetensors), tokenizer/
    (SD1.5's file set, or Taiyi's BERT vocab.txt), scheduler/. Deterministic for a given seed.
    ``unet``, ``vae``, ``text``: config overrides (build_tiny_components); ``write_tokenizer``:
    a function writing the tokenizer folder instead of the kind's own.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok_dir = out / "tokenizer"
    write = write_tokenizer or (write_bert_tokenizer if kind == "taiyi" else write_clip_tokenizer)
    write(tok_dir)
    parts = build_tiny_components(seed=seed, kind=kind, tokenizer_dir=tok_dir, unet=unet, vae=vae, text=text)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # save_pretrained rewrites the tokenizer in the library's current layout (tokenizer.json,
    # a long tokenizer_config.json): put back the hub layout written above.
    shutil.rmtree(tok_dir)
    write(tok_dir)
    return out


# ---------------------------------------------------------------------------------------------
# Single-file (original LDM / CompVis layout) checkpoints
# ---------------------------------------------------------------------------------------------
_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                  ("conv_shortcut", "skip_connection"))
_UNET_FIXED_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _resnet_to_ldm(rest: str) -> str:
    for new, old in _RESNET_TO_LDM:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _unet_key_to_ldm(key: str, config: dict) -> str:
    """A diffusers UNet2DConditionModel key as the original SD checkpoint names it."""
    import re

    per = config["layers_per_block"] + 1
    up_types = config["up_block_types"]
    for new, old in _UNET_FIXED_TO_LDM.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        side, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        index = per * i + j + (1 if side == "down" else 0)
        block = "input_blocks" if side == "down" else "output_blocks"
        if part == "resnets":
            return f"{block}.{index}.0.{_resnet_to_ldm(rest)}"
        return f"{block}.{index}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{per * (int(m.group(1)) + 1)}.0.op.{m.group(2)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)
    if m:
        i = int(m.group(1))
        slot = 2 if up_types[i].startswith("CrossAttn") else 1
        return f"output_blocks.{per * i + per - 1}.{slot}.{m.group(2)}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"middle_block.{2 * int(m.group(1))}.{_resnet_to_ldm(m.group(2))}"
    if key.startswith("mid_block.attentions.0."):
        return "middle_block.1." + key[len("mid_block.attentions.0."):]
    raise ValueError(f"no LDM name for UNet key {key}")


def _vae_key_to_ldm(key: str, config: dict) -> str:
    """A diffusers AutoencoderKL key as the original SD checkpoint names it."""
    import re

    last = len(config["block_out_channels"]) - 1
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key)
    if m:
        part = f"block.{m.group(3)}" if m.group(3) is not None else "downsample"
        return f"encoder.down.{m.group(1)}.{part}.{m.group(4)}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
    if m:
        part = f"block.{m.group(3)}" if m.group(3) is not None else "upsample"
        return f"decoder.up.{last - int(m.group(1))}.{part}.{m.group(4)}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key)
    if m:
        rest = m.group(2)
        for new, old in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."),
                         ("to_v.", "v."), ("to_out.0.", "proj_out.")):
            if rest.startswith(new):
                rest = old + rest[len(new):]
        return f"{m.group(1)}.mid.attn_1.{rest}"
    return key


def save_single_file(pipeline_dir: str | Path, out_file: str | Path) -> Path:
    """Write an SD1.5 diffusers folder as one original-layout (CompVis/LDM) checkpoint.

    The keys single-file SD1.5 checkpoints use (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer.*``), attention projections of the
    VAE as 1x1 convolutions. ``.safetensors`` or, for any other suffix, a torch ``.ckpt``
    (``{"state_dict": ...}``). CLIP text encoders only (Taiyi's BERT has no single-file layout).
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(pipeline_dir), Path(out_file)
    state: dict = {}
    unet_cfg = json.loads((src / "unet" / "config.json").read_text(encoding="utf-8"))
    for key, value in load_file(src / "unet" / "diffusion_pytorch_model.safetensors").items():
        state["model.diffusion_model." + _unet_key_to_ldm(key, unet_cfg)] = value
    vae_cfg = json.loads((src / "vae" / "config.json").read_text(encoding="utf-8"))
    for key, value in load_file(src / "vae" / "diffusion_pytorch_model.safetensors").items():
        ldm = _vae_key_to_ldm(key, vae_cfg)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        state["first_stage_model." + ldm] = value
    for key, value in load_file(src / "text_encoder" / "model.safetensors").items():
        # transformers 5 saves CLIPTextModel keys without the "text_model." of the module tree
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    state = {k: v.contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_file(state, str(out))
    else:
        torch.save({"state_dict": state}, str(out))
    return out


def make_config_folder(pipeline_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of a diffusers folder without weights: the local config a single file needs."""
    src, out = Path(pipeline_dir), Path(out_dir)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


# ---------------------------------------------------------------------------------------------
# SD3 (StableDiffusion3Pipeline): two CLIPs with projections, T5, an MMDiT transformer, a 16-channel VAE
# ---------------------------------------------------------------------------------------------
# Widths keep SD3.5 Medium's relations at a few channels: the transformer's pooled projections are
# the two CLIPs' text_embeds side by side (16 + 32), its joint width is T5's (64), wider than the
# CLIP states side by side (48), which MNN's runtime zero-pads to it.
SD3_CLIP_L_CONFIG = dict(CLIP_TEXT_CONFIG, hidden_size=16, projection_dim=16, hidden_act="quick_gelu")
SD3_CLIP_G_CONFIG = dict(CLIP_TEXT_CONFIG, hidden_size=32, intermediate_size=64, projection_dim=32,
                         num_attention_heads=4, hidden_act="gelu")
SD3_T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                     relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
# SD3.5 Medium's features (RMS qk-norm, a dual-attention first block) at 16x16 latents, 2 layers.
SD3_TRANSFORMER_CONFIG = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                              caption_projection_dim=16, pooled_projection_dim=48, pos_embed_max_size=16,
                              dual_attention_layers=(0,), qk_norm="rms_norm")
# SD3's VAE: 16 latent channels, its scaling and shift factors, no quant convs; 8x like the real one.
SD3_VAE_CONFIG = dict(VAE_CONFIG, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                      use_quant_conv=False, use_post_quant_conv=False, sample_size=128)
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
SD3_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def write_sd3_tokenizers(out_dir: str | Path) -> Path:
    """SD3's three tokenizer folders in ``out_dir``: SD1.5's real CLIP BPE as tokenizer/ (pads with
    <|endoftext|>) and tokenizer_2/ (pads with "!", id 0, as SD3's CLIP-G tokenizer does), and a
    small T5 Unigram tokenizer as tokenizer_3/."""
    from clip_tokenizer import write_sd15_tokenizer
    from t5_tokenizer import write_t5_tokenizer

    out = Path(out_dir)
    write_sd15_tokenizer(out / "tokenizer")
    second = write_sd15_tokenizer(out / "tokenizer_2")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((second / name).read_text())
        data["pad_token"] = "!"
        _write_json(second / name, data)
    write_t5_tokenizer(out / "tokenizer_3")
    return out


def jittered(model, seed: int):
    """``model`` with every parameter moved by seeded noise (std 0.02), in eval mode: no weight
    sits at its initializer's constant."""
    import torch

    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def seeded_models(builders: dict, seed: int) -> dict:
    """Each builder's model in eval mode, its weights seeded and jittered so no parameter sits at
    its initial constant; one generator per component, so changing one config leaves the others'
    weights alone."""
    import torch

    models = {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + i)
        models[name] = jittered(build().eval(), seed + 10 + i)
    return models


def make_tiny_sd3_pipeline(out_dir: str | Path, seed: int = 0, *, transformer: dict | None = None,
                           vae: dict | None = None, with_t5: bool = True) -> Path:
    """Save a tiny diffusers StableDiffusion3Pipeline folder at ``out_dir`` and return it.

    Layout as on the hub: model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/,
    text_encoder_3/ (safetensors), tokenizer/, tokenizer_2/, tokenizer_3/, scheduler/. Seeded random
    weights, jittered so no parameter sits at its initial constant. ``transformer``, ``vae``: config
    overrides; ``with_t5=False`` leaves T5 out (text_encoder_3 and tokenizer_3 null in the index).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizers = out / ".tokenizers"
    write_sd3_tokenizers(tokenizers)
    t5_vocab = len(T5TokenizerFast.from_pretrained(str(tokenizers / "tokenizer_3")))
    builders = {
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_L_CONFIG)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_G_CONFIG)),
        "text_encoder_3": lambda: T5EncoderModel(T5Config(vocab_size=t5_vocab, **SD3_T5_CONFIG)),
        "transformer": lambda: SD3Transformer2DModel(**{**SD3_TRANSFORMER_CONFIG, **(transformer or {})}),
        "vae": lambda: AutoencoderKL(**{**SD3_VAE_CONFIG, **(vae or {})}),
    }
    parts = seeded_models(builders, seed)
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(tokenizers / "tokenizer"))
    parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(tokenizers / "tokenizer_2"))
    parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(str(tokenizers / "tokenizer_3"))
    if not with_t5:
        parts["text_encoder_3"] = parts["tokenizer_3"] = None
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), **parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # save_pretrained rewrites the tokenizers in the library's current layout: put back the hub's.
    for name in SD3_TOKENIZERS if with_t5 else SD3_TOKENIZERS[:2]:
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(tokenizers / name, out / name)
    shutil.rmtree(tokenizers)
    return out


# Stability's SD3 single-file names per diffusers folder (text encoders only in the *_incl_* files).
SD3_SINGLE_FILE_PREFIXES = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.",
                            "text_encoder": "text_encoders.clip_l.transformer.",
                            "text_encoder_2": "text_encoders.clip_g.transformer.",
                            "text_encoder_3": "text_encoders.t5xxl.transformer."}


def _swap_halves(value):
    """SD3's original adaLN order (shift, scale) against diffusers' (scale, shift); its own inverse."""
    import torch

    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _sd3_transformer_to_original(state: dict) -> dict:
    """A diffusers SD3Transformer2DModel state dict in Stability's MMDiT names: the exact inverse of
    diffusers' convert_sd3_transformer_checkpoint_to_diffusers (fused qkv, swapped adaLN halves)."""
    import torch

    state = dict(state)
    out = {}

    def move(new, old, transform=None):
        value = state.pop(old)
        out[new] = transform(value) if transform else value

    def fuse(new, olds):
        out[new] = torch.cat([state.pop(o) for o in olds], dim=0)

    for suffix in ("weight", "bias"):
        move(f"x_embedder.proj.{suffix}", f"pos_embed.proj.{suffix}")
        move(f"context_embedder.{suffix}", f"context_embedder.{suffix}")
        move(f"final_layer.linear.{suffix}", f"proj_out.{suffix}")
        move(f"final_layer.adaLN_modulation.1.{suffix}", f"norm_out.linear.{suffix}", _swap_halves)
        for i, (mlp, text) in enumerate((("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder"))):
            move(f"{mlp}.mlp.0.{suffix}", f"time_text_embed.{text}.linear_1.{suffix}")
            move(f"{mlp}.mlp.2.{suffix}", f"time_text_embed.{text}.linear_2.{suffix}")
    move("pos_embed", "pos_embed.pos_embed")
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    for i in range(layers):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        last = i == layers - 1
        for suffix in ("weight", "bias"):
            fuse(f"{x}.attn.qkv.{suffix}", [f"{d}.attn.to_{p}.{suffix}" for p in "qkv"])
            fuse(f"{c}.attn.qkv.{suffix}", [f"{d}.attn.add_{p}_proj.{suffix}" for p in "qkv"])
            move(f"{x}.attn.proj.{suffix}", f"{d}.attn.to_out.0.{suffix}")
            move(f"{x}.adaLN_modulation.1.{suffix}", f"{d}.norm1.linear.{suffix}")
            move(f"{c}.adaLN_modulation.1.{suffix}", f"{d}.norm1_context.linear.{suffix}",
                 _swap_halves if last else None)
            move(f"{x}.mlp.fc1.{suffix}", f"{d}.ff.net.0.proj.{suffix}")
            move(f"{x}.mlp.fc2.{suffix}", f"{d}.ff.net.2.{suffix}")
            if not last:
                move(f"{c}.attn.proj.{suffix}", f"{d}.attn.to_add_out.{suffix}")
                move(f"{c}.mlp.fc1.{suffix}", f"{d}.ff_context.net.0.proj.{suffix}")
                move(f"{c}.mlp.fc2.{suffix}", f"{d}.ff_context.net.2.{suffix}")
            if f"{d}.attn2.to_q.{suffix}" in state:
                fuse(f"{x}.attn2.qkv.{suffix}", [f"{d}.attn2.to_{p}.{suffix}" for p in "qkv"])
                move(f"{x}.attn2.proj.{suffix}", f"{d}.attn2.to_out.0.{suffix}")
        for new, old in (("attn.ln_q", "attn.norm_q"), ("attn.ln_k", "attn.norm_k"),
                         ("attn2.ln_q", "attn2.norm_q"), ("attn2.ln_k", "attn2.norm_k")):
            if f"{d}.{old}.weight" in state:
                move(f"{x}.{new}.weight", f"{d}.{old}.weight")
        for new, old in (("attn.ln_q", "attn.norm_added_q"), ("attn.ln_k", "attn.norm_added_k")):
            if f"{d}.{old}.weight" in state:
                move(f"{c}.{new}.weight", f"{d}.{old}.weight")
    if state:
        raise ValueError(f"no original SD3 name for {sorted(state)[:5]}")
    return out


def save_sd3_single_file(pipeline_dir: str | Path, out_file: str | Path,
                         models: tuple[str, ...] = tuple(SD3_SINGLE_FILE_PREFIXES), dtype=None) -> Path:
    """Write the ``models`` of an SD3 diffusers folder as one Stability-layout .safetensors file
    (``sd3_medium_incl_clips_t5xxl``-like with all of them, ``sd3.5_medium``-like with
    ("transformer", "vae")): the MMDiT under model.diffusion_model., the VAE under
    first_stage_model. (LDM names), each text encoder under text_encoders.<clip_l|clip_g|t5xxl>.transformer.
    ``dtype``: the tensors' type in the file (Stability's files are float16); None keeps the folder's."""
    from safetensors.torch import load_file, save_file

    src, out = Path(pipeline_dir), Path(out_file)
    state: dict = {}
    for folder in models:
        prefix = SD3_SINGLE_FILE_PREFIXES[folder]
        weights = {k: v for shard in sorted((src / folder).glob("*.safetensors")) for k, v in load_file(shard).items()}
        if folder == "transformer":
            weights = _sd3_transformer_to_original(weights)
        elif folder == "vae":
            vae_cfg = json.loads((src / "vae" / "config.json").read_text(encoding="utf-8"))
            converted = {}
            for key, value in weights.items():
                ldm = _vae_key_to_ldm(key, vae_cfg)
                if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
                    value = value[:, :, None, None]
                converted[ldm] = value
            weights = converted
        elif folder in ("text_encoder", "text_encoder_2"):
            weights = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
                       for k, v in weights.items()}
        state.update({prefix + k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in weights.items()})
        del weights
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


def set_identity_clip_l_projection(pipeline_dir: str | Path) -> Path:
    """Give an SD3 folder's CLIP-L the identity text projection that diffusers' from_single_file
    gives an SD3 file's CLIP-L, so a folder and its single file hold the same model."""
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(pipeline_dir) / "text_encoder" / "model.safetensors"
    weights = load_file(path)
    width = weights["text_projection.weight"].shape[0]
    weights["text_projection.weight"] = torch.eye(width, dtype=weights["text_projection.weight"].dtype)
    save_file(weights, str(path), metadata={"format": "pt"})
    return Path(pipeline_dir)


def record_model_calls(pipeline, params):
    """(calls, generation): ``pipeline.run(params)`` with every model call's feeds (copied) and
    outputs recorded per model name, for tests that check each step of the recipe."""
    import numpy as np

    calls = {name: [] for name in pipeline._models}
    for name, model in pipeline._models.items():
        def spy(feeds, _run=model.run, _calls=calls[name]):
            out = _run(feeds)
            _calls.append(({k: np.array(v, copy=True) for k, v in feeds.items()}, out))
            return out
        model.run = spy
    return calls, pipeline.run(params)


# Wan2.1 at the smallest sizes its code takes: head dim 12 (RoPE splits it 4/4/4 over frames,
# height and width), the runtime's 16 latent channels and 2x2 patches, a VAE of 8x spatial and 4x
# temporal factors (4 levels, two temporal down-samplings).
WAN_TEXT_ENCODER_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                               relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
WAN_TRANSFORMER_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                              out_channels=16, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
# What the hub's Wan2.1 diffusers folders ship.
WAN_SCHEDULER_CONFIG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000)


def make_tiny_wan_pipeline(out_dir: str | Path, seed: int = 0, *, transformer: dict | None = None,
                           vae: dict | None = None) -> Path:
    """Save a tiny diffusers WanPipeline folder at ``out_dir`` and return it: model_index.json,
    text_encoder/ (UMT5EncoderModel), tokenizer/ (a small umT5-like tokenizer: Unigram with byte
    fallback, trained on text other than the prompts it is checked with),
    transformer/, vae/, scheduler/. Seeded random weights, jittered as the other tiny pipelines'."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from t5_tokenizer import write_umt5_tokenizer
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer_dir = write_umt5_tokenizer(out / ".tokenizer")
    vocab = len(T5TokenizerFast.from_pretrained(str(tokenizer_dir)))
    builders = {
        "text_encoder": lambda: UMT5EncoderModel(UMT5Config(vocab_size=vocab, **WAN_TEXT_ENCODER_CONFIG)),
        "transformer": lambda: WanTransformer3DModel(**{**WAN_TRANSFORMER_CONFIG, **(transformer or {})}),
        "vae": lambda: AutoencoderKLWan(**{**WAN_VAE_CONFIG, **(vae or {})}),
    }
    parts = seeded_models(builders, seed)
    parts["tokenizer"] = T5TokenizerFast.from_pretrained(str(tokenizer_dir))
    pipe = WanPipeline(scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG), **parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # save_pretrained rewrites the tokenizer in the library's current layout: put back the hub's.
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    shutil.move(str(tokenizer_dir), out / "tokenizer")
    return out


def load_wan_pipeline(folder: str | Path):
    """WanPipeline from a folder without accelerate, which WanPipeline.from_pretrained needs for
    WanTransformer3DModel (it keeps modules in float32 only through accelerate; in float32 there is
    nothing to keep)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5EncoderModel

    folder = Path(folder)
    transformer_class = type("WanTransformer3DModel", (WanTransformer3DModel,), {"_keep_in_fp32_modules": None})
    return WanPipeline(
        tokenizer=T5TokenizerFast.from_pretrained(str(folder / "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32).eval(),
        transformer=transformer_class.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32).eval(),
        vae=AutoencoderKLWan.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval(),
        scheduler=UniPCMultistepScheduler.from_pretrained(str(folder / "scheduler")))


# ---------------------------------------------------------------------------------------------
# VAEs users bring in place of a pipeline's own (sd2mnn export --vae)
# ---------------------------------------------------------------------------------------------
def make_tiny_taesd(out_dir: str | Path, seed: int = 0, latent_channels: int = 4, **config) -> Path:
    """A tiny diffusers AutoencoderTiny (TAESD's architecture: 3 upsamplings, 8x) at ``out_dir``,
    seeded and jittered; ``config`` replaces its entries (SD3's TAESD: scaling_factor, shift_factor)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(**{"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
                               "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1),
                               "latent_channels": latent_channels, **config})
    jittered(model, seed + 10).save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def make_tiny_vae(out_dir: str | Path, seed: int = 5, **config) -> Path:
    """A tiny AutoencoderKL of the tiny pipeline's architecture with other weights (a "fixed" VAE)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    jittered(AutoencoderKL(**{**VAE_CONFIG, **config}), seed + 10).save_pretrained(str(out_dir),
                                                                                  safe_serialization=True)
    return Path(out_dir)
