"""The denoising schedulers MNN's diffusion runtimes use, one file each, behind one interface:

    scheduler.timesteps                       what the denoiser is fed at call i (int32)
    scheduler.step(model_output, i, sample)   the sample after call i

    plms.py        PNDM in PLMS mode (SD1.5, Taiyi: stable_diffusion.cpp step_plms)
    flow_match.py  flow-matching Euler (SD3.5: diffusion_sd35.cpp step_flow_match; Wan:
                   wan_diffusion.cpp stepFlowMatch), and diffusers' rule for SD3.5
    unipc.py       UniPC on flow sigmas (diffusers' WanPipeline, not MNN's runtime)

A family names its scheduler (sd2mnn.families.Recipe.scheduler, and diffusers' in
``diffusers_scheduler``); ``make`` builds it.
"""
from __future__ import annotations

from functools import partial
from typing import Protocol

import numpy as np

from sd2mnn.schedulers.flow_match import FlowMatchEulerScheduler
from sd2mnn.schedulers.plms import MAX_STEPS, MIN_STEPS, PLMSScheduler, clamp_steps
from sd2mnn.schedulers.unipc import UniPCFlowScheduler

SCHEDULERS = {"plms": PLMSScheduler, "flow_match_euler": FlowMatchEulerScheduler,
              "wan_flow_match_euler": partial(FlowMatchEulerScheduler, rule="wan"),
              "flow_match_euler_diffusers": partial(FlowMatchEulerScheduler, rule="diffusers"),
              "unipc_flow": UniPCFlowScheduler}

__all__ = ["FlowMatchEulerScheduler", "MAX_STEPS", "MIN_STEPS", "PLMSScheduler", "SCHEDULERS", "Scheduler",
           "UniPCFlowScheduler", "clamp_steps", "make"]


class Scheduler(Protocol):
    timesteps: np.ndarray

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray: ...


def make(name: str, num_inference_steps: int) -> Scheduler:
    """The scheduler a family's recipe names, for one run of ``num_inference_steps`` calls."""
    return SCHEDULERS[name](num_inference_steps)
