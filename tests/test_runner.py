"""engine.runner: speed arithmetic (ns/day = structures/s x 0.0864), median timing, the batch-size sweep's stop
rules (plateau, memory cap, out of memory), real students in eager and fused modes, and bad input."""
import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from engine.errors import HessforgeError, UnknownElementError
from engine.graph import graph_from_atoms
from engine.models import STUDENTS
from engine.runner import (BenchResult, CompiledFusedStudent, FunctionTarget, FusedStudent, MemoryProbe, StudentTarget,
                           Sweep, Timing, benchmark, edge_slots, fill_batch, format_table, fused_forward, ns_per_day,
                           rebuild_neighbors, sample_batch, speedup, sweep, write_json)
from toy import STUDENT_VARIANTS

torch.set_num_threads(1)
SPECIES = [1, 6, 7, 8]


class FakeClock:
    """A timer the fake models advance: timings become exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_target(clock, seconds, fail_at=None, error=MemoryError("cannot allocate")):
    """A model whose call on B structures takes seconds(B) on the fake clock, and raises `error` from
    `fail_at` structures on."""

    def run(atoms_list):
        if fail_at is not None and len(atoms_list) >= fail_at:
            raise error
        clock.now += seconds(len(atoms_list))

    return FunctionTarget("fake", prepare=lambda atoms_list: atoms_list, run=run)


class FakeProbe(MemoryProbe):
    def __init__(self, bytes_per_structure, batch):
        super().__init__(torch.device("cpu"))
        self.method = "fake"
        self.value = bytes_per_structure * batch

    def start(self):
        pass

    def peak_bytes(self):
        return self.value


def small_molecules(rng, n=5):
    out = []
    for name in ("CH4", "H2O", "NH3", "CH3OH", "HCOOH")[:n]:
        a = molecule(name)
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        out.append(a)
    return out


def periodic(rng, n=6):
    cell = np.diag(rng.uniform(3.5, 4.5, 3)) + rng.uniform(-0.5, 0.5, (3, 3)) * (1 - np.eye(3))
    return Atoms(numbers=rng.choice(SPECIES, n), positions=rng.uniform(0, 1, (n, 3)) @ cell, cell=cell, pbc=True)


def tiny(force_mode="gradient", dtype=torch.float64, arch="painn"):
    return STUDENTS[arch](SPECIES, cutoff=3.5, hidden=16, layers=2, num_basis=8, force_mode=force_mode).to(dtype)


def test_speed_arithmetic_and_median(rng):
    clock = FakeClock()
    per_call = float(rng.uniform(0.01, 0.1))
    batch = int(rng.integers(2, 50))
    structures = small_molecules(rng)
    r = benchmark(fake_target(clock, lambda b: per_call), structures, batch, warmup=1, repeats=5, timer=clock,
                  memory_probe=FakeProbe(0, batch))
    # the structures it times: below the data's size a spread over it by size, not its first few (the test used
    # fill_batch's, and failed for batch sizes 2-4 whenever the two picks differed in atoms)
    atoms = sum(len(a) for a in sample_batch(structures, batch))
    assert r.atoms == atoms and r.batch_size == batch
    assert r.model.median_s == pytest.approx(per_call)
    assert r.model.structures_per_s == pytest.approx(batch / per_call)
    assert r.model.atom_steps_per_s == pytest.approx(atoms / per_call)
    assert r.model.ns_per_day == pytest.approx(batch / per_call * 86400 * 1e-6)
    assert ns_per_day(1000.0) == pytest.approx(86.4)
    assert r.model_nl is r.model  # the callable has its neighbor list inside: one timing, both columns


def test_median_ignores_outliers():
    clock = FakeClock()
    durations = iter([5.0, 0.2, 0.1, 9.0, 0.3])  # warm-up 5.0, then 0.2 0.1 9.0 0.3 ... median of 4 = 0.25
    target = fake_target(clock, lambda b: next(durations))
    r = benchmark(target, [molecule("H2O")], 1, warmup=1, repeats=4, timer=clock, memory_probe=FakeProbe(0, 1))
    assert r.model.first_call_s == 5.0
    assert r.model.median_s == pytest.approx(0.25)


def test_sweep_stops_at_plateau_and_finds_best(rng):
    clock = FakeClock()
    knee = 2 ** int(rng.integers(2, 6))
    target = fake_target(clock, lambda b: max(1.0, b / knee))  # throughput grows until `knee`, then flat
    s = sweep(target, [molecule("H2O")], max_batch=4096, warmup=1, repeats=3, timer=clock,
              memory_probe=lambda: FakeProbe(0, 1))
    assert "plateau" in s.stop_reason
    assert [r.batch_size for r in s.results][-1] == 4 * knee
    assert s.best().batch_size == knee
    assert s.best().model.structures_per_s == pytest.approx(knee)


def test_sweep_stops_at_memory_cap_and_out_of_memory():
    clock = FakeClock()
    sizes = iter([1, 2, 4, 8, 16, 32])
    s = sweep(fake_target(clock, lambda b: 1.0), [molecule("H2O")], max_batch=1024, warmup=1, repeats=1,
              timer=clock, memory_cap_bytes=10_000, memory_probe=lambda: FakeProbe(1000, next(sizes)))
    assert "memory cap" in s.stop_reason
    assert s.results[-1].batch_size == 8  # 16 structures would need 16 kB > 10 kB
    s = sweep(fake_target(clock, lambda b: 1.0, fail_at=16), [molecule("H2O")], max_batch=1024, warmup=1,
              repeats=1, timer=clock, memory_probe=lambda: FakeProbe(0, 1))
    assert s.stop_reason == "out of memory at batch 16"
    assert s.results[-1].batch_size == 8
    # torch's CPU allocator fails with a RuntimeError, CUDA with OutOfMemoryError: the same clean stop
    for error in (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 8589934592 bytes"), torch.OutOfMemoryError("CUDA out of memory")):
        s = sweep(fake_target(clock, lambda b: 1.0, fail_at=4, error=error), [molecule("H2O")], max_batch=1024,
                  warmup=1, repeats=1, timer=clock, memory_probe=lambda: FakeProbe(0, 1))
        assert s.stop_reason == "out of memory at batch 4" and [r.batch_size for r in s.results] == [1, 2]
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
        sweep(fake_target(clock, lambda b: 1.0, fail_at=4, error=RuntimeError("shape mismatch")),
              [molecule("H2O")], max_batch=1024, warmup=1, repeats=1, timer=clock)


@pytest.mark.parametrize("arch,force_mode", STUDENT_VARIANTS)
def test_fused_student_equals_eager(rng, arch, force_mode):
    model = tiny(force_mode, arch=arch)
    structures = small_molecules(rng, 3) + [periodic(rng)]
    graph = graph_from_atoms(structures, model.cutoff, torch.float64)
    eager = model(graph)
    fused = FusedStudent(model, backend="torch")(graph._replace(edge_index=graph.edge_index[:, :0],
                                                                shifts=graph.shifts[:0]))  # edges unused
    assert torch.allclose(eager["energy"], fused["energy"], atol=1e-10)
    assert torch.allclose(eager["forces"], fused["forces"], atol=1e-10)
    assert float(eager["forces"].detach().abs().max()) > 1e-4


@pytest.mark.parametrize("force_mode", ["gradient", "direct"])
def test_padded_fused_student_grows_and_never_drops_edges(rng, force_mode):
    """capacity=N pads the edges to N slots (static shapes, for CUDA graphs); too few slots are detected after
    the call and the call is redone with the capacity grown; capacity=0 sizes the slots at the first call."""
    model = tiny(force_mode)
    structures = small_molecules(rng, 4) + [periodic(rng)]
    graph = graph_from_atoms(structures, model.cutoff, torch.float64)
    edges = graph.edge_index.shape[1]
    eager = model(graph)
    start = int(rng.integers(1, edges // 2))
    for capacity in (start, 0, int(1.5 * edges), 3 * edges):  # too few, sized at the first call, enough, mostly padding
        fused = FusedStudent(model, backend="torch", capacity=capacity)
        out = fused(graph)
        assert torch.allclose(eager["energy"], out["energy"], atol=1e-10)
        assert torch.allclose(eager["forces"], out["forces"], atol=1e-10)
        assert fused.capacity == (capacity if edges <= capacity <= 2 * edges else edge_slots(edges))
        assert edges <= edge_slots(edges) <= max(256, 1.125 * edges + 256) and edge_slots(edges) % 256 == 0
    with pytest.raises(HessforgeError, match="capacity must be >= 0"):
        FusedStudent(model, capacity=-3)
    # On a GPU the padded op reads nothing back (no sync inside a CUDA graph), so it cannot reject NaN
    # positions itself (on CPU it does); the core's status says so and the call raises after it.
    fused = FusedStudent(model, backend="torch", capacity=4 * edges)

    def core_seeing_nan(*args):
        energy, node_energy, forces, status = fused.core(*args)
        assert status.tolist() == [edges, 1]
        return energy, node_energy, forces, status * torch.tensor([1, 0])

    with pytest.raises(HessforgeError, match="NaN or Inf"):
        fused_forward(core_seeing_nan, fused, graph, True, False)


def test_compiled_padded_student_for_cuda_graphs(rng):
    """The cudagraphs mode's student (compiled with mode='reduce-overhead' on a padded fused student): on CPU
    torch.compile runs it without graphs, so this checks its outputs and the one compilation for a stream of
    calls; the graph replay itself needs CUDA (bench/gpu/checks.sh). Unpadded, it is refused."""
    from torch._dynamo.utils import counters

    from engine.compiled import compile_events, compile_stats

    torch._dynamo.reset()
    counters.clear()
    before = compile_stats()
    model = tiny(dtype=torch.float32)
    structures = small_molecules(rng, 5)
    graph = graph_from_atoms(structures, model.cutoff, torch.float32)
    student = CompiledFusedStudent(FusedStudent(model, backend="torch", capacity=0), mode="reduce-overhead")
    eager = model(graph)
    for _ in range(3):
        moved = graph._replace(positions=graph.positions + 0.01 * torch.randn_like(graph.positions))
        out = student(moved)
        ref = model(moved)
        torch.testing.assert_close(out["forces"], ref["forces"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(out["forces"], eager["forces"])
    events = compile_events(before, compile_stats())
    assert events["unique_graphs"] == 1 and events["recompiles"] == 0
    with pytest.raises(HessforgeError, match="padded"):
        CompiledFusedStudent(FusedStudent(model, backend="torch"), mode="reduce-overhead")


def test_benchmark_says_when_cuda_graphs_were_not_used(rng):
    """A result labelled cudagraphs whose graphs inductor skipped (here: CPU tensors, so every graph) says
    so in its note and counts the skips; a plain compiled student's result has no such warning."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(dtype=torch.float32)
    structures = small_molecules(rng, 3)
    prepare = lambda atoms: graph_from_atoms(list(atoms), model.cutoff, torch.float32)  # noqa: E731
    graphs = CompiledFusedStudent(FusedStudent(model, backend="torch", capacity=0), mode="reduce-overhead")
    plain = CompiledFusedStudent(FusedStudent(model, backend="torch"))
    skipped = benchmark(FunctionTarget("tiny", prepare, lambda g: graphs(g)["forces"], mode="cudagraphs[torch]"),
                        structures, 3, warmup=1, repeats=1)
    assert skipped.compile_events["unique_graphs"] == 1 and skipped.compile_events["cudagraph_skips"] >= 1
    assert "CUDA graphs NOT used" in skipped.note and skipped.to_dict()["compile_events"] == skipped.compile_events
    again = benchmark(FunctionTarget("tiny", prepare, lambda g: plain(g)["forces"], mode="compiled+fused[torch]"),
                      structures, 3, warmup=1, repeats=1)
    assert again.compile_events["unique_graphs"] == 1 and again.compile_events["cudagraph_skips"] == 0
    assert "CUDA graphs" not in again.note


