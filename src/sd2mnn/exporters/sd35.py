"""SD3.5's exporter: MNN ships none; the graphs give the tensors diffusion_sd35.cpp loads
(sd2mnn.families.sd35 cites its lines; sd2mnn.exporting.export's module doc lists them)."""
from __future__ import annotations

from pathlib import Path

from sd2mnn.errors import InputError
from sd2mnn.exporters import Exporter, MemoryTerms
from sd2mnn.exporters.vae import text_encoder_terms, vae_decoder_job, vae_terms
from sd2mnn.exporting.export import _config, _Job, _load, _text_ids, _vae_factor
from sd2mnn.families import SD35Dims


def _wrappers():
    import torch

    class ClipPenultimate(torch.nn.Module):
        """CLIPTextModelWithProjection as StableDiffusion3Pipeline._get_clip_prompt_embeds uses it:
        the penultimate layer's states (``hidden_states[-2]``, no final layer norm) and the
        projected pooled output, named as MNN's runtime reads them (SD35:132)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            out = self.model(input_ids=input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
            return out.hidden_states[-2], out.text_embeds

    class T5Encoder(torch.nn.Module):
        # diffusers' _get_t5_prompt_embeds: no attention mask, the padding attended to.
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids.to(torch.int64), return_dict=True).last_hidden_state

    class Transformer(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                              pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]

    return ClipPenultimate, T5Encoder, Transformer


def _text_job(name: str, clip: bool):
    def job(source, options, text_length: int, gen) -> _Job:
        ClipPenultimate, T5Encoder, _ = _wrappers()
        spec = source.family.components[name]
        model = _load(source, name)
        length = source.family.prompt_formats[spec.tokenizer].max_length
        positions = getattr(model.config, "max_position_embeddings", length)  # T5's are relative: none
        if positions < length:
            raise InputError(f"{source.folder / name / 'config.json'}: max_position_embeddings {positions} < "
                             f"{length} tokens MNN's runtime feeds it")
        ids = _text_ids(source, length, spec.tokenizer)
        if clip and not hasattr(model, "text_projection"):
            raise InputError(f"{source.folder / name}: {type(model).__name__} has no text projection; SD3 needs "
                             "CLIPTextModelWithProjection (text_embeds)")
        wrapper = ClipPenultimate(model) if clip else T5Encoder(model)
        return _Job(wrapper, {"input_ids": ids}, list(spec.outputs))

    return job


def transformer_job(source, options, text_length: int, gen) -> _Job:
    import torch

    _, _, Transformer = _wrappers()
    spec = source.family.components["transformer"]
    dims = sd3_dims(source.folder)
    model = _load(source, "transformer")
    factor = _vae_factor(source)
    latents = [2, dims.latent_channels, options.height // factor, options.width // factor]
    inputs = {
        "hidden_states": torch.randn(*latents, generator=gen),
        "encoder_hidden_states": torch.randn(2, dims.text_length, dims.joint, generator=gen),
        "pooled_projections": torch.randn(2, dims.pooled, generator=gen),
        # A timestep of a 20-step run, the same for both rows (SD35:349).
        "timestep": torch.full((2,), 857.0),
    }
    return _Job(Transformer(model), inputs, list(spec.outputs))


def sd3_dims(folder: Path) -> SD35Dims:
    """The SD3 pipeline's widths, which must fit together as MNN's runtime joins the text encoders'
    outputs: pooled = the two text_embeds side by side (SD35:243), the CLIP states side by side no
    wider than the transformer's joint width they are padded to (SD35:236), T5's that wide (SD35:240)."""
    dims = SD35Dims.from_configs(folder)
    config = folder / "transformer" / "config.json"
    if dims.pooled != dims.clip_l_embeds + dims.clip_g_embeds:
        raise InputError(f"{config}: pooled_projection_dim {dims.pooled} is not the text encoders' projection "
                         f"widths {dims.clip_l_embeds} + {dims.clip_g_embeds}; the text encoders do not belong to it")
    if dims.clip_l + dims.clip_g > dims.joint or dims.t5 != dims.joint:
        raise InputError(f"{config}: joint_attention_dim {dims.joint} does not take the CLIP states "
                         f"({dims.clip_l} + {dims.clip_g}) and T5's ({dims.t5}); the text encoders do not belong to it")
    return dims


def transformer_terms(folder: Path, name: str, lh: int, lw: int, height: int, width: int,
                      text_length: int) -> MemoryTerms:
    """SD3's joint attention over the latent patches and the text tokens together."""
    model = _config(folder, "transformer")
    patch = int(model.get("patch_size") or 2)
    heads = int(model.get("num_attention_heads") or 24)
    inner = heads * int(model.get("attention_head_dim") or 64)
    tokens = (lh // patch) * (lw // patch) + text_length
    # torch folds the crop of the positional table into a constant: the table is not exported.
    folded = int(model.get("pos_embed_max_size") or 0) ** 2 * inner * 4
    return MemoryTerms(2 * heads * tokens * tokens * 4, 2 * tokens * inner * 4 * 4, folded)


def size_step(transformer: dict, factor: int) -> int:
    """The transformer cuts the latents into patch_size squares."""
    return factor * int(transformer.get("patch_size") or 1)


EXPORTER = Exporter(
    order=("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"),
    jobs={"text_encoder": _text_job("text_encoder", clip=True), "text_encoder_2": _text_job("text_encoder_2", clip=True),
          "text_encoder_3": _text_job("text_encoder_3", clip=False), "transformer": transformer_job,
          "vae_decoder": vae_decoder_job},
    terms={"text_encoder": text_encoder_terms, "text_encoder_2": text_encoder_terms,
           "text_encoder_3": text_encoder_terms, "transformer": transformer_terms, "vae_decoder": vae_terms},
    size_step=size_step,
    lora_loader="SD3LoraLoaderMixin",
    # The transformer attends to CLIP's tokens and T5's.
    text_lengths=lambda folder: {"transformer": sd3_dims(folder).text_length},
    # MNN's SD3.5 runtime loads all three tokenizers, with or without T5 (SD35:98-109).
    tokenizer_fix="MNN's SD3.5 runtime loads it even without T5; add the model's T5 tokenizer folder",
)
