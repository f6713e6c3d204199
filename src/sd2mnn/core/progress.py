"""Progress for long work: a live per-item display on a terminal, plain lines otherwise.

The runner only reports state changes (``update``) and gives the display a chance to redraw
(``tick``); how that looks is decided here.
"""
from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

_FINAL = {"done", "reused", "resumed", "failed", "cancelled", "skipped"}


class Progress(Protocol):
    def update(self, name: str, state: str, detail: str = "") -> None: ...
    def tick(self) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    def update(self, name: str, state: str, detail: str = "") -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def _seconds(value: float) -> str:
    return f"{value:5.1f}s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


class LineProgress:
    """One line per state change, for logs and pipes."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._started: dict[str, float] = {}

    def update(self, name: str, state: str, detail: str = "") -> None:
        now = time.monotonic()
        start = self._started.setdefault(name, now)
        elapsed = f" ({_seconds(now - start).strip()})" if state in _FINAL and now - start > 0.05 else ""
        print(f"{name}: {state}{elapsed}{' - ' + detail if detail else ''}", file=self.stream, flush=True)

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


class LiveProgress:
    """A block of lines, one per item, redrawn in place with the elapsed time of each."""

    def __init__(self, stream: TextIO, interval: float = 0.25):
        self.stream = stream
        self.interval = interval
        self._rows: dict[str, list] = {}  # name -> [state, started, finished, detail]
        self._drawn = 0
        self._last = 0.0

    def update(self, name: str, state: str, detail: str = "") -> None:
        now = time.monotonic()
        row = self._rows.setdefault(name, [state, now, None, detail])
        if row[0] in ("waiting", "queued") and state not in ("waiting", "queued"):
            row[1] = now  # the clock starts when the work does
        row[0], row[3] = state, detail
        row[2] = now if state in _FINAL else None
        self._draw()

    def tick(self) -> None:
        if time.monotonic() - self._last >= self.interval:
            self._draw()

    def _draw(self) -> None:
        now = self._last = time.monotonic()
        width = max((len(n) for n in self._rows), default=0)
        lines = []
        for name, (state, started, finished, detail) in self._rows.items():
            elapsed = "" if state in ("waiting", "queued") else _seconds((finished or now) - started)
            lines.append(f"  {name:<{width}}  {state:<10} {elapsed:>7}  {detail}".rstrip())
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F")
        for line in lines:
            self.stream.write(f"\x1b[2K{line}\n")
        self._drawn = len(lines)
        self.stream.flush()

    def close(self) -> None:
        if self._rows:
            self._draw()


def make_progress(quiet: bool = False, stream: TextIO | None = None) -> Progress:
    stream = sys.stderr if stream is None else stream
    if quiet:
        return NullProgress()
    return LiveProgress(stream) if stream.isatty() else LineProgress(stream)
