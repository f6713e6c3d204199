"""SD1.5 and Taiyi: the steps of MNN's ``StableDiffusion`` runtime between the text encoder and
the VAE decoder (transformers/diffusion/engine/src/stable_diffusion.cpp, MNN 3.6.1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sd2mnn.core.runtime import (DYNAMIC_QUANT_OPTIONS, MNN_GPU_MEMORY_BUFFER, MNN_GPU_TUNING_FAST,
                                 WINOGRAD_MEMORY_LEVEL, RuntimeConfig)
from sd2mnn.recipes.lifetime import KEEP_ALL, ModelLifetime


def unet_feeds(latent: np.ndarray, timestep: int, text_embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """``mSampleVar = _Concat({plms, plms}, 0)``; the timestep goes through a float and
    ``_Cast<int>`` into an int32 tensor of shape [1]."""
    return {
        "sample": np.concatenate([latent, latent], axis=0),
        "timestep": np.array([timestep], dtype=np.float32).astype(np.int32),
        "encoder_hidden_states": text_embeddings,
    }


@dataclass(frozen=True)
class StableDiffusionSteps:
    latent_input: str = "sample"  # the unet input that holds the latents

    def condition(self, outputs: dict[str, dict[str, np.ndarray]], shapes,
                  files: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        """text_encoder(): outputs[0] of {"last_hidden_state", "pooler_output"} conditions the unet."""
        return {"encoder_hidden_states": outputs["text_encoder"]["last_hidden_state"]}

    def denoiser_feeds(self, latent: np.ndarray, timestep, text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return unet_feeds(latent, int(timestep), text["encoder_hidden_states"])

    def contract_notes(self, shapes: dict[str, dict[str, list[int]]], outputs, files: dict[str, str],
                       family) -> list[str]:
        """sd2mnn.core.contract's rules (stable_diffusion.cpp's fixed shapes) over the loaded inputs."""
        from sd2mnn.core.contract import check_tensors, runtime_notes

        def dtype(tensor: str) -> str:
            return "int32" if tensor in ("input_ids", "timestep") else "float32"  # as sd2mnn feeds them

        infos = {name: {"inputs": list(s), "tensors": {t: {"shape": d, "dtype": dtype(t)} for t, d in s.items()}}
                 for name, s in shapes.items()}
        return runtime_notes(check_tensors(infos, family, files, complete=False))

    def model_lifetime(self, memory_mode: int) -> ModelLifetime:
        """The three models loaded up front and kept, whatever the mode. (stable_diffusion.cpp's
        load() also loads all three; in modes 0 and 2 it then frees each after its stage.)"""
        return KEEP_ALL

    def runtime_config(self, backend: str, threads: int, precision: str, memory_mode: int,
                       cache_file: str | None) -> RuntimeConfig:
        return winograd_runtime_config(backend, threads, precision, memory_mode, cache_file)


def winograd_runtime_config(backend: str, threads: int, precision: str, memory_mode: int,
                            cache_file: str | None) -> RuntimeConfig:
    """``StableDiffusion::load()`` (and ``WanDiffusion::load()``, the same settings): CPU with
    DYNAMIC_QUANT_OPTIONS 2 (int8 weights), the Winograd level that ``memory_mode`` is in these
    runtimes (0: off, 1: MNN's default, 2: level 1); on OpenCL, buffer memory with fast tuning;
    one thread on the other backends."""
    winograd_level = memory_mode
    hints = []
    if winograd_level == 2:
        hints.append((WINOGRAD_MEMORY_LEVEL, 1))
    backend = backend.upper()
    if backend == "CPU":
        hints.append((DYNAMIC_QUANT_OPTIONS, 2))
    elif backend == "OPENCL":
        threads = MNN_GPU_MEMORY_BUFFER | MNN_GPU_TUNING_FAST  # load(): config.mode for OpenCL
    else:
        threads = 1  # load(): "config.numThread = 1" for the other backends
    return RuntimeConfig(backend=backend, threads=threads, precision=precision, memory="low",
                         cache_file=cache_file, winograd=winograd_level != 0, hints=tuple(hints))


STEPS = StableDiffusionSteps()
