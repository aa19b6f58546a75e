"""Triton kernels: fused neighbor list + radial basis, and the per-edge backward.

One program per receiver atom i. Its candidates are c = j_local * S + s over the atoms j of i's structure
and the S cell shifts of that structure (S = 1 for molecules, and for periodic cells whose heights are all
>= 2 cutoff, where the one possible image is the minimum image, found by rounding the fractional
difference), visited in blocks of BLOCK_C. Two launches:

1. `_count_kernel`: distances only, the number of neighbors of each atom;
2. an exclusive cumulative sum (torch) gives each atom its first output slot;
3. `_fill_kernel`: the one pass that emits everything for each neighbor found: (i, j), the unwrapped
   integer shift, r, the unit vector, the sinc basis and the cosine envelope, written at consecutive slots
   (tl.cumsum over the hit mask), so the output is sorted by (i, j, shift) without atomics and is
   deterministic and identical to the torch reference order.

Slots at or beyond `capacity` are not written; the count still includes them, so an overflow is always
visible to the caller (see ops.py: grow and retry, or an assertion under torch.compile).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sqrt(x):
    # IEEE-rounded in both precisions (tl.sqrt of fp32 may be approximate on GPU; sqrt_rn is fp32-only)
    if x.dtype == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def _div(x, y):
    if x.dtype == tl.float32:
        z = tl.div_rn(x, y)
    else:
        z = x / y
    return z


@triton.jit
def _candidates(i, base, batch_ptr, meta_ptr, pos_ptr, cell_ptr, inv_ptr, cut2, BLOCK_C: tl.constexpr):
    """Geometry of the BLOCK_C candidates starting at `base` for receiver i."""
    b = tl.load(batch_ptr + i).to(tl.int32)
    mrow = meta_ptr + b * 8
    start = tl.load(mrow + 0)
    natoms = tl.load(mrow + 1)
    n0 = tl.load(mrow + 2)
    n1 = tl.load(mrow + 3)
    n2 = tl.load(mrow + 4)
    num_shift = tl.load(mrow + 5)
    mic = tl.load(mrow + 6) != 0
    pbc_bits = tl.load(mrow + 7)
    m1 = 2 * n1 + 1
    m2 = 2 * n2 + 1
    c = base + tl.arange(0, BLOCK_C)
    valid = c < natoms * num_shift
    j_local = c // num_shift
    s = c - j_local * num_shift
    j = start + j_local
    xi = tl.load(pos_ptr + 3 * i + 0)
    yi = tl.load(pos_ptr + 3 * i + 1)
    zi = tl.load(pos_ptr + 3 * i + 2)
    xj = tl.load(pos_ptr + 3 * j + 0, mask=valid, other=0.0)
    yj = tl.load(pos_ptr + 3 * j + 1, mask=valid, other=0.0)
    zj = tl.load(pos_ptr + 3 * j + 2, mask=valid, other=0.0)
    d0x = xj - xi
    d0y = yj - yi
    d0z = zj - zi
    # shift: decoded from the candidate index (shift enumeration), or the minimum image (rounded fraction)
    s0f = (s // (m1 * m2) - n0).to(xi.dtype)
    s1f = ((s // m2) % m1 - n1).to(xi.dtype)
    s2f = (s % m2 - n2).to(xi.dtype)
    irow = inv_ptr + b * 9
    f0 = (d0x * tl.load(irow + 0) + d0y * tl.load(irow + 3)) + d0z * tl.load(irow + 6)
    f1 = (d0x * tl.load(irow + 1) + d0y * tl.load(irow + 4)) + d0z * tl.load(irow + 7)
    f2 = (d0x * tl.load(irow + 2) + d0y * tl.load(irow + 5)) + d0z * tl.load(irow + 8)
    zero = tl.zeros_like(f0)
    s0f = tl.where(mic, tl.where((pbc_bits & 1) != 0, -tl.floor(f0 + 0.5), zero), s0f)
    s1f = tl.where(mic, tl.where((pbc_bits & 2) != 0, -tl.floor(f1 + 0.5), zero), s1f)
    s2f = tl.where(mic, tl.where((pbc_bits & 4) != 0, -tl.floor(f2 + 0.5), zero), s2f)
    crow = cell_ptr + b * 9
    sx = (s0f * tl.load(crow + 0) + s1f * tl.load(crow + 3)) + s2f * tl.load(crow + 6)
    sy = (s0f * tl.load(crow + 1) + s1f * tl.load(crow + 4)) + s2f * tl.load(crow + 7)
    sz = (s0f * tl.load(crow + 2) + s1f * tl.load(crow + 5)) + s2f * tl.load(crow + 8)
    dx = d0x + sx
    dy = d0y + sy
    dz = d0z + sz
    d2 = (dx * dx + dy * dy) + dz * dz
    is_self = (j == i) & (s0f == 0.0) & (s1f == 0.0) & (s2f == 0.0)
    hit = valid & (d2 < cut2) & (is_self == 0)
    return hit, j, s0f, s1f, s2f, dx, dy, dz, d2


@triton.jit
def _num_candidates(i, batch_ptr, meta_ptr):
    b = tl.load(batch_ptr + i).to(tl.int32)
    return tl.load(meta_ptr + b * 8 + 1) * tl.load(meta_ptr + b * 8 + 5)


@triton.jit
def _count_kernel(pos_ptr, batch_ptr, meta_ptr, cell_ptr, inv_ptr, params_ptr, counts_ptr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0)
    cut2 = tl.load(params_ptr + 1)
    total = _num_candidates(i, batch_ptr, meta_ptr)
    acc = tl.zeros([BLOCK_C], dtype=tl.int32)
    for base in range(0, total, BLOCK_C):
        hit, j, s0f, s1f, s2f, dx, dy, dz, d2 = _candidates(
            i, base, batch_ptr, meta_ptr, pos_ptr, cell_ptr, inv_ptr, cut2, BLOCK_C)
        acc += hit.to(tl.int32)
    tl.store(counts_ptr + i, tl.sum(acc, axis=0).to(tl.int64))


@triton.jit
def _fill_kernel(pos_ptr, off_ptr, batch_ptr, meta_ptr, cell_ptr, inv_ptr, params_ptr, first_ptr, capacity,
                 edge_ptr, shift_ptr, r_ptr, unit_ptr, rbf_ptr, fcut_ptr,
                 NUM_BASIS: tl.constexpr, NB_CHUNK: tl.constexpr, WITH_GEOMETRY: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    i = tl.program_id(0)
    cut = tl.load(params_ptr + 0)
    cut2 = tl.load(params_ptr + 1)
    k0 = tl.load(params_ptr + 2)
    eps = tl.load(params_ptr + 3)
    total = _num_candidates(i, batch_ptr, meta_ptr)
    slot0 = tl.load(first_ptr + i)  # int64: first output slot of atom i
    oxi = tl.load(off_ptr + 3 * i + 0)
    oyi = tl.load(off_ptr + 3 * i + 1)
    ozi = tl.load(off_ptr + 3 * i + 2)
    written = slot0
    for base in range(0, total, BLOCK_C):
        hit, j, s0f, s1f, s2f, dx, dy, dz, d2 = _candidates(
            i, base, batch_ptr, meta_ptr, pos_ptr, cell_ptr, inv_ptr, cut2, BLOCK_C)
        hit_i = hit.to(tl.int32)
        slot = written + (tl.cumsum(hit_i, axis=0) - 1).to(tl.int64)
        ok = hit & (slot < capacity)
        tl.store(edge_ptr + slot, i.to(tl.int64) + tl.zeros_like(slot), mask=ok)
        tl.store(edge_ptr + capacity + slot, j.to(tl.int64), mask=ok)
        ojx = tl.load(off_ptr + 3 * j + 0, mask=ok, other=0.0)
        ojy = tl.load(off_ptr + 3 * j + 1, mask=ok, other=0.0)
        ojz = tl.load(off_ptr + 3 * j + 2, mask=ok, other=0.0)
        tl.store(shift_ptr + 3 * slot + 0, (s0f + ojx) - oxi, mask=ok)
        tl.store(shift_ptr + 3 * slot + 1, (s1f + ojy) - oyi, mask=ok)
        tl.store(shift_ptr + 3 * slot + 2, (s2f + ojz) - ozi, mask=ok)
        if WITH_GEOMETRY:
            r = _sqrt(tl.where(ok, d2, cut2) + eps)  # no 0/0 on masked lanes
            tl.store(r_ptr + slot, r, mask=ok)
            tl.store(unit_ptr + 3 * slot + 0, _div(dx, r), mask=ok)
            tl.store(unit_ptr + 3 * slot + 1, _div(dy, r), mask=ok)
            tl.store(unit_ptr + 3 * slot + 2, _div(dz, r), mask=ok)
            fc = 0.5 * (tl.cos(r * k0) + 1.0)
            fc = tl.where(r < cut, fc, 0.0)
            tl.store(fcut_ptr + slot, fc, mask=ok)
            for n_start in tl.static_range(0, NUM_BASIS, NB_CHUNK):
                n_idx = n_start + tl.arange(0, NB_CHUNK)
                n_ok = n_idx < NUM_BASIS
                kn = (n_idx + 1).to(r.dtype) * k0
                rbf = _div(tl.sin(kn[None, :] * r[:, None]), r[:, None])
                dst = rbf_ptr + slot[:, None] * NUM_BASIS + n_idx[None, :]
                tl.store(dst, rbf, mask=ok[:, None] & n_ok[None, :])
        written += tl.sum(hit_i, axis=0).to(tl.int64)


@triton.jit
def _backward_kernel(r_ptr, unit_ptr, g_r_ptr, g_unit_ptr, g_rbf_ptr, g_fcut_ptr, count_ptr, params_ptr,
                     g_vec_ptr, num_slots,
                     NUM_BASIS: tl.constexpr, NB_CHUNK: tl.constexpr, HAS_G_R: tl.constexpr,
                     HAS_G_UNIT: tl.constexpr, HAS_G_RBF: tl.constexpr, HAS_G_FCUT: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_range = e < num_slots
    valid = in_range & (e < tl.load(count_ptr))
    cut = tl.load(params_ptr + 0)
    k0 = tl.load(params_ptr + 2)
    r = tl.load(r_ptr + e, mask=in_range, other=1.0)
    ux = tl.load(unit_ptr + 3 * e + 0, mask=in_range, other=0.0)
    uy = tl.load(unit_ptr + 3 * e + 1, mask=in_range, other=0.0)
    uz = tl.load(unit_ptr + 3 * e + 2, mask=in_range, other=0.0)
    g = tl.zeros([BLOCK_E], dtype=r.dtype)
    if HAS_G_R:
        g += tl.load(g_r_ptr + e, mask=in_range, other=0.0)
    if HAS_G_RBF:
        inv_r = 1.0 / r
        for n_start in tl.static_range(0, NUM_BASIS, NB_CHUNK):
            n_idx = n_start + tl.arange(0, NB_CHUNK)
            n_ok = n_idx < NUM_BASIS
            kn = ((n_idx + 1).to(r.dtype) * k0)[None, :]
            arg = kn * r[:, None]
            drbf = (kn * tl.cos(arg) - tl.sin(arg) * inv_r[:, None]) * inv_r[:, None]
            grbf = tl.load(g_rbf_ptr + e[:, None] * NUM_BASIS + n_idx[None, :],
                           mask=in_range[:, None] & n_ok[None, :], other=0.0)
            g += tl.sum(grbf * drbf, axis=1)
    if HAS_G_FCUT:
        gf = tl.load(g_fcut_ptr + e, mask=in_range, other=0.0)
        dfcut = tl.where(r < cut, -0.5 * k0 * tl.sin(r * k0), 0.0)
        g += gf * dfcut
    gx = g * ux
    gy = g * uy
    gz = g * uz
    if HAS_G_UNIT:
        gux = tl.load(g_unit_ptr + 3 * e + 0, mask=in_range, other=0.0)
        guy = tl.load(g_unit_ptr + 3 * e + 1, mask=in_range, other=0.0)
        guz = tl.load(g_unit_ptr + 3 * e + 2, mask=in_range, other=0.0)
        dot = (gux * ux + guy * uy) + guz * uz
        gx += (gux - ux * dot) / r
        gy += (guy - uy * dot) / r
        gz += (guz - uz * dot) / r
    tl.store(g_vec_ptr + 3 * e + 0, tl.where(valid, gx, 0.0), mask=in_range)
    tl.store(g_vec_ptr + 3 * e + 1, tl.where(valid, gy, 0.0), mask=in_range)
    tl.store(g_vec_ptr + 3 * e + 2, tl.where(valid, gz, 0.0), mask=in_range)


# Launch configurations, tuned on the GPU at the first call per key (triton.autotune times each one there;
# TRITON_PRINT_AUTOTUNING=1 prints the pick). Every one is compiled for sm_90 by tests/test_triton_aot.py and
# checked against the torch reference in the interpreter (tests/test_triton_kernels.py). The interpreter
# launches the kernels directly with one large block instead (ops.py).
#
# Forward: the candidate block and, for the fill kernel's features, the basis chunk. Count kernel and fill
# kernel may run different blocks: a candidate's hit test is elementwise (no fma, FORWARD_OPTIONS), so the
# counts and the fill agree on every pair whatever the tiling. 32-candidate blocks fit ~30-atom molecules in
# one iteration (a 64 block leaves half its lanes idle there); 64-128 suit periodic cells with many images.
COUNT_CONFIGS = [
    triton.Config({"BLOCK_C": 64}, num_warps=4),  # the original fixed launch
    triton.Config({"BLOCK_C": 32}, num_warps=1),
    triton.Config({"BLOCK_C": 64}, num_warps=2),
    triton.Config({"BLOCK_C": 128}, num_warps=4),
]
EDGES_CONFIGS = [triton.Config(dict(c.kwargs, NB_CHUNK=1), num_warps=c.num_warps) for c in COUNT_CONFIGS]
# Registers per thread on sm_90 for the features variant (fp32 / fp64, 32 and 128 basis functions; Triton 3.6,
# the lent H200's, then 3.9): the original 64x32 launch takes 215-221 / 255 under 3.6 (72-96 / 214-220 under
# 3.9), the others 56-128 / 80-168 under both (bench/results/triton_aot_sm90.md).
FILL_CONFIGS = [
    triton.Config({"BLOCK_C": 64, "NB_CHUNK": 32}, num_warps=4),  # the original fixed launch
    triton.Config({"BLOCK_C": 64, "NB_CHUNK": 8}, num_warps=4),
    triton.Config({"BLOCK_C": 32, "NB_CHUNK": 16}, num_warps=4),
    triton.Config({"BLOCK_C": 32, "NB_CHUNK": 8}, num_warps=4),
]
# The outputs are plain stores at slots fixed by the counts, so re-running a launch while tuning rewrites the
# same values: no reset or restore is needed.
count_kernel_tuned = triton.autotune(configs=COUNT_CONFIGS, key=[])(_count_kernel)
fill_kernel_tuned = triton.autotune(configs=FILL_CONFIGS, key=["NUM_BASIS", "WITH_GEOMETRY"])(_fill_kernel)
edges_kernel_tuned = triton.autotune(configs=EDGES_CONFIGS, key=["NUM_BASIS", "WITH_GEOMETRY"])(_fill_kernel)

# Backward: registers per thread on sm_90, fp32, 128 basis functions (python -m engine.kernels.aot, ptxas
# 12.9, no spills in any): the first, the original fixed choice, takes 255, the cap, so at most 2 programs of
# 4 warps fit on a multiprocessor (8 of 64 warps) for a kernel that is mostly sin/cos over the basis and
# memory traffic; the others hold fewer basis functions x edges per thread (122-168 registers).
BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_E": 64, "NB_CHUNK": 32}, num_warps=4),
    triton.Config({"BLOCK_E": 64, "NB_CHUNK": 8}, num_warps=4),
    triton.Config({"BLOCK_E": 32, "NB_CHUNK": 16}, num_warps=4),
    triton.Config({"BLOCK_E": 64, "NB_CHUNK": 16}, num_warps=8),
]
backward_kernel_tuned = triton.autotune(
    configs=BACKWARD_CONFIGS, key=["NUM_BASIS", "HAS_G_R", "HAS_G_UNIT", "HAS_G_RBF", "HAS_G_FCUT"],
)(_backward_kernel)
