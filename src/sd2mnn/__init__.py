"""sd2mnn: turn a Stable Diffusion pipeline into a verified MNN deployment bundle.

    import sd2mnn
    report = sd2mnn.convert("onnx/", "mnn/", weight_quant_bits=8)
    print(sd2mnn.verify("onnx/", "mnn/").passed)
    image = sd2mnn.Pipeline("mnn/").generate("a photo of a cat", seed=42)

The engines live one package each: conversion/, verification/, generation/, exporting/,
measurement/ (bench, sweep), quantization/ (bits per layer); what a model family brings in families/, recipes/, exporters/,
schedulers/ and tokenization/; what they share in core/; the command line in cli/.
"""
from __future__ import annotations

import importlib

from sd2mnn._version import __version__
from sd2mnn.conversion.convert import ConversionReport, convert
from sd2mnn.conversion.plan import ConvertOptions
from sd2mnn.errors import Sd2MnnError

# Imported on first use, so that `import sd2mnn` stays light (no numpy/MNN/ONNX Runtime load).
_LAZY = {
    "Pipeline": "sd2mnn.generation.pipeline",
    "verify": "sd2mnn.verification.verify",
    "export": "sd2mnn.exporting.export",
    "ExportOptions": "sd2mnn.exporting.export",
    "Lora": "sd2mnn.exporting.lora",
    "bench": "sd2mnn.measurement.bench",
    "sweep": "sd2mnn.measurement.sweep",
    "PromptIds": "sd2mnn.tokenization.prompt_ids",
    "quantize": "sd2mnn.quantization.quantize",
    "QuantizeOptions": "sd2mnn.quantization.quantize",
}

__all__ = ["__version__", "convert", "ConvertOptions", "ConversionReport", "Sd2MnnError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd2mnn' has no attribute {name!r}")
