"""PaiNN (Schütt, Unke, Gastegger 2021): polarizable atom interaction neural network.

Pure tensor code: index_add_ aggregation, no Python branches on data values, no .item() in forward, so the
module scripts with TorchScript and traces with torch.compile. Two force modes:
- "gradient": F = -dE/dr (energy-conserving; Hessian = d²E/dr²),
- "direct": a gated-equivariant vector head predicts F from the vector features (Hessian taken as -dF/dr).

`norm_eps`: the invariant |v| fed to the update and gate MLPs is sqrt(|v|² + norm_eps). The published PaiNN's
tiny epsilon (1e-8, the default) leaves the energy cone-shaped, E ~ |δ|, around geometries where vector features
vanish by symmetry (atoms on inversion or tetrahedral sites: a perfect crystal lattice, the centre of CH4), so
the Hessian there is ill-defined: finite differences grow as 1/step (measured on diamond Si: 27 eV/Å² at
0.01 Å, 10x more at 0.001 Å). norm_eps = 1 (features are O(1)) makes the invariant smooth on the features'
own scale, so phonons and vibrational frequencies at symmetric minima are well defined.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from engine.models.base import MLP, NORM_EPS, Student, safe_norm


class PaiNNMessage(nn.Module):
    def __init__(self, features: int, num_basis: int):
        super().__init__()
        self.features = features
        self.phi = MLP(features, features, 3 * features)
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
    def __init__(self, features: int, norm_eps: float = NORM_EPS):
        super().__init__()
        self.features = features
        self.norm_eps = float(norm_eps)
        self.U = nn.Linear(features, features, bias=False)
        self.V = nn.Linear(features, features, bias=False)
        self.mlp = MLP(2 * features, features, 3 * features)

    def forward(self, s, v):
        uv, vv = self.U(v), self.V(v)
        a = self.mlp(torch.cat([s, safe_norm(vv, 1, self.norm_eps)], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, self.features, dim=-1)
        v = v + a_vv.unsqueeze(1) * uv
        s = s + a_ss + a_sv * (uv * vv).sum(dim=1)
        return s, v


class GatedEquivariantBlock(nn.Module):
    """Maps (scalars, vectors) to a gated set of vectors: the direct force head."""

    def __init__(self, features: int, out_vectors: int, norm_eps: float = NORM_EPS):
        super().__init__()
        self.out_vectors = out_vectors
        self.norm_eps = float(norm_eps)
        self.W1 = nn.Linear(features, features, bias=False)
        self.W2 = nn.Linear(features, out_vectors, bias=False)
        self.mlp = MLP(2 * features, features, out_vectors)

    def forward(self, s, v):
        gate = self.mlp(torch.cat([s, safe_norm(self.W1(v), 1, self.norm_eps)], dim=-1))
        return self.W2(v) * gate.unsqueeze(1)


class PaiNN(Student):
    def __init__(
        self,
        species: Sequence[int],
        cutoff: float = 5.0,
        hidden: int = 128,
        layers: int = 4,
        num_basis: int = 128,
        force_mode: str = "gradient",
        norm_eps: float = NORM_EPS,
    ):
        super().__init__(species, cutoff, hidden, layers, num_basis, force_mode)
        if not (float(norm_eps) > 0 and math.isfinite(float(norm_eps))):
            raise ValueError(f"PaiNN: norm_eps must be a finite number > 0, got {norm_eps}")
        self.norm_eps = float(norm_eps)
        self.messages = nn.ModuleList([PaiNNMessage(hidden, num_basis) for _ in range(layers)])
        self.updates = nn.ModuleList([PaiNNUpdate(hidden, norm_eps) for _ in range(layers)])
        self.readout = MLP(hidden, hidden // 2, 1)
        self.force_head = GatedEquivariantBlock(hidden, 1, norm_eps) if self.direct_forces else None

    @torch.jit.unused
    def hyperparameters(self):
        return dict(super().hyperparameters(), norm_eps=self.norm_eps)

    def interact(self, species, edge_index, rbf, fcut, unit):
        """Final scalar [N, F] and vector [N, 3, F] features (vectors start at zero)."""
        s = self.embedding(species)
        v = torch.zeros(s.shape[0], 3, s.shape[1], dtype=s.dtype, device=s.device)
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, edge_index, rbf, fcut, unit)
            s, v = update(s, v)
        return s, v

    def halo_initial(self, species):
        s = self.embedding(species)
        return torch.cat([s, torch.zeros(s.shape[0], 3 * s.shape[1], dtype=s.dtype, device=s.device)], dim=1)

    def halo_layer(self, k: int, state, edge_index, rbf, fcut, unit, nlocal: int):
        s, v = self.halo_features(state)
        for index, (message, update) in enumerate(zip(self.messages, self.updates)):
            if index == k:
                s, v = message(s, v, edge_index, rbf, fcut, unit)
                s, v = update(s[:nlocal], v[:nlocal])  # ghost rows come from their owners
        return torch.cat([s, v.reshape(s.shape[0], 3 * self.hidden)], dim=1)  # (no -1: zero rows are allowed)

    def halo_features(self, state):
        return state[:, :self.hidden], state[:, self.hidden:].reshape(state.shape[0], 3, self.hidden)


__all__ = ["PaiNN"]