def test_cudagraphs_results_never_time_the_recording_call(rng):
    """CUDA graphs are recorded on a compiled function's second call: a cudagraphs target is called twice
    before timing even when the caller asks for one warm-up call; an exported (TorchScript) model three times
    (its executor optimises on the second); other modes keep the caller's warm-up."""
    model = tiny(dtype=torch.float32)
    structures = small_molecules(rng, 2)
    prepare = lambda atoms: graph_from_atoms(list(atoms), model.cutoff, torch.float32)  # noqa: E731
    for mode, warmup, least, expected in (("cudagraphs[torch]", 1, 2, 2), ("cudagraphs[torch]", 3, 2, 3),
                                          ("compiled+fused[torch]", 1, 1, 1), ("eager", 0, 1, 1),
                                          ("eager[torchscript float64]", 1, 3, 3)):
        calls = []
        target = FunctionTarget("tiny", prepare, lambda g: calls.append(model(g)["forces"]), mode=mode)
        assert target.min_warmup == least
        benchmark(target, structures, 2, warmup=warmup, repeats=2)
        assert len(calls) == expected + 2, (mode, warmup, len(calls))


def test_student_target_modes_and_neighbor_rebuild(rng):
    model = tiny()
    structures = small_molecules(rng) + [periodic(rng)]
    eager = StudentTarget(model, "eager", name="tiny")
    graph = eager.prepare(fill_batch(structures, 7))
    # the timed neighbor-list path gives the same forces as the prebuilt reference list
    rebuilt = rebuild_neighbors(graph._replace(edge_index=graph.edge_index[:, :0], shifts=graph.shifts[:0]),
                                model.cutoff)
    assert rebuilt.edge_index.shape == graph.edge_index.shape
    assert torch.allclose(eager.model(graph), eager.model_with_neighbors(graph), atol=1e-10)
    fused = StudentTarget(model, "fused", name="tiny")
    assert fused.mode == "fused[torch]" and fused.fuses_neighbors
    assert torch.allclose(eager.model(graph), fused.model(graph), atol=1e-10)
    rows = [benchmark(t, structures, 6, warmup=1, repeats=2) for t in (eager, fused)]
    for r in rows:
        assert r.atoms == sum(len(a) for a in fill_batch(structures, 6)) and r.edges > 0
        assert r.model.median_s > 0 and r.model_nl.median_s > 0
        assert r.dtype == "float64" and r.device == "cpu" and r.threads == 1
        assert r.peak_memory_bytes >= 0 and r.memory_method
    table = format_table(rows, reference=lambda r: rows[0])
    assert "fused[torch]" in table and "1.00x" in table
    assert format_table(rows, markdown=True).count("\n") == 3


