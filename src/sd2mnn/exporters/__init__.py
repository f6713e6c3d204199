"""Each family's exporter: the torch modules that give its ONNX graphs the tensors MNN's runtime
loads, their dummy inputs and the memory their export needs (as optimum keeps one OnnxConfig per
architecture, found by name). ``sd2mnn.exporting.export`` runs the same steps for every family and asks
the exporter of the family (``Family.exporter_module``, imported by that name) for these:

    order        the components in export order
    jobs         component -> (source, options, text length, torch generator) -> Job
    terms        component -> MemoryTerms (attention, feature maps, folded constants), bytes
    size_step    (denoiser config, VAE factor) -> what the image size must be a multiple of
    text_lengths (source folder) -> a component's text length beyond its tokenizer's
    tokenizer_fix what to do about a missing tokenizer folder ("": the family needs it)
    check_folder (source folder) -> None; raises InputError for a model its runtime cannot run
    free_dims    component -> input -> {axis: name}: dimensions the graph declares symbolic
    lora_loader  the diffusers LoRA loader mixin its pipeline class uses (sd2mnn.exporting.lora)

    stable_diffusion.py  SD1.5 and Taiyi (MNN's onnx_export.py)
    sd35.py              SD3.5 (diffusion_sd35.cpp's tensors)
    wan.py               Wan2.1 (wan_diffusion.cpp's tensors, diffusers' WanPipeline's values)
    vae.py               the VAE's and the text encoders' parts both share

Torch is imported inside the job builders only: looking an exporter up needs no export extra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Callable

from sd2mnn.families import Family


@dataclass(frozen=True)
class MemoryTerms:
    """What one component's export holds beside its weights, in bytes: one attention score matrix
    (the check keeps it and its softmax), the widest feature map, and weights torch folds into a
    constant that is not exported."""

    attention: int
    activation: int
    folded: int = 0
    # What torch's export and ONNX Runtime's check hold beyond the copies the estimate counts for
    # every model, where measured to matter (Wan2.1's UMT5 embedding table, its transformer).
    export_extra: int = 0
    check_extra: int = 0


# (folder, component, latent height, latent width, height, width, text length) -> MemoryTerms
TermsOf = Callable[[Path, str, int, int, int, int, int], MemoryTerms]


@dataclass(frozen=True)
class Exporter:
    order: tuple[str, ...]
    jobs: dict[str, Callable]
    terms: dict[str, TermsOf]
    size_step: Callable[[dict, int], int]
    text_lengths: Callable[[Path], dict[str, int]] = field(default=lambda folder: {})
    tokenizer_fix: str = ""
    check_folder: Callable[[Path], None] = field(default=lambda folder: None)
    free_dims: dict[str, dict[str, dict[int, str]]] = field(default_factory=dict)
    lora_loader: str = "StableDiffusionLoraLoaderMixin"


def exporter_for(family: Family) -> Exporter:
    """The exporter of ``family``."""
    return import_module(family.exporter_module).EXPORTER
