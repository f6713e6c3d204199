"""sd2mnn: turn a Stable Diffusion ONNX pipeline into a verified MNN deployment bundle.

    import sd2mnn
    report = sd2mnn.convert("onnx/", "mnn/", weight_quant_bits=8)
"""
from __future__ import annotations

__version__ = "0.1.0"

from sd2mnn.conversion import ConversionReport, convert
from sd2mnn.errors import Sd2MnnError
from sd2mnn.plan import ConvertOptions

__all__ = ["__version__", "convert", "ConvertOptions", "ConversionReport", "Sd2MnnError"]
