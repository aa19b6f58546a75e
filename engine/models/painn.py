"""PaiNN (Schütt, Unke, Gastegger 2021): polarizable atom interaction neural network.

Pure tensor code: index_add_ aggregation, no Python branches on data values, no .item() in forward, so the
module scripts with TorchScript and traces with torch.compile. Two force modes:
- "gradient": F = -dE/dr (energy-conserving; Hessian = d²E/dr²),
- "direct": a gated-equivariant vector head predicts F from the vector features (Hessian taken as -dF/dr).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from engine.errors import HessforgeError, UnknownElementError
from engine.graph import AtomicGraph, edge_vectors, sum_per_structure
from engine.radial import cosine_cutoff, sinc_basis

FORCE_MODES = ("gradient", "direct")
def _norm(v: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    # eps keeps the norm differentiable (twice) at zero vectors, where every PaiNN vector feature starts
    return torch.sqrt(v.square().sum(dim=dim) + eps)


class _MLP(nn.Sequential):
    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__(nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_out))


class PaiNNMessage(nn.Module):
    def __init__(self, features: int, num_basis: int):
        super().__init__()
        self.features = features
        self.phi = _MLP(features, features, 3 * features)
        self.filter = nn.Linear(num_basis, 3 * features)

    def forward(self, s, v, edge_index, rbf, fcut, unit):
        i, j = edge_index[0], edge_index[1]
        x = self.phi(s)[j] * self.filter(rbf) * fcut.unsqueeze(-1)
        x_vv, x_s, x_vs = torch.split(x, self.features, dim=-1)
        dv = v[j] * x_vv.unsqueeze(1) + x_vs.unsqueeze(1) * unit.unsqueeze(-1)
        s = s.index_add(0, i, x_s)
        v = v.index_add(0, i, dv)
        return s, v


class PaiNNUpdate(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.U = nn.Linear(features, features, bias=False)
        self.V = nn.Linear(features, features, bias=False)
        self.mlp = _MLP(2 * features, features, 3 * features)

    def forward(self, s, v):
        uv, vv = self.U(v), self.V(v)
        a = self.mlp(torch.cat([s, _norm(vv, 1)], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, self.features, dim=-1)
        v = v + a_vv.unsqueeze(1) * uv
        s = s + a_ss + a_sv * (uv * vv).sum(dim=1)
        return s, v


class GatedEquivariantBlock(nn.Module):
    """Maps (scalars, vectors) to a gated set of vectors: the direct force head."""

    def __init__(self, features: int, out_vectors: int):
        super().__init__()
        self.out_vectors = out_vectors
        self.W1 = nn.Linear(features, features, bias=False)
        self.W2 = nn.Linear(features, out_vectors, bias=False)
        self.mlp = _MLP(2 * features, features, out_vectors)

    def forward(self, s, v):
        gate = self.mlp(torch.cat([s, _norm(self.W1(v), 1)], dim=-1))
        return self.W2(v) * gate.unsqueeze(1)


def check_hyperparameters(species, cutoff, hidden, layers, num_basis) -> None:
    """One clear error for a PaiNN that cannot be built (instead of one from deep inside torch)."""
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
        raise HessforgeError("PaiNN: " + "; ".join(problems))


class PaiNN(nn.Module):
    def __init__(
        self,
        species: Sequence[int],
        cutoff: float = 5.0,
        hidden: int = 128,
        layers: int = 4,
        num_basis: int = 128,
        force_mode: str = "gradient",
    ):
        super().__init__()
        if force_mode not in FORCE_MODES:
            raise ValueError(f"force_mode must be one of {FORCE_MODES}, got {force_mode!r}")
        check_hyperparameters(species, cutoff, hidden, layers, num_basis)
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
        self.register_buffer("atom_ref", torch.zeros(len(self.species)))
        self.register_buffer("energy_scale", torch.ones(()))
        self.embedding = nn.Embedding(len(self.species), hidden)
        self.messages = nn.ModuleList([PaiNNMessage(hidden, num_basis) for _ in range(layers)])
        self.updates = nn.ModuleList([PaiNNUpdate(hidden) for _ in range(layers)])
        self.readout = _MLP(hidden, hidden // 2, 1)
        self.force_head = GatedEquivariantBlock(hidden, 1) if self.direct_forces else None

    def hyperparameters(self) -> Dict:
        return dict(
            species=self.species, cutoff=self.cutoff, hidden=self.hidden, layers=self.num_layers,
            num_basis=self.num_basis, force_mode=self.force_mode,
        )

    @torch.jit.unused
    def check_species(self, numbers, where: str = "") -> None:
        unknown = set(int(z) for z in torch.as_tensor(numbers).unique().tolist()) - set(self.species)
        if unknown:
            raise UnknownElementError(unknown, self.species, where or "PaiNN student")

    def representation(self, graph: AtomicGraph, positions: torch.Tensor):
        """Final scalar [N, F] and vector [N, 3, F] features."""
        vec = edge_vectors(graph, positions)
        r = _norm(vec, 1)
        unit = vec / r.unsqueeze(-1)
        rbf = sinc_basis(r, self.cutoff, self.num_basis)
        fcut = cosine_cutoff(r, self.cutoff)
        s = self.embedding(self.z_to_index[graph.numbers])
        v = torch.zeros(s.shape[0], 3, s.shape[1], dtype=s.dtype, device=s.device)
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, graph.edge_index, rbf, fcut, unit)
            s, v = update(s, v)
        return s, v

    def energies(self, graph: AtomicGraph, positions: torch.Tensor):
        """Per-structure energies [B], atomic energies [N] and the final features: the differentiable core,
        free of autograd calls so torch.compile can trace it whole."""
        s, v = self.representation(graph, positions)
        species = self.z_to_index[graph.numbers]
        node_energy = self.readout(s).squeeze(-1) * self.energy_scale + self.atom_ref[species]
        energy = sum_per_structure(node_energy, graph.batch, graph.cell.shape[0])
        return energy, node_energy, s, v

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
        positions = graph.positions
        if compute_forces and not self.direct_forces and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        energy, node_energy, s, v = self.energies(graph, positions)
        out: Dict[str, torch.Tensor] = {"energy": energy, "node_energy": node_energy, "node_features": s}
        if compute_forces:
            if self.force_head is not None:
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
