"""Wan2.1's exporter: the graphs MNN's Wan runtime loads (sd2mnn.families.wan cites its lines),
made to compute what diffusers' WanPipeline computes from what the runtime feeds them.

MNN's own exporter (transformers/diffusion/export/wan/wan_onnx_export.py) differs from diffusers on
a WanPipeline folder in three places, each fixed here: its text encoder attends to the padding
(an all-ones mask), its VAE de-normalises with ``latent / std + mean`` where diffusers has
``latent * std + mean``, and it leaves two modules torch 2.13's TorchScript exporter cannot write
at opset 18 (``torch.nn.RMSNorm``, ``nearest-exact`` upsampling), so it does not export at all.
Two more patches keep MNN from computing another graph than ONNX Runtime: no ``If`` for a
squeeze (MNN cannot size the output through it) and no ReduceL2 (converted over every axis); and
one input size of each graph is declared free, or MNN's stock wan_diffusion_demo crashes
(``EXPORTER.free_dims``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sd2mnn.errors import InputError
from sd2mnn.exporters import Exporter, MemoryTerms
from sd2mnn.exporters.vae import text_encoder_terms
from sd2mnn.exporting.export import TORCH_EXTERNAL_DATA_SWITCH, _config, _Job, _load, _load_tokenizer, weights_bytes
from sd2mnn.families.wan import (LATENT_CHANNELS, PATCH, SPATIAL_FACTOR, TEMPORAL_FACTOR, TEXT_LENGTH, WAN,
                                 WanDims)


def _wrappers():
    import torch

    class TextEncoder(torch.nn.Module):
        """UMT5 as WanPipeline._get_t5_prompt_embeds runs it, fed the runtime's ids: those carry no
        EOS (WAN:25), so the graph writes ``eos_id`` after the last id (in the last slot when all
        are used, as the tokenizer's truncation does), attends to the ids and the EOS only, and
        zeroes the padded positions' states."""

        def __init__(self, model, eos_id: int):
            super().__init__()
            self.model, self.eos_id = model, eos_id

        def forward(self, input_ids):
            ids = input_ids.to(torch.int64)
            length = ids.shape[1]
            used = (ids != 0).sum(dim=1, keepdim=True).clamp(max=length - 1)
            positions = torch.arange(length, dtype=torch.int64).unsqueeze(0)
            ids = torch.where(positions < used, ids, torch.where(positions == used, self.eos_id, 0))
            mask = (positions <= used).to(torch.int64)
            states = self.model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
            return states * mask.unsqueeze(-1).to(states.dtype)

    class Transformer(torch.nn.Module):
        """The runtime's mask marks the ids (WAN:152-156); widened by the EOS position the text
        encoder adds, it keeps exactly the states that encoder left non-zero, so diffusers'
        conditioning passes unchanged (diffusers' transformer takes no mask)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
            ids = encoder_attention_mask != 0
            first = torch.ones_like(ids[:, :1])
            kept = ids | torch.cat([first, ids[:, :-1]], dim=1)
            conditioning = encoder_hidden_states * kept.unsqueeze(-1).to(encoder_hidden_states.dtype)
            return self.model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=conditioning,
                              return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        """WanPipeline's de-normalisation (``latents / (1 / std) + mean``, in that order) then the
        decoder; the runtime feeds the final latents as they are (WAN:368)."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            shape = (1, model.config.z_dim, 1, 1, 1)
            self.register_buffer("inverse_std", 1.0 / torch.tensor(model.config.latents_std).view(shape))
            self.register_buffer("mean", torch.tensor(model.config.latents_mean).view(shape))

        def forward(self, latent_sample):
            return self.model.decode(latent_sample / self.inverse_std + self.mean, return_dict=False)[0]

    return TextEncoder, Transformer, VaeDecoder


def _rms_norm_forward(self, x):
    """torch.nn.RMSNorm as the operations ONNX has: the same values, cast-free in float32."""
    import torch

    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * self.weight if self.weight is not None else y


def _decompose_rms_norms(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.forward = _rms_norm_forward.__get__(module)


def _nearest_upsampling(model, folder: Path) -> None:
    """``nearest-exact`` at an integer scale picks the pixels ``nearest`` does, which ONNX has."""
    for module in model.modules():
        if getattr(module, "mode", None) == "nearest-exact":
            factors = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,)
            if not all(float(f).is_integer() for f in factors):
                raise InputError(f"{folder / 'config.json'}: upsampling by {module.scale_factor} is not an integer "
                                 "factor; sd2mnn exports Wan's VAE at integer factors only")
            module.mode = "nearest"


def _attention_block_forward(self, x):
    """diffusers' WanAttentionBlock.forward with ``[:, 0]`` for its ``squeeze(1)``: the same values,
    but torch exports a squeeze of a traced dimension as an ONNX ``If``, through which MNN cannot
    tell the decoder's output shape."""
    import torch.nn.functional as F

    identity = x
    batch_size, channels, time, height, width = x.size()
    x = x.permute(0, 2, 1, 3, 4).reshape(batch_size * time, channels, height, width)
    x = self.norm(x)
    qkv = self.to_qkv(x)
    qkv = qkv.reshape(batch_size * time, 1, channels * 3, -1)
    qkv = qkv.permute(0, 1, 3, 2).contiguous()
    q, k, v = qkv.chunk(3, dim=-1)
    x = F.scaled_dot_product_attention(q, k, v)
    x = x[:, 0].permute(0, 2, 1).reshape(batch_size * time, channels, height, width)
    x = self.proj(x)
    x = x.view(batch_size, time, channels, height, width)
    x = x.permute(0, 2, 1, 3, 4)
    return x + identity


def _static_attention(model) -> None:
    for module in model.modules():
        if type(module).__name__ == "WanAttentionBlock" and all(hasattr(module, a) for a in ("norm", "to_qkv", "proj")):
            module.forward = _attention_block_forward.__get__(module)


def _rms_norm_by_sums(self, x):
    """diffusers' WanRMS_norm.forward with ``F.normalize`` written as a sum and a square root: the
    same values, but ``F.normalize`` exports as ONNX ReduceL2, whose opset-18 form (axes as an
    input) MNNConvert 3.6.1 turns into a reduction over every axis (onnxextra/OnnxReduceL2.cpp
    reads axes from an attribute only): the decoder's output then has cosine 0.1 with ONNX Runtime's."""
    import torch

    dim = 1 if self.channel_first else -1
    norm = torch.sqrt((x * x).sum(dim=dim, keepdim=True)).clamp_min(1e-12)  # F.normalize's eps
    return x / norm * self.scale * self.gamma + self.bias


def _reduce_without_l2(model) -> None:
    for module in model.modules():
        if type(module).__name__ == "WanRMS_norm" and all(hasattr(module, a) for a in ("channel_first", "scale",
                                                                                      "gamma", "bias")):
            module.forward = _rms_norm_by_sums.__get__(module)


def dims_of(source, options) -> WanDims:
    text = _config(source.folder, "text_encoder")
    return WanDims(frames=options.frames, height=options.height, width=options.width,
                   text_hidden=int(text.get("d_model") or 4096))


def _runtime_ids(source):
    """[uncond "", prompt] ids as the runtime makes them: no EOS, cut or padded with 0 to 512."""
    import torch

    tokenizer = _load_tokenizer(source)
    rows = []
    for prompt in source.family.check_prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:TEXT_LENGTH]
        rows.append(list(ids) + [0] * (TEXT_LENGTH - len(ids)))
    return torch.tensor(rows, dtype=torch.int32)


