"""torch.compile of students: no graph breaks, compiled equals eager, no recompiling per batch shape."""
import pytest
import torch
from ase import Atoms

from engine.compiled import CompiledStudent
from engine.graph import graph_from_atoms
from engine.models import STUDENTS, PaiNN
from toy import STUDENT_VARIANTS

SPECIES = [1, 6, 7, 8]


def _stream(rng, sizes):
    for k in sizes:
        structures = []
        for _ in range(k):
            n = int(rng.integers(2, 9))
            structures.append(Atoms(numbers=rng.choice(SPECIES, n), positions=rng.uniform(-1.8, 1.8, (n, 3))))
        yield graph_from_atoms(structures, 4.0, torch.float64)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _model(mode, seed=0, arch="painn"):
    torch.manual_seed(seed)
    return STUDENTS[arch](SPECIES, cutoff=4.0, hidden=8, layers=2, num_basis=6, force_mode=mode).double().eval()


VARIANTS = STUDENT_VARIANTS


@pytest.mark.parametrize("arch,mode", VARIANTS)
def test_no_graph_breaks(rng, arch, mode):
    model = _model(mode, arch=arch)
    graph = next(_stream(rng, [3]))

    def core(graph, positions):
        energy, node_energy, s, v = model.energies(graph, positions)
        return model.direct_force_head(s, v) if mode == "direct" else energy

    explanation = torch._dynamo.explain(core)(graph, graph.positions)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("arch,mode", VARIANTS)
def test_compiled_equals_eager_without_recompiling(rng, arch, mode):
    torch._dynamo.reset()
    model = _model(mode, int(rng.integers(1000)), arch)
    # aot_eager runs dynamo + AOTAutograd (the graph capture and dynamic shapes) without the C++ codegen
    compiled = CompiledStudent(model, backend="aot_eager")
    frames = []
    before = _graphs_compiled()
    for graph in _stream(rng, [3, 4, 5, 2, 6, 7, 3]):
        a, b = model(graph), compiled(graph)
        torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b["forces"], a["forces"], rtol=1e-10, atol=1e-12)
        frames.append(graph.positions.shape[0])
    assert len(set(frames)) > 2  # the shapes really varied
    assert _graphs_compiled() - before == 1  # one graph for all the shapes


def test_inductor_compiled_equals_eager(rng):
    """The real CPU backend (C++ codegen): same numbers as eager; a stream of shapes compiles at most twice
    (the first call may specialise before dynamic shapes take over)."""
    torch._dynamo.reset()
    model = _model("gradient", int(rng.integers(1000)))
    compiled = CompiledStudent(model)
    before = _graphs_compiled()
    for graph in _stream(rng, [3, 4, 2, 5]):
        a, b = model(graph), compiled(graph)
        torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b["forces"], a["forces"], rtol=1e-8, atol=1e-10)
    assert _graphs_compiled() - before <= 2


def test_inductor_compiles_a_single_structure(rng):
    """One structure (an ASE calculator's case): inductor's CPU code generator failed on the per-structure
    energy's scatter-add into a one-element buffer (engine.graph.sum_per_structure sums it directly)."""
    torch._dynamo.reset()
    model = _model("gradient", int(rng.integers(1000)))
    compiled = CompiledStudent(model)
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    graph = graph_from_atoms([atoms], 4.0, torch.float64)
    a, b = model(graph), compiled(graph)
    torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=1e-8, atol=1e-10)
    assert float(a["forces"].abs().max()) > 0


def test_compiled_students_have_their_own_graph_caches_and_count_recompiles(rng):
    """torch caps the graphs of one function (recompile_limit): compiled students of different widths each
    compile their own copy of the core, so models do not use up each other's graphs (the ninth model
    configuration of a process failed); one model past the cap is one HessforgeError; compile_stats counts
    recompilations (it read a counter torch does not keep: always 0)."""
    from engine.compiled import compile_events, compile_stats
    from engine.errors import HessforgeError

    torch._dynamo.reset()
    graph = next(_stream(rng, [3]))
    single = next(_stream(rng, [1]))  # one structure: a graph of its own (sum_per_structure's B = 1 branch)
    with torch._dynamo.config.patch(recompile_limit=1):
        for hidden in (8, 10, 12):  # one shared function would hit the cap of 1 at the second width
            torch.manual_seed(hidden)
            model = PaiNN(SPECIES, cutoff=4.0, hidden=hidden, layers=1, num_basis=4).double().eval()
            out = CompiledStudent(model, backend="eager")(graph)
            torch.testing.assert_close(out["forces"], model(graph)["forces"], rtol=1e-10, atol=1e-12)
        before = compile_stats()
        compiled = CompiledStudent(_model("gradient"), backend="eager")
        compiled(graph)
        with pytest.raises(HessforgeError, match="needed more graphs than torch allows one function"):
            compiled(single)
    compiled(single)
    events = compile_events(before, compile_stats())
    # recompiles: the attempt the cap refused and the one after it was lifted
    assert events["unique_graphs"] == 2 and events["recompiles"] == 2, events
