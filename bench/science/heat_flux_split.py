"""How far the edge-split per-atom virials (what `compute heat/flux` gets from pair_style hessforge) put the
heat flux from the exact one, for a message-passing student.

For energies U = sum_i U_i, the potential part of the heat flux is exactly
    J_exact = sum_i sum_j (x_i - x_j) (dU_i/dx_j . v_j)
(Fan et al., PRB 92, 094301 (2015)); it needs each atom energy's own gradient (N backward passes). The
per-atom virials of engine.stress.atom_virials split each edge's -r_e (x) dU/dr_e half to each of its atoms,
W_i, and LAMMPS' heat/flux (centroid form) gives J_split = sum_i W_i v_i: exact for pair potentials, an
approximation for many-body ones. This script compares the two on molecular clusters (non-periodic, so
x_i - x_j is unambiguous) with Maxwell-Boltzmann velocities at 300 K.

    python bench/science/heat_flux_split.py [--checkpoint runs/quickstart/hessian_kd/best.pt] [--clusters 5]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from ase import Atoms
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

from engine.checkpoint import load_student
from engine.graph import edge_vectors, graph_from_atoms
from engine.models import PaiNN
from engine.stress import atom_virials


def cluster(molecules, rng, count: int, box: float = 9.0, gap: float = 2.2) -> Atoms:
    """`count` molecules (ase.Atoms) at random places and orientations in a box, no two atoms of different
    molecules closer than `gap` Å: a liquid-like cluster with intermolecular edges."""
    placed = Atoms()
    while count > 0:
        mol = molecules[int(rng.integers(len(molecules)))].copy()
        mol.positions -= mol.positions.mean(0)
        mol.rotate(float(rng.uniform(0, 360)), rng.normal(size=3))
        mol.positions += rng.uniform(0, box, 3)
        if len(placed) and np.linalg.norm(placed.positions[:, None] - mol.positions[None], axis=2).min() < gap:
            continue
        placed += mol
        count -= 1
    return placed


class PairPotential(torch.nn.Module):
    """U_i = 1/2 sum_j phi(r_ij), a Morse-like phi: the case where the split is exact (checks both formulas)."""

    cutoff = 5.0

    def forward(self, graph, compute_forces: bool = False):
        r = edge_vectors(graph).norm(dim=1)
        phi = (1 - torch.exp(-1.3 * (r - 1.6))) ** 2 * torch.cos(0.5 * torch.pi * r / self.cutoff) ** 2
        node_energy = torch.zeros(graph.positions.shape[0], dtype=r.dtype).index_add(0, graph.edge_index[0], 0.5 * phi)
        return {"node_energy": node_energy, "energy": node_energy.sum().reshape(1)}


def fluxes(model, atoms: Atoms, velocities: np.ndarray):
    """(J_exact, J_split), eV Å / fs-units of the velocities given (Å/fs here)."""
    graph = graph_from_atoms([atoms], model.cutoff, torch.float64)
    x = graph.positions.detach().clone().requires_grad_(True)
    node_energy = model(graph._replace(positions=x), compute_forces=False)["node_energy"]
    n = len(atoms)
    jac = torch.stack([torch.autograd.grad(node_energy[i], x, retain_graph=True)[0] for i in range(n)])  # [i, j, 3]
    v = torch.as_tensor(velocities)
    xd = x.detach()
    dot = torch.einsum("ijb,jb->ij", jac, v)  # dU_i/dx_j . v_j
    j_exact = torch.einsum("ija,ij->a", xd[:, None, :] - xd[None, :, :], dot)
    w = atom_virials(model, graph).detach()
    j_split = torch.einsum("iab,ib->a", w, v)
    return j_exact.numpy(), j_split.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/quickstart/hessian_kd/best.pt")
    parser.add_argument("--data", default="runs/quickstart/data.lmdb", help="molecules to build clusters from")
    parser.add_argument("--clusters", type=int, default=5)
    parser.add_argument("--molecules", type=int, default=8, help="molecules per cluster")
    parser.add_argument("--draws", type=int, default=4, help="velocity draws per cluster")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from training.data.store import Dataset

    data = Dataset(args.data)
    molecules = [Atoms(numbers=s.numbers, positions=s.positions) for s in (data[i] for i in range(len(data)))]
    trained = load_student(args.checkpoint, dtype=torch.float64).eval()
    torch.manual_seed(args.seed)
    models = {"check: a pair potential (exact split)": PairPotential(), f"trained ({args.checkpoint})": trained}
    for layers in (1, 3):
        random = PaiNN(list(trained.species), cutoff=trained.cutoff, hidden=64, layers=layers, num_basis=32)
        with torch.no_grad():
            random.energy_scale.fill_(1.0)
        models[f"random PaiNN, {layers} layer{'s' if layers > 1 else ''}"] = random.double().eval()
    rng = np.random.default_rng(args.seed)
    print(f"{args.clusters} clusters of {args.molecules} molecules from {args.data}, {args.draws} velocity draws "
          "each (300 K); relative error |J_split - J_exact| / |J_exact| of the potential heat flux")
    print(f"{'model':48s} {'median':>8s} {'mean':>8s} {'max':>8s}   atoms")
    systems = [cluster(molecules, rng, args.molecules) for _ in range(args.clusters)]
    for name, model in models.items():
        errors = []
        for atoms in systems:
            for _ in range(args.draws):
                a = atoms.copy()
                MaxwellBoltzmannDistribution(a, temperature_K=300, rng=rng)
                Stationary(a)
                ZeroRotation(a)
                j_exact, j_split = fluxes(model, a, a.get_velocities())
                errors.append(np.linalg.norm(j_split - j_exact) / np.linalg.norm(j_exact))
        sizes = sorted({len(a) for a in systems})
        print(f"{name:48s} {np.median(errors):8.3f} {np.mean(errors):8.3f} {np.max(errors):8.3f}   "
              f"{sizes[0]}-{sizes[-1]}")


if __name__ == "__main__":
    main()
