"""UniPC on flow sigmas, as diffusers' WanPipeline steps Wan2.1, in numpy float32.

MNN's Wan runtime steps with flow-match Euler (sd2mnn.schedulers.flow_match, rule "wan"); diffusers'
Wan2.1 pipelines ship ``UniPCMultistepScheduler`` configured as below (Wan2.1-T2V-1.3B-Diffusers'
scheduler_config.json). This is that scheduler for that configuration only, read from diffusers
0.42's scheduling_unipc_multistep.py, so ``generate --schedule diffusers`` draws what diffusers
draws and the runtime's departure can be measured (tests/test_wan.py checks it against diffusers):

* ``set_timesteps(N)``: float64 ``linspace(1, 1/1000, N + 1)[:-1]`` shifted ``3s / (1 + 2s)``, the
  first lowered by 1e-6; timesteps ``int64(1000 * sigma)``; sigmas float32 with a final 0.
* ``step``: the model's flow velocity becomes a data prediction ``x0 = x - sigma * v``; a UniC
  corrector (from the second step) then a UniP predictor, both B(h) = expm1(-h) ("bh2") of order
  up to 2, order 1 on the first and the last step ("lower_order_final").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sd2mnn.schedulers.flow_match import NUM_TRAIN_TIMESTEPS, _check_steps

FLOW_SHIFT = 3.0  # Wan2.1-T2V-1.3B-Diffusers: scheduler_config.json "flow_shift"
SOLVER_ORDER = 2

_F = np.float32


def unipc_flow_sigmas(num_inference_steps: int, shift: float = FLOW_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64, N + 1 float32 sigmas ending in 0) of ``set_timesteps(N)``."""
    n = _check_steps(num_inference_steps)
    sigmas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, n + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:  # diffusers: keeps log(alpha) finite in the first updates
        sigmas[0] -= 1e-6
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    return timesteps, np.append(sigmas, 0.0).astype(np.float32)


def _lambda(sigma: np.float32) -> np.float32:
    # log(alpha) - log(sigma) with alpha = 1 - sigma; +inf at sigma 0 (the last step's target).
    with np.errstate(divide="ignore"):
        return np.log(_F(1) - sigma) - np.log(sigma)


def _coefficients(rks: list, hh: np.float32, order: int) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's R (powers of the step ratios) and b (phi functions over B(h)), bh2."""
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - _F(1)
    b_h, factorial = np.expm1(hh), 1
    r, b = [], []
    ratios = np.array([*rks, _F(1)], dtype=np.float32)
    for i in range(1, order + 1):
        r.append(ratios ** (i - 1))
        b.append(h_phi_k * _F(factorial) / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - _F(1) / _F(factorial)
    return np.stack(r).astype(np.float32), np.array(b, dtype=np.float32)


@dataclass(eq=False)
class UniPCFlowScheduler:
    """diffusers' ``UniPCMultistepScheduler`` (flow sigmas, flow prediction, predict_x0, bh2,
    order 2, lower_order_final) for one run of ``num_inference_steps`` calls; ``step(v, i,
    sample)`` for i = 0, ..., N-1 in order (it keeps the last predictions)."""

    num_inference_steps: int
    shift: float = FLOW_SHIFT
    timesteps: np.ndarray = field(init=False)
    sigmas: np.ndarray = field(init=False, repr=False)
    _predictions: list = field(init=False, default_factory=list, repr=False)  # x0 of the last SOLVER_ORDER steps
    _last_sample: np.ndarray | None = field(init=False, default=None, repr=False)
    _order: int = field(init=False, default=1, repr=False)
    _next: int = field(init=False, default=0, repr=False)

    def __post_init__(self):
        self.timesteps, self.sigmas = unipc_flow_sigmas(self.num_inference_steps, self.shift)

    def _update(self, x: np.ndarray, target: int, source: int, order: int,
                new_prediction: np.ndarray | None = None) -> np.ndarray:
        """From ``x`` at sigma[source] to sigma[target]: the predictor (``new_prediction`` None)
        or the corrector, which also uses the prediction made at sigma[target]."""
        sigma_t, sigma_s0 = self.sigmas[target], self.sigmas[source]
        alpha_t = _F(1) - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        m0 = self._predictions[-1]
        rks, differences = [], []
        for i in range(1, order):
            earlier = source - i
            rk = (_lambda(self.sigmas[earlier]) - lambda_s0) / h
            rks.append(rk)
            differences.append((self._predictions[-(i + 1)] - m0) / rk)
        hh = -h
        h_phi_1 = b_h = np.expm1(hh)  # bh2: B(h) = expm1(-h), as h * phi_1
        x_t = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
        if new_prediction is None:  # UniP: rho 0.5 at order 2 (diffusers' shortcut)
            if differences:
                x_t = x_t - (alpha_t * b_h) * (_F(0.5) * differences[0])
            return x_t.astype(np.float32)
        rhos = np.array([0.5], dtype=np.float32) if order == 1 else \
            np.linalg.solve(*_coefficients(rks, hh, order)).astype(np.float32)
        correction = sum((rho * d for rho, d in zip(rhos[:-1], differences)), np.zeros_like(x))
        return (x_t - (alpha_t * b_h) * (correction + rhos[-1] * (new_prediction - m0))).astype(np.float32)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        if not 0 <= index < len(self.timesteps):
            raise IndexError(f"step index {index} outside 0..{len(self.timesteps) - 1}")
        if index != self._next:  # the corrector and the predictor use the steps before
            raise ValueError(f"UniPCFlowScheduler steps in order from 0: step {self._next} is next, not {index}")
        self._next += 1
        sample = np.asarray(sample, dtype=np.float32)
        prediction = (sample - self.sigmas[index] * np.asarray(model_output, dtype=np.float32)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):  # the last step's lambda is +inf
            if index > 0 and self._last_sample is not None:
                sample = self._update(self._last_sample, index, index - 1, self._order, prediction)
            self._predictions = [*self._predictions, prediction][-SOLVER_ORDER:]
            order = min(SOLVER_ORDER, len(self.timesteps) - index)  # lower_order_final
            self._order = min(order, index + 1)  # warm-up: order 1 on the first step
            self._last_sample = sample
            return self._update(sample, index + 1, index, self._order)
