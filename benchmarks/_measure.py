"""One way for every benchmark to measure a command: wall time, the peak of its whole process
tree's summed RSS (sampled), and wait4's ru_maxrss (the largest single process)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(argv: list[str], stdout_path: Path | None = None, cwd: Path | None = None, interval: float = 0.02,
            env: dict | None = None) -> dict:
    """Run ``argv`` to its end; {returncode, wall_s, tree_peak_bytes, maxrss_bytes}."""
    started = time.monotonic()
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    finally:
        if stdout_path:
            out.close()
    tree_peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_rss(proc.pid))
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall_s": round(time.monotonic() - started, 2),
        "tree_peak_bytes": tree_peak,
        "maxrss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
    }


def raw_converter_argv(onnx: Path, mnn: Path, flags: tuple[str, ...] | list[str] = ()) -> list[str]:
    """MNN's converter called as MNN's convert_mnn.py calls it (the Python package's, without the
    telemetry of its console script): one ONNX model, external weights."""
    return [sys.executable, "-c", "import sys, _tools; _tools.mnnconvert(sys.argv[1:])", "MNNConvert",
            "-f", "ONNX", "--modelFile", str(onnx), "--MNNModel", str(mnn), "--saveExternalData=1", *flags]