def text_encoder_job(source, options, text_length: int, gen) -> _Job:
    TextEncoder, _, _ = _wrappers()
    model = _load(source, "text_encoder")
    if int(getattr(model.config, "pad_token_id", 0) or 0) != 0:
        raise InputError(f"{source.folder / 'text_encoder' / 'config.json'}: pad_token_id "
                         f"{model.config.pad_token_id}; MNN's Wan runtime pads with 0 and masks by it")
    eos = int(getattr(model.config, "eos_token_id", 1) or 1)
    return _Job(TextEncoder(model, eos), {"input_ids": _runtime_ids(source)}, ["last_hidden_state"])


def transformer_job(source, options, text_length: int, gen) -> _Job:
    import torch

    _, Transformer, _ = _wrappers()
    dims = dims_of(source, options)
    model = _load(source, "transformer")
    _decompose_rms_norms(model)
    ids = _runtime_ids(source)
    latents = torch.randn(1, *dims.latent[1:], generator=gen)
    inputs = {
        "hidden_states": torch.cat([latents, latents]),
        # A timestep of a 20-step run, the same for both rows (WAN:339-342).
        "timestep": torch.full((2,), 857.0),
        "encoder_hidden_states": torch.randn(2, TEXT_LENGTH, dims.text_hidden, generator=gen),
        "encoder_attention_mask": (ids != 0).to(torch.int32),
    }
    return _Job(Transformer(model), inputs, ["noise_pred"])