def test_exported_and_checkpoint_students(tmp_path, rng):
    from engine.calculator import load_model
    from engine.export import export_model

    model = tiny()
    path = tmp_path / "exported.pt"
    export_model(model, str(path))
    exported = StudentTarget(load_model(str(path)), "eager", name="exported")
    assert exported.mode == "eager[torchscript float64]"
    eager = StudentTarget(model, "eager")
    graph = eager.prepare(small_molecules(rng) + [periodic(rng)])
    assert torch.allclose(exported.model(graph), eager.model(graph), atol=1e-10)
    assert torch.allclose(exported.model_with_neighbors(graph), eager.model(graph), atol=1e-10)
    with pytest.raises(HessforgeError, match="eager only"):
        StudentTarget(load_model(str(path)), "compiled")


def test_json_report(tmp_path):
    clock = FakeClock()
    r = benchmark(fake_target(clock, lambda b: 0.5), [molecule("H2O")], 4, warmup=1, repeats=1, timer=clock,
                  memory_probe=FakeProbe(10, 4))
    path = tmp_path / "out" / "bench.json"
    write_json(str(path), {"results": [r]})
    data = json.loads(path.read_text())["results"][0]
    assert data["batch_size"] == 4 and data["model"]["ns_per_day"] == pytest.approx(8 * 0.0864)
    assert data["peak_memory_bytes"] == 40


