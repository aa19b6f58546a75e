"""Custom ops: fused neighbor list + radial basis (Triton on GPU, vectorised torch elsewhere).

Registration and torch.compile
------------------------------
The number of edges depends on the data, so the ops are `torch.library.custom_op`s with a registered fake
(meta) implementation, not `triton_op`s: a triton_op's body is traced by dynamo/inductor, and its output
sizes would have to come from a `.item()` inside the traced region (a graph break without
`capture_scalar_outputs`, and inductor only code-generates user Triton kernels for GPU devices, so it could
not be compiled on CPU at all). As opaque custom ops they trace on any device with zero graph breaks, and
inductor calls them as extern kernels. Two output-size modes, chosen by `capacity`:

- `capacity=None` (exact): E edges exactly. The fake implementation allocates E as an *unbacked symint*
  (`torch.library.get_ctx().new_dynamic_size()`), so a compiled graph is reused for any number of edges
  without recompiling. One device->host sync per call (to size the outputs).
- `capacity=K` (padded, static): outputs have exactly K slots; the first `num_edges` are the edges, the
  rest are inert padding: edge (0, 0), shift 0, r = cutoff, unit = 0, rbf = 0, fcut = 0, zero gradient,
  so sums over edges (PaiNN's index_add messages) are unchanged. Static shapes, and on the Triton path no
  host sync inside the op: the mode for CUDA graphs / `mode="reduce-overhead"` (not yet measured on a GPU)
  and for avoiding recompiles. `num_edges` always holds the true count, also when it exceeds K, so nothing
  is dropped silently: in eager mode `radial_edges` reads it (one sync) and grows the capacity and
  recomputes (or raises with `grow=False`); under torch.compile it adds an
  `_assert_async(num_edges <= capacity)` instead. Call `torch.ops.hessforge.radial_edges` directly to skip
  the check and read `num_edges` yourself.

Gradients: `register_autograd` gives first derivatives of r, unit, rbf and fcut with respect to positions and
cell (cell: for stress via strain) through a per-edge backward op (Triton or torch) plus index_add. The
backward op itself is not differentiable: differentiating forces (training on forces, Hessians) raises and
must use the torch reference path (engine.neighbors + engine.graph.edge_vectors + engine.radial).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from engine.errors import HessforgeError
from engine.kernels._prepare import make_params, prepare
from engine.kernels._torch_impl import empty_outputs, torch_backward, torch_forward
from engine.neighbors import MIN_CELL_HEIGHT, cell_heights, complete_cells

BACKENDS = ("auto", "torch", "triton")
INTERPRETER_BLOCK = 1024  # the interpreter runs blocks as numpy arrays: large blocks are nearly free there
# No a*b+c -> fma contraction in the forward kernels: Triton contracts by default (17 fma in the count
# kernel's sm_90 PTX, none with this), which rounds distances differently from the torch reference's separate
# multiply and add, so a pair within an ulp of the cutoff could differ from the reference, or between the
# count and the fill kernel (their slots would then disagree). The backward only rounds gradients: default.
# tests/test_triton_aot.py checks the compiled PTX (python -m engine.kernels.aot prints it per kernel).
FORWARD_OPTIONS = dict(enable_fp_fusion=False)
BACKWARD_OPTIONS: dict = {}

_triton_module = None
_triton_error: Optional[str] = None


def _load_triton():
    """Import the kernels lazily: TRITON_INTERPRET is read when they are decorated."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from engine.kernels import _triton_impl

            _triton_module = _triton_impl
        except Exception as exc:  # ImportError, or a triton without a usable backend
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


