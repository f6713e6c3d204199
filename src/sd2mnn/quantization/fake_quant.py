"""MNN's weight quantization, reproduced in numpy: what a layer's weights become at a bit width.

As MNNConvert 3.6.1 computes it (WeightQuantAndCoding.cpp, IDSTEncoder.hpp): the weights as
[output channels, inputs per channel], cut into blocks (all of a row, or ``block_size`` input
channels times the kernel's positions); per block, symmetric: scale = max|w| / (2^(b-1) - 1),
q = clamp(round(w / scale)); asymmetric: scale = (max - min) / (2^b - 1), q = round((w - min) /
scale) - 2^(b-1), the stored weight (q + 2^(b-1)) * scale + min. So the sensitivity measured on
ONNX Runtime with these weights is the one the converted model has.
"""
from __future__ import annotations

import numpy as np

from sd2mnn.quantization.compression import FLOAT_BITS, LayerBits, OnnxLayer

# What MNN stores per scale: a float32 scale, and a float32 minimum when asymmetric.
SCALE_BYTES = 4


def to_mnn_layout(layer: OnnxLayer, weight: np.ndarray) -> np.ndarray:
    """[output channels, everything else] as MNN keeps the layer."""
    matrix = weight.T if layer.transposed else weight
    return np.ascontiguousarray(matrix, dtype=np.float32).reshape(layer.output_channels, -1)


def from_mnn_layout(layer: OnnxLayer, rows: np.ndarray) -> np.ndarray:
    if layer.transposed:
        return np.ascontiguousarray(rows.reshape(layer.shape[1], layer.shape[0]).T)
    return rows.reshape(layer.shape)


def quantize_rows(rows: np.ndarray, kernel_positions: int, setting: LayerBits) -> np.ndarray:
    """``rows`` ([out, in * kernel positions], float32) after MNN's quantization to ``setting``."""
    if setting.bits == FLOAT_BITS:
        return rows
    out = rows.shape[0]
    width = setting.block_size * kernel_positions if setting.block_size else rows.shape[1]
    blocks = rows.reshape(out, -1, width)
    threshold = float((1 << (setting.bits - 1)) - 1)
    if setting.asymmetric:
        low = blocks.min(axis=2, keepdims=True)
        scale = (blocks.max(axis=2, keepdims=True) - low) / (2 * threshold + 1)
        safe = np.where(scale > 0, scale, 1.0)
        steps = np.clip(np.round((blocks - low) / safe), 0, 2 * threshold + 1)
        result = np.where(scale > 0, steps * scale + low, blocks)
    else:
        scale = np.abs(blocks).max(axis=2, keepdims=True) / threshold
        safe = np.where(scale > 0, scale, 1.0)
        result = np.where(scale > 0, np.clip(np.round(blocks / safe), -threshold, threshold) * scale, 0.0)
    return result.astype(np.float32).reshape(rows.shape)


def quantized_weight(layer: OnnxLayer, weight: np.ndarray, setting: LayerBits) -> np.ndarray:
    """The ONNX initializer as the converted model will hold it."""
    rows = to_mnn_layout(layer, weight)
    return from_mnn_layout(layer, quantize_rows(rows, kernel_positions(layer), setting))


def kernel_positions(layer: OnnxLayer) -> int:
    if layer.op_type != "Conv":
        return 1
    positions = 1
    for dim in layer.shape[2:]:
        positions *= dim
    return positions


def stored_bytes(layer: OnnxLayer, setting: LayerBits) -> int:
    """About what MNN writes for the layer's weights: packed values plus the scales."""
    if setting.bits == FLOAT_BITS:
        return layer.count * 4
    blocks = layer.input_channels // setting.block_size if setting.block_size else 1
    scales = layer.output_channels * blocks * SCALE_BYTES * (2 if setting.asymmetric else 1)
    return (layer.count * setting.bits + 7) // 8 + scales


def weight_error(rows: np.ndarray, kernel: int, setting: LayerBits) -> float:
    """Sum of squared weight changes the setting causes."""
    diff = quantize_rows(rows, kernel, setting) - rows
    return float(np.dot(diff.ravel(), diff.ravel()))
