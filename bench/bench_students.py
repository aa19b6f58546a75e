"""Student forward+forces (eager vs compiled vs compiled+fused; on CUDA also compiled+triton and cudagraphs:
the fused op's Triton kernels, compiled, replayed as CUDA graphs) and teacher vs student (the MACE-OFF23-Large
architecture vs the paper-size PaiNN student) at batch 64 and at each one's best batch, on ~26-atom molecules
(s22 complexes with >= 24 atoms). Every timed call is an MD step's force work: the neighbor list rebuilt from
the positions, then energy and forces (engine.runner's "model+NL" timing).

    . .venv/bin/activate
    python -m pytest bench/bench_students.py -p no:cacheprovider -s \
        --benchmark-columns=min,median,mean,rounds --benchmark-json=bench/results/students_cpu.json
    python bench/bench_students.py report bench/results/students_cpu.json   # markdown tables + paper ratios
    python bench/bench_students.py profile [BATCH [MODES]]                  # wall vs kernel time, top ops
    python bench/bench_students.py stream [MODES]                           # recompiles over varying batches

ns/day at 1 fs = structures/s x 0.0864 (bench/README.md), from the median of the rounds. Paper anchors (A6000,
eager PyTorch, SPICE monomers): PaiNN 291.5 vs MACE-OFF-L 38.0 ns/day at batch 64 (7.7x); 1827 vs 38.1 at
the best batch (48x).

Knobs (environment): HESSFORGE_BENCH_DEVICE (auto: cuda when available), HESSFORGE_BENCH_THREADS (1),
HESSFORGE_BENCH_ROUNDS (5, students), HESSFORGE_BENCH_TEACHER_ROUNDS (1 on CPU, 5 on CUDA: one MACE-OFF-L
call on 64 molecules takes about a minute on one CPU core), HESSFORGE_BENCH_BATCHES (16,64),
HESSFORGE_BENCH_MAX_BATCH (sweep limit: 1024 on CPU, 8192 on CUDA), HESSFORGE_BENCH_DTYPE (float32),
HESSFORGE_BENCH_MODES (CPU: eager,compiled,compiled+fused; CUDA: eager,compiled,compiled+triton,cudagraphs:
on CUDA compiled+fused is compiled+triton), HESSFORGE_BENCH_SWEEP (the best-batch sweeps; CPU:
teacher,eager,compiled; CUDA: teacher,eager,compiled+triton,cudagraphs), HESSFORGE_BENCH_SWEEP_FROM (the
sweeps' first batch size, doubled up to the maximum: 1 on CPU, 16 on CUDA), HESSFORGE_BENCH_FIXED (64),
HESSFORGE_BENCH_LOG (a JSONL file that gets each case's result as soon as it is measured, so a run stopped
early keeps what it measured; `report` reads it like the --benchmark-json file).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import warnings

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from engine.allocator import keep_freed_memory  # noqa: E402
from engine.errors import HessforgeError  # noqa: E402
from engine.models import PaiNN  # noqa: E402
from engine.compiled import compile_events, compile_stats  # noqa: E402
from engine.runner import (StudentTarget, cuda_graphs_note, fill_batch, machine_info, sample_batch,  # noqa: E402
                           ns_per_day, resolve_device, sweep)

keep_freed_memory()  # as hessforge's commands run (engine/allocator.py; HESSFORGE_MALLOC=system: glibc's defaults)
DEVICE = resolve_device(os.environ.get("HESSFORGE_BENCH_DEVICE", "auto"))
CUDA = DEVICE.type == "cuda"
THREADS = int(os.environ.get("HESSFORGE_BENCH_THREADS", "1"))
ROUNDS = int(os.environ.get("HESSFORGE_BENCH_ROUNDS", "5"))
TEACHER_ROUNDS = int(os.environ.get("HESSFORGE_BENCH_TEACHER_ROUNDS", "5" if CUDA else "1"))
BATCHES = [int(b) for b in os.environ.get("HESSFORGE_BENCH_BATCHES", "16,64").split(",")]
MAX_BATCH = int(os.environ.get("HESSFORGE_BENCH_MAX_BATCH", "8192" if CUDA else "1024"))
DTYPE = {"float32": torch.float32, "float64": torch.float64}[os.environ.get("HESSFORGE_BENCH_DTYPE", "float32")]
DATA = "s22:24"
STUDENT = dict(hidden=128, layers=4, num_basis=128, cutoff=5.0, force_mode="gradient")  # the paper-size PaiNN
MODES = os.environ.get("HESSFORGE_BENCH_MODES", "eager,compiled,compiled+triton,cudagraphs" if CUDA
                       else "eager,compiled,compiled+fused").split(",")
SWEEP = os.environ.get("HESSFORGE_BENCH_SWEEP", "teacher,eager,compiled+triton,cudagraphs" if CUDA
                       else "teacher,eager,compiled").split(",")
SWEEP_FROM = int(os.environ.get("HESSFORGE_BENCH_SWEEP_FROM", "16" if CUDA else "1"))
LOG = os.environ.get("HESSFORGE_BENCH_LOG")
FIXED = int(os.environ.get("HESSFORGE_BENCH_FIXED", "64"))  # the paper's fixed batch size
PAPER = {"batch64": {"student": 291.5, "teacher": 38.0}, "best": {"student": 1827.0, "teacher": 38.1}}

torch.set_num_threads(THREADS)
warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")


@pytest.fixture(scope="module")
def structures():
    from training.bench import data_summary, load_structures

    s = load_structures(DATA)
    d = data_summary(s)
    print(f"\n{DATA}: {d['structures']} molecules, {d['atoms_mean']:.1f} atoms on average; device {DEVICE}, "
          f"{str(DTYPE)[6:]}, {torch.get_num_threads()} thread(s); {machine_info(DEVICE)['cpu']}")
    return s


_targets = {}


def target(kind: str):
    """Cached targets (a compiled model compiles once per session, then serves every batch size)."""
    if kind not in _targets:
        if kind == "teacher":
            from training.bench import MaceTarget, count_parameters, mace_off_large

            model = mace_off_large(dtype=DTYPE)
            print(f"\nmace-off-l-arch: {count_parameters(model):,} parameters")
            _targets[kind] = MaceTarget(model, "mace-off-l-arch", DEVICE, DTYPE)
        else:
            torch.manual_seed(0)
            model = PaiNN([1, 6, 7, 8], **STUDENT)
            try:
                _targets[kind] = StudentTarget(model, kind, DEVICE, DTYPE, name="painn")
            except HessforgeError as err:
                _targets[kind] = err
    t = _targets[kind]
    if isinstance(t, HessforgeError):
        pytest.skip(str(t))
    return t


def run(benchmark, t, structures, batch, rounds, **info):
    """Time `rounds` MD steps' force work on `batch` structures; the result goes to the benchmark record
    (extra_info) and, with HESSFORGE_BENCH_LOG, at once to that JSONL file."""
    graph = t.prepare(sample_batch(structures, batch))  # what engine.runner.sweep timed at this size
    atoms = t.count(graph)[0]
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def step():
        t.model_with_neighbors(graph)
        sync()

    before = compile_stats()
    # warm-up: compilation, allocator; CUDA graphs are recorded on the second call (t.min_warmup)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=t.min_warmup, iterations=1)
    events = compile_events(before, compile_stats())
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        model=t.name, mode=t.mode, batch=batch, atoms=atoms, device=str(DEVICE), dtype=str(DTYPE)[6:],
        threads=torch.get_num_threads(), structures_per_s=batch / median,
        ns_per_day=ns_per_day(batch / median), compile_events=events, **info)
    warning = cuda_graphs_note(t.mode, events)
    if warning:
        benchmark.extra_info["warning"] = warning
        print(f"\n  {t.mode} batch {batch}: {warning}")
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"name": benchmark.name, "stats": {"median": median, "min": benchmark.stats.stats.min,
                                                                   "rounds": rounds},
                                "extra_info": benchmark.extra_info}) + "\n")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", MODES)
def test_student_step(benchmark, structures, mode, batch):
    run(benchmark, target(mode), structures, batch, ROUNDS)


def test_teacher_step_fixed(benchmark, structures):
    run(benchmark, target("teacher"), structures, FIXED, TEACHER_ROUNDS)


@pytest.mark.parametrize("kind", SWEEP)
def test_best_batch(benchmark, structures, kind):
    """Sweep SWEEP_FROM, doubling (engine.runner.sweep: out of memory, plateau, memory cap on CPU), then
    benchmark the best batch size found (in atom-steps/s; each batch holds the data's mix of sizes)."""
    t = target(kind)
    fast = kind == "teacher" and not CUDA
    sizes = [2 ** k for k in range(SWEEP_FROM.bit_length() - 1, MAX_BATCH.bit_length())]
    s = sweep(t, structures, batch_sizes=sizes, warmup=1, repeats=1 if fast else 3,
              with_neighbors=True, max_call_s=120.0,
              progress=lambda r: print(f"\n  sweep {t.name} [{t.mode}] batch {r.batch_size}: "
                                       f"{r.model_nl.ns_per_day:.3g} ns/day", end=""))
    best = s.best("model_nl")  # by atom-steps/s
    if best is None:
        pytest.skip(f"sweep of {t.name} [{t.mode}] measured nothing: {s.stop_reason}")
    print(f"\n  sweep stop: {s.stop_reason}; best batch {best.batch_size}")
    run(benchmark, t, structures, best.batch_size, TEACHER_ROUNDS if kind == "teacher" else ROUNDS,
        sweep=[{"batch": r.batch_size, "ns_per_day": r.model_nl.ns_per_day,
                "atom_steps_per_s": r.model_nl.atom_steps_per_s, "atoms_per_structure": r.atoms_per_structure,
                "peak_memory_mb": r.peak_memory_bytes / 2**20} for r in s.results],
        sweep_stop=s.stop_reason, memory_method=best.memory_method)


# ---------------------------------------------------------------------------------------------- report
def report(path: str) -> str:
    """Markdown tables and the paper ratios from a --benchmark-json file of this suite."""
    with open(path) as f:
        if path.endswith(".jsonl"):  # HESSFORGE_BENCH_LOG: one result per line, the last of a name wins
            rows = {b["name"]: b for b in map(json.loads, filter(str.strip, f))}
        else:
            rows = {b["name"]: b for b in json.load(f)["benchmarks"]}
    lines = ["| case | model | mode | batch | median ms/call | structures/s | ns/day (1 fs) |", "|" + "---|" * 7]
    for name, b in rows.items():
        e = b["extra_info"]
        lines.append(f"| `{name}` | {e['model']} | {e['mode']} | {e['batch']} | {b['stats']['median'] * 1e3:.1f} | "
                     f"{e['structures_per_s']:.2f} | {e['ns_per_day']:.3g} |")
    out = ["\n".join(lines), ""]
    out += [f"**{name}: {b['extra_info']['warning']}**" for name, b in rows.items() if b["extra_info"].get("warning")]

    def get(name):
        return rows[name]["extra_info"] if name in rows else None

    students = [get(n) for n in rows if n.startswith("test_student_step[")]
    modes = list(dict.fromkeys(e["mode"] for e in students))
    batches = sorted(set(e["batch"] for e in students))
    by = {(e["mode"], e["batch"]): e["ns_per_day"] for e in students}
    paper64 = PAPER["batch64"]["student"] / PAPER["batch64"]["teacher"]
    paper_best = PAPER["best"]["student"] / PAPER["best"]["teacher"]
    out += ["| student | teacher | student/teacher | paper (eager, A6000) |", "|---|---|---|---|"]
    teacher = get("test_teacher_step_fixed")
    if teacher:
        for mode in modes:
            v = by.get((mode, teacher["batch"]))
            if v:
                out.append(f"| {mode}, batch {teacher['batch']}: {v:.3g} ns/day | batch {teacher['batch']}: "
                           f"{teacher['ns_per_day']:.3g} ns/day | {v / teacher['ns_per_day']:.1f}x | "
                           f"{paper64:.1f}x (291.5 / 38.0 at batch 64) |")
    tb = get("test_best_batch[teacher]")
    for name in rows:
        e = get(name) if name.startswith("test_best_batch[") and name != "test_best_batch[teacher]" else None
        if e and tb:
            out.append(f"| {e['mode']}, best batch {e['batch']}: {e['ns_per_day']:.3g} ns/day | best batch "
                       f"{tb['batch']}: {tb['ns_per_day']:.3g} ns/day | {e['ns_per_day'] / tb['ns_per_day']:.1f}x | "
                       f"{paper_best:.1f}x (1827 / 38.1) |")
    others = [m for m in modes if m != "eager"]
    out += ["", "| batch | " + " | ".join(f"{m} / eager" for m in others) + " |", "|---|" + "---|" * len(others)]
    for b in batches:
        base = by.get(("eager", b))
        out.append(f"| {b} | " + " | ".join(f"{by[(m, b)] / base:.2f}x" if base and (m, b) in by else "-"
                                            for m in others) + " |")
    return "\n".join(out)


def profile(batch: int = 64, modes=None, top: int = 12) -> None:
    """Where a step's time goes, per mode: the wall time of one step (median of 5, synchronised) against the
    time the device spends in kernels and the number of kernels run (torch.profiler); on CUDA a wall
    time far above the kernel time means the step is bound by launches and Python, not by arithmetic (what
    compiling and CUDA graphs remove). Then the top operators by self time. Modes: targets of this suite
    (default: eager and compiled on CPU; eager, compiled+triton, cudagraphs and the teacher on CUDA)."""
    import time

    from torch.profiler import ProfilerActivity, profile as prof

    structures = load_structures_for_profile()
    modes = modes or (["eager", "compiled+triton", "cudagraphs", "teacher"] if CUDA else ["eager", "compiled"])
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    for mode in modes:
        t = target(mode)
        graph = t.prepare(fill_batch(structures, batch))
        for _ in range(t.min_warmup + 1):
            t.model_with_neighbors(graph)
        sync()
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            t.model_with_neighbors(graph)
            sync()
            walls.append(time.perf_counter() - t0)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with prof(activities=acts) as p:
            t.model_with_neighbors(graph)
            sync()
        averages = p.key_averages()
        wall_ms = 1e3 * statistics.median(walls)
        atoms, edges = t.count(graph)
        size = f"{atoms} atoms, {edges} edges" if atoms >= 0 else "atoms and edges not counted"
        line = f"\n## {t.name} [{t.mode}], batch {batch}, {size}: wall {wall_ms:.2f} ms per step"
        if CUDA:
            try:
                kernels = [a for a in averages if _device_time_us(a) > 0 and "cuda" in str(a.device_type).lower()]
                kernel_ms = sum(_device_time_us(a) for a in kernels) / 1e3
                runs = sum(a.count for a in kernels)
                line += (f"; device busy {kernel_ms:.2f} ms ({100 * kernel_ms / wall_ms:.0f}% of the wall time) "
                         f"in {runs} kernels")
            except AttributeError as err:  # another torch's profiler API: the table below still tells
                line += f"; device time not summed ({err})"
        print(line)
        print(averages.table(sort_by="self_cuda_time_total" if CUDA else "self_cpu_time_total", row_limit=top))


def stream(modes=None, batches: int = 16, seed: int = 0) -> str:
    """Recompiles over a stream of batches of varying size (the issue's "does not recompile on every batch"):
    for each mode, `batches` batches of 1-64 s22:24 molecules in a seeded random order of sizes (so atom and
    edge counts vary), the graphs compiled and the recompilations at each batch (engine.compiled.compile_stats)
    and the call time. Markdown."""
    import random
    import time

    from engine.compiled import compile_events, compile_stats

    structures = load_structures_for_profile()
    sizes = [1, 64] + random.Random(seed).sample(range(2, 64), batches - 2)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    lines = []
    for mode in modes or (["compiled+triton", "cudagraphs"] if CUDA else ["compiled", "compiled+fused"]):
        t = target(mode)
        lines += [f"\n### {t.name} [{t.mode}], {DEVICE}, {str(DTYPE)[6:]}", "",
                  "| call | structures | atoms | ms | new graphs | recompiles |", "|---|---|---|---|---|---|"]
        total = compile_stats()
        for k, b in enumerate(sizes):
            graph = t.prepare(fill_batch(structures[k % len(structures):] + structures, b))
            before = compile_stats()
            t0 = time.perf_counter()
            t.model_with_neighbors(graph)
            sync()
            ms = 1e3 * (time.perf_counter() - t0)
            ev = compile_events(before, compile_stats())
            lines.append(f"| {k + 1} | {b} | {t.count(graph)[0]} | {ms:.1f} | {ev['unique_graphs']} | "
                         f"{ev['recompiles']} |")
        ev = compile_events(total, compile_stats())
        lines.append(f"\n{len(sizes)} batches: {ev['unique_graphs']} graphs compiled, {ev['recompiles']} "
                     "recompilations.")
    return "\n".join(lines)


def _device_time_us(avg) -> float:
    """Self device time of a profiler average (the attribute was renamed in torch 2.4)."""
    value = getattr(avg, "self_device_time_total", None)
    return float(value if value is not None else getattr(avg, "self_cuda_time_total", 0.0))


def load_structures_for_profile():
    from training.bench import load_structures

    return load_structures(DATA)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "report":
        print(report(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "stream":  # stream [MODE,MODE,...]
        print(stream(sys.argv[2].split(",") if len(sys.argv) > 2 else None))
    elif len(sys.argv) >= 2 and sys.argv[1] == "profile":  # profile [BATCH [MODE,MODE,...]]
        profile(int(sys.argv[2]) if len(sys.argv) > 2 else 64, sys.argv[3].split(",") if len(sys.argv) > 3 else None)
    else:
        print(__doc__)