def test_bad_input(rng):
    model = tiny()
    target = StudentTarget(model, "eager")
    with pytest.raises(HessforgeError, match="empty batch"):
        benchmark(target, [], 4)
    with pytest.raises(HessforgeError, match="batch size"):
        benchmark(target, [molecule("H2O")], 0)
    bad = molecule("CH4")
    bad.positions[0, 2] = np.inf
    with pytest.raises(HessforgeError, match="NaN or Inf"):
        benchmark(target, [bad], 2, warmup=1, repeats=1)
    with pytest.raises(UnknownElementError, match="Si"):
        benchmark(target, [molecule("SiH4")], 2, warmup=1, repeats=1)
    flat = Atoms("CH4", positions=molecule("CH4").positions, cell=[[3, 0, 0], [0, 3, 0], [0, 6, 0]], pbc=True)
    with pytest.raises(HessforgeError, match="zero volume"):
        benchmark(target, [flat], 2, warmup=1, repeats=1)
    with pytest.raises(HessforgeError, match="unknown student mode"):
        StudentTarget(model, "turbo")
    if not torch.cuda.is_available():
        for mode in ("compiled+triton", "cudagraphs"):
            with pytest.raises(HessforgeError, match="needs CUDA"):
                StudentTarget(model, mode)


# ---------------------------------------------------------------------------------------------- hessforge bench
def assert_batched_forces_match(target, teacher, structures, atol, min_force):
    """A teacher's bench target on one batch (prebuilt and rebuilt neighbour lists) gives the forces the
    teacher gives one structure at a time."""
    inputs = target.prepare(structures)
    forces = target.model(inputs).detach().numpy()
    again = target.model_with_neighbors(inputs).detach().numpy()
    start = 0
    for a in structures:
        ref = teacher.compute(a).forces
        got = forces[start:start + len(a)]
        assert np.allclose(got, ref, atol=atol), np.abs(got - ref).max()
        start += len(a)
    assert np.abs(forces).max() > min_force
    np.testing.assert_allclose(forces, again, atol=atol)


