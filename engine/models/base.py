"""What every student shares: the element table, per-element reference energies and the energy scale (fitted by
the trainer), the edge geometry and radial features, the energy readout and the forward/forces interface.

A student implements one method, `interact(species, edge_index, rbf, fcut, unit) -> (s [N, F], v)`: its message
passing on precomputed edge features (and, for LAMMPS' layer-wise halo exchange on several MPI ranks, the same
one layer at a time: halo_initial, halo_layer, halo_features; without them an export runs in ghost mode there). Everything else (the graph path here, the fused neighbor-list path of
`engine.runner.FusedStudent`, compiled and exported students) calls it through `energies_from_edges`, so a new
architecture gets every engine path without a second copy of its physics."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from engine.autograd_mode import autograd_is_off, autograd_on, normal_graph
from engine.errors import HessforgeError, UnknownElementError
from engine.graph import AtomicGraph, edge_vectors, sum_per_structure
from engine.radial import cosine_cutoff, sinc_basis

FORCE_MODES = ("gradient", "direct")
NORM_EPS = 1e-8  # keeps |r| differentiable (twice) at zero vectors; the fused op takes the same value


def safe_norm(v: torch.Tensor, dim: int, eps: float = NORM_EPS) -> torch.Tensor:
    return torch.sqrt(v.square().sum(dim=dim) + eps)


class MLP(nn.Sequential):
    def __init__(self, n_in: int, n_hidden: int, n_out: int, activation: type = nn.SiLU):
        super().__init__(nn.Linear(n_in, n_hidden), activation(), nn.Linear(n_hidden, n_out))


def check_hyperparameters(architecture: str, species, cutoff, hidden, layers, num_basis) -> None:
    """One clear error for a student that cannot be built (instead of one from deep inside torch)."""
    problems = []
    if not species or any(not 1 <= int(z) <= 118 for z in species):
        problems.append(f"species must be atomic numbers 1..118, got {list(species)}")
    if not (math.isfinite(float(cutoff)) and float(cutoff) > 0):
        problems.append(f"cutoff must be > 0 Å, got {cutoff}")
    if int(hidden) < 2:
        problems.append(f"hidden must be >= 2, got {hidden}")
    if int(layers) < 1:
        problems.append(f"layers must be >= 1, got {layers}")
    if int(num_basis) < 1:
        problems.append(f"num_basis must be >= 1, got {num_basis}")
    if problems:
        raise HessforgeError(f"{architecture}: " + "; ".join(problems))


class Student(nn.Module):
    """Base of the student architectures (not a model by itself: subclasses define `interact`)."""

    force_modes: Tuple[str, ...] = FORCE_MODES

    def __init__(self, species: Sequence[int], cutoff: float, hidden: int, layers: int, num_basis: int,
                 force_mode: str):
        super().__init__()
        name = type(self).__name__
        if force_mode not in self.force_modes:
            raise ValueError(f"{name}: force_mode must be one of {self.force_modes}, got {force_mode!r}")
        check_hyperparameters(name, species, cutoff, hidden, layers, num_basis)
        self.species: List[int] = sorted(int(z) for z in species)
        self.cutoff = float(cutoff)
        self.hidden = hidden
        self.num_layers = layers
        self.num_basis = num_basis
        self.force_mode = force_mode
        self.direct_forces = force_mode == "direct"
        z_to_index = torch.full((119,), -1, dtype=torch.long)
        z_to_index[torch.tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("z_to_index", z_to_index)
        # Per-element reference energies (eV) and the scale of the learned atomic energies (eV).
        self.register_buffer("atom_ref", torch.zeros(len(self.species), dtype=torch.float64))  # float64 always (_apply)
        self.register_buffer("energy_scale", torch.ones(()))
        self.embedding = nn.Embedding(len(self.species), hidden)

    def _apply(self, fn, *args, **kwargs):
        """Module.to / .float() / .cuda() move atom_ref but keep it float64 (energies are float64 outputs)."""
        ref = self.atom_ref
        super()._apply(fn, *args, **kwargs)
        self.atom_ref = ref.to(device=self.atom_ref.device, dtype=torch.float64)
        return self

    def hyperparameters(self) -> Dict:
        return dict(
            species=self.species, cutoff=self.cutoff, hidden=self.hidden, layers=self.num_layers,
            num_basis=self.num_basis, force_mode=self.force_mode,
        )

    @torch.jit.unused
    def check_species(self, numbers, where: str = "") -> None:
        unknown = set(int(z) for z in torch.as_tensor(numbers).unique().tolist()) - set(self.species)
        if unknown:
            raise UnknownElementError(unknown, self.species, where or f"{type(self).__name__} student")

    def edge_features(self, graph: AtomicGraph, positions: torch.Tensor):
        """Unit vectors [E, 3], radial basis [E, num_basis] and cosine envelope [E] of the graph's edges."""
        return self.features_of_vectors(edge_vectors(graph, positions))

    def features_of_vectors(self, vec: torch.Tensor):
        """edge_features of edge vectors r_ij [E, 3]."""
        r = safe_norm(vec, 1)
        return vec / r.unsqueeze(-1), sinc_basis(r, self.cutoff, self.num_basis), cosine_cutoff(r, self.cutoff)

    def node_energies(self, species: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Atomic energies [N] (float64) from final scalar features."""
        # learned part in the model's dtype, the per-element references (~1e3 eV) added in float64: in float32
        # they would round every atomic energy to ~1e-4 eV (noise in the energy loss and in MD energies)
        return (self.readout(s).squeeze(-1) * self.energy_scale).to(torch.float64) + self.atom_ref[species]

    # Layer-wise halo exchange (the C++ core's compute_halo, LAMMPS mode halo): message passing one layer at a
    # time, each atom's features packed in one row of a node state [N, halo_width], so that between layers a
    # domain decomposition can copy its ghost atoms' rows from their owners, and ghost atoms need reach only one
    # cutoff instead of num_layers cutoffs. A student implements halo_initial, halo_layer and halo_features.
    def halo_initial(self, species: torch.Tensor) -> torch.Tensor:
        """The node state [N, halo_width] before the first layer."""
        raise NotImplementedError

    def halo_layer(self, k: int, state: torch.Tensor, edge_index: torch.Tensor, rbf: torch.Tensor,
                   fcut: torch.Tensor, unit: torch.Tensor, nlocal: int) -> torch.Tensor:
        """Layer k on node states [N, W] (rows >= nlocal: ghost atoms, up to date) with edges whose receivers
        are < nlocal: the new states [nlocal, W] of the receivers."""
        raise NotImplementedError

    def halo_features(self, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(s, v) of a node state, as interact returns them."""
        raise NotImplementedError

    def energies_from_edges(self, numbers: torch.Tensor, batch: torch.Tensor, num_structures: int,
                            edge_index: torch.Tensor, rbf: torch.Tensor, fcut: torch.Tensor, unit: torch.Tensor):
        """Per-structure energies [B], atomic energies [N] and the final scalar and vector features."""
        species = self.z_to_index[numbers]
        s, v = self.interact(species, edge_index, rbf, fcut, unit)
        node_energy = self.node_energies(species, s)
        return sum_per_structure(node_energy, batch, num_structures), node_energy, s, v

    def energies(self, graph: AtomicGraph, positions: torch.Tensor):
        """energies_from_edges on the graph's edges: the differentiable core, free of autograd calls so
        torch.compile can trace it whole."""
        unit, rbf, fcut = self.edge_features(graph, positions)
        return self.energies_from_edges(graph.numbers, graph.batch, graph.cell.shape[0], graph.edge_index, rbf,
                                        fcut, unit)

    def direct_force_head(self, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self.force_head is not None
        return self.force_head(s, v).squeeze(-1) * self.energy_scale

    def forward(
        self, graph: AtomicGraph, compute_forces: bool = True, create_graph: bool = False
    ) -> Dict[str, torch.Tensor]:
        """energy [B], node_energy [N], node_features [N, F] and, if asked, forces [N, 3].

        For gradient forces, positions that already require grad are used as they are (so callers can take
        second derivatives); otherwise a detached copy is made differentiable.
        """
        # a caller under no_grad / inference_mode (not in TorchScript: an exported model handles it itself)
        if not torch.jit.is_scripting():
            if compute_forces and not self.direct_forces and autograd_is_off():
                with autograd_on():
                    return self.forward(normal_graph(graph), compute_forces, create_graph)
        positions = graph.positions
        if compute_forces and not self.direct_forces and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        energy, node_energy, s, v = self.energies(graph, positions)
        out: Dict[str, torch.Tensor] = {"energy": energy, "node_energy": node_energy, "node_features": s}
        if compute_forces:
            if self.direct_forces:
                out["forces"] = self.direct_force_head(s, v)
            else:
                grads = torch.autograd.grad(
                    [energy.sum()], [positions], create_graph=create_graph, allow_unused=True
                )
                grad = grads[0]
                if grad is None:  # no edges at all: energy does not depend on positions
                    grad = torch.zeros_like(positions)
                out["forces"] = -grad
        return out
