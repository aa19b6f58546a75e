"""Fast kernels for inference: the fused neighbor-list + radial-basis op (Triton on GPU, vectorised torch on
CPU or without triton), registered as torch custom ops so torch.compile traces through them.

    from engine.kernels import radial_edges, neighbor_list
    out = radial_edges(positions, cell, pbc, batch, cutoff, num_basis)            # exact size
    out = radial_edges(..., capacity=K)                                            # static size K, padded
    out.edge_index, out.shifts, out.r, out.unit, out.rbf, out.fcut, out.num_edges

See engine/kernels/ops.py for the compile and capacity design.
"""
from engine.kernels.ops import (
    BACKENDS,
    NeighborList,
    RadialEdges,
    neighbor_list,
    neighbor_list_triton,
    radial_edges,
    triton_available,
    use_triton,
)

__all__ = [
    "BACKENDS",
    "NeighborList",
    "RadialEdges",
    "neighbor_list",
    "neighbor_list_triton",
    "radial_edges",
    "triton_available",
    "use_triton",
]
