"""Large allocations on transparent huge pages: the environment sd2mnn gives its children and
itself, and that glibc and the kernel honour it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sd2mnn.core.children import child_env, run_module
from sd2mnn.core.huge_pages import huge_page_env

glibc_only = pytest.mark.skipif(not huge_page_env({}), reason="not glibc: its malloc tunables do not apply")

# malloc 64 MiB, touch it, report the process's anonymous memory on huge pages (KiB).
ALLOCATE = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
print(next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")))
"""


@glibc_only
def test_the_environment_adds_to_what_the_user_set():
    assert huge_page_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert huge_page_env({})["THP_MEM_ALLOC_ENABLE"] == "1"
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "THP_MEM_ALLOC_ENABLE": "0"}
    assert huge_page_env(mine) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                                   "THP_MEM_ALLOC_ENABLE": "0"}
    chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert huge_page_env(chosen)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    off = {"SD2MNN_HUGE_PAGES": "0", "PATH": "/bin"}
    assert huge_page_env(off) == off


@glibc_only
def test_children_allocate_on_huge_pages(tmp_path):
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.is_file() or "[never]" in mode.read_text():
        pytest.skip("the kernel's transparent huge pages are off")
    (tmp_path / "allocate.py").write_text(ALLOCATE)
    done = run_module("allocate", [], tmp_path, timeout=60, log_path=tmp_path / "log")
    assert done.returncode == 0
    assert int((tmp_path / "log").read_text().split()[-1]) >= 32 << 10  # KiB: half the block at least
    assert "glibc.malloc.hugetlb=1" in child_env()["GLIBC_TUNABLES"]


@glibc_only
def test_the_command_line_restarts_itself_once_with_huge_pages(tmp_path):
    script = ("import os; print('start', flush=True)\n"
              "from sd2mnn.core.huge_pages import relaunch_with_huge_pages\n"
              "relaunch_with_huge_pages()\n"
              "print(os.environ['GLIBC_TUNABLES'])\n")
    env = {k: v for k, v in child_env().items() if k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "SD2MNN_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path).stdout.split()
    assert out == ["start", "start", "glibc.malloc.hugetlb=1"]
    off = subprocess.run([sys.executable, "-c", script], env={**env, "SD2MNN_HUGE_PAGES": "0", "GLIBC_TUNABLES": "x=1"},
                         capture_output=True, text=True, timeout=60, cwd=tmp_path).stdout.split()
    assert off == ["start", "x=1"]
