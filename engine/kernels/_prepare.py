"""Per-batch preparation shared by the Triton kernel and the vectorised torch path.

Everything here is O(N + B), device-agnostic and sync-free (no device->host reads and no host->device copies,
so a CUDA graph can capture it): wrapped positions (so that a fixed range of integer shifts finds every image
within the cutoff), the integer wrap offsets (to report shifts relative to the caller's unwrapped positions),
and per-structure metadata (first atom, atom count, shift ranges).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from engine.neighbors import wrap_into_cells

# Columns of the int32 per-structure metadata table [B, META_COLS].
META_START, META_NATOMS, META_N0, META_N1, META_N2, META_NSHIFT, META_MIC, META_PBC = range(8)
META_COLS = 8


class Prepared(NamedTuple):
    pos_w: torch.Tensor  # [N, 3] wrapped positions (dtype of positions), contiguous
    offsets: torch.Tensor  # [N, 3] integer wrap offsets (dtype of positions): pos_w = pos + offsets @ cell
    cell: torch.Tensor  # [B, 3, 3] cell with non-periodic structures' rows replaced by the identity
    inv_cell: torch.Tensor  # [B, 3, 3] its inverse: frac = x @ inv_cell
    meta: torch.Tensor  # [B, META_COLS] int32: start, natoms, n0, n1, n2, number of shifts, mic, pbc bits
    params: torch.Tensor  # [4] (cutoff, cutoff², π/cutoff, eps) in positions' dtype


def heights(cell: torch.Tensor) -> torch.Tensor:
    """Distances between opposite faces of each cell [B, 3, 3] -> [B, 3] (same formula as the reference)."""
    volume = torch.linalg.det(cell).abs()
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
    cross = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], dim=1)
    return volume.unsqueeze(1) / cross.norm(dim=2)


def make_params(cutoff: float, eps: float, dtype: torch.dtype, device) -> torch.Tensor:
    # The same roundings as the torch reference: python doubles cast once to the working dtype. Filled on the
    # device rather than copied from host memory, which a CUDA graph capture would refuse.
    values = (cutoff, cutoff * cutoff, math.pi / cutoff, eps)
    return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])


@torch.no_grad()
def prepare(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor, cutoff: float, eps: float
) -> Prepared:
    positions = positions.detach()
    cell = cell.detach().to(positions.dtype)
    num_graphs = cell.shape[0]
    device, dtype = positions.device, positions.dtype
    pbc = pbc.to(torch.bool)
    # not bincount: on CUDA it reads max(batch) back to the host (a sync; refused inside a CUDA graph capture)
    natoms = torch.zeros(num_graphs, dtype=torch.int64, device=device).index_add_(0, batch, torch.ones_like(batch))
    start = torch.cumsum(natoms, 0) - natoms
    periodic = pbc.any(dim=1)
    pos_w, offsets, cell_safe, inv = wrap_into_cells(positions, cell, pbc, batch)
    h = heights(cell_safe)
    # Minimum-image mode: when every periodic height is >= 2 cutoff, a vector shorter than the cutoff has
    # |fractional coordinate| < 1/2 along each periodic axis, so the only image of j that can be a neighbor of
    # i is the one found by rounding the fractional difference: 1 candidate per pair instead of 27.
    mic = periodic & torch.where(pbc, h >= 2 * cutoff, torch.ones_like(pbc)).all(dim=1)
    nshift = torch.where(pbc & ~mic[:, None], torch.ceil(cutoff / h), torch.zeros((), dtype=dtype, device=device))
    nshift = nshift.to(torch.int64)
    m = 2 * nshift + 1
    bits = pbc.to(torch.int64)
    pbc_bits = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]
    meta = torch.stack(
        [start, natoms, nshift[:, 0], nshift[:, 1], nshift[:, 2], m.prod(dim=1), mic.to(torch.int64), pbc_bits],
        dim=1,
    ).to(torch.int32)
    return Prepared(pos_w.contiguous(), offsets.contiguous(), cell_safe.contiguous(), inv.contiguous(),
                    meta.contiguous(), make_params(cutoff, eps, dtype, device))
