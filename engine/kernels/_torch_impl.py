"""Vectorised, batched torch implementation of the fused neighbor-list + radial-basis pass.

The same candidates as the Triton kernel: for each receiver atom i, every atom j of i's structure and every
cell shift s of the structure's shift range (one shift, the minimum image, where the cell allows it), and
the same sequence of IEEE operations per candidate, so on CPU the edge set is bit-identical to the Triton
kernel run by the interpreter, and the output order is the same: sorted by (i, j, shift), like the torch
reference. No Python loop over structures: structures are grouped by their number of shifts S (usually one
or two groups: molecules S = 1, periodic cells S = 27...), pairs (i, j) of a group are generated with
repeat_interleave, and the S shifts of each pair are evaluated as a dense [pairs, S] block (contiguous
memory, no per-candidate gathers); chunks of receivers bound the memory.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from engine.kernels._prepare import (
    META_MIC, META_N0, META_N1, META_N2, META_NATOMS, META_NSHIFT, META_PBC, META_START, Prepared,
)

# Candidates evaluated at once: ~10 temporaries of this length stay in L2 cache (2^21 was 2x slower).
CHUNK_CANDIDATES = 1 << 18


def shift_table(prep: Prepared) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer shifts [ΣS, 3] and their cartesian vectors [ΣS, 3] for every structure, plus the offset of
    each structure's block [B]. Shift s of structure b is row table_offset[b] + s (s in mixed radix order,
    first axis slowest, like itertools.product in the reference)."""
    meta = prep.meta.to(torch.int64)
    num_shift = meta[:, META_NSHIFT]
    table_offset = torch.cumsum(num_shift, 0) - num_shift
    total = int(num_shift.sum())
    device, dtype = prep.pos_w.device, prep.pos_w.dtype
    b = torch.repeat_interleave(torch.arange(meta.shape[0], device=device), num_shift, output_size=total)
    s = torch.arange(total, device=device) - table_offset[b]
    n0, n1, n2 = meta[b, META_N0], meta[b, META_N1], meta[b, META_N2]
    m1, m2 = 2 * n1 + 1, 2 * n2 + 1
    s0 = (s // (m1 * m2) - n0).to(dtype)
    s1 = ((s // m2) % m1 - n1).to(dtype)
    s2 = (s % m2 - n2).to(dtype)
    c = prep.cell[b]
    vec = torch.stack([s0 * c[:, 0, k] + s1 * c[:, 1, k] + s2 * c[:, 2, k] for k in range(3)], dim=1)
    return torch.stack([s0, s1, s2], dim=1), vec, table_offset


def _chunks(per_atom: List[int], limit: int) -> List[Tuple[int, int]]:
    """Split positions [0, len) into runs of at most `limit` total weight (at least one element each)."""
    out, begin, acc = [], 0, 0
    for k, n in enumerate(per_atom):
        if acc and acc + n > limit:
            out.append((begin, k))
            begin, acc = k, 0
        acc += n
    if begin < len(per_atom):
        out.append((begin, len(per_atom)))
    return out


def torch_pairs(prep: Prepared, batch: torch.Tensor):
    """All edges: receivers i [E], senders j [E], integer shifts (unwrapped, dtype) [E, 3], vectors [E, 3]
    computed from the wrapped positions, squared lengths [E], sorted by (i, j, shift).

    Structure-of-arrays with index_select gathers (CPU advanced indexing of [N, 3] rows is ~10x slower);
    every floating-point expression is the Triton kernel's, in the same order."""
    device, dtype = prep.pos_w.device, prep.pos_w.dtype
    meta = prep.meta.to(torch.int64)
    shifts_int, shifts_vec, table_offset = shift_table(prep)
    cut2 = prep.params[1]
    sel_ = torch.index_select
    x, y, z = (prep.pos_w[:, k].contiguous() for k in range(3))
    ox, oy, oz = (prep.offsets[:, k].contiguous() for k in range(3))
    natoms_g, start_g, nshift_g = meta[:, META_NATOMS], meta[:, META_START], meta[:, META_NSHIFT]
    mic_g = meta[:, META_MIC] != 0
    atom_natoms = sel_(natoms_g, 0, batch)
    parts = []
    for num_shift in torch.unique(nshift_g[natoms_g > 0]).tolist():
        atoms = (sel_(nshift_g, 0, batch) == num_shift).nonzero().squeeze(1)
        if atoms.numel() == 0:
            continue
        any_mic = num_shift == 1 and bool(mic_g[(nshift_g == 1) & (natoms_g > 0)].any())
        weights = sel_(atom_natoms, 0, atoms)
        for a0, a1 in _chunks((weights * num_shift).tolist(), CHUNK_CANDIDATES):
            rec_atoms, pa = atoms[a0:a1], weights[a0:a1]
            total = int(pa.sum())

            def rep(values):  # per-receiver values -> per-pair
                return torch.repeat_interleave(values, pa, output_size=total)

            graph_of_rec = sel_(batch, 0, rec_atoms)
            rec = rep(rec_atoms)
            graph = rep(graph_of_rec)
            j = rep(sel_(start_g, 0, graph_of_rec)) + (torch.arange(total, device=device) - rep(torch.cumsum(pa, 0) - pa))
            d0x = sel_(x, 0, j) - sel_(x, 0, rec)
            d0y = sel_(y, 0, j) - sel_(y, 0, rec)
            d0z = sel_(z, 0, j) - sel_(z, 0, rec)
            if num_shift == 1:
                row = sel_(table_offset, 0, graph)
                if any_mic:  # minimum image where the structure allows it (see _prepare), as in the kernel
                    s0, s1, s2 = _minimum_image_shifts(d0x, d0y, d0z, prep, graph, shifts_int, row)
                else:
                    sh = sel_(shifts_int, 0, row)
                    s0, s1, s2 = sh[:, 0], sh[:, 1], sh[:, 2]
                cg = prep.cell.reshape(-1, 9)
                ck = [sel_(cg[:, k].contiguous(), 0, graph) for k in range(9)]
                dx = d0x + ((s0 * ck[0] + s1 * ck[3]) + s2 * ck[6])
                dy = d0y + ((s0 * ck[1] + s1 * ck[4]) + s2 * ck[7])
                dz = d0z + ((s0 * ck[2] + s1 * ck[5]) + s2 * ck[8])
                d2 = (dx * dx + dy * dy) + dz * dz
                hit = ((d2 < cut2) & (j != rec)).nonzero().squeeze(1)
                shift_sel = [sel_(s0, 0, hit), sel_(s1, 0, hit), sel_(s2, 0, hit)]
                pair = hit
                d_sel = [sel_(dx, 0, hit), sel_(dy, 0, hit), sel_(dz, 0, hit)]
            else:
                # [pairs, S] blocks: each pair's structure's S shift vectors, then the same arithmetic
                rows = sel_(table_offset, 0, graph)[:, None] + torch.arange(num_shift, device=device)[None, :]
                flat = rows.reshape(-1)
                dx = d0x[:, None] + sel_(shifts_vec[:, 0].contiguous(), 0, flat).reshape(rows.shape)
                dy = d0y[:, None] + sel_(shifts_vec[:, 1].contiguous(), 0, flat).reshape(rows.shape)
                dz = d0z[:, None] + sel_(shifts_vec[:, 2].contiguous(), 0, flat).reshape(rows.shape)
                d2 = (dx * dx + dy * dy) + dz * dz
                hit = d2 < cut2
                self_pair = (j == rec).nonzero().squeeze(1)
                hit[self_pair, (num_shift - 1) // 2] = False  # the middle shift is zero
                hit = hit.reshape(-1).nonzero().squeeze(1)
                pair = torch.div(hit, num_shift, rounding_mode="floor")
                sh = sel_(shifts_int, 0, sel_(flat, 0, hit))
                shift_sel = [sh[:, 0], sh[:, 1], sh[:, 2]]
                d_sel = [sel_(dx.reshape(-1), 0, hit), sel_(dy.reshape(-1), 0, hit), sel_(dz.reshape(-1), 0, hit)]
                d2 = d2.reshape(-1)
            r_i, r_j = sel_(rec, 0, pair), sel_(j, 0, pair)
            shift = torch.stack([(shift_sel[0] + sel_(ox, 0, r_j)) - sel_(ox, 0, r_i),
                                 (shift_sel[1] + sel_(oy, 0, r_j)) - sel_(oy, 0, r_i),
                                 (shift_sel[2] + sel_(oz, 0, r_j)) - sel_(oz, 0, r_i)], dim=1)
            parts.append((r_i, r_j, shift, torch.stack(d_sel, dim=1), sel_(d2, 0, hit)))
    if not parts:
        z0 = torch.zeros(0, dtype=torch.int64, device=device)
        zf = torch.zeros(0, 3, dtype=dtype, device=device)
        return z0, z0, zf, zf, torch.zeros(0, dtype=dtype, device=device)
    if len(parts) == 1:
        return parts[0]
    out = tuple(torch.cat([p[k] for p in parts]) for k in range(5))
    # groups interleave in receiver order; within a receiver, edges are already sorted by (j, shift)
    order = torch.sort(out[0], stable=True).indices
    return tuple(sel_(t, 0, order) for t in out)


def _minimum_image_shifts(d0x, d0y, d0z, prep: Prepared, graph, shifts_int, row):
    """Per-candidate shifts: the rounded fractional difference where the structure is in minimum-image
    mode, the enumerated shift elsewhere."""
    sel_ = torch.index_select
    ig = prep.inv_cell.reshape(-1, 9)
    inv = [sel_(ig[:, k].contiguous(), 0, graph) for k in range(9)]
    meta = prep.meta.to(torch.int64)
    mic = sel_(meta[:, META_MIC].contiguous(), 0, graph) != 0
    bits = sel_(meta[:, META_PBC].contiguous(), 0, graph)
    table = sel_(shifts_int, 0, row)
    out = []
    for k in range(3):
        f = (d0x * inv[k] + d0y * inv[3 + k]) + d0z * inv[6 + k]
        mic_shift = torch.where((bits & (1 << k)) != 0, -torch.floor(f + 0.5), torch.zeros_like(f))
        out.append(torch.where(mic, mic_shift, table[:, k]))
    return out


def basis(r: torch.Tensor, params: torch.Tensor, num_basis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """sin(n π r / r_c) / r, n = 1..num_basis, and the cosine envelope, in the kernel's operation order."""
    n = torch.arange(1, num_basis + 1, device=r.device, dtype=r.dtype)
    k = n * params[2]
    rbf = torch.sin(k[None, :] * r[:, None]) / r[:, None]
    fcut = torch.where(r < params[0], 0.5 * (torch.cos(r * params[2]) + 1.0), torch.zeros_like(r))
    return rbf, fcut


def torch_forward(prep: Prepared, batch: torch.Tensor, num_basis: int, capacity: int, with_geometry: bool):
    """(edge_index [2, E'], shifts [E', 3], r [E'], unit [E', 3], rbf [E', nb], fcut [E'], num_edges [])
    with E' = E (capacity < 0) or capacity, padded with inert edges (see ops.py)."""
    i, j, shift, d, d2 = torch_pairs(prep, batch)
    num_edges = i.shape[0]
    edge_index = torch.stack([i, j])
    if with_geometry:
        r = torch.sqrt(d2 + prep.params[3])
        unit = d / r[:, None]
        rbf, fcut = basis(r, prep.params, num_basis)
    else:
        r = unit = rbf = fcut = None
    count = torch.tensor(num_edges, dtype=torch.int64, device=batch.device)
    if capacity >= 0:
        keep = min(num_edges, capacity)
        out = empty_outputs(prep, capacity, num_basis, with_geometry, padded=True)
        out[0][:, :keep] = edge_index[:, :keep]
        out[1][:keep] = shift[:keep]
        if with_geometry:
            for dst, src in zip(out[2:6], (r, unit, rbf, fcut)):
                dst[:keep] = src[:keep]
        return out[:6] + (count,) if with_geometry else (out[0], out[1], count)
    if with_geometry:
        return edge_index, shift, r, unit, rbf, fcut, count
    return edge_index, shift, count


def empty_outputs(prep: Prepared, size: int, num_basis: int, with_geometry: bool, padded: bool):
    """Output buffers; padded ones hold inert edges: (0, 0), zero shift, r = cutoff, unit = 0, rbf = 0,
    fcut = 0, so that they contribute nothing to sums over edges and nothing to gradients."""
    device, dtype = prep.pos_w.device, prep.pos_w.dtype
    new = torch.zeros if padded else torch.empty
    edge_index = new(2, size, dtype=torch.int64, device=device)
    shifts = new(size, 3, dtype=dtype, device=device)
    if not with_geometry:
        return edge_index, shifts, None, None, None, None
    if padded:
        r = prep.params[0].expand(size).clone()
    else:
        r = torch.empty(size, dtype=dtype, device=device)
    unit = new(size, 3, dtype=dtype, device=device)
    rbf = new(size, num_basis, dtype=dtype, device=device)
    fcut = new(size, dtype=dtype, device=device)
    return edge_index, shifts, r, unit, rbf, fcut


def torch_backward(r, unit, g_r: Optional[torch.Tensor], g_unit: Optional[torch.Tensor],
                   g_rbf: Optional[torch.Tensor], g_fcut: Optional[torch.Tensor],
                   num_edges: torch.Tensor, params: torch.Tensor, num_basis: int) -> torch.Tensor:
    """dL/d(edge vector) [E, 3] from the output gradients (padding edges, e >= num_edges, get zero)."""
    g = torch.zeros_like(r) if g_r is None else g_r.clone()
    if g_rbf is not None and num_basis > 0:
        n = torch.arange(1, num_basis + 1, device=r.device, dtype=r.dtype)
        k = (n * params[2])[None, :]
        arg = k * r[:, None]
        inv_r = 1.0 / r[:, None]
        drbf = (k * torch.cos(arg) - torch.sin(arg) * inv_r) * inv_r
        g = g + (g_rbf * drbf).sum(dim=1)
    if g_fcut is not None:
        dfcut = torch.where(r < params[0], -0.5 * params[2] * torch.sin(r * params[2]), torch.zeros_like(r))
        g = g + g_fcut * dfcut
    g_vec = g[:, None] * unit
    if g_unit is not None:
        g_vec = g_vec + (g_unit - unit * (g_unit * unit).sum(dim=1, keepdim=True)) / r[:, None]
    valid = torch.arange(r.shape[0], device=r.device) < num_edges
    return torch.where(valid[:, None], g_vec, torch.zeros_like(g_vec))
