"""Wan2.1: the steps of MNN's ``WanDiffusion`` runtime between the text encoder and the VAE
decoder, read from transformers/diffusion/engine/src/wan_diffusion.cpp (MNN 3.6.1; ``WAN:n``
cites its lines).

``encodePrompt()`` (WAN:122-171)
    ``[encode(""), encode(prompt)]``, int32 [2, 512] (MtokTokenizer kSingle: no BOS, no EOS, cut or
    padded with 0), through the text encoder alone; the mask ``ids != 0`` (int32, WAN:152-156)
    goes to the transformer with its ``last_hidden_state``.
``runVideo()`` (WAN:274-383)
    noise [1, 16, (frames + 3) / 4, h / 8, w / 8] from std::mt19937 (sd2mnn.generation.noise);
    float timesteps ``1000 * shift(t)``, shift 3 (sd2mnn.schedulers.flow_match, rule "wan"); per
    step ``hidden_states = [x, x]``, ``timestep`` float [2], CFG ``uncond + (text - uncond) * cfg``,
    Euler ``x + v * ((t_next - t) / 1000)``; the VAE decoder once on the final latents (its graph
    de-normalises them), each frame of its NCTHW output written as SD1.5 writes an image
    (``saveFrame``, WAN:199-210).
Model lifetime (``memory_mode``)
    ``load()`` loads all three (WAN:87-119); unless ``memory_mode`` is 1, each is freed after its
    stage (WAN:296-300, 362-366, 377-379).

Where this departs from diffusers' ``WanPipeline`` and what the bundle does about it:
sd2mnn.families.wan (the EOS and mask, in the graphs) and sd2mnn.exporters.wan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sd2mnn.core.runtime import RuntimeConfig
from sd2mnn.families.wan import LATENT_CHANNELS, TEXT_LENGTH
from sd2mnn.recipes.lifetime import ModelLifetime
from sd2mnn.recipes.stable_diffusion import winograd_runtime_config


@dataclass(frozen=True)
class WanSteps:
    latent_input: str = "hidden_states"

    def condition(self, outputs: dict[str, dict[str, np.ndarray]], shapes,
                  files: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        """The transformer's text inputs: the text encoder's states and the mask of the ids it was fed."""
        encoder = outputs["text_encoder"]
        return {"encoder_hidden_states": encoder["last_hidden_state"],
                "encoder_attention_mask": (encoder["input_ids"] != 0).astype(np.int32)}

    def denoiser_feeds(self, latent: np.ndarray, timestep, text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """WAN:337-342: ``_Concat({sample, sample}, 0)``, the float timestep twice."""
        return {"hidden_states": np.concatenate([latent, latent], axis=0),
                "timestep": np.full(2, timestep, dtype=np.float32), **text}

    def contract_notes(self, inputs: dict[str, dict[str, list[int]]], outputs: dict[str, dict[str, list[int]]],
                       files: dict[str, str], family) -> list[str]:
        """What the runtime fixes (512 ids, 16 latent channels) against the models' shapes."""
        issues = []
        ids = inputs.get("text_encoder", {}).get("input_ids") or []
        if len(ids) == 2 and ids[1] not in (TEXT_LENGTH, -1):  # -1: declared free, fed 512
            issues.append(f"{files.get('text_encoder', 'text_encoder')} takes {ids[1]} ids ({TEXT_LENGTH} in the runtime)")
        latents = inputs.get("transformer", {}).get(self.latent_input) or []
        if len(latents) == 5 and latents[1] != LATENT_CHANNELS:
            issues.append(f"{files.get('transformer', 'transformer')} takes {latents[1]} latent channels "
                          f"({LATENT_CHANNELS} in the runtime)")
        return [f"MNN's runtime would refuse these models' sizes: {', '.join(issues)}"] if issues else []

    def model_lifetime(self, memory_mode: int) -> ModelLifetime:
        return ModelLifetime(at_start=True, release_after_use=memory_mode != 1)

    def runtime_config(self, backend: str, threads: int, precision: str, memory_mode: int,
                       cache_file: str | None) -> RuntimeConfig:
        """WAN:37-72: StableDiffusion::load()'s settings."""
        return winograd_runtime_config(backend, threads, precision, memory_mode, cache_file)


STEPS = WanSteps()
