"""Ahead-of-time compilation of the Triton kernels for a named NVIDIA GPU, on a machine without one.

The numeric tests run the kernels under TRITON_INTERPRET=1, which executes them as numpy and accepts code
that Triton's compiler refuses (or compiles differently). This runs the real pipeline, source -> TTIR ->
TTGIR -> LLVM IR -> PTX -> cubin (the ptxas bundled with Triton), with the launch options ops.py uses, for
every kernel variant the engine launches, and reads each cubin's resources with the bundled cuobjdump:
registers, spill (local) memory, shared memory, and the fused multiply-adds left in the PTX.

    python -m engine.kernels.aot [--arch 90] [--num-basis 32] [--json]   # one row per kernel variant

TRITON_INTERPRET must be unset (the kernels are decorated as interpreted functions otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import HessforgeError

POINTER = {"float32": "*fp32", "float64": "*fp64"}


@dataclass
class KernelReport:
    kernel: str
    variant: str
    registers: int
    spill_bytes: int  # cuobjdump's LOCAL: per-thread local memory of spilled registers
    stack_bytes: int  # cuobjdump's STACK: per-thread call stack (libdevice calls not inlined), local memory too
    shared_bytes: int
    fma_in_ptx: int  # contracted a*b+c, or libdevice's sin/cos (which use fma by design)


def _tiling(config) -> str:
    return ", ".join([f"{k} {v}" for k, v in config.kwargs.items() if k != "NB_CHUNK" or v > 1]
                     + [f"{config.num_warps} warp" + ("s" if config.num_warps > 1 else "")])


def _variants(dtype: str, num_basis: int):
    """(kernel name, variant label, signature, constexprs, options) for every launch ops.py makes on a GPU:
    each kernel with each launch configuration its autotuning may pick (_triton_impl.*_CONFIGS)."""
    from engine.kernels import ops
    from engine.kernels._triton_impl import BACKWARD_CONFIGS, COUNT_CONFIGS, EDGES_CONFIGS, FILL_CONFIGS

    fp = POINTER[dtype]
    forward = dict(pos_ptr=fp, batch_ptr="*i64", meta_ptr="*i32", cell_ptr=fp, inv_ptr=fp, params_ptr=fp)
    for config in COUNT_CONFIGS:
        yield ("_count_kernel", f"{dtype}, {_tiling(config)}", dict(forward, counts_ptr="*i64", BLOCK_C="constexpr"),
               dict(config.kwargs), dict(ops.FORWARD_OPTIONS, num_warps=config.num_warps))
    fill = dict(forward, off_ptr=fp, first_ptr="*i64", capacity="i32", edge_ptr="*i64", shift_ptr=fp,
                r_ptr=fp, unit_ptr=fp, rbf_ptr=fp, fcut_ptr=fp, NUM_BASIS="constexpr", NB_CHUNK="constexpr",
                WITH_GEOMETRY="constexpr", BLOCK_C="constexpr")
    for geometry, configs in ((True, FILL_CONFIGS), (False, EDGES_CONFIGS)):
        for config in configs:
            yield ("_fill_kernel", f"{dtype}, {'features' if geometry else 'edges only'}, {_tiling(config)}", fill,
                   dict(config.kwargs, NUM_BASIS=num_basis if geometry else 0, WITH_GEOMETRY=geometry),
                   dict(ops.FORWARD_OPTIONS, num_warps=config.num_warps))
    backward = dict(r_ptr=fp, unit_ptr=fp, g_r_ptr=fp, g_unit_ptr=fp, g_rbf_ptr=fp, g_fcut_ptr=fp,
                    count_ptr="*i64", params_ptr=fp, g_vec_ptr=fp, num_slots="i32", NUM_BASIS="constexpr",
                    NB_CHUNK="constexpr", HAS_G_R="constexpr", HAS_G_UNIT="constexpr", HAS_G_RBF="constexpr",
                    HAS_G_FCUT="constexpr", BLOCK_E="constexpr")
    flags = dict(NUM_BASIS=num_basis, HAS_G_R=True, HAS_G_UNIT=True, HAS_G_RBF=True, HAS_G_FCUT=True)
    for config in BACKWARD_CONFIGS:
        yield ("_backward_kernel", f"{dtype}, all gradients, {_tiling(config)}", backward,
               dict(flags, **config.kwargs), dict(ops.BACKWARD_OPTIONS, num_warps=config.num_warps))


def _resources(cubin: bytes, cuobjdump: Path, name: str) -> tuple[int, int, int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    lines = text.splitlines()
    heads = [k for k, ln in enumerate(lines) if ln.strip() == f"Function {name}:"]
    line = next((ln for ln in lines[heads[0] + 1:] if "REG:" in ln), None) if heads else None
    if line is None:
        raise HessforgeError(f"cuobjdump printed no resource usage for {name}:\n{text}")
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", line).group(1))  # noqa: E731
    return field("REG"), field("LOCAL"), field("STACK"), field("SHARED")


def compile_kernels(arch: int = 90, dtypes=("float32", "float64"), num_basis: int = 32) -> list[KernelReport]:
    """Compile every kernel variant for sm_<arch> and report its resources. Raises on a compile error."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise HessforgeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.kernels import _triton_impl

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", arch, 32)
    reports = []
    for dtype in dtypes:
        for name, variant, signature, constexprs, options in _variants(dtype, num_basis):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Triton 3.9's notice that its fp-fusion default will change
                compiled = triton.compile(ASTSource(fn=getattr(_triton_impl, name), signature=signature,
                                                    constexprs=constexprs), target=target, options=dict(options))
            regs, spill, stack, shared = _resources(compiled.asm["cubin"], cuobjdump, name)
            fma = len(re.findall(r"\bfma\.rn(\.ftz)?\.f(32|64)\b", compiled.asm["ptx"]))
            reports.append(KernelReport(name, variant, regs, spill, stack, shared, fma))
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--num-basis", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="a JSON list instead of the markdown table")
    args = parser.parse_args(argv)
    try:
        reports = compile_kernels(args.arch, num_basis=args.num_basis)
    except HessforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=1))
        return 0
    print(f"sm_{args.arch}, {args.num_basis} radial basis functions, launch options from engine/kernels/ops.py\n")
    print("| kernel | variant | registers | spill bytes | stack bytes | shared bytes "
          "| fma in PTX (sin/cos: libdevice) |\n|---|---|---|---|---|---|---|")
    for r in reports:
        print(f"| {r.kernel} | {r.variant} | {r.registers} | {r.spill_bytes} | {r.stack_bytes} "
              f"| {r.shared_bytes} | {r.fma_in_ptx} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
