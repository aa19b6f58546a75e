"""Radial basis and cutoff envelope shared by the students and the fused neighbor-list kernels."""
from __future__ import annotations

import math

import torch


def sinc_basis(r: torch.Tensor, cutoff: float, num_basis: int) -> torch.Tensor:
    """PaiNN's radial basis sin(n π r / r_c) / r, n = 1..num_basis, shape [E, num_basis]. Requires r > 0."""
    n = torch.arange(1, num_basis + 1, device=r.device, dtype=r.dtype)
    return torch.sin(n * (math.pi / cutoff) * r.unsqueeze(-1)) / r.unsqueeze(-1)


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """0.5 (cos(π r / r_c) + 1) inside the cutoff, 0 outside: smooth to first order at r_c."""
    return torch.where(r < cutoff, 0.5 * (torch.cos(r * (math.pi / cutoff)) + 1.0), torch.zeros_like(r))