def vae_decoder_job(source, options, text_length: int, gen) -> _Job:
    import torch

    _, _, VaeDecoder = _wrappers()
    dims = dims_of(source, options)
    vae = _load(source, "vae")
    _nearest_upsampling(vae, source.folder / "vae")
    _static_attention(vae)
    _reduce_without_l2(vae)
    return _Job(VaeDecoder(vae), {"latent_sample": torch.randn(*dims.latent, generator=gen)}, ["sample"])


def transformer_terms(folder: Path, name: str, lh: int, lw: int, height: int, width: int,
                      text_length: int, frames: int = WanDims().frames) -> MemoryTerms:
    """Self-attention over every latent frame's patches (both CFG rows), cross-attention to the text."""
    model = _config(folder, "transformer")
    heads = int(model.get("num_attention_heads") or 12)
    inner = heads * int(model.get("attention_head_dim") or 128)
    ffn = int(model.get("ffn_dim") or 4 * inner)
    tokens = WanDims(frames=frames).latent_frames * (lh // PATCH) * (lw // PATCH)
    # ONNX Runtime's check of the 1.3B transformer, measured: 17.2 GiB in its child at 256x256x9,
    # over 20.7 GiB at 320x320x9 (stopped). Three copies of the graph's weights and of the rotary
    # tables torch folds into every block (2 per layer of [2, tokens, heads, head_dim] floats: 584 MB
    # at 256x256x9), and every layer's attention scores held at once, account for both.
    layers = int(model.get("num_layers") or 30)
    rope = layers * 2 * 2 * tokens * inner * 4
    scores = layers * 2 * heads * tokens * max(tokens, TEXT_LENGTH) * 4
    check_extra = 2 * weights_bytes(folder, name, WAN) + 3 * rope + scores
    return MemoryTerms(2 * heads * tokens * max(tokens, TEXT_LENGTH) * 4, 2 * tokens * max(inner, ffn) * 4 * 4,
                       check_extra=check_extra)


def umt5_terms(folder: Path, name: str, lh: int, lw: int, height: int, width: int, text_length: int,
               frames: int = WanDims().frames) -> MemoryTerms:
    """A text encoder's terms (they do not depend on the frames), and UMT5's 256384 x 4096 embedding
    table: one tensor of 4.2 GB, which torch's export holds about 1.43 times more of than of the
    other weights (its export peaked at 13.9 GiB with 2 blocks, 5.7 GB of weights, measured)."""
    config = _config(folder, name)
    table = int(config.get("vocab_size") or 0) * int(config.get("d_model") or 0) * 4
    terms = text_encoder_terms(folder, name, lh, lw, height, width, text_length)
    return replace(terms, export_extra=int(1.43 * table) if table > TORCH_EXTERNAL_DATA_SWITCH else 0)


def vae_terms(folder: Path, name: str, lh: int, lw: int, height: int, width: int,
              text_length: int, frames: int = WanDims().frames) -> MemoryTerms:
    """The causal decoder works a latent frame (up to 4 video frames) at a time, at each level's
    channels; its mid attention is per frame."""
    vae = _config(folder, "vae")
    base = int(vae.get("decoder_base_dim") or vae.get("base_dim") or 96)
    mult = list(vae.get("dim_mult") or [1, 2, 4, 4])
    levels = [base * m for m in reversed(mult)]  # the decoder starts at the widest
    widest = max(ch * 4 * (height >> (len(levels) - 1 - i)) * (width >> (len(levels) - 1 - i)) * 4
                 for i, ch in enumerate(levels))
    tokens = lh * lw
    return MemoryTerms(tokens * tokens * 4, widest)


def size_step(transformer: dict, factor: int) -> int:
    """The transformer cuts the latents into patch_size[1:] squares (the runtime: 2, WAN:284-291)."""
    patch = transformer.get("patch_size") or (1, PATCH, PATCH)
    return factor * int(patch[-1])


def check_model(folder: Path) -> None:
    """What MNN's Wan runtime fixes and a model must have beyond its latent channels (WAN:283-284),
    and the one denoiser it steps with."""
    from sd2mnn.core.files import read_json_object

    second = read_json_object(folder / "model_index.json").get("transformer_2")
    if isinstance(second, list) and any(second):
        raise InputError(f"{folder / 'model_index.json'}: a second transformer (Wan2.2's two experts); MNN's Wan "
                         "runtime steps with one: export a Wan2.1 pipeline")
    transformer, vae = _config(folder, "transformer"), _config(folder, "vae")
    for where, key, value, want in (("transformer", "out_channels", transformer.get("out_channels"), LATENT_CHANNELS),
                                    ("vae", "scale_factor_spatial", vae.get("scale_factor_spatial"), SPATIAL_FACTOR),
                                    ("vae", "scale_factor_temporal", vae.get("scale_factor_temporal"), TEMPORAL_FACTOR)):
        if value is not None and int(value) != want:
            raise InputError(f"{folder / where / 'config.json'}: {key} {value}; MNN's Wan runtime fixes it at {want}")
    patch = transformer.get("patch_size") or (1, PATCH, PATCH)
    if list(patch)[-2:] != [PATCH, PATCH]:
        raise InputError(f"{folder / 'transformer' / 'config.json'}: patch_size {patch}; MNN's Wan runtime cuts "
                         f"latents into {PATCH}x{PATCH} patches")


EXPORTER = Exporter(
    order=("text_encoder", "transformer", "vae_decoder"),
    jobs={"text_encoder": text_encoder_job, "transformer": transformer_job, "vae_decoder": vae_decoder_job},
    # The text encoder's memory does not depend on the frames.
    terms={"text_encoder": umt5_terms, "transformer": transformer_terms,
           "vae_decoder": vae_terms},
    size_step=size_step,
    lora_loader="WanLoraLoaderMixin",
    check_folder=check_model,
    # WanDiffusion::load() fixes each module's resize right after loading it (WAN:116-118), before
    # any forward: on a model whose every input size is known, MNN allocated its memory at load,
    # the fix frees it, and the first forward writes into freed memory (wan_diffusion_demo
    # crashes). One symbolic input dimension each keeps MNN from allocating at load; the graphs
    # inside stay static, and sd2mnn feeds that dimension what the runtime feeds.
    free_dims={"text_encoder": {"input_ids": {1: "text_length"}},
               "transformer": {"encoder_attention_mask": {1: "text_length"}},
               "vae_decoder": {"latent_sample": {1: "latent_channels"}}},
)
