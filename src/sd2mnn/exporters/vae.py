"""What every family's exporter shares: the VAE's graphs (diffusers' AutoencoderKL) and the memory
terms of the VAE and of a text encoder."""
from __future__ import annotations

from pathlib import Path

from sd2mnn.exporters import MemoryTerms
from sd2mnn.exporting.export import _config, _Job, _load


def _vae_wrappers():
    import torch

    class VaeEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample):
            encoded = self.model.encode(sample)
            # AutoencoderKL's posterior's mode; AutoencoderTiny encodes to latents directly.
            return encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents

    class VaeDecoder(torch.nn.Module):
        """``decode`` of what MNN's runtime feeds: its latents already scaled by the runtime's own
        constants, which ``scale`` and ``shift`` turn into the VAE's (None: they are the same)."""

        def __init__(self, model, scale: float | None = None, shift: float = 0.0):
            super().__init__()
            self.model, self.scale, self.shift = model, scale, shift

        def forward(self, latent_sample):
            if self.scale is not None:
                latent_sample = latent_sample * self.scale + self.shift
            return self.model.decode(latent_sample, return_dict=False)[0]

    return VaeEncoder, VaeDecoder


def runtime_to_vae(recipe, vae_config) -> tuple[float | None, float]:
    """(scale, shift) that turn the decoder input MNN's runtime makes, ``latents * latent_scale +
    latent_shift`` (its constants), into the one diffusers' pipelines give this VAE, ``latents /
    scaling_factor + shift_factor`` (its config's); (None, 0) where the two agree, as they do for
    the pipeline's own AutoencoderKL. TAESD (AutoencoderTiny, scaling factor 1) decodes SD1.5's raw
    latents, so its graph multiplies the runtime's input by 0.18215."""
    scaling = float(vae_config.get("scaling_factor") or 1.0)
    vae_shift = float(vae_config.get("shift_factor") or 0.0)
    scale = 1.0 / (recipe.latent_scale * scaling)
    shift = vae_shift - recipe.latent_shift * scale
    if abs(scale - 1.0) < 1e-6 and abs(shift) < 1e-6:
        return None, 0.0
    return scale, shift


def vae_encoder_job(source, options, text_length: int, gen) -> _Job:
    import torch

    VaeEncoder, _ = _vae_wrappers()
    vae = _load(source, "vae")
    image = torch.rand(1, vae.config.in_channels, options.height, options.width, generator=gen)
    return _Job(VaeEncoder(vae), {"sample": image * 2 - 1}, ["latent_sample"])


def vae_decoder_job(source, options, text_length: int, gen) -> _Job:
    import torch

    _, VaeDecoder = _vae_wrappers()
    vae = _load(source, "vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = torch.randn(1, vae.config.latent_channels, options.height // factor,
                         options.width // factor, generator=gen)
    scale, shift = runtime_to_vae(source.family.recipe, vae.config)
    return _Job(VaeDecoder(vae, scale, shift), {"latent_sample": latent}, ["sample"])


def vae_terms(folder: Path, name: str, lh: int, lw: int, height: int, width: int, text_length: int) -> MemoryTerms:
    channels = list(_config(folder, "vae").get("block_out_channels", [128]))
    tokens = lh * lw  # the mid block's single-head attention at the latent size
    # Level i works at 1/2**i of the image size with channels[i].
    return MemoryTerms(tokens * tokens * 4, max(ch * (height >> i) * (width >> i) * 4 for i, ch in enumerate(channels)))


def text_encoder_terms(folder: Path, name: str, lh: int, lw: int, height: int, width: int,
                       text_length: int) -> MemoryTerms:
    config = _config(folder, name if (folder / name / "config.json").is_file() else "text_encoder")
    hidden = int(config.get("hidden_size") or config.get("d_model") or 768)
    heads = int(config.get("num_attention_heads") or config.get("num_heads") or 16)
    return MemoryTerms(2 * heads * text_length * text_length * 4, 2 * text_length * hidden * 4 * 4)