def test_mace_target_matches_mace_pipeline(tmp_path, rng):
    """The engine graph handed to mace (edge_index = (sender i, receiver j), Cartesian shifts) gives the forces
    mace's own data pipeline gives (training.teachers.mace, float64), for molecules and a periodic cell."""
    pytest.importorskip("mace")
    from e3nn import o3
    from mace import modules

    from training.bench import MaceTarget
    from training.teachers.mace import MACETeacher

    z = [1, 6, 7, 8]
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=3.5, num_bessel=4, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
        interaction_cls_first=block, num_interactions=2, num_elements=4, hidden_irreps=o3.Irreps("8x0e+8x1o"),
        MLP_irreps=o3.Irreps("4x0e"), atomic_energies=np.zeros(4), avg_num_neighbors=6.0, atomic_numbers=z,
        correlation=2, gate=torch.nn.functional.silu, radial_MLP=[8], atomic_inter_scale=1.0,
        atomic_inter_shift=0.0).double()
    path = tmp_path / "small.model"
    torch.save(model, path)
    teacher = MACETeacher(str(path))
    structures = small_molecules(rng, 3) + [periodic(rng, 5)]
    target = MaceTarget(teacher.model, "small", "cpu", torch.float64)
    assert_batched_forces_match(target, teacher, structures, atol=1e-9, min_force=1e-4)
    with pytest.raises(UnknownElementError, match="Si"):
        target.prepare([molecule("SiH4")])


def test_so3lr_target_batches_like_the_teacher(rng):
    """hessforge bench's SO3LR target: forces of a batch (float64) equal the teacher's one structure at a time,
    for molecules and for periodic cells; a batch mixing both is refused (different long-range cutoffs)."""
    pytest.importorskip("so3krates_torch")
    from training.bench import So3lrTarget
    from training.teachers import load_teacher

    teacher = load_teacher("so3lr")
    target = So3lrTarget(teacher, "cpu", torch.float64)
    for structures in (small_molecules(rng, 4), [periodic(rng, 5), periodic(rng, 4)]):
        assert_batched_forces_match(target, teacher, structures, atol=1e-8, min_force=1e-3)
    with pytest.raises(HessforgeError, match="mixes molecules and periodic"):
        target.prepare(small_molecules(rng, 1) + [periodic(rng, 3)])
    with pytest.raises(UnknownElementError, match="Si"):
        target.prepare([molecule("SiH4")])


def test_chgnet_target_batches_like_the_teacher(rng):
    """hessforge bench's CHGNet target: forces of a batch of crystals of different sizes and elements equal the
    teacher's one structure at a time; molecules and float64 are refused with clear errors."""
    pytest.importorskip("chgnet")
    from ase.build import bulk

    from training.bench import ChgnetTarget, make_targets
    from training.teachers import load_teacher

    teacher = load_teacher("chgnet")
    crystals = [bulk("Si", "diamond", a=5.43, cubic=True), bulk("NaCl", "rocksalt", a=5.64),
                bulk("Si", "diamond", a=5.5).repeat((2, 1, 1))]
    for a in crystals:
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
    (target,) = make_targets("chgnet", crystals, ["eager"], torch.device("cpu"), torch.float32, {}, {})
    assert isinstance(target, ChgnetTarget)
    assert_batched_forces_match(target, teacher, crystals, atol=2e-4, min_force=0.1)
    with pytest.raises(HessforgeError, match="crystal model"):
        target.prepare([molecule("H2O")])
    with pytest.raises(HessforgeError, match="float32 only"):
        ChgnetTarget(teacher, "cpu", torch.float64)


