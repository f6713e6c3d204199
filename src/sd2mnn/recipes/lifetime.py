"""When a runtime holds its models (each recipe module's ``model_lifetime(memory_mode)`` answers with one)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelLifetime:
    """When a runtime holds its models. ``at_start``: all are loaded before the first prompt
    (in ``load()``); else each just before its first use. ``release_after_use``: each is freed
    once its stage is done (so loaded again for the next prompt); else kept to the end."""

    at_start: bool
    release_after_use: bool


# Every model loaded up front and kept: ONNX Runtime's sessions, and sd2mnn's SD1.x engine.
KEEP_ALL = ModelLifetime(at_start=True, release_after_use=False)
