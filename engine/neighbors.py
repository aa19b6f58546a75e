"""Reference neighbor list in plain torch: exact, periodic (triclinic, cells smaller than the cutoff).

Convention for an edge e = (i, j) with integer cell shift S_e:
    r_ij = positions[j] - positions[i] + S_e @ cell[batch[i]]
and |r_ij| < cutoff (strict), excluding the self pair (i == i, S = 0). Every pair appears in both directions.

This is the reference every faster kernel is tested against, and the path used when building training
batches. It works structure by structure on all pairs (O(N² · shifts)): fine for molecules and the small
periodic cells of training sets.
"""
from __future__ import annotations

import itertools
from typing import Optional, Tuple

import numpy as np
import torch

from engine.errors import HessforgeError


def cell_heights(cell: torch.Tensor) -> torch.Tensor:
    """Distances between opposite faces of the cell(s) spanned by the rows of `cell` [..., 3, 3] -> [..., 3]."""
    volume = torch.linalg.det(cell).abs()
    a, b, c = cell[..., 0, :], cell[..., 1, :], cell[..., 2, :]
    cross = torch.stack(
        [torch.linalg.cross(b, c, dim=-1), torch.linalg.cross(c, a, dim=-1), torch.linalg.cross(a, b, dim=-1)], dim=-2
    )
    return volume[..., None] / cross.norm(dim=-1)


def _shift_vectors(cell: torch.Tensor, pbc: torch.Tensor, cutoff: float) -> torch.Tensor:
    """All integer shifts [S, 3] that can bring an image within `cutoff` of an atom of the wrapped cell."""
    reps = []
    heights = cell_heights(cell) if bool(pbc.any()) else None
    for axis in range(3):
        if bool(pbc[axis]):
            n = int(torch.ceil(cutoff / heights[axis]).item())
            reps.append(range(-n, n + 1))
        else:
            reps.append(range(0, 1))
    return torch.tensor(list(itertools.product(*reps)), dtype=cell.dtype, device=cell.device)


def _unit(x: torch.Tensor) -> torch.Tensor:
    # a zero vector stays zero (degenerate periodic vectors: the cell keeps no volume, which is reported)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def complete_cells(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] cells with usable vectors along the non-periodic directions of wires (1 periodic direction)
    and slabs (2) whose cell has no volume: ASE writes zero vectors there (ase.build.nanotube, graphene).
    Images are never taken along a non-periodic direction, so unit vectors orthogonal to the periodic ones
    give the same edges. A cell that already has a volume, a molecule's cell, and degenerate periodic vectors
    (whose completion keeps no volume, for check_cell to report) come back as they were or without volume.
    Branch-free and sync-free: the kernels' op preparation calls it inside CUDA graph capture."""
    pbc = pbc.to(torch.bool)
    count = pbc.sum(dim=1)
    rows = torch.arange(3, device=cell.device)
    # slabs: the non-periodic row k gets the unit normal cell[k+1] x cell[k+2] (the two periodic rows)
    normals = _unit(torch.linalg.cross(cell[:, (rows + 1) % 3], cell[:, (rows + 2) % 3], dim=-1))
    slab = torch.where(pbc[:, :, None], cell, normals)
    # wires: the periodic row a (index m), then u ⊥ a and w ⊥ a, u in rows m+1 and m+2 (cyclically)
    a = (cell * pbc[:, :, None]).sum(dim=1)
    m = pbc.to(torch.int64).argmax(dim=1)
    helper = (rows[None, :] == a.abs().argmin(dim=1)[:, None]).to(cell.dtype)  # the axis least along a
    # (not one_hot: on CUDA it reads its input's range back to the host)
    u = _unit(torch.linalg.cross(a, helper, dim=-1))
    w = _unit(torch.linalg.cross(a, u, dim=-1))
    frame = torch.stack([a, u, w], dim=1)  # rows in the order m, m+1, m+2
    order = (rows[None, :] - m[:, None]) % 3
    wire = torch.gather(frame, 1, order[:, :, None].expand(-1, -1, 3))
    volume = torch.linalg.det(cell).abs()
    need = ((count == 1) | (count == 2)) & ~(volume > 1e-8)  # NaN volume (a NaN non-periodic row) included
    return torch.where(need[:, None, None], torch.where((count == 1)[:, None, None], wire, slab), cell)


