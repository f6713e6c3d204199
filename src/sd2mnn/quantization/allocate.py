"""Bits per layer: the fewest bytes whose predicted output noise stays within a budget.

Each layer has a few settings (bytes stored, predicted noise: sd2mnn.quantization.sensitivity);
the component's noise is about the sum of its layers'. Starting from every layer at its most
precise setting, the step with the least noise per byte saved is taken next, while the sum
stays within the budget: the classic greedy for a multiple-choice knapsack, exact on each
layer's lower convex hull of (bytes, noise).
"""
from __future__ import annotations

from dataclasses import dataclass

from sd2mnn.quantization.compression import LayerBits, OnnxLayer
from sd2mnn.quantization.fake_quant import stored_bytes
from sd2mnn.quantization.sensitivity import LayerCost


@dataclass(frozen=True)
class Allocation:
    layers: dict[str, LayerBits]  # op name -> setting
    predicted_noise: float
    weight_bytes: int  # the quantized layers' stored bytes


def _hull(points: list[tuple[int, float, LayerBits]]) -> list[tuple[int, float, LayerBits]]:
    """From most bytes to fewest: the settings on the lower convex hull of (bytes, noise), each
    cheaper one noisier than the last (a setting both bigger and noisier is never worth it)."""
    ordered = sorted(points, key=lambda p: (-p[0], p[1]))
    hull: list[tuple[int, float, LayerBits]] = []
    for point in ordered:
        if hull and point[1] <= hull[-1][1]:  # fewer bytes, no more noise: it replaces the last
            while hull and point[1] <= hull[-1][1]:
                hull.pop()
        while len(hull) >= 2:
            (b0, n0, _), (b1, n1, _) = hull[-2], hull[-1]
            # Keep slopes (noise per byte saved) increasing: drop a middle point above the chord.
            if (n1 - n0) * (b1 - point[0]) >= (point[1] - n1) * (b0 - b1):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate(layers: list[OnnxLayer], costs: dict[str, LayerCost], choices: list[LayerBits],
             budget: float) -> Allocation:
    """The assignment of ``choices`` to ``layers`` with the fewest bytes whose predicted noise
    is at most ``budget``; a layer without a measured cost keeps the most precise choice, and
    a choice a layer cannot take (a block its input channels do not divide) is left out for it."""
    top = max(choices, key=lambda c: (c.bits == 0, c.bits, -c.block_size))
    chosen: dict[str, tuple[int, float, LayerBits]] = {}
    steps: list[tuple[float, str, int]] = []  # (noise per byte saved, layer, hull index)
    hulls = {}
    for layer in layers:
        cost = costs.get(layer.op_name)
        usable = [c for c in choices if layer.takes_block(c.block_size)]
        if cost is None or not usable:
            chosen[layer.op_name] = (stored_bytes(layer, top), 0.0, top)
            continue
        hull = _hull([(stored_bytes(layer, c), cost.predicted_noise(c), c) for c in usable])
        hulls[layer.op_name] = hull
        chosen[layer.op_name] = hull[0]
        for i in range(1, len(hull)):
            saved = hull[i - 1][0] - hull[i][0]
            steps.append(((hull[i][1] - hull[i - 1][1]) / max(saved, 1), layer.op_name, i))
    total = sum(noise for _, noise, _ in chosen.values())
    blocked: set[str] = set()
    for _, name, i in sorted(steps, key=lambda s: s[0]):
        if name in blocked:
            continue
        before, after = hulls[name][i - 1], hulls[name][i]
        if total - before[1] + after[1] > budget:
            blocked.add(name)  # its later steps cost more per byte: none of them fits either
            continue
        total += after[1] - before[1]
        chosen[name] = after
    return Allocation({name: setting for name, (_, _, setting) in chosen.items()}, total,
                      sum(size for size, _, _ in chosen.values()))
