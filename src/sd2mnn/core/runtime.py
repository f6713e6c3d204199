"""Run one model on MNN or on ONNX Runtime behind the same small interface.

``MnnModel`` and ``OrtModel`` take a dict of numpy arrays by input name and return a dict of
numpy arrays by output name, so verification, generation and benchmarks compare runtimes
without caring which is which. Both import their runtime lazily.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sd2mnn.errors import InputError

PRECISIONS = ("high", "normal", "low")
# MNN::Interpreter::HintMode::WINOGRAD_MEMORY_LEVEL; 0 turns Winograd convolutions off.
WINOGRAD_MEMORY_LEVEL = 3
# MNN::Interpreter::HintMode value set by StableDiffusion::load().
DYNAMIC_QUANT_OPTIONS = 5
MNN_GPU_TUNING_FAST = 1 << 4  # MNNForwardType.h
MNN_GPU_MEMORY_BUFFER = 1 << 6
MEMORY_MODES = ("low", "normal", "high")
# MNN::BackendConfig's enums. pymnn reads "memory" only as a number (a name is dropped without a
# word) and "precision" as a number or as "low"/"high": both go as numbers.
_MEMORY_ENUM = {"normal": 0, "high": 1, "low": 2}
_PRECISION_ENUM = {"normal": 0, "high": 1, "low": 2}
# The backend names MNN's create_runtime_manager takes (MNNForwardType); a build has only some.
BACKENDS = ("CPU", "OPENCL", "VULKAN", "METAL", "CUDA", "OPENGL", "NN", "HIAI", "TRT")


@dataclass(frozen=True)
class RuntimeConfig:
    """How MNN runs a model. MNN's SD runtime itself uses CPU, 4 threads, low precision/memory."""

    backend: str = "CPU"
    threads: int = 2
    precision: str = "high"
    memory: str = "normal"
    # A file where MNN keeps its backend's compiled kernels/tuning between runs (OpenCL, etc.).
    cache_file: str | None = None
    # MNN's Winograd 3x3 convolutions are fast but add ~1e-3 abs error on an SD VAE decoder at
    # 512x512 (measured here); MNN's own SD runtime turns them off in its low-memory mode 0.
    winograd: bool = True
    # Further MNN::Interpreter::HintMode settings, (hint, value) pairs, set on the runtime manager.
    hints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise InputError(f"unknown MNN backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.memory not in MEMORY_MODES:
            raise InputError(f"memory mode {self.memory!r} is not one of {', '.join(MEMORY_MODES)}")
        if self.threads < 1:
            raise InputError(f"threads must be at least 1, got {self.threads}")


def _mnn_dtype(F, dtype: np.dtype):
    if dtype == np.float32:
        return F.float
    if dtype == np.int32:
        return F.int
    raise InputError(f"MNN inputs must be float32 or int32, got {dtype}")


def mnn_runtime_manager(config: RuntimeConfig):
    """An MNN RuntimeManager for ``config``. Its cache file, if any, is written when it is freed."""
    import MNN.nn as nn

    runtime_config = {
        "backend": config.backend,
        "numThread": config.threads,  # GPU backends read this field as their mode bits
        "precision": _PRECISION_ENUM[config.precision],
        "memory": _MEMORY_ENUM[config.memory],
    }
    if config.backend == "CPU":
        runtime = nn.create_runtime_manager((runtime_config,))
    else:
        # A build without the backend says "Can't Find type=N backend, use 0 instead" on stdout and
        # runs on the CPU: refuse instead, so nothing records a backend that did not run.
        with _native_stdout_captured() as said:
            runtime = nn.create_runtime_manager((runtime_config,))
        if "Can't Find type=" in said():
            import MNN

            raise InputError(f"this MNN build (MNN {getattr(MNN, 'version', lambda: '?')()}) has no {config.backend} "
                             "backend (MNN would quietly run on the CPU); use --backend CPU, or install an MNN "
                             f"built with {config.backend}")
    if config.cache_file:
        runtime.set_cache(str(config.cache_file))
    if not config.winograd:
        runtime.set_hint(WINOGRAD_MEMORY_LEVEL, 0)
    for hint, value in config.hints:
        runtime.set_hint(hint, value)
    return runtime


class _native_stdout_captured:
    """Capture what native code writes to file descriptor 1 (MNN prints there), then pass it on."""

    def __enter__(self):
        sys.stdout.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(1)
        os.dup2(self._file.fileno(), 1)
        self._text = ""
        return lambda: self._text

    def __exit__(self, *exc):
        os.dup2(self._saved, 1)
        os.close(self._saved)
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        self._text = data.decode("utf-8", "replace")
        os.write(1, data)


def check_mnn_files(path: Path) -> None:
    """A one-line error unless the model and its external weights are there."""
    if not path.is_file():
        raise InputError(f"{path} is missing; convert the bundle first (sd2mnn convert)")
    weight = path.with_name(path.name + ".weight")
    if not weight.is_file():
        # MNN loads a model whose external weights are missing and computes garbage.
        raise InputError(f"{weight} is missing; reconvert {path.name} (sd2mnn convert --overwrite)")


class MnnModel:
    """A loaded ``.mnn`` module with fixed input and output names."""

    def __init__(
        self,
        path: str | os.PathLike,
        input_names: Sequence[str],
        output_names: Sequence[str],
        config: RuntimeConfig = RuntimeConfig(),
        shape_mutable: bool = False,
        runtime_manager=None,
    ):
        """``runtime_manager``: one from ``mnn_runtime_manager`` to share between models (as MNN's
        SD runtime shares one across its three: one cache file, one set of hints); else a new one."""
        import MNN.nn as nn

        self.path = Path(path)
        check_mnn_files(self.path)
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._runtime = runtime_manager or mnn_runtime_manager(config)
        try:
            self._module = nn.load_module_from_file(
                str(self.path),
                self.input_names,
                self.output_names,
                runtime_manager=self._runtime,
                shape_mutable=shape_mutable,
            )
        except Exception as err:  # MNN raises SystemError with its own text on stderr
            raise InputError(
                f"MNN could not load {self.path} with inputs {self.input_names} and outputs "
                f"{self.output_names} ({err}); reconvert it, or check it with sd2mnn verify"
            ) from None
        if self._module is None:
            raise InputError(f"MNN could not load {self.path}; reconvert it (sd2mnn convert --overwrite)")

    def input_shapes(self) -> dict[str, list[int]]:
        """The shape the model was converted with, per input (-1 where it is dynamic)."""
        info = self._module.get_info()
        return {name: [int(d) for d in var.shape] for name, var in zip(info["inputNames"], info["inputs"])}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import MNN.expr as F

        args = []
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name])
            if array.dtype == np.int64:
                array = array.astype(np.int32)  # MNN refuses int64 inputs
            args.append(F.const(array, list(array.shape), F.NCHW, _mnn_dtype(F, array.dtype)))
        outputs = self._module.forward(args)
        result = {}
        for name, value in zip(self.output_names, outputs):
            value = F.convert(value, F.NCHW)
            result[name] = np.array(value.read(), copy=True)
        return result


class OrtModel:
    """An ONNX Runtime session on one ``model.onnx``, single-threaded by default like MNN's."""

    def __init__(self, path: str | os.PathLike, threads: int = 2, layout_transforms: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not layout_transforms:  # every optimization but the blocked layouts, which copy each kernel
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise InputError(f"ONNX Runtime could not load {self.path} ({err}); re-export it") from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        # Exports differ in integer widths (timestep int32 or int64): feed what the model declares.
        self._int64_inputs = {i.name for i in self._session.get_inputs() if i.type == "tensor(int64)"}

    def input_shapes(self) -> dict[str, list[int]]:
        """The graph's shape per input (-1 where it is symbolic)."""
        return {i.name: [d if isinstance(d, int) else -1 for d in i.shape] for i in self._session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {n: feeds[n].astype(np.int64) if n in self._int64_inputs else feeds[n] for n in self.input_names}
        outputs = self._session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))
