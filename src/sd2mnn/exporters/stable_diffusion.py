"""SD1.x's exporter (SD1.5, Taiyi): the graphs of MNN's transformers/diffusion/export/onnx_export.py,
tensors as stable_diffusion.cpp loads them (sd2mnn.exporting.export's module doc lists them)."""
from __future__ import annotations

from pathlib import Path

from sd2mnn.errors import InputError
from sd2mnn.exporters import Exporter, MemoryTerms
from sd2mnn.exporters.vae import text_encoder_terms, vae_decoder_job, vae_encoder_job, vae_terms
from sd2mnn.exporting.export import _config, _Job, _load, _per_block, _text_ids, _vae_factor


def _wrappers():
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            out = self.model(input_ids=input_ids.to(torch.int64), return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class Unet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states):
            t = timestep.to(torch.float32)
            return self.model(sample, t, encoder_hidden_states, return_dict=False)[0]

    return TextEncoder, Unet


def text_encoder_job(source, options, text_length: int, gen) -> _Job:
    TextEncoder, _ = _wrappers()
    model = _load(source, "text_encoder")
    positions = getattr(model.config, "max_position_embeddings", text_length)
    if positions < text_length:
        raise InputError(
            f"{source.folder / 'text_encoder' / 'config.json'}: max_position_embeddings "
            f"{positions} < {text_length} tokens MNN's runtime feeds a {source.kind} model"
        )
    ids = _text_ids(source, text_length)
    return _Job(TextEncoder(model), {"input_ids": ids}, ["last_hidden_state", "pooler_output"])


def unet_job(source, options, text_length: int, gen) -> _Job:
    import torch

    _, Unet = _wrappers()
    model = _load(source, "unet")
    cfg = model.config
    factor = _vae_factor(source)
    h, w = options.height // factor, options.width // factor
    te_cfg = _config(source.folder, "text_encoder")
    hidden = int(cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int)
                 else te_cfg["hidden_size"])
    inputs = {
        "sample": torch.randn(2, cfg.in_channels, h, w, generator=gen),
        "timestep": torch.tensor([981], dtype=torch.int32),
        "encoder_hidden_states": torch.randn(2, text_length, hidden, generator=gen),
    }
    return _Job(Unet(model), inputs, ["out_sample"])


def unet_terms(folder: Path, name: str, lh: int, lw: int, height: int, width: int, text_length: int) -> MemoryTerms:
    unet = _config(folder, "unet")
    channels = list(unet.get("block_out_channels", [320]))
    heads = _per_block(unet.get("num_attention_heads") or unet.get("attention_head_dim", 8), len(channels))
    down = list(unet.get("down_block_types", ["CrossAttnDownBlock2D"] * len(channels)))
    attention = activation = 0
    for level, (kind, ch) in enumerate(zip(down, channels)):
        tokens = (lh >> level) * (lw >> level)
        activation = max(activation, 2 * ch * tokens * 4)
        if "Attn" in kind:
            attention = max(attention, 2 * heads[level] * tokens * max(tokens, text_length) * 4)
    last = len(channels) - 1  # the mid block attends at the lowest resolution
    attention = max(attention, 2 * heads[last] * ((lh >> last) * (lw >> last)) ** 2 * 4)
    return MemoryTerms(attention, activation)


def size_step(unet: dict, factor: int) -> int:
    """The unet halves the latents once per down block but the last."""
    return factor * 2 ** (len(unet.get("block_out_channels", [0])) - 1)


EXPORTER = Exporter(
    order=("text_encoder", "unet", "vae_encoder", "vae_decoder"),
    jobs={"text_encoder": text_encoder_job, "unet": unet_job, "vae_encoder": vae_encoder_job,
          "vae_decoder": vae_decoder_job},
    terms={"text_encoder": text_encoder_terms, "unet": unet_terms, "vae_encoder": vae_terms, "vae_decoder": vae_terms},
    size_step=size_step,
)
