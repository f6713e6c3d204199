"""Run one model on one runtime over a list of feeds: load, run them all, free.

``run_pass`` does it in this process or, with ``isolate``, in a child (sd2mnn.core.children.run_module:
``python -m sd2mnn.verification._pass RUNTIME MODEL FEEDS.npz OUT.npz INPUTS OUTPUTS THREADS KERNEL_TRANSFORMS``): ONNX
Runtime does not give a multi-GB model's memory back, and a child's ends with it. Feeds and
outputs travel as .npz files; the child's peak memory comes from wait4.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd2mnn.errors import Sd2MnnError


@dataclass
class RunStats:
    runtime: str  # "onnxruntime" or "mnn"
    wall_s: float
    peak_rss_bytes: int | None  # of the child process; None when run in-process
    isolated: bool


class PassError(Exception):
    """A runtime could not load or run a model."""


def _load(runtime: str, model: Path, inputs: list[str], outputs: list[str], threads: int, kernel_transforms: bool):
    from sd2mnn.core.runtime import MnnModel, OrtModel, RuntimeConfig

    if runtime == "onnxruntime":
        return OrtModel(model, threads=threads, layout_transforms=kernel_transforms)
    return MnnModel(model, inputs, outputs,
                    RuntimeConfig(threads=threads, precision="high", winograd=kernel_transforms))


@contextlib.contextmanager
def _stdout_to_devnull():
    """MNN's C++ code prints to file descriptor 1; keep it off a stdout that may carry JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _run_in_process(runtime, model, inputs, outputs, feeds, threads, kernel_transforms, quiet=True) -> list[dict[str, np.ndarray]]:
    try:
        with _stdout_to_devnull() if quiet else contextlib.nullcontext():
            loaded = _load(runtime, model, inputs, outputs, threads, kernel_transforms)
            results = [{k: v for k, v in loaded.run(f).items() if k in outputs} for f in feeds]
    except Sd2MnnError as err:
        raise PassError(err.message) from None
    except Exception as err:  # MNN and ONNX Runtime raise plain exceptions for bad models
        raise PassError(f"{model.name}: {err}") from None
    del loaded
    gc.collect()  # free this runtime's copy before the other one loads
    return results


def _run_in_child(runtime, model, inputs, outputs, feeds, threads, kernel_transforms, workdir: Path, timeout: float):
    from sd2mnn.core.children import log_tail, run_module

    feeds_path, out_path, log = workdir / f"{runtime}-in.npz", workdir / f"{runtime}-out.npz", workdir / f"{runtime}.log"
    np.savez(feeds_path, **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    args = [runtime, model.resolve(), feeds_path, out_path, ",".join(inputs), ",".join(outputs), threads, int(kernel_transforms)]
    result = run_module("sd2mnn.verification._pass", args, workdir, timeout, log)
    if result.timed_out:
        raise PassError(f"{model.name}: ran past {timeout:g}s and was killed")
    if result.returncode != 0 or not out_path.is_file():
        tail = log_tail(log, 4).strip() or f"exit status {result.returncode}"
        raise PassError(f"{model.name}: {tail}")
    with np.load(out_path) as data:
        outs = [{k: data[f"{i}/{k}"] for k in outputs} for i in range(len(feeds))]
    feeds_path.unlink()
    out_path.unlink()
    return outs, result.peak_rss_bytes


# MNN's Winograd 3x3 convolutions and ONNX Runtime's blocked (NCHWc) layouts rewrite every
# kernel into a new copy as the model loads. For the few runs a check makes that pays on a small
# model with large activations (SD1.5's 198 MB VAE decoder at 512x512 here: MNN 2 s of load, then
# each run 2.3x faster; ONNX Runtime 0.5 s, then 1.1x) and not on a large one (its 3.4 GB unet:
# MNN 28 s of load and 12 GB instead of 6 for runs 1.2x faster; ONNX Runtime 8 s of load for runs
# 1.1x slower). Either way each runtime computes the same convolutions.
KERNEL_TRANSFORMS_UP_TO_BYTES = 1 << 30


def kernel_transforms_pay(model_bytes: int) -> bool:
    """Whether a model of this size (its files together) should load with kernel transforms."""
    return model_bytes <= KERNEL_TRANSFORMS_UP_TO_BYTES


# A full-size unet's pass takes minutes here; a child still running after an hour is stuck.
PASS_TIMEOUT_S = 3600.0


def run_pass(runtime: str, model: Path, inputs: list[str], outputs: list[str], feeds: list[dict],
             threads: int, isolate: bool, workdir: Path, timeout: float = PASS_TIMEOUT_S,
             kernel_transforms: bool = True) -> tuple[list[dict[str, np.ndarray]], RunStats]:
    """Load ``model`` in ``runtime`` ("onnxruntime" or "mnn"), run every feed, free it.
    ``timeout``: seconds before an isolated pass's child is killed; ``kernel_transforms``: MNN's Winograd
    3x3 convolutions (sd2mnn.core.runtime.RuntimeConfig) and ONNX Runtime's blocked layouts
    (``kernel_transforms_pay`` says when they do)."""
    started = time.monotonic()
    if isolate:
        results, peak = _run_in_child(runtime, model, inputs, outputs, feeds, threads, kernel_transforms, workdir, timeout)
    else:
        results, peak = _run_in_process(runtime, model, inputs, outputs, feeds, threads, kernel_transforms), None
    return results, RunStats(runtime, round(time.monotonic() - started, 3), peak, isolate)


def main(argv: list[str]) -> int:
    """``python -m sd2mnn.verification._pass RUNTIME MODEL FEEDS.npz OUT.npz INPUTS OUTPUTS THREADS KERNEL_TRANSFORMS``."""
    runtime, model, feeds_path, out_path, inputs, outputs, threads, kernel_transforms = argv
    inputs, outputs = inputs.split(","), outputs.split(",")
    with np.load(feeds_path) as data:
        count = len({k.split("/")[0] for k in data.files})
        feeds = [{n: data[f"{i}/{n}"] for n in inputs} for i in range(count)]
    try:
        results = _run_in_process(runtime, Path(model), inputs, outputs, feeds, int(threads), kernel_transforms == "1", quiet=False)
    except PassError as err:
        print(err, file=sys.stderr)
        return 1
    np.savez(out_path, **{f"{i}/{k}": v for i, r in enumerate(results) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