def wrap_into_cells(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor):
    """(wrapped positions, integer offsets, cell_safe, its inverse) for a batch: wrapped = positions +
    offsets @ cell_safe[batch], fractional coordinates in [0, 1) along periodic directions; cell_safe is the
    cell, the identity for a structure without periodic direction. Sync-free (capture-safe)."""
    pbc = pbc.to(torch.bool)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    cell_safe = torch.where(pbc.any(dim=1)[:, None, None], cell, eye)
    inv = torch.linalg.inv_ex(cell_safe).inverse
    if positions.shape[0] == 0:
        return positions, torch.zeros_like(positions), cell_safe, inv
    frac = torch.einsum("na,nab->nb", positions, inv[batch])
    offsets = torch.where(pbc[batch], -torch.floor(frac), torch.zeros((), dtype=frac.dtype, device=frac.device))
    return positions + torch.einsum("na,nab->nb", offsets, cell_safe[batch]), offsets, cell_safe, inv


MIN_CELL_HEIGHT = 0.5  # Å between opposite faces along a periodic direction (simple cubic Po: 3.35 Å)


def reduce_thin_cells(cell: torch.Tensor, pbc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cells, ops) with cells = ops @ cell [B, 3, 3]: a periodic cell thinner than MIN_CELL_HEIGHT along a
    periodic direction, but with a volume, replaced by the Minkowski-reduced basis of the same lattice along its
    periodic directions (ase.geometry.minkowski_reduce; ops: integer, determinant ±1, on the periodic rows; a wire's
    or slab's non-periodic rows lose their parts along the periodic ones, which leaves the volume). Such a cell is a valid
    crystal written in a skewed basis (a supercell's or a sheared box's vectors): the same lattice gives the
    same edges, energies, forces and stress, and its reduced basis a short image search. Other cells, cells thin
    in every basis, and cells without volume or with NaN (check_cell reports them) come back as they were with
    ops = identity."""
    from ase.geometry import minkowski_reduce

    ops = torch.eye(3, dtype=cell.dtype, device=cell.device).repeat(cell.shape[0], 1, 1)
    if cell.shape[0] == 0:
        return cell, ops
    cell64 = cell.detach().double()
    periodic = pbc.to(torch.bool)
    ok = torch.isfinite(cell64).flatten(1).all(dim=1) & (torch.linalg.det(cell64).abs() > 1e-8)
    heights = cell_heights(cell64)
    thin = (periodic & (heights < MIN_CELL_HEIGHT)).any(dim=1) & ok
    if not bool(thin.any()):
        return cell, ops
    for k in thin.nonzero().flatten().tolist():
        c, mask = cell64[k].cpu().numpy(), periodic[k].cpu().numpy()
        # a wire's or slab's non-periodic vectors without their parts along the periodic ones (no images are
        # taken along them; the volume stays): a vacuum vector slanted along a periodic one makes it look thin
        flat = c.copy()
        if not mask.all():
            q, _ = np.linalg.qr(c[mask].T)  # orthonormal basis of the periodic span (columns)
            flat[~mask] = c[~mask] - (c[~mask] @ q) @ q.T
        _, reduce = minkowski_reduce(flat, pbc=mask)
        op = reduce @ flat @ np.linalg.inv(c)
        op[mask] = np.rint(op[mask])  # periodic rows: integer combinations of the periodic vectors, exactly
        op = torch.as_tensor(op, dtype=cell64.dtype, device=cell64.device)
        if bool((cell_heights(op @ cell64[k])[periodic[k]] >= MIN_CELL_HEIGHT).all()):
            ops[k] = op.to(cell.dtype)  # else thin in every basis: kept as given, for check_cell to name it
    return ops @ cell, ops  # differentiable in cell (strain derivatives reach the reduced vectors)


def lattice_cells(cell: torch.Tensor, pbc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cells, ops) the neighbor search works with, for [B, 3, 3] cells as given: wires' and slabs' zero
    non-periodic vectors completed (complete_cells), then skewed thin bases reduced (reduce_thin_cells, whose
    ops relate the two: cells = ops @ complete_cells(cell))."""
    return reduce_thin_cells(complete_cells(cell, pbc), pbc)


def check_cell(cell: torch.Tensor, pbc: torch.Tensor, where: str = "structure",
               given: Optional[torch.Tensor] = None) -> None:
    """A periodic structure's cell (after complete_cells) must be finite and span a volume. `given`: the cell
    as the caller wrote it, for the messages (default `cell`)."""
    shown = (cell if given is None else given).tolist()
    if bool(pbc.any()):
        if not bool(torch.isfinite(cell).all()):
            raise HessforgeError(f"{where}: periodic cell contains NaN or Inf (cell={shown})")
        volume = float(torch.linalg.det(cell.double()).abs())
        if not volume > 1e-8:
            raise HessforgeError(f"{where}: periodic cell has zero volume (cell={shown})")
        heights = cell_heights(cell.double())
        thin = [a for a in range(3) if bool(pbc[a]) and float(heights[a]) < MIN_CELL_HEIGHT]
        if thin:  # no crystal is; and every atom would meet (cutoff / height)^3 images of itself
            a = thin[0]
            ops = reduce_thin_cells(cell.double()[None], pbc[None])[1][0]
            reducible = bool((ops != torch.eye(3, dtype=ops.dtype, device=ops.device)).any())
            hint = ("a skewed basis of a thicker lattice: pass its reduced basis, ase.geometry.minkowski_reduce"
                    if reducible else "a cell in nm or Bohr, or a broken one?")
            raise HessforgeError(f"{where}: periodic cell is {float(heights[a]):.3g} Å thick along cell vector {a} "
                                 f"(below {MIN_CELL_HEIGHT} Å, thinner than any crystal: {hint}; "
                                 f"cell={shown})")


def structure_neighbor_list(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neighbor list of one structure. Returns edge_index [2, E] (long) and shifts [E, 3] (positions' dtype)."""
    n = positions.shape[0]
    device, dtype = positions.device, positions.dtype
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, dtype=dtype, device=device)
    pbc = pbc.to(torch.bool)
    with torch.no_grad():
        pos = positions.detach()
        offsets = torch.zeros_like(pos)  # integer offsets o with wrapped = pos + o @ cell
        ops = None
        if bool(pbc.any()):
            cell, ops = lattice_cells(cell[None], pbc[None])
            cell, ops = cell[0], ops[0]  # shifts are found in the reduced basis, returned in the caller's
            check_cell(cell, pbc)
            frac = torch.linalg.solve(cell.T, pos.T).T
            offsets = torch.where(pbc, -torch.floor(frac), torch.zeros_like(frac))
            pos = pos + offsets @ cell
        shifts = _shift_vectors(cell, pbc, cutoff)
        idx_i, idx_j = torch.meshgrid(
            torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij"
        )
        idx_i, idx_j = idx_i.reshape(-1), idx_j.reshape(-1)
        base = pos[idx_j] - pos[idx_i]
        senders, receivers, found = [], [], []
        for shift in shifts:
            d = base + shift @ cell
            keep = (d.square().sum(dim=1) < cutoff * cutoff)
            if not bool(shift.any()):
                keep &= idx_i != idx_j
            sel = keep.nonzero().squeeze(1)
            receivers.append(idx_i[sel])
            senders.append(idx_j[sel])
            found.append(shift.expand(sel.shape[0], 3))
        edge_i = torch.cat(receivers)
        edge_j = torch.cat(senders)
        edge_shift = torch.cat(found)
        # Undo the wrapping so the shifts refer to the caller's (unwrapped) positions.
        edge_shift = edge_shift + offsets[edge_j] - offsets[edge_i]
        if ops is not None:
            edge_shift = edge_shift @ ops  # S @ (ops @ cell): the same lattice vector in the caller's basis
        order = torch.argsort(edge_i * n + edge_j, stable=True)
    return torch.stack([edge_i[order], edge_j[order]]), edge_shift[order]


def batched_neighbor_list(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor, cutoff: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neighbor list of a batch: per-structure lists with atom indices offset into the batch."""
    counts = torch.bincount(batch, minlength=cell.shape[0]).tolist()
    edges, shifts = [], []
    start = 0
    for g, count in enumerate(counts):
        e, s = structure_neighbor_list(positions[start : start + count], cell[g], pbc[g], cutoff)
        edges.append(e + start)
        shifts.append(s)
        start += count
    return torch.cat(edges, dim=1), torch.cat(shifts)
