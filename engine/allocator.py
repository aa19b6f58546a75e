"""CPU memory allocator settings for fast inference: large tensors reused from the heap.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and
gives them back on free, so each large temporary tensor costs one page fault per 4 KiB page, zero-filled by the
kernel, on every call. A student's per-edge tensors pass that size from ~1000 atoms on (PaiNN, hidden 64:
[E, 3, 64] float32 is 41 MB at 53k edges), and the force call then spends most of its time in page faults:
measured on this project's CPU machine, a quickstart-size PaiNN on 1000 atoms took 1.43 s per eager force call
with glibc's defaults and 0.47 s with large blocks kept in the heap (peak resident memory 1.29 -> 1.65 GiB); the
LAMMPS fold step 1.48 -> 0.50 s (bench/results/lammps_cpu.md). `keep_freed_memory()` turns mmap off for
allocations (M_MMAP_MAX = 0) and raises the heap's trim threshold to 1 GiB, process-wide: the memory a step
freed is reused by the next instead of being returned and faulted back in.

The cost: freed memory stays with the process (its resident size stays near its peak; holes below live blocks are
never returned, whatever the threshold), and fragmentation can add to the peak (a review measured +14 % with
random sizes and lifetimes). Only the main thread's heap gains: other threads' arenas still map blocks above
64 MiB afresh. The hessforge commands, engine.Calculator, BatchedMD and the C++ core (LAMMPS,
engine.exported.load_core) call it; HESSFORGE_MALLOC=system in the environment keeps glibc's defaults
(HESSFORGE_MALLOC=heap or unset: these settings)."""
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
        if sys.platform.startswith("linux") and malloc_setting() == "heap":
            try:
                libc = _libc()
                _tuned = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            except (OSError, AttributeError):  # not glibc (musl, macOS)
                _tuned = False
    return _tuned


def malloc_setting() -> str:
    """HESSFORGE_MALLOC: "heap" (unset or empty too) or "system"; anything else is an error naming it."""
    value = os.environ.get("HESSFORGE_MALLOC", "").strip().lower() or "heap"
    if value not in ("heap", "system"):
        from engine.errors import HessforgeError

        raise HessforgeError(f"HESSFORGE_MALLOC={os.environ['HESSFORGE_MALLOC']!r}: expected 'system' (glibc's "
                             "defaults) or 'heap' (large freed blocks kept for reuse; the default)")
    return value


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory's settings are in effect in this process (without applying them)."""
    return bool(_tuned)


def malloc_trim() -> None:
    """Return glibc's free heap memory to the OS (before measuring a peak)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
