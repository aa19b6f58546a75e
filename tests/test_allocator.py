"""engine.allocator.keep_freed_memory and the C++ core's twin: after them, a large tensor allocated again and
again reuses heap memory instead of being faulted in afresh from the kernel every time (glibc's default for
blocks above its mmap threshold: one page fault per 4 KiB page, most of a ~1000-atom force call's time,
bench/results/lammps_cpu.md). Each case runs in a fresh interpreter: the settings are process-wide."""
import os
import subprocess
import sys

import pytest

from engine.exported import core_available

REPEATS, MIB = 4, 64
CHILD = """
import resource, torch
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a force call's pattern: large temporaries, each freed after the next is made
    x = torch.ones({mib} * 262144); y = x * 2; del x; z = y + 1; del y, z
for _ in range(10):  # the heap grows to its working size (faults in any case)
    step()
before = faults()
for _ in range({repeats}):
    step()
print(tuned, faults() - before)
"""


def page_faults(setup, malloc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HESSFORGE_MALLOC", None)
    if malloc:
        env["HESSFORGE_MALLOC"] = malloc
    code = CHILD.format(setup=setup, mib=MIB, repeats=REPEATS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tuned, faults = proc.stdout.split()
    return tuned == "True", int(faults)


PYTHON = "from engine.allocator import keep_freed_memory; tuned = keep_freed_memory()"
CORE = "from engine import _core; tuned = _core.keep_freed_memory()"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("setup", [PYTHON, pytest.param(CORE, marks=pytest.mark.skipif(
    not core_available(), reason="C++ core not built"))], ids=["python", "core"])
def test_large_tensors_reuse_the_heap(setup):
    fresh_pages = 3 * REPEATS * MIB * 256  # 4 KiB pages the steps touch
    tuned, faults = page_faults(setup)
    assert tuned and faults < 0.25 * fresh_pages, faults  # a fresh clone measured 8 % (one block once)
    # glibc's defaults (HESSFORGE_MALLOC=system): every 64 MiB block is mapped and faulted in again
    tuned, faults = page_faults(setup, malloc="system")
    assert not tuned and faults > 0.5 * fresh_pages, faults


def test_a_bad_setting_is_one_clear_error(monkeypatch):
    """HESSFORGE_MALLOC other than system/heap: one error naming it, in Python (the command line: exit status 2)
    and in the C++ core; case and spaces do not matter (the two readings agree)."""
    from engine import allocator
    from engine.errors import HessforgeError
    from training.cli import main

    monkeypatch.setenv("HESSFORGE_MALLOC", "off")
    monkeypatch.setattr(allocator, "_tuned", None)  # as in a fresh process (the setting is read once)
    with pytest.raises(HessforgeError, match="HESSFORGE_MALLOC='off': expected 'system'"):
        allocator.malloc_setting()
    assert main(["export", "--help"]) == 2
    monkeypatch.setenv("HESSFORGE_MALLOC", " System ")
    assert allocator.malloc_setting() == "system"
    if core_available():
        env = dict(os.environ, HESSFORGE_MALLOC="off")
        code = "from engine import _core; _core.keep_freed_memory()"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode != 0 and "HESSFORGE_MALLOC='off': expected 'system'" in proc.stderr
        tuned, _ = page_faults(CORE, malloc=" System ")
        assert not tuned
