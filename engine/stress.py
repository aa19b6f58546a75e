"""Stress of gradient-force students, batched: the strain derivative of the energy.

Each structure b gets its own symmetric displacement gradient ε_b (zero): x -> x (1 + ε_b), cell -> cell (1 + ε_b),
so every edge vector of b becomes r (1 + ε_b). One backward pass of the energy then gives the forces -dE/dx and
dE/dε_b together, and stress_b = (1/V_b) dE/dε_b (eV/Å³, ASE's sign: positive is tensile). The ASE calculator
(one structure) and the trainer's stress loss (a batch, differentiated again for the parameters) share this.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from engine.autograd_mode import autograd_is_off, autograd_on, normal_graph
from engine.errors import HessforgeError
from engine.graph import AtomicGraph, edge_vector_graph, edge_vectors, sum_per_structure


VOIGT_ROWS, VOIGT_COLS = [0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]  # xx yy zz yz xz xy: ASE's order


def voigt(stress):
    """[..., 3, 3] stresses (numpy or torch) -> [..., 6] in ASE's Voigt order xx, yy, zz, yz, xz, xy."""
    return stress[..., VOIGT_ROWS, VOIGT_COLS]


def cell_volumes(cell: torch.Tensor) -> torch.Tensor:
    """|det| of each cell [B, 3, 3] -> [B] (Å³)."""
    return torch.linalg.det(cell).abs()


def energy_forces_strain_derivative(model, graph: AtomicGraph, create_graph: bool = False) -> Dict[str, torch.Tensor]:
    """energy [B], node_energy [N], forces [N, 3] and dE_deps [B, 3, 3] (eV; the negative virial) of a
    gradient-force student. create_graph keeps the graph of forces and dE/dε (a loss on them trains the
    parameters). For structures that are not periodic dE/dε is still defined (Σ x ⊗ ∂E/∂x) but is no stress.
    Models that compute it themselves (exported TorchScript models: engine.exported) are asked for it."""
    own = getattr(model, "energy_forces_strain_derivative", None)
    if own is not None:
        if create_graph:
            raise HessforgeError(f"{type(model).__name__} gives forces and stress, not their derivatives "
                                 "(train from a checkpoint, not an exported model)")
        return own(graph)
    if autograd_is_off():  # a caller under no_grad / inference_mode: the derivatives need autograd
        with autograd_on():
            return energy_forces_strain_derivative(model, normal_graph(graph), create_graph)
    positions = graph.positions.detach().requires_grad_(True)
    eps = torch.zeros(graph.cell.shape[0], 3, 3, dtype=positions.dtype, device=positions.device, requires_grad=True)
    sym = 0.5 * (eps + eps.transpose(1, 2))
    # x (1 + ε) written as x + x ε: exact zero ε leaves the positions bit-identical
    strained_positions = positions + torch.einsum("na,nab->nb", positions, sym[graph.batch])
    strained = graph._replace(positions=strained_positions, cell=graph.cell + graph.cell @ sym)
    out = model(strained, compute_forces=False)
    grads = torch.autograd.grad(out["energy"].sum(), [positions, eps], create_graph=create_graph, allow_unused=True)
    dE_dx, dE_deps = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, (positions, eps)))
    return {"energy": out["energy"], "node_energy": out["node_energy"], "forces": -dE_dx, "dE_deps": dE_deps,
            "positions": positions, **{k: v for k, v in out.items() if k not in ("energy", "node_energy")}}


