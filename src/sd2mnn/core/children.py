"""Child processes: output captured to a log at the file-descriptor level, peak memory measured
per child (wait4's rusage), a timeout, and death with the parent so nothing outlives sd2mnn.

``run_module`` is the one way sd2mnn starts its own Python children (verify's and bench's runtime
passes, the contract's model reader): ``python -m <module> ARGS`` with ``child_env()``, so they
import this sd2mnn even from a source checkout that is not installed.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from sd2mnn.core.huge_pages import huge_page_env

_PR_SET_PDEATHSIG = 1


_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C and SIGTERM until the block is done (where the platform can); a signal that
    came meanwhile is handled as the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _in_child() -> None:  # runs in the child between fork and exec
    # The parent starts children with interrupts held (see Child); the child must not keep that.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's cleanup must do
        pass


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    timed_out: bool


class Child:
    """One running child; ``poll()`` returns its result once it has ended."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ):
        self.timeout = timeout
        self.started = time.monotonic()
        self._timed_out = False
        self._result: ChildResult | None = None
        self._proc: subprocess.Popen | None = None
        try:
            # Python runs its at-fork hooks around a fork with preexec_fn, and an exception raised
            # in one is printed and dropped: a Ctrl-C or SIGTERM landing there would be lost and
            # the run would go on. Held until the child has started, it is handled here instead.
            with interrupts_deferred(), open(log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    list(argv),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=None if env is None else dict(env),
                    preexec_fn=_in_child,
                )
        except BaseException:
            if self._proc is not None:  # started, then interrupted: it must not outlive the run
                self._proc.kill()
                self._proc.wait()
            raise

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> ChildResult | None:
        if self._result is not None:
            return self._result
        if self.timeout is not None and not self._timed_out and self.elapsed > self.timeout:
            self._timed_out = True
            self.kill()
        pid, status, usage = os.wait4(self._proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        return self._finish(status, usage)

    def wait(self) -> ChildResult:
        while (result := self.poll()) is None:
            time.sleep(0.05)
        return result

    def _finish(self, status: int, usage) -> ChildResult:
        code = os.waitstatus_to_exitcode(status)
        self._proc.returncode = code  # reaped here; keep Popen from waiting again
        # ru_maxrss is in KiB on Linux.
        self._result = ChildResult(code, self.elapsed, usage.ru_maxrss * 1024, self._timed_out)
        return self._result

    def kill(self) -> None:
        if self._result is not None:
            return
        # os.kill, not Popen.kill: that polls first, and a child it reaps there is lost to wait4.
        # Until wait4 reaps it the pid stays ours (a zombie at worst), so this cannot hit another.
        try:
            os.kill(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_child(argv: Sequence[str], cwd: Path, log_path: Path, env=None, timeout=None) -> ChildResult:
    return Child(argv, cwd, log_path, env, timeout).wait()


def child_env() -> dict[str, str]:
    """The environment for sd2mnn's children: this process's, with the folder that holds this
    sd2mnn first on PYTHONPATH and large allocations on huge pages (sd2mnn.core.huge_pages)."""
    env = huge_page_env(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # src/, which holds sd2mnn/core/children.py
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def run_module(module: str, args: Sequence[str], cwd: Path, timeout: float | None,
               log_path: Path | None = None) -> ChildResult:
    """``python -m module args`` in ``cwd``, its output in ``log_path`` (default cwd/<module>.log),
    killed after ``timeout`` seconds (None: no limit; callers give one)."""
    log_path = log_path or Path(cwd) / f"{module.rsplit('.', 1)[-1]}.log"
    return run_child([sys.executable, "-m", module, *map(str, args)], Path(cwd), log_path, env=child_env(),
                     timeout=timeout)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, for error messages (read from the end: logs can be long)."""
    try:
        with open(path, "rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(max(0, size - 16384))
            text = stream.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
