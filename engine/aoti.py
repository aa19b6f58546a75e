"""An exported model's forward compiled ahead of time by AOTInductor (`hessforge export --compiled`).

TorchScript interprets the student op by op; Inductor fuses its elementwise work into C++ loops (a LAMMPS step
of the quickstart PaiNN on 1000 atoms, float32, one thread: 0.19 s instead of 0.49 s). The compiled forward is
the exported file's `forward` (energy, node energies, forces, virial on an explicit graph) with nlocal as a 0-d
int64 tensor:

    compiled(positions [N, 3] f64, numbers [N] i64, edge_index [2, E] i64, shifts [E, 3] f64, nlocal [] i64)
      -> (energy [], node_energy [N], forces [N, 3], virial [3, 3]) f64

Forces come from autograd, which AOTInductor cannot run: the whole forward-and-backward is traced first into
one graph of plain operations (make_fx, symbolic sizes N and E), which is then exported and compiled. Students
that run layer by layer (halo_width) also get the layer-wise halo exchange's programs (HALO_INTERFACE below),
for LAMMPS mode halo. The packages (zips with a shared library holding the weights) travel inside the
TorchScript archive as extra records, so the file stays one file and the TorchScript methods stay the reference
and the fallback: the C++ core uses the compiled programs only where it can (a CPU with the instruction set they
were built for, the torch they were built with, >= 2 atoms and edges; fold-mode per-atom virials stay on
TorchScript) and says why not otherwise.

Built for a named x86-64 level (x86-64-v3: AVX2, x86-64-v4: AVX-512), not `-march=native`, so a file exported
on one machine runs on machines of that level with the same extra features (cpu_features, checked at load).
Kernels take the thread count at run time (LAMMPS `threads N`, torch.set_num_threads).
"""
from __future__ import annotations

import os
import platform
import tempfile
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from engine.errors import HessforgeError
from engine.export import halo_width

# Two builds, records extra/<name> of the exported archive. Inductor's multi-thread kernels add into shared
# outputs (the per-edge scatters) with atomic adds: on the quickstart PaiNN, 1000 atoms, float32, the C++ core's
# model call takes 0.45 s on 1 thread and 0.24 s on 2 with the threaded build, 0.20 s and 0.16 s with the
# single-thread one (torch's own ops still threaded), 0.49 s and 0.32 s with TorchScript. The threaded build
# scales better (1.9x vs 1.2x from 1 to 2 threads), so the C++ core picks "serial" below 4 threads and "threaded"
# from 4 (an extrapolation; HESSFORGE_COMPILED=serial|threaded overrides): bench/results/lammps_cpu.md.
PACKAGES = {"serial": "compiled_serial.pt2", "threaded": "compiled_threaded.pt2"}
_VARIANTS = {"serial": {"cpp.threads": 1, "cpp.dynamic_threads": False},
             "threaded": {"cpp.dynamic_threads": True}}
MIN_ATOMS = 2  # sizes 0 and 1 are specialised by tracing: smaller graphs run the TorchScript forward
MIN_EDGES = 2

# Inductor's vector instruction set -> the x86-64 micro-architecture level that contains it
_LEVELS = {"avx512": "x86-64-v4", "avx2": "x86-64-v3"}


def target_level() -> Tuple[str, str, List[str]]:
    """(x86-64 level, Inductor vector ISA, the CPU features its kernels are built with: -m flags such as
    avx512vnni beyond the level) this machine compiles for; HessforgeError where it cannot."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise HessforgeError(f"a compiled export is built for x86-64 CPUs; this machine is {platform.machine()} "
                             "(export without --compiled)")
    from torch._inductor import cpu_vec_isa

    try:
        vec = cpu_vec_isa.pick_vec_isa()  # compiles a probe: needs a working C++ compiler
    except Exception as err:
        raise HessforgeError(f"a compiled export needs a working C++ compiler (CXX={os.environ.get('CXX', 'g++')}): "
                             f"{_first_line(err)}") from None
    isa = str(vec).split()[0] if str(vec) else ""
    if isa not in _LEVELS:
        forced = os.environ.get("ATEN_CPU_CAPABILITY")
        raise HessforgeError(f"a compiled export needs AVX2 or AVX-512; Inductor's vector ISA here is '{isa or 'none'}'"
                             + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else "") + " (export without --compiled)")
    # AMX (Sapphire Rapids on) is left out of the requirement: its instructions need an explicit tile
    # configuration that only Inductor's bf16/int8 matrix-multiply templates emit, never a float32/float64 loop,
    # so a build on an AMX CPU runs on any AVX-512 VNNI CPU (AMD Zen 4 included)
    features = sorted({flag[2:] for flag in vec.build_arch_flags().split()
                       if flag.startswith("-m") and not flag.startswith("-mamx")})
    return _LEVELS[isa], str(vec), features


def _first_line(err: BaseException) -> str:
    """The line of a compiler/Inductor error that names the problem: the first with 'error' or 'Killed' in it
    (a compiler's own message inside Inductor's page of build log), else the first line."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line.lower() or "killed" in line.lower():
            return line
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def example_graph(species, cutoff: float) -> Tuple[torch.Tensor, ...]:
    """A small explicit graph to trace with: 7 atoms cycling through the model's species, 5 of them local, every
    pair closer than the cutoff an edge (N and E distinct and >= 2, so neither is specialised)."""
    gen = torch.Generator().manual_seed(0)
    n = 7
    positions = torch.rand(n, 3, generator=gen, dtype=torch.float64) * (0.8 * cutoff / 3 ** 0.5)
    numbers = torch.tensor([int(species[k % len(species)]) for k in range(n)], dtype=torch.long)
    dist = torch.cdist(positions, positions)
    edge_index = torch.nonzero((dist < cutoff) & ~torch.eye(n, dtype=torch.bool)).t().contiguous()
    shifts = torch.zeros(edge_index.shape[1], 3, dtype=torch.float64)
    return positions, numbers, edge_index, shifts, torch.tensor(5, dtype=torch.long)


