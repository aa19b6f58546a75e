"""CPU memory allocator settings for fast inference: large tensors reused from the heap.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and
gives them back on free, so each large temporary tensor costs one page fault per 4 KiB page, zero-filled by the
kernel, on every call. A student's per-edge tensors pass that size from ~1000 atoms on (PaiNN, hidden 64:
[E, 3, 64] float32 is 40 MB at 53k edges), and the force call then spends most of its time in page faults:
measured on this project's CPU machine (bench/results/lammps_cpu.md), a quickstart-size PaiNN on 1000 atoms took
1.46 s per eager force call with glibc's defaults and 0.52 s with large blocks kept in the heap (LAMMPS fold
step: 2.3 s -> 0.54 s). `keep_freed_memory()` turns mmap off for allocations (M_MMAP_MAX = 0) and raises the
heap's trim threshold to 1 GiB, process-wide: the memory a step freed is reused by the next instead of being
returned and faulted back in. The cost: the process keeps up to 1 GiB of freed heap above what it uses (its
resident size stays near its peak). The hessforge commands, engine.Calculator, BatchedMD and the C++ core (LAMMPS,
engine.exported.load_core) call it; HESSFORGE_MALLOC=system in the environment leaves glibc's defaults."""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30

_tuned = None


def _libc():
    return ctypes.CDLL("libc.so.6")


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (glibc only; once per process).
    Returns whether the settings are in effect."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith("linux") and os.environ.get("HESSFORGE_MALLOC", "").lower() != "system":
            try:
                libc = _libc()
                _tuned = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            except (OSError, AttributeError):  # not glibc (musl, macOS)
                _tuned = False
    return _tuned


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory's settings are in effect in this process (without applying them)."""
    return bool(_tuned)


def malloc_trim() -> None:
    """Return glibc's free heap memory to the OS (before measuring a peak)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