def triton_available() -> bool:
    return _load_triton() is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, device: torch.device) -> bool:
    """auto: Triton on CUDA when importable, torch otherwise (the interpreter is far too slow to be a
    default on CPU). triton: required (on CPU only with TRITON_INTERPRET=1)."""
    if backend not in BACKENDS:
        raise HessforgeError(f"neighbor backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise HessforgeError(f"backend='triton' but triton cannot be used: {_triton_error}")
    if device.type == "cpu" and not _interpreting():
        raise HessforgeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
    return True


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _validate(positions: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, cutoff: float, sync_ok: bool):
    if not (cutoff > 0 and math.isfinite(cutoff)):
        raise HessforgeError(f"cutoff must be a positive number of Å, got {cutoff}")
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise HessforgeError(f"positions must be [N, 3], got {tuple(positions.shape)}")
    for name, t in (("positions", positions), ("cell", cell)):
        if t.dtype not in (torch.float32, torch.float64):
            raise HessforgeError(f"{name} must be float32 or float64 tensors, got {t.dtype}")
    if batch.shape != positions.shape[:1]:
        raise HessforgeError(f"batch must be [N] = [{positions.shape[0]}], got {tuple(batch.shape)}")
    if cell.dim() != 3 or cell.shape[1:] != (3, 3) or pbc.shape != (cell.shape[0], 3):
        raise HessforgeError(f"cell must be [B, 3, 3] and pbc [B, 3], got {tuple(cell.shape)}, {tuple(pbc.shape)}")
    if batch.dtype != torch.int64:
        raise HessforgeError(f"batch must be int64 (torch.long), got {batch.dtype}")
    if not sync_ok:  # checks below read values: done on CPU, or where the op synchronises anyway
        return
    # all value checks in one device->host transfer
    n = positions.shape[0]
    periodic = pbc.to(torch.bool).any(dim=1)
    volume = torch.linalg.det(cell.double()).abs() if cell.shape[0] else cell.new_zeros(0, dtype=torch.float64)
    infinite = periodic & ~torch.isfinite(cell).flatten(1).all(dim=1)
    bad_cell = periodic & ~(volume > 1e-8)
    # a periodic direction thinner than check_cell allows: (cutoff / height)^3 shifts, past int32 in the kernels
    heights = cell_heights(cell.double())  # NaN for the cells flagged above
    thin = pbc.to(torch.bool) & ~(heights >= MIN_CELL_HEIGHT) & ~bad_cell[:, None] & ~infinite[:, None]
    true = torch.ones((), dtype=torch.bool, device=positions.device)
    flags = torch.stack([
        torch.isfinite(positions).all() if n else true,
        (batch[1:] >= batch[:-1]).all() if n > 1 else true,
        ((batch >= 0) & (batch < cell.shape[0])).all() if n else true,
        ~infinite.any() if cell.shape[0] else true,
        ~bad_cell.any() if cell.shape[0] else true,
        ~thin.any() if cell.shape[0] else true,
    ]).tolist()
    if not flags[0]:
        raise HessforgeError("positions contain NaN or Inf")
    if not flags[1]:
        raise HessforgeError("batch must be sorted: the atoms of each structure contiguous")
    if not flags[2]:
        raise HessforgeError("batch holds structure indices outside [0, B)")
    if not flags[3]:
        k = int(infinite.nonzero()[0, 0])
        raise HessforgeError(f"structure {k}: periodic cell contains NaN or Inf (cell={cell[k].tolist()})")
    if not flags[4]:
        k = int(bad_cell.nonzero()[0, 0])
        raise HessforgeError(f"structure {k}: periodic cell has zero volume (cell={cell[k].tolist()})")
    if not flags[5]:
        k, a = (int(x) for x in thin.nonzero()[0])
        raise HessforgeError(f"structure {k}: periodic cell is {float(heights[k, a]):.3g} Å thick along cell vector "
                             f"{a} (below {MIN_CELL_HEIGHT} Å, thinner than any crystal, or a skewed basis of a thicker "
                             f"lattice: engine.neighbors.reduce_thin_cells; cell={cell[k].tolist()})")


def nb_chunk(num_basis: int) -> int:
    """Basis functions per inner block of the interpreted kernels: a power of two, at most 32."""
    return min(32, _next_pow2(num_basis))


def _interpreted(device: torch.device) -> bool:
    """Triton on CPU tensors is the interpreter (use_triton allows nothing else): it launches the kernels
    directly with one large block, untuned (tuning would time numpy); a GPU launches the autotuned kernels."""
    return device.type == "cpu"


def _forward_launches(device: torch.device, num_basis: int, with_geometry: bool):
    """(count kernel, its tiling kwargs, fill kernel, its tiling kwargs); tuned kernels take none."""
    tk = _load_triton()
    if _interpreted(device):
        return (tk._count_kernel, dict(BLOCK_C=INTERPRETER_BLOCK),
                tk._fill_kernel, dict(BLOCK_C=INTERPRETER_BLOCK, NB_CHUNK=nb_chunk(num_basis)))
    # _triton_impl.COUNT_CONFIGS / FILL_CONFIGS / EDGES_CONFIGS
    return tk.count_kernel_tuned, {}, tk.fill_kernel_tuned if with_geometry else tk.edges_kernel_tuned, {}


def _triton_forward(prep, batch: Tensor, num_basis: int, capacity: int, with_geometry: bool):
    n_atoms = prep.pos_w.shape[0]
    device = prep.pos_w.device
    count_kernel, count_tiling, fill_kernel, fill_tiling = _forward_launches(device, num_basis, with_geometry)
    counts = torch.zeros(n_atoms, dtype=torch.int64, device=device)
    batch = batch.contiguous()
    if n_atoms:
        count_kernel[(n_atoms,)](
            prep.pos_w, batch, prep.meta, prep.cell, prep.inv_cell, prep.params, counts, **count_tiling,
            **FORWARD_OPTIONS)
    first = torch.cumsum(counts, 0) - counts
    num_edges = counts.sum()
    padded = capacity >= 0
    size = capacity if padded else int(num_edges)
    outs = empty_outputs(prep, size, num_basis, with_geometry, padded)
    if n_atoms and size:
        dummy = outs[1]
        r, unit, rbf, fcut = (t if t is not None else dummy for t in outs[2:6])
        fill_kernel[(n_atoms,)](
            prep.pos_w, prep.offsets, batch, prep.meta, prep.cell, prep.inv_cell, prep.params, first, size,
            outs[0], outs[1], r, unit, rbf, fcut,
            NUM_BASIS=num_basis, WITH_GEOMETRY=with_geometry, **fill_tiling, **FORWARD_OPTIONS,
        )
    if with_geometry:
        return tuple(outs) + (num_edges,)
    return outs[0], outs[1], num_edges


# ----------------------------------------------------------------------------------------------------------
# radial_edges: neighbor list + r, unit vectors, sinc basis, cosine envelope


@torch.library.custom_op("hessforge::radial_edges", mutates_args=())
def _radial_edges_op(
    positions: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, cutoff: float, num_basis: int,
    capacity: int, eps: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _validate(positions, cell, pbc, batch, cutoff, sync_ok=positions.device.type == "cpu" or capacity < 0)
    prep = prepare(positions, cell, pbc, batch, cutoff, eps)
    if use_triton(backend, positions.device):
        return _triton_forward(prep, batch, num_basis, capacity, True)
    return torch_forward(prep, batch, num_basis, capacity, True)


@_radial_edges_op.register_fake
def _radial_edges_fake(positions, cell, pbc, batch, cutoff, num_basis, capacity, eps, backend):
    size = capacity if capacity >= 0 else torch.library.get_ctx().new_dynamic_size()
    return (
        positions.new_empty(2, size, dtype=torch.int64),
        positions.new_empty(size, 3),
        positions.new_empty(size),
        positions.new_empty(size, 3),
        positions.new_empty(size, num_basis),
        positions.new_empty(size),
        positions.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op("hessforge::radial_edges_backward", mutates_args=())
def _radial_edges_backward_op(
    r: Tensor, unit: Tensor, g_r: Optional[Tensor], g_unit: Optional[Tensor], g_rbf: Optional[Tensor],
    g_fcut: Optional[Tensor], num_edges: Tensor, cutoff: float, num_basis: int, backend: str,
) -> Tensor:
    """dL/d(edge vector) [E, 3]; zero on padding slots."""
    params = make_params(cutoff, 0.0, r.dtype, r.device)
    if not use_triton(backend, r.device):
        return torch_backward(r, unit, g_r, g_unit, g_rbf, g_fcut, num_edges, params, num_basis)
    tk = _load_triton()
    num_slots = r.shape[0]
    g_vec = torch.empty(num_slots, 3, dtype=r.dtype, device=r.device)
    if num_slots == 0:
        return g_vec
    grads = [None if g is None else g.contiguous() for g in (g_r, g_unit, g_rbf, g_fcut)]
    args = (r.contiguous(), unit.contiguous(), *(g if g is not None else r for g in grads),
            num_edges, params, g_vec, num_slots)
    flags = dict(NUM_BASIS=num_basis, HAS_G_R=grads[0] is not None, HAS_G_UNIT=grads[1] is not None,
                 HAS_G_RBF=grads[2] is not None and num_basis > 0, HAS_G_FCUT=grads[3] is not None)
    if _interpreted(r.device):
        tk._backward_kernel[(triton_cdiv(num_slots, INTERPRETER_BLOCK),)](
            *args, NB_CHUNK=nb_chunk(num_basis), BLOCK_E=INTERPRETER_BLOCK, **flags,
            **BACKWARD_OPTIONS)
    else:  # GPU: the launch configuration is tuned at the first call per flags (_triton_impl.BACKWARD_CONFIGS)
        tk.backward_kernel_tuned[lambda meta: (triton_cdiv(num_slots, meta["BLOCK_E"]),)](
            *args, **flags, **BACKWARD_OPTIONS)
    return g_vec


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@_radial_edges_backward_op.register_fake
def _radial_edges_backward_fake(r, unit, g_r, g_unit, g_rbf, g_fcut, num_edges, cutoff, num_basis, backend):
    return r.new_empty(r.shape[0], 3)


def _no_double_backward(ctx, grad):
    raise HessforgeError(
        "second derivatives through the fused radial_edges kernel are not supported (forces only); "
        "train and take Hessians with the torch reference path (engine.graph.edge_vectors + engine.radial)"
    )


def _no_double_backward_setup(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "hessforge::radial_edges_backward", _no_double_backward, setup_context=_no_double_backward_setup
)


def _setup_context(ctx, inputs, output):
    positions, cell, pbc, batch, cutoff, num_basis, capacity, eps, backend = inputs
    edge_index, shifts, r, unit, rbf, fcut, num_edges = output
    ctx.save_for_backward(edge_index, shifts, r, unit, batch, num_edges)
    ctx.cutoff, ctx.num_basis, ctx.backend = cutoff, num_basis, backend
    ctx.num_atoms, ctx.num_graphs = positions.shape[0], cell.shape[0]
    ctx.cell_dtype = cell.dtype


def _backward(ctx, g_edge_index, g_shifts, g_r, g_unit, g_rbf, g_fcut, g_num_edges):
    edge_index, shifts, r, unit, batch, num_edges = ctx.saved_tensors
    g_vec = torch.ops.hessforge.radial_edges_backward(
        r, unit, g_r, g_unit, g_rbf, g_fcut, num_edges, ctx.cutoff, ctx.num_basis, ctx.backend
    )
    grad_positions = grad_cell = None
    i, j = edge_index[0], edge_index[1]
    if ctx.num_atoms == 0:  # only padding edges (pointing at atom 0, which does not exist): no gradient
        g_vec, i, j = g_vec[:0], i[:0], j[:0]
        shifts = shifts[:0]
    if ctx.needs_input_grad[0]:
        grad_positions = torch.zeros(ctx.num_atoms, 3, dtype=g_vec.dtype, device=g_vec.device)
        grad_positions = grad_positions.index_add(0, j, g_vec).index_add(0, i, -g_vec)
    if ctx.needs_input_grad[1]:
        grad_cell = torch.zeros(ctx.num_graphs, 3, 3, dtype=g_vec.dtype, device=g_vec.device)
        grad_cell = grad_cell.index_add(0, batch[i], shifts[:, :, None] * g_vec[:, None, :])
        grad_cell = grad_cell.to(ctx.cell_dtype)
    return grad_positions, grad_cell, None, None, None, None, None, None, None


torch.library.register_autograd("hessforge::radial_edges", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# neighbor_list: edges and shifts only (no geometry written)


@torch.library.custom_op("hessforge::neighbor_list", mutates_args=())
def _neighbor_list_op(
    positions: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, cutoff: float, capacity: int, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    _validate(positions, cell, pbc, batch, cutoff, sync_ok=positions.device.type == "cpu" or capacity < 0)
    prep = prepare(positions, cell, pbc, batch, cutoff, 0.0)
    if use_triton(backend, positions.device):
        return _triton_forward(prep, batch, 0, capacity, False)
    return torch_forward(prep, batch, 0, capacity, False)


@_neighbor_list_op.register_fake
def _neighbor_list_fake(positions, cell, pbc, batch, cutoff, capacity, backend):
    size = capacity if capacity >= 0 else torch.library.get_ctx().new_dynamic_size()
    return (
        positions.new_empty(2, size, dtype=torch.int64),
        positions.new_empty(size, 3),
        positions.new_empty((), dtype=torch.int64),
    )


# ----------------------------------------------------------------------------------------------------------
# Public API


class RadialEdges(NamedTuple):
    edge_index: Tensor  # [2, E] long: (receiver i, sender j), sorted by (i, j, shift)
    shifts: Tensor  # [E, 3] integer cell shifts (positions' dtype): r_ij = x_j - x_i + shift @ cell[batch[i]]
    r: Tensor  # [E] sqrt(|r_ij|² + eps)
    unit: Tensor  # [E, 3] r_ij / r
    rbf: Tensor  # [E, num_basis] sin(n π r / cutoff) / r, n = 1..num_basis (engine.radial.sinc_basis)
    fcut: Tensor  # [E] 0.5 (cos(π r / cutoff) + 1) (engine.radial.cosine_cutoff)
    num_edges: Tensor  # [] long: true number of edges (E, or the valid prefix of a padded output)


class NeighborList(NamedTuple):
    edge_index: Tensor
    shifts: Tensor
    num_edges: Tensor


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _grow(capacity: int, needed: int) -> int:
    return max(_next_pow2(needed), capacity)


def _check_capacity(out, capacity: int, grow: bool, rerun):
    if _compiling():
        torch._assert_async(out.num_edges <= capacity, "hessforge: edge capacity exceeded; pass a larger capacity")
        return out
    needed = int(out.num_edges)
    if needed <= capacity:
        return out
    if not grow:
        raise HessforgeError(f"edge capacity {capacity} exceeded: {needed} edges; pass a larger capacity")
    return rerun(_grow(capacity, needed))


def _eager_inputs(positions, cell, pbc, batch, complete: bool):
    """The public ops' input handling outside torch.compile: torch tensors required (numpy arrays reached torch's
    operator-schema error), and with `complete` the cell completed (complete_cells). Returns the cell to use."""
    if _compiling():
        return cell
    for name, value in (("positions", positions), ("cell", cell), ("pbc", pbc), ("batch", batch)):
        if not isinstance(value, Tensor):
            raise HessforgeError(f"{name} must be a torch tensor, got {type(value).__name__} (torch.as_tensor(...); "
                                 "engine.graph.build_graph takes numpy arrays and ase structures)")
    if not complete or cell.dim() != 3 or pbc.shape != cell.shape[:1] + (3,):
        return cell  # shapes: the op reports them
    return complete_cells(cell, pbc)


def radial_edges(
    positions: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, cutoff: float, num_basis: int, *,
    capacity: Optional[int] = None, eps: float = 0.0, backend: str = "auto", grow: bool = True,
    complete: bool = True,
) -> RadialEdges:
    """Neighbor list within `cutoff` (strict) fused with the edge geometry and PaiNN's radial features.

    positions [N, 3], cell [B, 3, 3] (rows are lattice vectors; ignored for non-periodic structures), pbc
    [B, 3] bool, batch [N] sorted structure index. Same edges, shifts and order as
    `engine.neighbors.batched_neighbor_list`; `eps` as in the students' `safe_norm` (1e-8 there) for bitwise-equal
    semantics; with eps = 0, coincident atoms (an edge of length 0, no direction) are an error in eager mode. Differentiable once in positions and cell. `capacity`: see the module docstring; in eager mode
    an overflow grows the output to the next power of two ≥ E (keep passing `out.edge_index.shape[1]` to
    stay there) or raises with grow=False. `complete`: fill the zero cell vectors ASE writes along the
    non-periodic directions of wires and slabs (`_prepare.complete_cells`, ~35 small ops; differentiable, and
    they get no gradient); False for cells that already span a volume, as engine.graph.build_graph's do (the
    ops themselves refuse a periodic cell without volume). Not done under torch.compile: dynamo traces an
    exact-size op without a graph break only when its inputs are the graph's own, not computed cells.
    """
    cell = _eager_inputs(positions, cell, pbc, batch, complete)

    def run(cap: int) -> RadialEdges:
        return RadialEdges(*torch.ops.hessforge.radial_edges(
            positions, cell, pbc, batch, float(cutoff), int(num_basis), cap, float(eps), backend))

    out = run(-1) if capacity is None else _check_capacity(run(int(capacity)), int(capacity), grow, run)
    if float(eps) <= 0 and not _compiling():
        _check_not_coincident(out)
    return out


def _check_not_coincident(out: RadialEdges) -> None:
    """With eps = 0 two atoms at one place give an edge of length 0, whose direction and basis are 0/0 (NaN
    that would spread through a model): name the pair instead (padding has r = cutoff, never 0)."""
    zero = torch.nonzero(out.r == 0)
    if zero.numel():
        i, j = out.edge_index[:, int(zero[0, 0])].tolist()
        raise HessforgeError(f"atoms {i} and {j} (batch numbering) coincide: an edge of length 0 has no direction; "
                             "remove the duplicate atom, or pass eps > 0 for a smooth norm (the students use 1e-8)")


def neighbor_list(
    positions: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, cutoff: float, *,
    capacity: Optional[int] = None, backend: str = "auto", grow: bool = True, complete: bool = True,
) -> NeighborList:
    """(edge_index [2, E], shifts [E, 3], num_edges []) — the edges of `radial_edges` without geometry.
    Not differentiable (integer outputs); compute edge vectors with engine.graph.edge_vectors (on the
    completed cell: `complete` as in radial_edges)."""
    cell = _eager_inputs(positions, cell, pbc, batch, complete)

    def run(cap: int) -> NeighborList:
        return NeighborList(*torch.ops.hessforge.neighbor_list(
            positions, cell, pbc, batch, float(cutoff), cap, backend))

    if capacity is None:
        return run(-1)
    return _check_capacity(run(int(capacity)), int(capacity), grow, run)


def neighbor_list_triton(positions, cell, pbc, batch, cutoff, **kwargs) -> Tuple[Tensor, Tensor]:
    """(edge_index, shifts) from the Triton kernel (TRITON_INTERPRET=1 on CPU)."""
    out = neighbor_list(positions, cell, pbc, batch, cutoff, backend="triton", **kwargs)
    return out.edge_index, out.shifts
