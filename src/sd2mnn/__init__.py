"""sd2mnn: turn a Stable Diffusion ONNX pipeline into a verified MNN deployment bundle.

    import sd2mnn
    report = sd2mnn.convert("onnx/", "mnn/", weight_quant_bits=8)
    image = sd2mnn.Pipeline("mnn/").generate("a photo of a cat", seed=42)
"""
from __future__ import annotations

from sd2mnn._version import __version__
from sd2mnn.conversion import ConversionReport, convert
from sd2mnn.errors import Sd2MnnError
from sd2mnn.plan import ConvertOptions

__all__ = ["__version__", "convert", "ConvertOptions", "ConversionReport", "Pipeline", "Sd2MnnError"]


def __getattr__(name: str):
    # Pipeline is imported on first use, so `import sd2mnn` stays light.
    if name == "Pipeline":
        from sd2mnn.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sd2mnn' has no attribute {name!r}")
