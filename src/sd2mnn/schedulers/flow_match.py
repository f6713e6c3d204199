"""Flow-matching Euler, exactly as MNN 3.6.1's SD3.5 runtime runs it, in numpy float32.

Read against MNN ``transformers/diffusion/engine/src/diffusion_sd35.cpp``:

* ``DiffusionSD35::run()``: for N > 1, ``t = 1 + i * (0.001 - 1) / (N - 1)`` (a float linspace
  from 1 to 1/1000), shifted ``3t / (1 + 2t)``, times 1000, stored in ``std::vector<int>
  mTimeSteps``: truncated to an integer. N = 1 is ``[1000]``. The transformer's ``timestep``
  input at call i is that integer, as a float.
* ``DiffusionSD35::step_flow_match()``: ``sigma = mTimeSteps[i] / 1000``, ``sigma_next`` the
  next one's (0 after the last), ``x_next = x + v * (sigma_next - sigma)``.

How this differs from diffusers' ``FlowMatchEulerDiscreteScheduler(shift=3.0)``
(tests/test_schedulers.py checks each point):

* diffusers shifts the end of its schedule twice: its ``sigma_min`` is the shifted 1/1000, and
  ``set_timesteps`` shifts ``linspace(1, sigma_min, N)`` again, so its last sigma is about
  0.0089 where MNN's is ``int(1000 * shift(0.001)) / 1000 = 0.002``. The first sigma (1) and the
  final 0 agree; the ones between differ by the truncation and the endpoint.
* diffusers feeds the transformer ``sigma * 1000`` as a float (857.69...); MNN the truncated
  integer (857).

``FlowMatchEulerScheduler(n, rule="diffusers")`` runs diffusers' schedule instead (its float32
and float64 arithmetic reproduced, so the sigmas are diffusers' bit for bit), to draw SD3.5 as
diffusers does and measure what the runtime's rule costs (benchmarks/sd35_recipe_fidelity.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sd2mnn.schedulers.plms import MAX_STEPS, MIN_STEPS

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0  # DiffusionSD35::run() "float shift = 3.0f"

_F = np.float32


def _check_steps(num_inference_steps) -> int:
    n = int(num_inference_steps)
    if n != num_inference_steps or not MIN_STEPS <= n <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {num_inference_steps!r}")
    return n


def _shifted_timesteps(n: int, shift: float) -> list[np.float32]:
    """``1000 * shift(t)`` for t a float32 linspace from 1 to 1/1000, as both runtimes compute it."""
    if n == 1:
        return [_F(NUM_TRAIN_TIMESTEPS)]
    start, end, shift = _F(1.0), _F(1.0) / _F(1000.0), _F(shift)
    out = []
    for i in range(n):
        t_linear = start + _F(i) * (end - start) / _F(n - 1)
        t_shifted = (shift * t_linear) / (_F(1.0) + (shift - _F(1.0)) * t_linear)
        out.append(t_shifted * _F(1000.0))
    return out


def sd35_timesteps(num_inference_steps: int, shift: float = SHIFT) -> np.ndarray:
    """``mTimeSteps``: int32, descending, one per transformer call."""
    # float -> int conversion truncates toward 0
    return np.array([int(t) for t in _shifted_timesteps(_check_steps(num_inference_steps), shift)], dtype=np.int32)


def wan_timesteps(num_inference_steps: int, shift: float = SHIFT) -> np.ndarray:
    """MNN's Wan runtime's ``mTimesteps`` (wan_diffusion.cpp runVideo): the same shifted linspace,
    kept as float32."""
    return np.array(_shifted_timesteps(_check_steps(num_inference_steps), shift), dtype=np.float32)


def diffusers_sigmas(num_inference_steps: int, shift: float = SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` after
    ``set_timesteps(N)``: float32, the timesteps ``1000 * sigma``, N + 1 sigmas ending in 0.

    ``__init__``: float32 ``linspace(1, 1000, 1000)`` reversed, / 1000, shifted in float32; its
    last and first values are ``sigma_min`` and ``sigma_max``. ``set_timesteps``: a float64
    ``linspace(1000 * sigma_max, 1000 * sigma_min, N)`` / 1000, shifted again in float64, then
    float32."""
    n = _check_steps(num_inference_steps)
    train = np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1] / _F(NUM_TRAIN_TIMESTEPS)
    train = _F(shift) * train / (_F(1) + _F(shift - 1) * train)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, n) / NUM_TRAIN_TIMESTEPS
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    return sigmas * _F(NUM_TRAIN_TIMESTEPS), np.append(sigmas, _F(0)).astype(np.float32)


RULES = ("mnn", "diffusers", "wan")


@dataclass(eq=False)
class FlowMatchEulerScheduler:
    """``step_flow_match`` for one run of ``num_inference_steps`` transformer calls.

    Call ``step(v, i, sample)`` for i = 0, ..., N-1, with ``v`` the guided transformer output at
    ``timesteps[i]``. ``rule``: "mnn" (the SD3.5 runtime's int32 timesteps), "diffusers" (float32)
    or "wan" (the Wan runtime's float32 timesteps, each step ``x + v * ((t_next - t) / 1000)``)."""

    num_inference_steps: int
    shift: float = SHIFT
    rule: str = "mnn"
    timesteps: np.ndarray = field(init=False)
    sigmas: np.ndarray = field(init=False, repr=False)  # N + 1 float32 values, the last 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.rule == "diffusers":
            self.timesteps, self.sigmas = diffusers_sigmas(self.num_inference_steps, self.shift)
            return
        if self.rule == "wan":
            self.timesteps = wan_timesteps(self.num_inference_steps, self.shift)
            self.sigmas = np.append(self.timesteps, _F(0.0)).astype(np.float32) / _F(1000.0)
            return
        self.timesteps = sd35_timesteps(self.num_inference_steps, self.shift)
        self.sigmas = np.append(self.timesteps.astype(np.float32) / _F(1000.0), _F(0.0)).astype(np.float32)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """``x + v * (sigma_next - sigma)``, each operation rounded to float32."""
        if not 0 <= index < len(self.timesteps):
            raise IndexError(f"step index {index} outside 0..{len(self.timesteps) - 1}")
        if self.rule == "wan":  # wan_diffusion.cpp stepFlowMatch: the difference of timesteps, over 1000
            following = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else _F(0.0)
            dt = (following - self.timesteps[index]) / _F(1000.0)
        else:
            dt = self.sigmas[index + 1] - self.sigmas[index]
        model_output = np.asarray(model_output, dtype=np.float32)
        return np.asarray(sample, dtype=np.float32) + model_output * dt
