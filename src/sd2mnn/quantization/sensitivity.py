"""How much each layer's quantization costs a component's output, measured on ONNX Runtime.

One session of the ONNX model whose quantizable weights are overridable inputs (ONNX Runtime
lets a graph input of an initializer's name replace it per run); the external weights are
handed to it memory-mapped, so nothing is copied. For each layer alone, its weights go in as
MNN would store them at the probe setting (sd2mnn.quantization.fake_quant), the rest stay float,
and the outputs are compared with the float run's:

    noise = mean((out - ref)^2) / ptp(ref)^2     (PSNR = -10 log10(noise), as verify reads it)

worst over the outputs and cases. Noises of small, independent weight errors add, and one
layer's noise grows with its weights' squared error, so a layer at any other setting costs
about noise * error(setting) / error(probe) (sd2mnn.quantization.allocate builds on that).
"""
from __future__ import annotations

import mmap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sd2mnn.quantization.compression import LayerBits, OnnxLayer
from sd2mnn.quantization.fake_quant import from_mnn_layout, kernel_positions, quantize_rows, to_mnn_layout, weight_error

# Below this noise an output is float rounding, not quantization.
NOISE_FLOOR = 1e-20


@dataclass(frozen=True)
class LayerCost:
    """One layer's measured sensitivity and its weights' quantization error per setting."""

    op_name: str
    noise: float  # output noise with this layer alone at the probe setting
    errors: dict[str, float]  # setting label -> sum of squared weight changes
    probe: str  # the probe setting's label

    def predicted_noise(self, setting: LayerBits) -> float:
        probe_error = self.errors[self.probe]
        if probe_error <= 0:
            return 0.0
        return self.noise * self.errors[setting.label] / probe_error

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LayerCost":
        return cls(data["op_name"], float(data["noise"]), {k: float(v) for k, v in data["errors"].items()},
                   data["probe"])


def output_noise(references: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> float:
    """The worst output's mean squared error over its peak-to-peak range squared."""
    worst = 0.0
    for ref_case, out_case in zip(references, outputs):
        for name, ref in ref_case.items():
            ref64, out64 = ref.astype(np.float64), out_case[name].astype(np.float64)
            span = float(np.ptp(ref64)) or 1.0
            worst = max(worst, float(np.mean((out64 - ref64) ** 2)) / span ** 2)
    return worst


def noise_psnr(noise: float) -> float:
    return -10.0 * np.log10(max(noise, NOISE_FLOOR))


class OverridableModel:
    """An ONNX model on ONNX Runtime whose listed weights can be replaced per run."""

    def __init__(self, model: Path, weights: list[str], threads: int):
        import onnx
        import onnxruntime as ort

        self.model = Path(model)
        proto = onnx.load(str(self.model), load_external_data=False)
        initializers = {t.name: t for t in proto.graph.initializer}
        for name in weights:
            tensor = initializers[name]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        files = sorted({entry.value for t in proto.graph.initializer for entry in t.external_data
                        if entry.key == "location"})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # each overridable weight would print a warning
        # The external files, memory-mapped (the model is loaded from bytes, so ONNX Runtime could
        # not find them beside itself). It copies what it needs while the session is made; the
        # maps are closed after, so the weights are not held twice.
        maps = []
        try:
            for name in files:
                with open(self.model.parent / name, "rb") as stream:
                    maps.append(mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ))
            if files:
                views = [np.frombuffer(m, dtype=np.uint8) for m in maps]
                options.add_external_initializers_from_files_in_memory(files, views, [v.size for v in views])
                del views
            self._session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        finally:
            del options
            for mapped in maps:
                mapped.close()
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], replaced: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        values = self._session.run(None, {**feeds, **(replaced or {})})
        return dict(zip(self.output_names, values))


def initializers(model: Path) -> dict:
    """The model's initializers by name, without their external bytes (read per tensor when asked)."""
    import onnx

    return {t.name: t for t in onnx.load(str(model), load_external_data=False).graph.initializer}


def load_weight(model: Path, layer: OnnxLayer, tensors: dict | None = None) -> np.ndarray:
    """The layer's weights as float32; ``tensors``: ``initializers(model)``, read once by the caller."""
    from onnx import numpy_helper

    tensor = (tensors if tensors is not None else initializers(model))[layer.weight]
    return numpy_helper.to_array(tensor, base_dir=str(Path(model).parent)).astype(np.float32)


def measure(model: Path, layers: list[OnnxLayer], feeds: list[dict[str, np.ndarray]], probe: LayerBits,
            settings: list[LayerBits], threads: int,
            report: Callable[[int, int, str], None] = lambda done, total, name: None) -> list[LayerCost]:
    """Each layer's LayerCost on ``feeds``: its noise alone at ``probe``, its weight error at each setting."""
    session = OverridableModel(model, [layer.weight for layer in layers], threads)
    references = [session.run(case) for case in feeds]
    tensors = initializers(model)
    costs = []
    for index, layer in enumerate(layers):
        report(index, len(layers), layer.op_name)
        weight = load_weight(model, layer, tensors)
        rows = to_mnn_layout(layer, weight)
        kernel = kernel_positions(layer)
        errors = {s.label: weight_error(rows, kernel, s) for s in {*settings, probe} if layer.takes_block(s.block_size)}
        replaced = {layer.weight: from_mnn_layout(layer, quantize_rows(rows, kernel, probe))}
        outputs = [session.run(case, replaced) for case in feeds]
        costs.append(LayerCost(layer.op_name, output_noise(references, outputs), errors, probe.label))
    report(len(layers), len(layers), "")
    return costs

