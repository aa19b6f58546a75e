"""The batched atomic graph: one plain container of tensors used by training and inference alike.

A NamedTuple keeps it TorchScript- and torch.compile-friendly (no methods run inside models).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.errors import HessforgeError
from engine.neighbors import batched_neighbor_list, check_cell, lattice_cells, wrap_into_cells


class AtomicGraph(NamedTuple):
    positions: torch.Tensor  # [N, 3] Å
    numbers: torch.Tensor  # [N] atomic numbers (long)
    cell: torch.Tensor  # [B, 3, 3] Å, rows are lattice vectors
    pbc: torch.Tensor  # [B, 3] bool
    batch: torch.Tensor  # [N] structure index of each atom (long)
    edge_index: torch.Tensor  # [2, E]: (receiver i, sender j)
    shifts: torch.Tensor  # [E, 3] integer cell shifts (positions' dtype): r_ij = x_j - x_i + shift @ cell


def edge_vectors(graph: AtomicGraph, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r_ij for every edge; pass `positions` to differentiate with respect to a tensor other than graph's."""
    pos = graph.positions if positions is None else positions
    i, j = graph.edge_index[0], graph.edge_index[1]
    cell_per_edge = graph.cell[graph.batch[i]]
    return pos[j] - pos[i] + torch.einsum("ea,eab->eb", graph.shifts, cell_per_edge)


def edge_vector_graph(numbers: torch.Tensor, edge_index: torch.Tensor, vectors: torch.Tensor) -> AtomicGraph:
    """A graph whose edges carry all the geometry: one "structure" with every position zero, the identity cell
    and the edge vectors as shifts, so a student computes r_ij = 0 - 0 + r_ij @ I exactly and the gradient of
    its energy with respect to `vectors` is dE/dr_e (per-edge forces: virials, per-atom virials, export)."""
    n = numbers.shape[0]
    return AtomicGraph(
        positions=torch.zeros(n, 3, dtype=vectors.dtype, device=vectors.device),
        numbers=numbers,
        cell=torch.eye(3, dtype=vectors.dtype, device=vectors.device).unsqueeze(0),
        pbc=torch.zeros(1, 3, dtype=torch.bool, device=vectors.device),
        batch=torch.zeros(n, dtype=torch.long, device=vectors.device),
        edge_index=edge_index,
        shifts=vectors,
    )


def num_atoms_per_structure(graph: AtomicGraph) -> torch.Tensor:
    return torch.bincount(graph.batch, minlength=graph.cell.shape[0])


def sum_per_structure(values: torch.Tensor, batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    """Per-structure sums [B] of per-atom values [N] (batch: the structure of each atom).

    One structure is summed directly: inductor's CPU code generator fails on a scatter-add into a
    one-element buffer (AssertionError in cpp.py store, torch 2.13), so a compiled student could not evaluate
    a single structure. The branch is on a shape, which torch.compile guards on and TorchScript keeps."""
    if num_structures == 1:
        return values.sum(dim=0, keepdim=True)
    out = torch.zeros(num_structures, dtype=values.dtype, device=values.device)
    return out.index_add(0, batch, values)


def with_positions(graph: AtomicGraph, positions: torch.Tensor) -> AtomicGraph:
    return graph._replace(positions=positions)


def recentred(graph: AtomicGraph) -> AtomicGraph:
    """The same structures with small coordinates: each translated so that its first atom sits at the origin,
    then its atoms wrapped into the cell along periodic directions (shifts adjusted, so every edge vector is
    unchanged). Energies, forces and stress do not change; float32 edge vectors then keep their precision
    for unwrapped MD coordinates or molecules far from the origin. Call in float64, before casting."""
    pos, batch = graph.positions, graph.batch
    if pos.shape[0] == 0:
        return graph
    counts = torch.bincount(batch, minlength=graph.cell.shape[0])
    first = torch.cumsum(counts, 0) - counts
    x, offsets, _, _ = wrap_into_cells(pos - pos[first[batch]], graph.cell, graph.pbc, batch)
    i, j = graph.edge_index[0], graph.edge_index[1]
    return graph._replace(positions=x, shifts=graph.shifts - offsets[j] + offsets[i])


# atoms per model call on a CPU (max_atoms_per_call="auto" in BatchedMD and Calculator.predict): with large
# blocks kept in the heap (engine/allocator.py) group size hardly matters; 1024 was faster than 128 or within 2 %
# of it for every width measured, under either allocator, and bounds a huge batch's memory
# (bench/results/md_cpu_atoms_per_call.md)
CPU_ATOMS_PER_CALL = 1024


def atoms_per_call(value, device: torch.device) -> Optional[int]:
    """A max_atoms_per_call setting: "auto" (None, one call, on a GPU; CPU_ATOMS_PER_CALL on a CPU), None or 0
    (one call), or a number of atoms >= 1."""
    if isinstance(value, str) and value == "auto":
        return None if device.type == "cuda" else CPU_ATOMS_PER_CALL
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0):
        return int(value) if value else None
    raise HessforgeError(f"max_atoms_per_call must be 'auto', None, 0 (one call) or a number of atoms >= 1, "
                         f"got {value!r}")


