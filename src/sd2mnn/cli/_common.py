"""Helpers shared by the command modules: output formatting and signal handling."""
from __future__ import annotations

import json
import signal
import sys
from typing import Iterable, Sequence


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells):
        out = []
        for i, cell in enumerate(cells):
            numeric = cell.replace(".", "", 1).replace("-", "", 1).replace("x", "").strip().isdigit()
            out.append(cell.rjust(widths[i]) if numeric else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def terminate_as_interrupt() -> None:
    """Make SIGTERM unwind like Ctrl-C so every command cleans up the same way."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