def _trace(fn, example, dynamic) -> Tuple[Any, Any, Tuple]:
    """(exported program, fn, example): fn (which may call torch.autograd.grad) as one program of plain
    operations with symbolic sizes, and what _package checks the build against."""
    from torch.export import export
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with torch.enable_grad():  # gradients by autograd, traced (the parameters do not require gradients)
            traced = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
            return export(traced, example, dynamic_shapes=dynamic, strict=False), fn, example
    except Exception as err:
        raise HessforgeError(f"cannot trace the student for AOTInductor: {_first_line(err)}") from None


def _outputs_of(value) -> List[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _package(traced, options: Dict[str, Any], level: str, model: nn.Module, tmp: str, name: str) -> bytes:
    """One build, checked against the eager function on the traced example before it goes into the file (the
    C++ core checks the builds against the TorchScript methods again at load)."""
    program, fn, example = traced
    path = os.path.join(tmp, name)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=path,
                                                 inductor_configs=dict(options, **{"cpp.march": level}))
        built = torch._inductor.aoti_load_package(path)
        got = _outputs_of(built(*example))
    except Exception as err:  # a compiler problem: one line, not Inductor's page of build log
        raise HessforgeError(f"AOTInductor could not compile {type(model).__name__}: {_first_line(err)}") from None
    with torch.enable_grad():
        want = _outputs_of(fn(*example))
    # float32: a vector-Jacobian product with random cotangents sums ~100 terms of both signs (edges_vjp of the
    # paper-size PaiNN: 3e-4 of its largest entry); a wrong or damaged build is off by O(1)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 1e-8
    for a, b in zip(got, want):
        scale = float(b.detach().abs().max()) + 1e-6 if b.numel() else 1.0
        if a.shape != b.shape or (b.numel() and float((a.double() - b.detach().double()).abs().max()) > tol * scale):
            raise HessforgeError(f"AOTInductor's build {name} of {type(model).__name__} does not reproduce the model "
                                 "on its example graph (a miscompile, or a cache damaged by a concurrent export: "
                                 "run the export again)")
    with open(path, "rb") as f:
        return f.read()


def compile_forward(wrapper: nn.Module) -> Tuple[Dict[str, bytes], Dict[str, Any]]:
    """AOTInductor packages of an ExportWrapper's forward on the CPU ({record name: bytes}: both builds, and the
    layer-wise halo programs where the student has them) and its metadata entry."""
    from torch.export import Dim

    level, isa, features = target_level()
    model = wrapper.model

    def forward(positions, numbers, edge_index, shifts, nlocal):
        batch = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        energy, node_energy, forces, virial, _ = wrapper._outputs(positions, numbers, edge_index, shifts, batch, 1,
                                                                  nlocal, 0)
        return energy[0], node_energy, forces, virial[0]

    example = example_graph(model.species, float(model.cutoff))
    atoms, edges = Dim("atoms", min=MIN_ATOMS), Dim("edges", min=MIN_EDGES)
    program = _trace(forward, example, ({0: atoms}, {0: atoms}, {1: edges}, {0: edges}, None))
    packages: Dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="hessforge-aoti-") as tmp:
        for variant, name in PACKAGES.items():
            packages[name] = _package(program, _VARIANTS[variant], level, model, tmp, name)
        halo = None
        if halo_width(model):
            halo = {}
            for program_name, program in halo_programs(wrapper).items():
                halo[program_name] = f"halo_{program_name}.pt2"
                packages[halo[program_name]] = _package(program, _VARIANTS["serial"], level, model, tmp,
                                                        halo[program_name])
    info = {"packages": dict(PACKAGES), "march": level, "vector_isa": isa, "cpu_features": features,
            "torch_version": torch.__version__, "min_atoms": MIN_ATOMS, "min_edges": MIN_EDGES, "halo": halo,
            "interface": "(positions[N,3] f64, numbers[N] i64, edge_index[2,E] i64, shifts[E,3] f64, nlocal[] i64) "
                         "-> forward's outputs; halo: HALO_INTERFACE of engine/aoti.py"}
    return packages, info