def test_mace_off_large_architecture():
    pytest.importorskip("mace")
    from training.bench import MACE_OFF23_ELEMENTS, count_parameters, mace_off_large

    model = mace_off_large()
    assert count_parameters(model) == 2_446_032
    assert [int(x) for x in model.atomic_numbers] == list(MACE_OFF23_ELEMENTS)
    assert float(model.r_max) == 5.0 and len(model.interactions) == 2
    assert str(model.products[0].linear.irreps_out) == "192x0e+192x1o+192x2e"


def test_bench_cli(tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "bench.json"
    # options between the positionals, as users type them
    rc = main(["bench", "painn:hidden=8,layers=1,num_basis=4", "--batch-size", "3", "painn:hidden=16,layers=2,num_basis=8",
               "quickstart", "--repeats", "1", "--warmup", "1", "--threads", "1", "--sweep",
               "--batch-sizes", "1,2", "--modes", "eager,fused,compiled+triton", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "speedup" in text and "1.00x" in text and "fused[torch]" in text
    data = json.loads(out.read_text())
    assert data["data"]["structures"] == 90 and data["machine"]["torch_threads"] == 1
    assert len(data["fixed"]) == 4 and all(r["batch_size"] == 3 for r in data["fixed"])
    assert [r["batch_size"] for r in data["sweeps"][0]["results"]] == [1, 2]
    first = data["fixed"][0]
    assert data["speedups"]["fixed"][f"{first['name']} [{first['mode']}]"] == pytest.approx(1.0)
    if not torch.cuda.is_available():
        assert any("compiled+triton: skipped" in n for n in data["notes"])
    # every mode's energies and forces against the first mode's, and what was run with
    agreement = data["mode_agreement"]
    assert set(agreement) == {f"{r['name']} [{r['mode']}]" for r in data["fixed"] if r["mode"] != "eager"}
    assert all(a["against"] == "eager" and a["max_abs_dF_eV_per_A"] < 1e-4 for a in agreement.values())
    assert data["settings"]["repeats"] == 1 and data["settings"]["batch_sizes"] == [1, 2]
    assert data["provenance"]["hessforge_version"] and data["provenance"]["cwd"]
    # --json replaces an earlier report, nothing else
    other = tmp_path / "config.json"
    other.write_text('{"lr": 0.001}')
    assert main(["bench", "painn:hidden=8,layers=1,num_basis=4", "quickstart", "--batch-size", "2", "--repeats",
                 "1", "--json", str(other)]) == 2
    assert "is not a hessforge bench report" in capsys.readouterr().err and other.read_text() == '{"lr": 0.001}'
    # bad input: one clear line, exit status 2
    assert main(["bench", "painn", str(tmp_path / "missing.extxyz")]) == 2
    assert "data not found" in capsys.readouterr().err
    assert main(["bench", "nonsense-model", "quickstart"]) == 2
    assert "not a file and not one of" in capsys.readouterr().err


def test_bench_cli_keeps_results_when_a_model_runs_out_of_memory(tmp_path, capsys, monkeypatch):
    """An allocation failure of one model at the fixed batch: a note, and the other models' table and JSON
    (it used to end the run with a traceback and no output)."""
    import training.bench
    from training.cli import main

    real = training.bench.benchmark

    def failing(target, *args, **kwargs):
        if target.mode.startswith("fused"):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(training.bench, "benchmark", failing)
    out = tmp_path / "bench.json"
    assert main(["bench", "painn:hidden=8,layers=1,num_basis=4", "quickstart", "--batch-size", "2", "--repeats",
                 "1", "--warmup", "1", "--threads", "1", "--modes", "eager,fused", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["fixed"]] == ["eager"] and data["compare"] == []
    assert any("out of memory at batch 2" in n for n in data["notes"])
    assert "out of memory at batch 2" in capsys.readouterr().out


def test_bench_data_sources(tmp_path):
    import ase.io

    from training.bench import load_structures

    mols = [molecule("CH4"), molecule("C6H6")]
    ase.io.write(tmp_path / "m.extxyz", mols)
    assert [len(a) for a in load_structures(str(tmp_path / "m.extxyz"))] == [5, 12]
    assert [len(a) for a in load_structures(str(tmp_path / "m.extxyz"), min_atoms=6)] == [12]
    from training.data.records import Structure
    from training.data.store import write_dataset

    write_dataset(str(tmp_path / "d.lmdb"), [Structure(id=f"s{k}", group="g", numbers=a.numbers,
                                                       positions=a.positions) for k, a in enumerate(mols)])
    assert [len(a) for a in load_structures(str(tmp_path / "d.lmdb"))] == [5, 12]
    assert min(len(a) for a in load_structures("s22:24")) >= 24
    with pytest.raises(HessforgeError, match="no structures with >= 100 atoms"):
        load_structures("s22", min_atoms=100)


def test_sweep_compares_batches_of_the_same_mix_by_atom_throughput():
    """Small batches hold the data's mix of sizes (not its first, smallest structures), and the best batch is
    the one with the most atom-steps/s: with structures/s a batch of small molecules looked faster."""
    from engine.runner import sample_batch

    sizes = [3] * 8 + [12] * 8 + [30] * 8  # dataset order: all small molecules first (conformers of one)
    data = [Atoms("H" * n, positions=np.arange(3 * n).reshape(n, 3)) for n in sizes]
    assert [len(a) for a in data] == sizes
    for b in (1, 2, 3, 6, 12, 24, 48):
        batch = sample_batch(data, b)
        assert len(batch) == b
        mean = np.mean([len(a) for a in batch])
        if b >= 3:  # every third of the size range represented
            assert abs(mean - np.mean(sizes)) < 0.15 * np.mean(sizes), (b, mean)
    assert len(sample_batch(data, 2)[0]) != len(sample_batch(data, 2)[1])
    with pytest.raises(HessforgeError, match="batch size"):
        sample_batch(data, 0)

    def result(b, atoms, seconds):
        return BenchResult(name="m", mode="eager", device="cpu", dtype="float32", threads=1, batch_size=b,
                           atoms=atoms, edges=0, model=Timing.from_times([seconds], seconds, b, atoms),
                           model_nl=None, peak_memory_bytes=0, memory_method="none")

    s = Sweep([result(1, 3, 0.001), result(4, 200, 0.02)])  # more structures/s at 1, more atoms/s at 4
    assert s.results[0].model.structures_per_s > s.results[1].model.structures_per_s
    assert s.best("model").batch_size == 4
    assert speedup(s.results[1], s.results[0]) == pytest.approx((200 / 0.02) / (3 / 0.001))


def test_bench_cli_skips_a_fixed_batch_projected_past_the_memory_cap(tmp_path, capsys):
    """On a CPU a fixed batch too large for memory was killed by the kernel (every result lost, no JSON): a
    large batch is projected from a small one and skipped with a note when it would pass the cap."""
    from training.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "painn:hidden=8,layers=1,num_basis=4", "quickstart", "--batch-size", "2000", "--repeats",
                 "1", "--warmup", "1", "--threads", "1", "--memory-cap-gb", "0.001", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["fixed"] == [] and any("batch 2000 skipped: projected at" in n for n in data["notes"])
    # an exported model reports the dtype it computes in, and says --dtype does not apply to it
    from engine.export import export_model

    export_model(tiny(), str(tmp_path / "m32.pt"), dtype=torch.float32)
    assert main(["bench", str(tmp_path / "m32.pt"), "quickstart", "--batch-size", "2", "--repeats", "1",
                 "--dtype", "float64", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["fixed"][0]["dtype"] == "float32"
    assert any("computes in its own dtype (float32), not --dtype float64" in n for n in data["notes"])
    export_model(tiny(), str(tmp_path / "m64.pt"))
    assert main(["bench", str(tmp_path / "m64.pt"), "quickstart", "--batch-size", "2", "--repeats", "1",
                 "--json", str(out)]) == 0  # a float64 export, no --dtype given: nothing to say
    assert not any("own dtype" in n for n in json.loads(out.read_text())["notes"])


def test_table_spread_column():
    """The table's spread: (slowest - fastest) / median of the timed calls behind the throughput (model+NL
    where timed); a single call has none."""
    from engine.runner import Timing, spread

    assert spread(Timing.from_times([0.3, 0.1, 0.2], 0.5, 4, 100)) == "100%"
    assert spread(Timing.from_times([0.2], 0.5, 4, 100)) == "-"