def structure_chunks(natoms: Sequence[int], max_atoms: int) -> List[Tuple[int, int]]:
    """Consecutive structure ranges [b0, b1) holding at most `max_atoms` atoms each (a larger structure on
    its own), covering every structure in order."""
    chunks, begin, acc = [], 0, 0
    for b, n in enumerate(natoms):
        if b > begin and acc + int(n) > max_atoms:
            chunks.append((begin, b))
            begin, acc = b, 0
        acc += int(n)
    if begin < len(natoms):
        chunks.append((begin, len(natoms)))
    return chunks


def split_batch(graph: AtomicGraph, groups: Sequence[Tuple[Tuple[int, int], Tuple[int, int]]]) -> List[AtomicGraph]:
    """Each group ((b0, b1), (a0, a1)) of consecutive structures (and their atoms) of a batched graph as a graph
    of its own, atoms and structures renumbered from 0. Structures share no edges, so a group's edges are those
    whose receiver is in [a0, a1): one contiguous range once receivers are sorted (every hessforge neighbor
    list already sorts them), found for all groups by one search."""
    i = graph.edge_index[0]
    if i.numel() > 1 and not bool((i[1:] >= i[:-1]).all()):
        order = torch.argsort(i, stable=True)
        graph = graph._replace(edge_index=graph.edge_index[:, order], shifts=graph.shifts[order])
        i = graph.edge_index[0]
    starts = [a0 for _, (a0, _) in groups] + [groups[-1][1][1]]
    bounds = torch.searchsorted(i, torch.tensor(starts, device=i.device)).tolist()
    out = []
    for k, ((b0, b1), (a0, a1)) in enumerate(groups):
        lo, hi = bounds[k], bounds[k + 1]
        out.append(AtomicGraph(positions=graph.positions[a0:a1], numbers=graph.numbers[a0:a1],
                               cell=graph.cell[b0:b1], pbc=graph.pbc[b0:b1], batch=graph.batch[a0:a1] - b0,
                               edge_index=graph.edge_index[:, lo:hi] - a0, shifts=graph.shifts[lo:hi]))
    return out