# Layer-wise halo exchange (LAMMPS mode halo, Model::compute_halo) in compiled programs, single-thread build only
# (several MPI ranks with one thread each is how it runs). The C++ core calls them between its exchanges and runs
# the backward pass itself, layer by layer: each *_vjp program recomputes its forward and returns the input
# gradients for a given output gradient (a vector-Jacobian product), so no autograd graph crosses a program.
# The local atom count nlocal is the size of `marker` (an [nlocal, 0] tensor), so it stays a symbolic size.
HALO_INTERFACE = """edges(vec[E,3]) -> (unit[E,3], rbf[E,K], fcut[E]);
edges_vjp(vec, g_unit, g_rbf, g_fcut) -> g_vec[E,3];
layer<k>(state[N,W], edge_index[2,E] i64, unit, rbf, fcut, marker[nlocal,0]) -> state'[nlocal,W];
layer<k>_vjp(state, edge_index, unit, rbf, fcut, marker, g_state'[nlocal,W]) -> (g_state[N,W], g_unit, g_rbf, g_fcut);
readout(numbers[n] i64, state[n,W]) -> (energy[n] f64, forces[n,3] f64 (direct) or [0,3]);
readout_vjp(numbers, state, g_energy[n] f64) -> g_state[n,W] (gradient-force models)
(model dtype but where f64 is named; sizes >= 2)"""


def halo_programs(wrapper: nn.Module) -> Dict[str, Any]:
    """The exported programs of HALO_INTERFACE for an ExportWrapper whose student runs layer by layer."""
    from torch.export import Dim

    model = wrapper.model
    dtype = wrapper.identity_cell.dtype
    direct = wrapper.direct_forces
    gen = torch.Generator().manual_seed(0)
    n, nlocal, e = 9, 5, 23  # distinct, >= 2: no size specialised
    width = int(halo_width(model))
    numbers = torch.tensor([int(model.species[k % len(model.species)]) for k in range(n)], dtype=torch.long)
    vec = (torch.randn(e, 3, generator=gen, dtype=torch.float64) * float(model.cutoff) / 3).to(dtype)
    with torch.no_grad():
        unit, rbf, fcut = wrapper.halo_edges(vec)
    edge_index = torch.stack([torch.randint(0, nlocal, (e,), generator=gen), torch.randint(0, n, (e,), generator=gen)])
    state = torch.randn(n, width, generator=gen, dtype=torch.float64).to(dtype)
    marker = torch.empty(nlocal, 0, dtype=dtype)
    atoms, edges, local = Dim("atoms", min=2), Dim("edges", min=2), Dim("local", min=2)
    edge_dims = ({0: edges}, {0: edges}, {0: edges})

    def leaves(*tensors):
        return [t.detach().requires_grad_(True) for t in tensors]

    def grads(outputs, inputs, seeds):
        found = torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs))

    def edges_vjp(vec, g_unit, g_rbf, g_fcut):
        (x,) = leaves(vec)
        return grads(list(wrapper.halo_edges(x)), [x], [g_unit, g_rbf, g_fcut])[0]

    programs = {"edges": _trace(lambda v: wrapper.halo_edges(v), (vec,), ({0: edges},)),
                "readout": _trace(lambda z, s: wrapper.halo_readout(z, s), (numbers, state),
                                  ({0: atoms}, {0: atoms}))}
    if not direct:
        programs["edges_vjp"] = _trace(edges_vjp, (vec, unit, rbf, fcut), ({0: edges},) + edge_dims)

        def readout_vjp(z, s, g_energy):
            (x,) = leaves(s)
            return grads([wrapper.halo_readout(z, x)[0]], [x], [g_energy])[0]

        g_energy = torch.randn(n, generator=gen, dtype=torch.float64)
        programs["readout_vjp"] = _trace(readout_vjp, (numbers, state, g_energy), ({0: atoms}, {0: atoms}, {0: atoms}))
    layer_dims = ({0: atoms}, {1: edges}) + edge_dims + ({0: local},)

    def layer_programs(k: int):
        def layer(s, ei, u, r, f, m):
            return wrapper.halo_layer(k, s, ei, u, r, f, m.shape[0])

        def layer_vjp(s, ei, u, r, f, m, g_out):
            xs = leaves(s, u, r, f)
            out = wrapper.halo_layer(k, xs[0], ei, xs[1], xs[2], xs[3], m.shape[0])
            return grads([out], xs, [g_out])

        return layer, layer_vjp

    for k in range(int(model.num_layers)):
        layer, layer_vjp = layer_programs(k)
        args = (state, edge_index, unit, rbf, fcut, marker)
        programs[f"layer{k}"] = _trace(layer, args, layer_dims)
        if not direct:
            g_out = torch.randn(nlocal, width, generator=gen, dtype=torch.float64).to(dtype)
            programs[f"layer{k}_vjp"] = _trace(layer_vjp, args + (g_out,), layer_dims + ({0: local},))
    return programs
