"""One engine.Calculator force call on diamond Si supercells, with build_graph's neighbor list by the kernels'
vectorised torch path (what it uses since 2026-12-07) and by the plain reference it used before
(engine.neighbors.batched_neighbor_list, all pairs per periodic image): what an ASE MD or optimizer step on a
large cell costs. Median of 3 calls after one warm-up call, one torch thread, float64, a small PaiNN (cutoff 3 Å,
hidden 8, 1 layer: the neighbor list dominates, as it did for the user who reported it).

    python bench/calculator_neighbors.py            # results: bench/results/calculator_neighbors_cpu.md
"""
import time

import torch
from ase.build import bulk

import engine.graph as graph_module
from engine.calculator import Calculator
from engine.models import PaiNN
from engine.neighbors import batched_neighbor_list


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PaiNN([14], cutoff=3.0, hidden=8, layers=1, num_basis=4).double()
    kernels = graph_module._neighbor_list
    print("| atoms | reference ms/call | kernels ms/call | speed-up |\n|---|---|---|---|")
    try:
        for n in (2, 3, 4, 6):
            atoms = bulk("Si", cubic=True) * (n, n, n)
            atoms.rattle(0.01, seed=0)
            medians = []
            for neighbor_list in (batched_neighbor_list, kernels):
                graph_module._neighbor_list = neighbor_list
                calc = Calculator(model)
                calc.get_forces(atoms)  # warm-up
                times = []
                for k in range(3):
                    atoms.rattle(0.001, seed=k + 1)  # a new geometry: the calculator recomputes
                    start = time.perf_counter()
                    calc.get_forces(atoms)
                    times.append(time.perf_counter() - start)
                medians.append(sorted(times)[1])
            print(f"| {len(atoms)} | {medians[0] * 1e3:.1f} | {medians[1] * 1e3:.1f} | {medians[0] / medians[1]:.1f}x |",
                  flush=True)
    finally:
        graph_module._neighbor_list = kernels


if __name__ == "__main__":
    main()