def resolve_device(device: Optional[str] = None) -> torch.device:
    """A torch device from a user's string: auto (cuda when available), cpu, cuda, cuda:N; one clear error
    for anything else or for cuda without CUDA."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HessforgeError(f"unknown device {device!r} (cpu, cuda, cuda:N or auto)") from None
    if dev.type not in ("cpu", "cuda"):
        raise HessforgeError(f"device {device!r}: hessforge runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HessforgeError(f"device {device!r} requested but CUDA is not available")
    return dev


def graph_to(graph: AtomicGraph, device=None, dtype=None) -> AtomicGraph:
    """Move to a device and cast the floating tensors to `dtype`."""

    def conv(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return AtomicGraph(*(conv(t) for t in graph))


def _neighbor_list(positions, cell, pbc, batch, cutoff):
    """(edge_index, shifts) of a batch: the kernels' vectorised torch path when engine.kernels imports (the
    same edges as the reference, tests/test_triton_kernels.py; 3x faster for a molecule, 7x at 512 atoms, 15x
    at 4096, where the reference's all-pairs loop takes 24 s and GBs per call: an ASE calculator's every step),
    else the plain reference."""
    try:
        import engine.kernels as kernels
    except Exception:  # optional (another engineer's work in progress): the reference is always there
        return batched_neighbor_list(positions, cell, pbc, batch, cutoff)
    out = kernels.neighbor_list(positions, cell, pbc, batch, cutoff, complete=False, backend="torch")
    return out.edge_index, out.shifts


MIN_ATOM_DISTANCE = 0.01  # Å: closer atoms are one atom written twice; the students' safe norm keeps them finite


def _check_no_overlaps(graph: AtomicGraph, names: Sequence[str]) -> None:
    """Refuse atoms on top of each other (a duplicated atom, an atom on another's periodic image): the model
    would return finite nonsense. A blown-up MD run can still bring atoms close; only coincidence is refused."""
    if graph.edge_index.shape[1] == 0:
        return
    d = torch.linalg.vector_norm(edge_vectors(graph), dim=1)
    k = int(torch.argmin(d))
    if not float(d[k]) < MIN_ATOM_DISTANCE:
        return
    i, j = int(graph.edge_index[0, k]), int(graph.edge_index[1, k])
    b = int(graph.batch[i])
    first = int(torch.searchsorted(graph.batch, torch.tensor(b)))  # batch is sorted
    raise HessforgeError(f"{names[b]}: atoms {i - first} (Z={int(graph.numbers[i])}) and {j - first} "
                         f"(Z={int(graph.numbers[j])}) are {float(d[k]):.3g} Å apart: overlapping atoms (an atom "
                         "written twice?)")


def build_graph(
    numbers: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    pbcs: Sequence[np.ndarray],
    cutoff: float,
    dtype: torch.dtype = torch.float32,
    where: Sequence[str] = (),
    check_overlaps: bool = True,
) -> AtomicGraph:
    """Batch structures into one graph and build its neighbor list. The neighbor list is built in float64
    so that the edge set does not depend on the working dtype. A periodic cell thinner than any crystal
    along a periodic direction but reducible (a skewed basis of its lattice) is held in its reduced basis
    (engine.neighbors.reduce_thin_cells: same lattice, same results). A graph in a lower precision is recentred
    first (each structure translated and wrapped: edge vectors, energies, forces and stress unchanged) so that
    its edge vectors keep that precision far from the origin. `check_overlaps`: refuse atoms closer than
    MIN_ATOM_DISTANCE (False for a caller that reports close pairs in its own words, as ingest does)."""
    if len(numbers) == 0:
        raise HessforgeError("empty batch: no structures to evaluate")
    if not (cutoff > 0 and math.isfinite(cutoff)):
        raise HessforgeError(f"cutoff must be a positive number of Å, got {cutoff}")
    if not len(numbers) == len(positions) == len(cells) == len(pbcs):
        raise HessforgeError(f"{len(numbers)} structures' atomic numbers but {len(positions)} positions, "
                             f"{len(cells)} cells and {len(pbcs)} pbc flags")
    pos64 = []
    for k, p in enumerate(positions):
        name = where[k] if k < len(where) else f"structure {k}"
        p = np.asarray(p, dtype=np.float64)
        p = p.reshape(0, 3) if p.size == 0 else p  # an empty structure, however its positions are shaped
        if p.ndim != 2 or p.shape[1] != 3:
            raise HessforgeError(f"{name}: positions must be [N, 3], got shape {p.shape}")
        if p.shape[0] != np.asarray(numbers[k]).size:  # else atoms would land in the neighbouring structure
            raise HessforgeError(f"{name}: {np.asarray(numbers[k]).size} atomic numbers for {p.shape[0]} positions")
        if not np.all(np.isfinite(p)):
            raise HessforgeError(f"{name}: positions contain NaN or Inf")
        pos64.append(torch.from_numpy(p))
    positions_t = torch.cat(pos64)
    numbers_t = torch.cat([torch.as_tensor(np.asarray(z), dtype=torch.long).reshape(-1) for z in numbers])
    cell_t = torch.stack([torch.as_tensor(np.asarray(c, dtype=np.float64)).reshape(3, 3) for c in cells])
    pbc_t = torch.stack([torch.as_tensor(np.asarray(b, dtype=bool)).reshape(3) for b in pbcs])
    names = [where[k] if k < len(where) else f"structure {k}" for k in range(cell_t.shape[0])]
    for k, name in enumerate(names):
        if not bool(torch.isfinite(cell_t[k]).all()):  # also for a molecule: its cell enters edge vectors
            raise HessforgeError(f"{name}: cell contains NaN or Inf")
    given = cell_t
    # wires' and slabs' zero non-periodic vectors completed; the graph holds the reduced basis of a skewed thin cell
    cell_t, _ = lattice_cells(cell_t, pbc_t)
    for k, name in enumerate(names):
        check_cell(cell_t[k], pbc_t[k], name, given=given[k])
    batch_t = torch.repeat_interleave(
        torch.arange(len(numbers)), torch.tensor([len(np.asarray(z).reshape(-1)) for z in numbers])
    )
    edge_index, shifts = _neighbor_list(positions_t, cell_t, pbc_t, batch_t, cutoff)
    graph = AtomicGraph(positions=positions_t, numbers=numbers_t, cell=cell_t, pbc=pbc_t, batch=batch_t,
                        edge_index=edge_index, shifts=shifts)
    if check_overlaps:
        _check_no_overlaps(graph, names)
    if dtype != torch.float64:  # small coordinates before the cast (molecules far out, unwrapped MD frames)
        graph = recentred(graph)
    return graph_to(graph, dtype=dtype)


def graph_from_atoms(atoms_list: List, cutoff: float, dtype: torch.dtype = torch.float32) -> AtomicGraph:
    """Batch a list of `ase.Atoms`."""
    return build_graph(
        [a.numbers for a in atoms_list],
        [a.positions for a in atoms_list],
        [np.asarray(a.cell) for a in atoms_list],
        [a.pbc for a in atoms_list],
        cutoff,
        dtype,
        # a batch's structures are told apart by their index too (MD replicas share one formula)
        where=[a.get_chemical_formula() if len(atoms_list) == 1 else f"structure {k} ({a.get_chemical_formula()})"
               for k, a in enumerate(atoms_list)],
    )
