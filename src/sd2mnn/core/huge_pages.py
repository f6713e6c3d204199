"""Large allocations on transparent huge pages, for sd2mnn and every program it starts.

Converting and running a multi-GB model allocates and frees buffers of tens of MB over and over.
glibc serves each with a fresh mmap, which the kernel then fills 4 KiB at a time: MNN's converter
on a full-size SD1.5 unet took 78 s here (2 cores), 64 of them in the kernel, and 34 s with glibc's
``glibc.malloc.hugetlb=1`` tunable (glibc >= 2.35: 2 MiB pages, asked for with madvise, where the
kernel's transparent_hugepage setting is ``madvise`` or ``always``). PyTorch's own allocator asks
for them with ``THP_MEM_ALLOC_ENABLE=1``. Peak memory grows by about 2%.

glibc reads its tunables once, as a process starts: sd2mnn's children get them in their
environment (``sd2mnn.core.children.child_env``), and the command line restarts itself once with
them before it imports anything heavy (``relaunch_with_huge_pages``). ``SD2MNN_HUGE_PAGES=0``
turns all of it off; tunables the user set are kept.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
SWITCH = "SD2MNN_HUGE_PAGES"


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def huge_page_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus what puts a process's large allocations on huge pages: glibc's tunable
    (added to any the user set, unless they chose one for it) and PyTorch's switch. ``env``
    unchanged where ``SD2MNN_HUGE_PAGES=0`` or the C library is not glibc."""
    out = dict(env)
    if out.get(SWITCH, "1").strip() == "0" or not _glibc():
        return out
    tunables = out.get("GLIBC_TUNABLES", "")
    if TUNABLE not in tunables:
        out["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, f"{TUNABLE}=1")))
    out.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return out


def relaunch_with_huge_pages() -> None:
    """Restart this process, same interpreter, arguments and folder, with ``huge_page_env``,
    unless it has it already (so at most once). Only for an entry point: nothing may have
    been started or printed yet."""
    env = huge_page_env(os.environ)
    if env == dict(os.environ) or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        pass  # the interpreter cannot be started again: go on without huge pages
