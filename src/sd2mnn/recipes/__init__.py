"""What each family's runtime does between the tokenizer and the VAE decoder, as functions of
numpy arrays. The engine (sd2mnn.pipeline.Pipeline) runs the same steps for every family: encode
the prompt, draw noise, step the denoiser with classifier-free guidance, decode. What differs is
here, one module per MNN runtime:

    stable_diffusion.py  SD1.5 and Taiyi (stable_diffusion.cpp): one text encoder, a unet
    sd35.py              SD3.5 (diffusion_sd35.cpp): three text encoders joined, an MMDiT

Each module defines a ``Steps`` object with:

    condition(outputs, shapes, files) -> the denoiser's text feeds, from each text encoder's outputs
    denoiser_feeds(latent, timestep, text_feeds) -> the denoiser's inputs for one call
    contract_notes(inputs, outputs, files) -> what MNN's runtime would refuse in the models' shapes
"""
from __future__ import annotations

from sd2mnn.families import Family


def steps_for(family: Family):
    """The runtime steps of ``family``."""
    if family.denoiser == "transformer":
        from sd2mnn.recipes.sd35 import STEPS
    else:
        from sd2mnn.recipes.stable_diffusion import STEPS
    return STEPS
