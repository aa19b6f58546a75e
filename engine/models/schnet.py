"""SchNet (Schütt et al. 2018): continuous-filter convolutions on interatomic distances, scalars only.

The smallest and fastest student here: one scalar feature vector per atom, no vector features, so it has
gradient forces only (F = -dE/dr, Hessian = d²E/dr²). Its filters are made from the same radial features as
PaiNN's (sin(nπr/r_c)/r under a cosine envelope) instead of the original Gaussians, so the fused Triton
neighbor-list/radial-basis kernel serves it unchanged; the envelope makes every filter vanish smoothly at the
cutoff (a continuous potential energy surface, as in later SchNet versions).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from engine.models.base import MLP, Student


class ShiftedSoftplus(nn.Module):
    """softplus(x) - ln 2: SchNet's activation (smooth, zero at zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x) - math.log(2.0)


class SchNetInteraction(nn.Module):
    """x_i += f2out(Σ_j in2f(x_j) ⊙ W(r_ij) fcut(r_ij)), with the filter W a two-layer network of the radial
    features."""

    def __init__(self, features: int, num_basis: int):
        super().__init__()
        self.filter = MLP(num_basis, features, features, ShiftedSoftplus)
        self.in2f = nn.Linear(features, features, bias=False)
        self.f2out = MLP(features, features, features, ShiftedSoftplus)

    def forward(self, x, edge_index, rbf, fcut, num_out: int = -1):
        """num_out >= 0: only the first num_out atoms' new features (the edges' receivers are among them)."""
        i, j = edge_index[0], edge_index[1]
        message = self.in2f(x)[j] * self.filter(rbf) * fcut.unsqueeze(-1)
        if num_out >= 0:
            x = x[:num_out]
        return x + self.f2out(torch.zeros_like(x).index_add(0, i, message))


class SchNet(Student):
    force_modes = ("gradient",)

    def __init__(
        self,
        species: Sequence[int],
        cutoff: float = 5.0,
        hidden: int = 128,
        layers: int = 3,
        num_basis: int = 32,
        force_mode: str = "gradient",
    ):
        super().__init__(species, cutoff, hidden, layers, num_basis, force_mode)
        self.interactions = nn.ModuleList([SchNetInteraction(hidden, num_basis) for _ in range(layers)])
        self.readout = MLP(hidden, hidden // 2, 1, ShiftedSoftplus)
        self.force_head = None  # scalars only: no direct-force head

    def interact(self, species, edge_index, rbf, fcut, unit):
        """Final scalar features [N, F]; the vector features are empty ([N, 3, 0]: SchNet has none)."""
        x = self.embedding(species)
        for interaction in self.interactions:
            x = interaction(x, edge_index, rbf, fcut)
        return x, x.new_zeros(x.shape[0], 3, 0)

    def halo_initial(self, species):
        return self.embedding(species)

    def halo_layer(self, k: int, state, edge_index, rbf, fcut, unit, nlocal: int):
        for index, interaction in enumerate(self.interactions):
            if index == k:
                state = interaction(state, edge_index, rbf, fcut, nlocal)
        return state

    def halo_features(self, state):
        return state, state.new_zeros(state.shape[0], 3, 0)


__all__ = ["SchNet"]
