"""What each family's runtime does between the tokenizer and the VAE decoder, as functions of
numpy arrays. The engine (sd2mnn.generation.pipeline.Pipeline) runs the same steps for every family: encode
the prompt, draw noise, step the denoiser with classifier-free guidance, decode. What differs is
here, one module per MNN runtime:

    stable_diffusion.py  SD1.5 and Taiyi (stable_diffusion.cpp): one text encoder, a unet
    sd35.py              SD3.5 (diffusion_sd35.cpp): three text encoders joined, an MMDiT

Each module defines a ``Steps`` object with:

    condition(outputs, shapes, files) -> the denoiser's text feeds, from each text encoder's outputs
    denoiser_feeds(latent, timestep, text_feeds) -> the denoiser's inputs for one call
    contract_notes(inputs, outputs, files, family) -> what MNN's runtime would refuse in the models' shapes
    model_lifetime(memory_mode) -> ModelLifetime: when the runtime loads its models and frees them
    runtime_config(backend, threads, precision, memory_mode, cache_file) -> the runtime's RuntimeConfig

``memory_mode`` is the C++ demos' argument of that name; each family's runtime reads it as its own
setting, and its recipe names that setting: SD1.x's is a Winograd level (runtime_config), SD3.5's a
model lifetime (model_lifetime).

The family names its module (Family.steps_module); ``steps_for`` imports it by that name.
"""
from __future__ import annotations

from importlib import import_module

from sd2mnn.errors import InputError
from sd2mnn.families import Family
from sd2mnn.recipes.lifetime import KEEP_ALL, ModelLifetime

__all__ = ["KEEP_ALL", "MEMORY_MODES", "ModelLifetime", "steps_for"]

MEMORY_MODES = (0, 1, 2)  # diffusion_demo's and diffusion_sd35_demo's memory_mode argument


def steps_for(family: Family):
    """The runtime steps of ``family``; an InputError for a family sd2mnn does not draw with."""
    if not family.steps_module:
        raise InputError(f"sd2mnn cannot draw with {family.title or family.name} bundles in Python yet; "
                         "run MNN's own demo on the bundle")
    return import_module(family.steps_module).STEPS