def stress_from_strain_derivative(dE_deps: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] stress (eV/Å³) = dE/dε / V; NaN for cells without a volume (molecules)."""
    volume = cell_volumes(cell)
    safe = torch.where(volume > 1e-8, volume, torch.ones_like(volume))
    return torch.where((volume > 1e-8)[:, None, None], dE_deps / safe[:, None, None],
                       torch.full_like(dE_deps, float("nan")))


def edge_gradient_sums(vectors: torch.Tensor, grad: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor,
                       num_atoms: int, num_structures: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What dE/dr_e of every edge gives (r_e = x_j - x_i + shift for edge_index (i, j); each edge belongs to its
    receiver's structure): forces [N, 3] (-dE/dx), each structure's virial W_b = -sym(sum_e r_e ⊗ dE/dr_e) [B, 3, 3]
    (= -dE/dε) and the edge virials -r_e ⊗ dE/dr_e [E, 3, 3] (split_edge_virials), in grad's dtype. The Python
    engine (energy_forces_virials) and the exported TorchScript model (engine/export.py) share it."""
    i, j = edge_index[0], edge_index[1]
    forces = torch.zeros(num_atoms, 3, dtype=grad.dtype, device=grad.device).index_add(0, i, grad).index_add(0, j, -grad)
    edge_virials = -vectors.unsqueeze(2) * grad.unsqueeze(1)
    virial = torch.zeros(num_structures, 3, 3, dtype=grad.dtype, device=grad.device).index_add(0, batch[i], edge_virials)
    return forces, 0.5 * (virial + virial.transpose(1, 2)), edge_virials


def split_edge_virials(edge_virials: torch.Tensor, edge_index: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """Per-atom virials [N, 3, 3] from per-edge ones [E, 3, 3] (-r_e ⊗ dE/dr_e): half to each of the edge's two
    atoms, the centroid virial of a two-body cluster. Not symmetrized; they sum to the virial."""
    half = 0.5 * edge_virials
    out = torch.zeros(num_atoms, 3, 3, dtype=edge_virials.dtype, device=edge_virials.device)
    return out.index_add(0, edge_index[0], half).index_add(0, edge_index[1], half)


def atom_virials(model, graph: AtomicGraph) -> torch.Tensor:
    """Per-atom virials W_i [N, 3, 3] (eV, the edge split of split_edge_virials; ASE's per-atom stresses are
    -sym(W_i) / V) of a gradient-force student, from one backward pass through the edge vectors. Each
    structure's W_i sum to its virial -dE/dε. Exported models answer from their own method. (The exact
    many-body form, for heat flux, needs explicit periodic images: engine/export.py with_atom_virial, LAMMPS
    halo and ghost mode.)"""
    own = getattr(model, "atom_virials", None)
    if own is not None:
        return own(graph)
    return energy_forces_virials(model, graph)["atom_virials"]


def energy_forces_virials(model, graph: AtomicGraph) -> Dict[str, torch.Tensor]:
    """Everything one backward pass through the edge vectors r_e gives a gradient-force student: energy [B],
    node_energy [N], forces [N, 3], dE_deps [B, 3, 3] (sym(Σ_e r_e ⊗ dE/dr_e) over each structure's edges: what
    energy_forces_strain_derivative gives) and per-atom virials atom_virials [N, 3, 3] (the edge split)."""
    if autograd_is_off():
        with autograd_on():
            return energy_forces_virials(model, normal_graph(graph))
    vectors = edge_vectors(graph).detach().requires_grad_(True)
    out = model(edge_vector_graph(graph.numbers, graph.edge_index, vectors), compute_forces=False)
    num_structures = graph.cell.shape[0]
    energy = sum_per_structure(out["node_energy"], graph.batch, num_structures)
    (grad,) = torch.autograd.grad(out["energy"].sum(), [vectors], allow_unused=True)
    if grad is None:  # no edges
        grad = torch.zeros_like(vectors)
    forces, virial, edge_virials = edge_gradient_sums(vectors.detach(), grad, graph.edge_index, graph.batch,
                                                      graph.positions.shape[0], num_structures)
    return {"energy": energy, "node_energy": out["node_energy"], "forces": forces, "dE_deps": -virial,
            "atom_virials": split_edge_virials(edge_virials, graph.edge_index, graph.positions.shape[0])}
