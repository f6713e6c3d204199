"""PNDM in PLMS mode, exactly as MNN's C++ diffusion runtime runs it, in numpy float32.

Read against MNN ``transformers/diffusion/engine/src/``:

* ``scheduler.cpp`` ``PNDMScheduler::PNDMScheduler()``: ``alphas_cumprod`` from a float32
  ``linspace`` of sqrt(beta), ``1 - b*b``, a float32 running product;
* ``stable_diffusion.cpp`` ``StableDiffusion::run()``: the step-count clamp and the timesteps
  ``1 + (N-1-i) * (1000 / N)``;
* ``stable_diffusion.cpp`` ``StableDiffusion::step_plms()``: one PLMS update per UNet call.

Every scalar is a float32 computed in the C++'s order (numpy float32 scalars and arrays round
each operation to float32, as the C++ ``float`` arithmetic and MNN's float32 CPU ops do). The
x86-64 build with default flags has no FMA instructions, so nothing is fused: ``fma=False``.
A build that fuses ``a*b + c`` (clang on aarch64, i.e. Android/iOS/Apple silicon, or x86-64
with ``-mfma``) computes ``start + i * step``, ``1 - beta * beta`` and the ``denom`` expression
as fused multiply-adds: 206 of the 1000 ``alphas_cumprod`` move by an ulp or so. ``fma=True``
reproduces that (the tensor arithmetic is MNN ops, never fused).

How this differs from diffusers' ``PNDMScheduler(skip_prk_steps=True, steps_offset=1,
set_alpha_to_one=False)`` (tests/test_scheduler.py checks each point):

* diffusers runs N+1 UNet calls for N steps: its timesteps repeat the second one
  (``[t0, t1, t1, t2, ..., t_{N-1}]``), so the PLMS "second step" (index 1, which redoes step 0
  with the averaged noise) is followed by a UNet call at the same noise level ``t1``. MNN makes
  N calls at ``[t0, t1, t2, ..., t_{N-1}]``: after its index-1 step the sample is at level
  ``t1``, but the index-2 step treats it as being at ``t2``. One interval of the schedule is
  skipped; for N=2 the final sample is left at level ``alphas_cumprod[1]``, not ``[0]``.
  diffusers fed MNN's timesteps through ``step()`` runs MNN's algorithm (same arithmetic).
* The timestep values themselves are the same as diffusers' "leading" spacing with
  ``steps_offset=1``: ``1 + k * (1000 // N)``.
* The last step goes to ``alphas_cumprod[0]`` in both (diffusers: ``final_alpha_cumprod`` with
  ``set_alpha_to_one=False``; MNN: ``prev_timestep = 0``).
* diffusers builds ``alphas_cumprod`` with ``torch.linspace`` of binary64 square roots (torch
  fills the second half of a linspace from the end) and ``torch.cumprod``: 976 of the 1000 values
  differ from MNN's, by up to 21 ulps (1.3e-6 relative). diffusers
  computes ``(a_prev - a_t) * eps / denom``, MNN ``((a_prev - a_t) / denom) * eps``, and divides by
  12 where MNN multiplies by ``float(1/12)``. Trajectories agree to float32 rounding, not bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sd2mnn.generation.noise import fma_f32

NUM_TRAIN_TIMESTEPS = 1000  # scheduler.hpp mTrainTimestepsNum
BETA_START = 0.00085  # scheduler.hpp mBetaStart (a float)
BETA_END = 0.012  # scheduler.hpp mBetaEnd (a float)
MIN_STEPS = 1
MAX_STEPS = 50

_F = np.float32


def clamp_steps(requested: int) -> int:
    """The step count MNN's ``StableDiffusion::run()`` actually uses for ``requested``.

    ``> 50`` becomes 50 and ``< 1`` becomes 10 (not 1), each with a printed warning in the C++.
    The CLI rejects such values instead; this is the rule it can quote.
    """
    if requested > MAX_STEPS:
        return MAX_STEPS
    if requested < MIN_STEPS:
        return 10
    return requested


def mnn_timesteps(num_inference_steps: int) -> np.ndarray:
    """``mTimeSteps[i] = 1 + (N - 1 - i) * (1000 / N)`` (integer division), descending, int32.

    For N=20: 951, 901, ..., 51, 1. The UNet's ``timestep`` input at call i is ``timesteps[i]``.
    """
    n = _check_steps(num_inference_steps)
    step = NUM_TRAIN_TIMESTEPS // n
    return np.array([1 + (n - 1 - i) * step for i in range(n)], dtype=np.int32)


def alphas_cumprod(fma: bool = False) -> np.ndarray:
    """``PNDMScheduler::mAlphasCumProd`` (scheduler.cpp), float32, 1000 values, bit for bit.

    ``fma``: whether the C++ was compiled to fuse ``a*b + c`` (see the module docstring).
    """
    # linspace(std::sqrt(mBetaStart), std::sqrt(mBetaEnd), 1000): all float arithmetic.
    start = np.sqrt(_F(BETA_START))
    end = np.sqrt(_F(BETA_END))
    step = (end - start) / _F(NUM_TRAIN_TIMESTEPS - 1)
    i = np.arange(NUM_TRAIN_TIMESTEPS, dtype=np.float32)
    # result[i] = start + i * step; then "beta = 1 - beta * beta" (the vector now holds alphas).
    if fma:
        betas = fma_f32(i, step, start)
        alphas = fma_f32(-betas, betas, _F(1))
    else:
        betas = start + i * step
        alphas = _F(1) - betas * betas
    # cumulative_product: result[i] = result[i - 1] * input[i], sequentially in float32.
    return np.multiply.accumulate(alphas, dtype=np.float32)


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one ``step_plms`` call: prev_sample = sample_coeff * sample - model_output_coeff * eps."""

    timestep: int
    prev_timestep: int
    alpha_prod_t: np.float32
    alpha_prod_t_prev: np.float32
    sample_coeff: np.float32
    model_output_coeff: np.float32


