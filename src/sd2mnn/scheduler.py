"""Kept importable: the PLMS scheduler now lives in sd2mnn.schedulers.plms."""
from sd2mnn.schedulers.plms import (
    BETA_END,
    BETA_START,
    MAX_STEPS,
    MIN_STEPS,
    NUM_TRAIN_TIMESTEPS,
    PLMSScheduler,
    StepCoefficients,
    alphas_cumprod,
    clamp_steps,
    mnn_timesteps,
)

__all__ = ["BETA_END", "BETA_START", "MAX_STEPS", "MIN_STEPS", "NUM_TRAIN_TIMESTEPS", "PLMSScheduler",
           "StepCoefficients", "alphas_cumprod", "clamp_steps", "mnn_timesteps"]
