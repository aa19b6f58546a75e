"""Neighbor lists (and the fused radial features) on batches of structures: pytest-benchmark suite.

    . .venv/bin/activate
    python -m pytest bench/bench_neighbors.py -p no:cacheprovider --benchmark-columns=min,median,mean,rounds \
        --benchmark-json=bench/results/neighbors_cpu.json
    python bench/bench_neighbors.py bench/results/neighbors_cpu.json   # markdown table of a JSON

Cases (cutoff 5 Å, float32, one Python call returns the whole batch's edges):
- mol64:    64 random 30-atom molecules (atoms >= 0.95 Å apart in a 3.8 Å ball): the paper's batch 64,
- pbc16:    16 periodic triclinic boxes of 96 atoms (heights ~9.5 Å < 2 cutoff: 27 shifts per pair),
- pbc1536:  one periodic triclinic box of 1536 atoms (heights ~24 Å: minimum-image mode, 1 shift per pair).
Implementations:
- reference:       engine.neighbors.batched_neighbor_list (O(n²·shifts) per structure, Python loop over them),
- reference_feats: the same + edge_vectors, r, unit vectors, sinc basis, cosine envelope (PaiNN's eager path),
- torch:           engine.kernels.neighbor_list(backend="torch"): the vectorised batched torch path,
- torch_fused:     engine.kernels.radial_edges(backend="torch"): the same fused with the features,
- triton / triton_fused: the Triton kernels (GPU only: the CPU interpreter says nothing about speed),
- vesin, matscipy, hessforge_core (the C++ core's cell list), ase: per-structure CPU libraries, looped,
- torch_cluster:   radius_graph (molecules only: no periodic images), when installed or its radius operator
                   built from the sdist (bench/torch_cluster_peer.py).
Knobs (environment): HESSFORGE_BENCH_DEVICE (cpu | cuda, default cuda when available), HESSFORGE_BENCH_NB
(radial basis size, 32: the quickstart student's), HESSFORGE_BENCH_THREADS (torch intra-op threads, 1: on a
shared 2-core machine two threads spin against other processes and times go up 10-50x).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from engine.graph import AtomicGraph, edge_vectors
from engine.kernels import neighbor_list, radial_edges, triton_available
from engine.neighbors import batched_neighbor_list
from engine.radial import cosine_cutoff, sinc_basis

import torch_cluster_peer  # bench/, on sys.path when pytest collects this file

CUTOFF = 5.0
NUM_BASIS = int(os.environ.get("HESSFORGE_BENCH_NB", "32"))
DEVICE = torch.device(os.environ.get("HESSFORGE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = torch.float32
torch.set_num_threads(int(os.environ.get("HESSFORGE_BENCH_THREADS", "1")))


# ------------------------------------------------------------------------------------------------ structures


def _molecule(rng, n=30, radius=3.8, min_dist=0.95):
    pos = []
    while len(pos) < n:
        x = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(x) <= radius and all(np.linalg.norm(x - y) >= min_dist for y in pos):
            pos.append(x)
    return np.array(pos), np.zeros((3, 3)), np.array([False] * 3)


def _box(rng, n, side):
    cell = np.diag([side, side, side]) + np.array([[0, 0, 0], [0.08, 0, 0], [-0.05, 0.06, 0]]) * side
    return rng.uniform(0, 1, (n, 3)) @ cell, cell, np.array([True] * 3)


def make_case(name):
    rng = np.random.default_rng(12345)
    if name == "mol64":
        return [_molecule(rng) for _ in range(64)]
    if name == "pbc16":
        return [_box(rng, 96, 9.9) for _ in range(16)]
    if name == "pbc1536":
        return [_box(rng, 1536, 24.9)]
    raise KeyError(name)


CASES = ["mol64", "pbc16", "pbc1536"]
_cache = {}


def case_data(name):
    if name not in _cache:
        structures = make_case(name)
        pos = torch.tensor(np.concatenate([s[0] for s in structures]), dtype=DTYPE, device=DEVICE)
        cell = torch.tensor(np.stack([s[1] for s in structures]), dtype=DTYPE, device=DEVICE)
        pbc = torch.tensor(np.stack([s[2] for s in structures]), device=DEVICE)
        counts = torch.tensor([len(s[0]) for s in structures], device=DEVICE)
        batch = torch.repeat_interleave(torch.arange(len(structures), device=DEVICE), counts)
        ref_edges = batched_neighbor_list(pos.cpu().double(), cell.cpu().double(), pbc.cpu(), batch.cpu(), CUTOFF)[0]
        _cache[name] = dict(structures=structures, args=(pos, cell, pbc, batch), num_edges=ref_edges.shape[1],
                            max_atoms=max(len(s[0]) for s in structures))
    return _cache[name]


# ------------------------------------------------------------------------------------------------ implementations


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run_reference(d):
    return batched_neighbor_list(*d["args"], CUTOFF)[0].shape[1]


def run_reference_feats(d):
    pos, cell, pbc, batch = d["args"]
    edge_index, shifts = batched_neighbor_list(pos, cell, pbc, batch, CUTOFF)
    graph = AtomicGraph(pos, batch, cell, pbc, batch, edge_index, shifts)
    vec = edge_vectors(graph)
    r = torch.sqrt(vec.square().sum(dim=1) + 1e-8)
    unit, rbf, fcut = vec / r[:, None], sinc_basis(r, CUTOFF, NUM_BASIS), cosine_cutoff(r, CUTOFF)
    _sync()
    return edge_index.shape[1]


# complete=False: the cells here span volumes (molecules, boxes), as engine.graph.build_graph's do for the
# runner and MD, which call the ops the same way
def _kernel_nl(backend):
    def run(d):
        out = neighbor_list(*d["args"], CUTOFF, backend=backend, complete=False)
        _sync()
        return out.edge_index.shape[1]
    return run


def _kernel_fused(backend):
    def run(d):
        out = radial_edges(*d["args"], CUTOFF, NUM_BASIS, eps=1e-8, backend=backend, complete=False)
        _sync()
        return out.edge_index.shape[1]
    return run


def _looped(fn):
    def run(d):
        return sum(fn(*s) for s in d["structures"])
    return run


def _vesin():
    import vesin

    nl = vesin.NeighborList(cutoff=CUTOFF, full_list=True)
    return _looped(lambda pos, cell, pbc: len(nl.compute(pos, cell, pbc.tolist(), "ijS")[0]))


def _matscipy():
    from matscipy.neighbours import neighbour_list

    def one(pos, cell, pbc):
        if not pbc.any():  # matscipy wants a cell; any box works for open boundaries
            cell = np.eye(3) * 100.0
        return len(neighbour_list("ijS", positions=pos, cell=cell, pbc=pbc, cutoff=CUTOFF)[0])
    return _looped(one)


def _ase():
    from ase.neighborlist import primitive_neighbor_list

    return _looped(lambda pos, cell, pbc: len(primitive_neighbor_list("ijS", pbc, cell, pos, CUTOFF)[0]))


def _hessforge_core():
    from engine.exported import neighbor_list as core_neighbor_list

    return _looped(lambda pos, cell, pbc: core_neighbor_list(pos, cell, pbc, CUTOFF)[0].shape[1])


def _torch_cluster():
    run_radius_graph = torch_cluster_peer.radius_graph()
    if run_radius_graph is None:
        pytest.skip("no torch-cluster (installed, or its radius operator built: bench/torch_cluster_peer.py)")

    def run(d):
        pos, cell, pbc, batch = d["args"]
        # the smallest cap that drops nothing (every atom of the largest structure); a larger one only makes
        # torch-cluster allocate and scan more output slots
        edge_index = run_radius_graph(pos, CUTOFF, batch, d["max_atoms"])
        _sync()
        return edge_index.shape[1]
    return run


def _has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _core_built():
    try:
        from engine.exported import _core_module

        _core_module()
        return True
    except Exception:
        return False


gpu_only = pytest.mark.skipif(DEVICE.type != "cuda" or not triton_available(),
                              reason="Triton timings need a GPU (the CPU interpreter measures nothing useful)")
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU library: run with HESSFORGE_BENCH_DEVICE=cpu")

IMPLS = {
    "reference": (run_reference, []),
    "reference_feats": (run_reference_feats, []),
    "torch": (_kernel_nl("torch"), []),
    "torch_fused": (_kernel_fused("torch"), []),
    "triton": (_kernel_nl("triton"), [gpu_only]),
    "triton_fused": (_kernel_fused("triton"), [gpu_only]),
    "vesin": (_vesin, [cpu_only, pytest.mark.skipif(not _has("vesin"), reason="vesin not installed")]),
    "matscipy": (_matscipy, [cpu_only, pytest.mark.skipif(not _has("matscipy"), reason="matscipy not installed")]),
    "hessforge_core": (_hessforge_core, [cpu_only, pytest.mark.skipif(not _core_built(), reason="make build")]),
    "ase": (_ase, [cpu_only]),
    "torch_cluster": (_torch_cluster, []),
}
FACTORIES = {"vesin", "matscipy", "hessforge_core", "ase", "torch_cluster"}


@pytest.mark.parametrize("impl", [pytest.param(k, marks=v[1]) for k, v in IMPLS.items()])
@pytest.mark.parametrize("case", CASES)
def test_neighbors(benchmark, case, impl):
    if impl == "torch_cluster" and case != "mol64":
        pytest.skip("radius_graph has no periodic images")
    if impl in ("reference", "reference_feats", "ase") and case == "pbc1536":
        rounds = 3
    else:
        rounds = None
    d = case_data(case)
    fn = IMPLS[impl][0]
    if impl in FACTORIES:
        fn = fn()
    assert fn(d) == d["num_edges"]  # warm-up and check: every implementation finds the same edges
    benchmark.group = case
    benchmark.extra_info.update(
        num_edges=d["num_edges"], num_atoms=int(d["args"][0].shape[0]), num_structures=len(d["structures"]),
        device=str(DEVICE), torch_threads=torch.get_num_threads(), num_basis=NUM_BASIS,
    )
    if rounds:
        benchmark.pedantic(fn, args=(d,), rounds=rounds, iterations=1)
    else:
        benchmark(fn, d)


def markdown(json_path: str) -> str:
    """A markdown table of a pytest-benchmark JSON: per case, min and median ms, and the speed-up over the
    torch reference on the min (the least noisy statistic on a shared machine)."""
    data = json.load(open(json_path))
    rows, ref = [], {}
    for b in data["benchmarks"]:
        case, impl = b["params"]["case"], b["params"]["impl"]
        if impl == "reference":
            ref[case] = b["stats"]["min"]
    for b in sorted(data["benchmarks"], key=lambda b: (CASES.index(b["params"]["case"]), b["stats"]["min"])):
        case, impl, s, e = b["params"]["case"], b["params"]["impl"], b["stats"], b["extra_info"]
        speedup = f"{ref[case] / s['min']:.2f}×" if case in ref else ""
        rows.append(f"| {case} | {impl} | {s['min'] * 1e3:.2f} | {s['median'] * 1e3:.2f} | {s['rounds']} | "
                    f"{e['num_atoms']} | {e['num_edges']} | {speedup} |")
    head = ("| case | implementation | min ms | median ms | rounds | atoms | edges | vs reference (min) |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + rows)


if __name__ == "__main__":
    print(markdown(sys.argv[1]))