@dataclass(eq=False)
class PLMSScheduler:
    """MNN's ``step_plms`` state machine for one run of ``num_inference_steps`` UNet calls.

    Call ``step(eps, i, sample)`` for i = 0, 1, ..., N-1 in order, with ``eps`` the guided UNet
    output at ``timesteps[i]`` and ``sample`` the previous step's result (the initial noise for
    i=0). A new run takes a new scheduler (the C++ clears ``mEts`` at the top of ``run()``).
    """

    num_inference_steps: int
    fma: bool = False  # the C++ build fuses a*b + c (see the module docstring)
    timesteps: np.ndarray = field(init=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    _ets: list = field(init=False, repr=False, default_factory=list)
    _sample0: np.ndarray | None = field(init=False, repr=False, default=None)
    _next_index: int = field(init=False, repr=False, default=0)

    def __post_init__(self):
        _check_steps(self.num_inference_steps)
        self.timesteps = mnn_timesteps(self.num_inference_steps)
        self.alphas_cumprod = alphas_cumprod(self.fma)

    def coefficients(self, index: int) -> StepCoefficients:
        """The timesteps and float32 scalars ``step_plms`` uses at ``index`` (no state touched)."""
        timesteps = self.timesteps
        if not 0 <= index < len(timesteps):
            raise IndexError(f"step index {index} outside 0..{len(timesteps) - 1}")
        timestep = int(timesteps[index])
        prev_timestep = int(timesteps[index + 1]) if index + 1 < len(timesteps) else 0
        if index == 1:
            # The second call redoes step 0 (t0 -> t1) with the averaged noise.
            timestep, prev_timestep = int(timesteps[0]), int(timesteps[1])
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep]  # [0] at the end, not 1.0
        beta_prod_t = _F(1) - alpha_prod_t
        beta_prod_t_prev = _F(1) - alpha_prod_t_prev
        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        if self.fma:
            model_output_denom_coeff = fma_f32(
                alpha_prod_t, np.sqrt(beta_prod_t_prev), np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
            )[()]
        else:
            model_output_denom_coeff = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(
                alpha_prod_t * beta_prod_t * alpha_prod_t_prev
            )
        model_output_coeff = (alpha_prod_t_prev - alpha_prod_t) / model_output_denom_coeff
        return StepCoefficients(
            timestep, prev_timestep, alpha_prod_t, alpha_prod_t_prev, sample_coeff, model_output_coeff
        )

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """One ``StableDiffusion::step_plms(sample, model_output, index)``; returns prev_sample."""
        if index != self._next_index:
            raise ValueError(
                f"step index {index} out of order: expected {self._next_index} (a new run takes a new scheduler)"
            )
        coeffs = self.coefficients(index)  # raises past the last index
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        if index != 1:
            # mEts keeps every output but nulls all but the last four: a ring of four.
            self._ets = self._ets[-3:] + [model_output]
        ets = self._ets
        n = len(ets) - 1  # the C++ "int ets = mEts.size() - 1"
        if index == 0:
            self._sample0 = sample
        elif index == 1:
            model_output = (model_output + ets[n]) * _F(0.5)
            sample = self._sample0
        elif n == 1:
            model_output = (_F(3.0) * ets[n] - ets[n - 1]) * _F(0.5)
        elif n == 2:
            model_output = (_F(23.0) * ets[n] - _F(16.0) * ets[n - 1] + _F(5.0) * ets[n - 2]) * _F(1.0 / 12.0)
        else:  # Adams-Bashforth, 4th order
            model_output = _F(1.0 / 24.0) * (
                _F(55.0) * ets[n] - _F(59.0) * ets[n - 1] + _F(37.0) * ets[n - 2] - _F(9.0) * ets[n - 3]
            )
        self._next_index += 1
        return coeffs.sample_coeff * sample - coeffs.model_output_coeff * model_output


def _check_steps(num_inference_steps: int) -> int:
    n = int(num_inference_steps)
    if n != num_inference_steps or not MIN_STEPS <= n <= MAX_STEPS:
        raise ValueError(
            f"num_inference_steps must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {num_inference_steps!r}"
            f" (MNN's runtime would use {clamp_steps(n)})"
        )
    return n
