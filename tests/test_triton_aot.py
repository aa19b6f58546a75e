"""The Triton kernels through Triton's real compiler for Hopper (sm_90), with no GPU (engine.kernels.aot).

The numeric kernel tests run under TRITON_INTERPRET=1 (numpy), which accepts code the compiler refuses and
never contracts a*b+c into fma; this compiles every variant the engine launches down to a cubin in a
subprocess without the interpreter, and checks what the interpreter cannot: it compiles, nothing spills to
local memory, the float32 kernels keep no large call stack, and the forward kernels' distance arithmetic is
not fma-contracted (ops.FORWARD_OPTIONS), so the cutoff decisions round like the torch reference's.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import HessforgeError

ROOT = Path(__file__).resolve().parents[1]
# found, not imported: importing triton here, before test_triton_kernels sets TRITON_INTERPRET, would make
# that module's kernels compiled (not interpreted) functions
_spec = importlib.util.find_spec("triton")
NVIDIA_BIN = Path(_spec.origin).parent / "backends" / "nvidia" / "bin" if _spec else None
pytestmark = pytest.mark.skipif(NVIDIA_BIN is None or not (NVIDIA_BIN / "cuobjdump").exists(),
                                reason="no triton with its CUDA tools")


def _compile_report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(ROOT / "build" / "triton_aot_cache")  # never the user's cache
    run = subprocess.run([sys.executable, "-m", "engine.kernels.aot", "--json", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("num_basis", [32, 20])
def test_every_kernel_variant_compiles_for_sm90(num_basis):
    reports = _compile_report("--arch", "90", "--num-basis", str(num_basis))
    from engine.kernels import _triton_impl as tk

    expected = {"_count_kernel": len(tk.COUNT_CONFIGS), "features": len(tk.FILL_CONFIGS),
                "edges only": len(tk.EDGES_CONFIGS), "_backward_kernel": len(tk.BACKWARD_CONFIGS)}
    for dtype in ("float32", "float64"):
        found = dict.fromkeys(expected, 0)
        for r in reports:
            if r["variant"].startswith(dtype + ","):
                kind = r["variant"].split(", ")[1] if r["kernel"] == "_fill_kernel" else r["kernel"]
                found[kind] += 1
        assert found == expected, (dtype, found)  # every launch configuration the autotuning may pick
    for r in reports:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
        if r["variant"].startswith("float32"):
            # libdevice's sinf/cosf keep a small local array for large-argument range reduction (32-112 bytes
            # measured); a frame of kilobytes means calls were not inlined (seen for fp64 at NB_CHUNK 32)
            assert r["stack_bytes"] <= 128, r
        if r["kernel"] == "_count_kernel" or ", edges only," in r["variant"]:
            # no sin/cos in these: any fma would be a contraction of the distance arithmetic
            assert r["fma_in_ptx"] == 0, r


def test_interpreted_kernels_are_refused(monkeypatch):
    from engine.kernels.aot import compile_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(HessforgeError, match="TRITON_INTERPRET"):
        compile_kernels()
