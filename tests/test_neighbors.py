"""The torch reference neighbor list against ASE's, on fresh random structures."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list

from engine.errors import HessforgeError
from engine.graph import build_graph, edge_vectors
from engine.neighbors import cell_heights, structure_neighbor_list


def _edge_set(i, j, shifts):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, np.rint(shifts).astype(int).tolist())))


def _random_cell(rng, kind):
    if kind == "cubic":
        return np.eye(3) * rng.uniform(3.0, 8.0)
    if kind == "small":  # smaller than the cutoff in every direction
        return np.eye(3) * rng.uniform(1.5, 2.5)
    # triclinic, sheared
    cell = np.diag(rng.uniform(2.5, 6.0, size=3))
    cell[1, 0], cell[2, 0], cell[2, 1] = rng.uniform(-1.5, 1.5, size=3)
    return cell


@pytest.mark.parametrize("kind", ["cubic", "small", "triclinic", "mixed_pbc", "molecule"])
def test_matches_ase(rng, kind):
    cutoff = rng.uniform(2.5, 5.0)
    n = int(rng.integers(1, 12))
    if kind == "molecule":
        cell, pbc = np.zeros((3, 3)), np.array([False] * 3)
        pos = rng.uniform(-3, 3, size=(n, 3))
    else:
        cell = _random_cell(rng, "triclinic" if kind == "mixed_pbc" else kind)
        pbc = np.array([True, False, True]) if kind == "mixed_pbc" else np.array([True] * 3)
        # Positions partly outside the cell: the list must not depend on wrapping.
        pos = rng.uniform(-0.5, 1.5, size=(n, 3)) @ cell
    i_ref, j_ref, s_ref = primitive_neighbor_list("ijS", pbc, cell, pos, cutoff, self_interaction=False)
    edges, shifts = structure_neighbor_list(
        torch.tensor(pos), torch.tensor(cell), torch.tensor(pbc), cutoff
    )
    assert _edge_set(edges[0], edges[1], shifts.numpy()) == _edge_set(i_ref, j_ref, s_ref)
    # and the distances agree with the convention r_ij = x_j - x_i + S @ cell
    d = pos[edges[1]] - pos[edges[0]] + shifts.numpy() @ cell
    assert np.all(np.linalg.norm(d, axis=1) < cutoff)


def test_batched_edges_and_vectors(rng):
    atoms = [
        Atoms("H2O", positions=rng.uniform(0, 2, (3, 3))),
        Atoms("Cu", cell=np.eye(3) * 2.0, pbc=True),  # one atom, only its own images
        Atoms("CH4", positions=rng.uniform(0, 2, (5, 3)), cell=np.eye(3) * 3.0, pbc=True),
    ]
    g = build_graph([a.numbers for a in atoms], [a.positions for a in atoms],
                    [np.asarray(a.cell) for a in atoms], [a.pbc for a in atoms], 3.0, torch.float64)
    assert g.batch.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    # edges never cross structures
    assert torch.equal(g.batch[g.edge_index[0]], g.batch[g.edge_index[1]])
    vec = edge_vectors(g)
    start = 0
    for k, a in enumerate(atoms):
        i, j, D = primitive_neighbor_list("ijD", a.pbc, np.asarray(a.cell), a.positions, 3.0)
        mine = (g.batch[g.edge_index[0]] == k).numpy()
        assert mine.sum() == len(i)
        got = sorted(map(tuple, np.round(vec[mine].numpy(), 9).tolist()))
        assert got == sorted(map(tuple, np.round(D, 9).tolist()))
        start += len(a)


def test_float32_graph_keeps_its_precision_far_from_the_origin(rng):
    """A float32 graph of structures 10^4 Å out (a training set of unwrapped MD frames) has the float64
    graph's edge vectors to float32 rounding of the vectors themselves, not of the coordinates (which
    gave 1e-3 Å errors before build_graph recentred before its cast)."""
    cell = np.diag(rng.uniform(4.0, 6.0, 3)) + rng.uniform(-1, 1, (3, 3)) * (1 - np.eye(3))
    structures = [(rng.uniform(-2, 2, (6, 3)) + [1e4, -7e3, 3e3], np.zeros((3, 3)), [False] * 3),
                  (rng.uniform(0, 1, (5, 3)) @ cell + [-2e4, 5e3, 1e4], cell, [True] * 3)]
    args = ([np.ones(len(p), dtype=int) for p, _, _ in structures], [p for p, _, _ in structures],
            [c for _, c, _ in structures], [b for _, _, b in structures], 3.5)
    g64, g32 = build_graph(*args, torch.float64), build_graph(*args, torch.float32)
    assert torch.equal(g64.edge_index, g32.edge_index) and g64.edge_index.shape[1] > 20
    err = (edge_vectors(g32).double() - edge_vectors(g64)).abs().max()
    assert err < 2e-6, err


def test_thin_cell_messages_tell_a_skewed_basis_from_a_unit_error():
    """check_cell (teachers check their input with it) tells a skewed basis of a thicker lattice, which
    build_graph reduces itself, from a cell thin in every basis (a cell in nm)."""
    from engine.neighbors import check_cell

    pbc = torch.tensor([True, True, True])
    skewed = torch.tensor([[3.0, 0, 0], [30.0, 3.0, 0], [0, 0, 3.0]], dtype=torch.float64)
    with pytest.raises(HessforgeError, match="0.299 Å thick .* a skewed basis of a thicker lattice: pass its "
                                             "reduced basis, ase.geometry.minkowski_reduce"):
        check_cell(skewed, pbc)
    with pytest.raises(HessforgeError, match="0.3 Å thick .* a cell in nm or Bohr"):
        check_cell(torch.eye(3, dtype=torch.float64) * 0.3, pbc)
    g = build_graph([np.ones(2, dtype=int)], [[[0.0, 0, 0], [1.2, 0.4, 0.3]]], [skewed.numpy()], [[True] * 3], 2.5,
                    torch.float64)
    assert float(cell_heights(g.cell[0]).min()) > 2.9 and g.edge_index.shape[1] > 0


def test_zero_volume_cell_is_rejected():
    with pytest.raises(HessforgeError, match="zero volume"):
        build_graph([[1, 1]], [np.zeros((2, 3))], [np.zeros((3, 3))], [[True] * 3], 3.0)
    # the message shows the cell as given (a slab's zero vector, not the completion put in its place)
    with pytest.raises(HessforgeError, match=r"zero volume \(cell=\[\[0.0, 0.0, 0.0\], \[0.0, 3.0, 0.0\], \[0.0, 0.0, 5.0\]\]"):
        build_graph([[1, 1]], [[[0, 0, 0], [1, 0, 0]]], [[[0, 0, 0], [0, 3, 0], [0, 0, 5]]], [[True, True, False]], 3.0)


@pytest.mark.parametrize("periodic", [(False, False, True), (True, False, False), (True, True, False)])
def test_wires_and_slabs_with_zero_nonperiodic_vectors(rng, periodic):
    """ASE writes wires and slabs (ase.build.nanotube, graphene_nanoribbon) with zero cell vectors along
    their non-periodic directions: the same edges as with a vacuum vector there, skewed periodic vectors
    included; a cell whose periodic vectors are themselves degenerate is still refused."""
    pbc = np.array(periodic)
    cell = _random_cell(rng, "triclinic")
    n = int(rng.integers(2, 12))
    pos = rng.uniform(-0.5, 1.5, size=(n, 3)) @ cell
    cutoff = rng.uniform(2.5, 5.0)
    zeroed = np.where(pbc[:, None], cell, 0.0)
    numbers = rng.integers(1, 9, n)
    g = build_graph([numbers], [pos], [zeroed], [pbc], cutoff, torch.float64)
    i_ref, j_ref, D_ref = primitive_neighbor_list("ijD", pbc, cell, pos, cutoff, self_interaction=False)
    got = sorted(map(tuple, np.round(edge_vectors(g).numpy(), 9).tolist()))
    assert got == sorted(map(tuple, np.round(D_ref, 9).tolist())) and len(got) == len(i_ref)
    np.testing.assert_allclose(g.cell[0].numpy()[pbc], cell[pbc])  # the periodic vectors are untouched
    if pbc.sum() == 2:
        flat = zeroed.copy()
        flat[1] = 2.0 * flat[0]  # the two periodic vectors parallel
        with pytest.raises(HessforgeError, match="zero volume"):
            build_graph([numbers], [pos], [flat], [pbc], cutoff)


def test_nan_positions_are_rejected():
    pos = np.zeros((2, 3))
    pos[1, 0] = np.nan
    with pytest.raises(HessforgeError, match="NaN"):
        build_graph([[1, 1]], [pos], [np.zeros((3, 3))], [[False] * 3], 3.0)


def test_empty_batch_is_rejected():
    with pytest.raises(HessforgeError, match="empty batch"):
        build_graph([], [], [], [], 3.0)


def test_atom_counts_must_match_per_structure():
    """Totals that agree but per-structure counts that do not would put atoms into the neighbouring structure."""
    pos = [np.eye(3)[:2], 2 * np.eye(3)]
    cells, pbcs = [np.zeros((3, 3))] * 2, [[False] * 3] * 2
    assert build_graph([[1, 1], [8, 1, 1]], pos, cells, pbcs, 3.0).numbers.shape == (5,)
    with pytest.raises(HessforgeError, match="structure 0: 3 atomic numbers for 2 positions"):
        build_graph([[1, 1, 8], [1, 1]], pos, cells, pbcs, 3.0)
    with pytest.raises(HessforgeError, match=r"positions must be \[N, 3\]"):
        build_graph([[1, 1]], [np.zeros(6)], cells[:1], pbcs[:1], 3.0)
    with pytest.raises(HessforgeError, match="2 structures' atomic numbers but 1 positions"):
        build_graph([[1, 1], [1]], pos[:1], cells, pbcs, 3.0)
