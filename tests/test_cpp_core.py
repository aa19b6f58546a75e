"""The C++ core (pybind11 module engine._core): cell-list neighbor list against the reference, energies,
forces, virials and per-atom energies against the Python engine (float64), and its errors."""
import json
import os
import re
import time

import numpy as np
import pytest
import torch
from ase import Atoms

from engine.errors import HessforgeError
from engine.export import EXPORT_VERSION, METADATA_NAME, export_model, quiet_torchscript
from engine.exported import ExportedModel, core_available, load_core, neighbor_list, read_metadata
from engine.graph import graph_from_atoms
from engine.neighbors import structure_neighbor_list
from test_export import CUTOFF, SPECIES, VARIANTS, flipped_weights_copy, rel, strain_virial, structures, tiny_painn

pytestmark = pytest.mark.skipif(not core_available(), reason="C++ core not built (make build)")


def edge_set(edge_index, shifts):
    return set(zip(np.asarray(edge_index[0]).tolist(), np.asarray(edge_index[1]).tolist(),
                   map(tuple, np.asarray(shifts).round().astype(int).tolist())))


def reference_edges(positions, cell, pbc, cutoff):
    e, s = structure_neighbor_list(torch.tensor(positions), torch.tensor(cell), torch.tensor(pbc), cutoff)
    return edge_set(e.numpy(), s.numpy())


def random_cases(rng):
    tric = np.array([[3.1, 0.0, 0.0], [1.2, 2.7, 0.0], [-0.9, 0.6, 2.4]])
    yield "molecule", rng.uniform(-3, 3, (12, 3)), np.zeros((3, 3)), [False] * 3
    yield "orthorhombic", rng.uniform(0, 8, (30, 3)), np.diag([8.0, 9.0, 7.5]), [True] * 3
    yield "small triclinic", rng.uniform(-2, 5, (5, 3)), tric, [True] * 3  # heights < cutoff, atoms outside
    yield "one atom", rng.uniform(0, 2, (1, 3)), tric, [True] * 3  # only self images
    yield "slab", rng.uniform(0, 6, (20, 3)), np.array([[6.0, 0, 0], [2.0, 5.5, 0], [0, 0, 30.0]]), [True, True, False]
    yield "wire", rng.uniform(0, 3, (6, 3)), np.array([[2.6, 0, 0], [0, 9, 0], [0.4, 0, 9]]), [True, False, False]
    # as ASE writes them (ase.build.nanotube, graphene): zero vectors along the non-periodic directions
    yield "wire, zero vectors", rng.uniform(0, 3, (6, 3)), np.array([[0, 0, 0], [0, 0, 0], [0.3, 0.2, 2.6]]), \
        [False, False, True]
    yield "slab, zero vector", rng.uniform(0, 6, (12, 3)), np.array([[6.0, 0, 0], [2.0, 5.5, 0.5], [0, 0, 0]]), \
        [True, True, False]


@pytest.mark.parametrize("cutoff", [2.5, 4.0])
def test_neighbor_list_matches_reference(rng, cutoff):
    for name, pos, cell, pbc in random_cases(rng):
        edge_index, shifts = neighbor_list(pos, cell, pbc, cutoff)
        assert edge_index.dtype == np.int64 and shifts.shape == (edge_index.shape[1], 3)
        got = edge_set(edge_index, shifts)
        assert len(got) == edge_index.shape[1], name  # no duplicates
        assert got == reference_edges(pos, cell, pbc, cutoff), name
        # sorted by receiver, and r_ij = x_j - x_i + S @ cell within the cutoff
        assert np.all(np.diff(edge_index[0]) >= 0)
        vec = pos[edge_index[1]] - pos[edge_index[0]] + shifts @ cell
        assert np.all(np.linalg.norm(vec, axis=1) < cutoff)


def test_neighbor_list_large_system_matches_ase(rng):
    """A 3000-atom triclinic box: the same edges as ASE's O(N) list, in well under a second."""
    from ase.neighborlist import primitive_neighbor_list

    cell = np.array([[30.0, 0, 0], [5.0, 28.0, 0], [-3.0, 4.0, 29.0]])
    pos = rng.uniform(0, 1, (3000, 3)) @ cell
    start = time.perf_counter()
    edge_index, shifts = neighbor_list(pos, cell, [True] * 3, 4.0)
    elapsed = time.perf_counter() - start
    i, j, S = primitive_neighbor_list("ijS", [True] * 3, cell, pos, 4.0, self_interaction=False)
    assert edge_set(edge_index, shifts) == edge_set(np.stack([i, j]), S)
    assert elapsed < 2.0, f"cell list took {elapsed:.2f} s for 3000 atoms"


@pytest.mark.parametrize("arch,force_mode", VARIANTS)
def test_core_matches_python_engine(tmp_path, rng, arch, force_mode):
    model = tiny_painn(force_mode, seed=int(rng.integers(1000)), arch=arch)
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    core = load_core(path, num_threads=1)
    assert core.metadata["species"] == SPECIES and core.model.num_layers == 2
    for name, atoms in structures(rng).items():
        graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
        ref = model(graph)
        out = core.compute_atoms(atoms)
        assert out["num_edges"] == graph.edge_index.shape[1], name
        assert rel(out["energy"], ref["energy"].item()) < 1e-10, name
        assert rel(out["node_energy"], ref["node_energy"].detach()) < 1e-10, name
        assert rel(out["forces"], ref["forces"].detach()) < 1e-10, name
        if force_mode == "gradient" and atoms.pbc.any():
            assert rel(out["virial"], strain_virial(model, graph)) < 1e-10, name
        if force_mode == "direct":
            assert not out["virial"].any()


def test_core_atom_virials(tmp_path, rng):
    """The core's per-atom virials: the edge split (compute, compute_graph) equals the Python engine's
    (engine.stress.atom_virials, tested against finite differences in test_stress.py), the exact ones
    (W_j = sum_i (x_i - x_j) ⊗ dU_i/dx_j, molecules and explicit ghosts) equal a brute-force Jacobian of every
    atom energy, both sum to the virial; a direct-force model, a file exported before the method existed and
    exact ones with periodic shifts are refused by name."""
    from engine.stress import atom_virials

    model = tiny_painn(seed=int(rng.integers(1000)))
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    core, exported = load_core(path, num_threads=1), ExportedModel(path)
    assert core.model.has_atom_virial and core.metadata["atom_virial"]
    for name, atoms in structures(rng).items():
        graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
        ref = atom_virials(model, graph).numpy()
        out = core.compute_atoms(atoms, atom_virial="split")
        assert rel(out["atom_virial"], ref) < 1e-10, name
        assert rel(out["atom_virial"].sum(0), out["virial"]) < 1e-12, name
        assert rel(exported.atom_virials(graph), ref) < 1e-10, name
        assert "atom_virial" not in core.compute_atoms(atoms)
        if atoms.pbc.any():
            with pytest.raises(HessforgeError, match="exact per-atom virials need periodic images as explicit"):
                core.compute_atoms(atoms, atom_virial="exact")
    # exact, with ghost atoms (nlocal < N): only local energies count, the ghosts get their share
    atoms = structures(rng)["molecule"]
    atoms.positions += 1e4  # far from the origin: the exact form must not lose digits to x ⊗ F
    graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
    x = graph.positions.clone().requires_grad_(True)
    node_energy = model(graph._replace(positions=x), compute_forces=False)["node_energy"]
    for nlocal in (len(atoms), 4):
        jacobian = torch.stack([torch.autograd.grad(node_energy[i], x, retain_graph=True)[0] for i in range(nlocal)])
        brute = torch.einsum("ija,ijb->jab", x.detach()[:nlocal, None] - x.detach()[None], jacobian).numpy()
        out = core.compute_graph(atoms.positions, atoms.numbers, graph.edge_index.numpy(),
                                 np.zeros((graph.edge_index.shape[1], 3)), nlocal=nlocal, atom_virial="exact")
        assert rel(out["atom_virial"], brute) < 1e-8, nlocal
        assert rel(out["atom_virial"].sum(0), np.einsum("na,nb->ab", atoms.positions - atoms.positions[0],
                                                         out["forces"])) < 1e-8, nlocal
        split = core.compute_graph(atoms.positions, atoms.numbers, graph.edge_index.numpy(),
                                   np.zeros((graph.edge_index.shape[1], 3)), nlocal=nlocal, atom_virial="split")
        assert rel(split["atom_virial"], brute) > 1e-3  # another decomposition of the same sum
    # a float32 export: the two terms of the exact form cancel to W; relative to the local atoms' centroid
    # they keep float32's digits (uncentred, 1e4 Å from the origin, they kept ~2)
    single = str(tmp_path / "float32.pt")
    export_model(model, single, dtype=torch.float32)
    out = load_core(single).compute_graph(atoms.positions, atoms.numbers, graph.edge_index.numpy(),
                                          np.zeros((graph.edge_index.shape[1], 3)), nlocal=4, atom_virial="exact")
    assert rel(out["atom_virial"], brute) < 1e-4
    with pytest.raises(HessforgeError, match="atom_virial must be None, 'split' or 'exact'"):
        core.compute_atoms(atoms, atom_virial="hardy")

    direct = str(tmp_path / "direct.pt")
    export_model(tiny_painn("direct"), direct)
    assert not load_core(direct).model.has_atom_virial
    with pytest.raises(HessforgeError, match="direct-force model has no virial, per atom or total"):
        load_core(direct).compute_atoms(atoms, atom_virial="split")

    class Before(torch.nn.Module):  # forward only, like the archives written before with_atom_virial
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

        def forward(self, positions: torch.Tensor, numbers: torch.Tensor, edge_index: torch.Tensor,
                    shifts: torch.Tensor, nlocal: int):
            return self.wrapped(positions, numbers, edge_index, shifts, nlocal)

    old = str(tmp_path / "old.pt")
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(Before(torch.jit.load(path))), old,
                       _extra_files={METADATA_NAME: json.dumps(read_metadata(path))})
    assert rel(load_core(old).compute_atoms(atoms)["forces"], core.compute_atoms(atoms)["forces"]) < 1e-12
    with pytest.raises(HessforgeError, match="exported before per-atom virials existed; export the checkpoint again"):
        load_core(old).compute_atoms(atoms, atom_virial="split")
    with pytest.raises(HessforgeError, match="exported before per-atom virials existed"):
        ExportedModel(old).atom_virials(graph)


def test_core_graph_call_with_ghosts(tmp_path):
    """compute_graph with nlocal < N: local energy only, reaction forces on the other atoms."""
    model = tiny_painn()
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    core = load_core(path)
    atoms = structures(np.random.default_rng(3))["molecule"]
    graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
    shifts = np.zeros((graph.edge_index.shape[1], 3))
    out = core.compute_graph(atoms.positions, atoms.numbers, graph.edge_index.numpy(), shifts, nlocal=4)
    x = graph.positions.clone().requires_grad_(True)
    e_local = model(graph._replace(positions=x), compute_forces=False)["node_energy"][:4].sum()
    (grad,) = torch.autograd.grad(e_local, x)
    assert rel(out["energy"], e_local.item()) < 1e-12
    assert rel(out["forces"], -grad) < 1e-10


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_gradient_models_under_no_grad_and_inference_mode(tmp_path, mode):
    """Inference scripts run under torch.no_grad() / torch.inference_mode(): a gradient model's forces come from
    autograd inside the module, which used to fail there (core, ExportedModel and LAMMPS in-process alike)."""
    path = str(tmp_path / "model.pt")
    export_model(tiny_painn(), path)
    core, exported = load_core(path), ExportedModel(path)
    atoms = structures(np.random.default_rng(5))["triclinic"]
    graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
    ref_core, ref_exported = core.compute_atoms(atoms), exported.evaluate_batch(graph)
    with getattr(torch, mode)():
        out = core.compute_atoms(atoms)
        got = exported.evaluate_batch(graph_from_atoms([atoms], CUTOFF, torch.float64))
    assert rel(out["forces"], ref_core["forces"]) < 1e-12 and rel(out["virial"], ref_core["virial"]) < 1e-12
    for a, b in zip(got, ref_exported):
        assert rel(a, b) < 1e-12


def test_metadata_reads_the_same_in_a_comma_decimal_locale(tmp_path):
    """The core's JSON reader used strtod, which follows LC_NUMERIC: a host program in de_DE could load no model."""
    import shutil
    import subprocess
    import sys

    if shutil.which("localedef") is None:
        pytest.skip("localedef not installed")
    locales = tmp_path / "locales"
    locales.mkdir()
    made = subprocess.run(["localedef", "-i", "de_DE", "-f", "UTF-8", str(locales / "de_DE.UTF-8")],
                          capture_output=True)
    if not (locales / "de_DE.UTF-8").exists():
        pytest.skip(f"cannot build the de_DE locale ({made.stderr.decode()[-200:]})")
    path = str(tmp_path / "model.pt")
    export_model(tiny_painn(), path)
    script = ("import locale, sys; locale.setlocale(locale.LC_ALL, 'de_DE.UTF-8'); "
              "assert locale.localeconv()['decimal_point'] == ','; "
              "from engine.exported import load_core; m = load_core(sys.argv[1]).model; print(m.cutoff)")
    run = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True,
                         env={**os.environ, "LOCPATH": str(locales)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip()) == CUTOFF


def test_exported_model_checks_nlocal_and_metadata(tmp_path):
    path = str(tmp_path / "model.pt")
    export_model(tiny_painn(), path)
    model = ExportedModel(path)
    atoms = structures(np.random.default_rng(2))["molecule"]
    graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
    with pytest.raises(HessforgeError, match="nlocal must be 0"):  # -1 dropped the last atom's energy
        model.evaluate(graph.positions, graph.numbers, graph.edge_index, torch.zeros(graph.edge_index.shape[1], 3),
                       nlocal=-1)
    meta = json.loads(json.dumps(model.metadata))
    for key, value, message in (("species", ["H", "C"], "'species' is not a list of distinct atomic numbers"),
                                ("dtype", "float16", "'dtype' is 'float16'"),
                                ("force_mode", "both", "'force_mode' is 'both'"),
                                ("cutoff", -1.0, "'cutoff' is -1.0")):
        bad = str(tmp_path / f"bad_{key}.pt")
        with quiet_torchscript():
            torch.jit.save(torch.jit.load(path), bad, _extra_files={METADATA_NAME: json.dumps(dict(meta, **{key: value}))})
        with pytest.raises(HessforgeError, match=re.escape(message)):
            ExportedModel(bad)


def test_core_errors(tmp_path):
    model = tiny_painn()
    path = str(tmp_path / "model.pt")
    meta = export_model(model, path)
    with pytest.raises(HessforgeError, match="model file not found"):
        load_core(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(HessforgeError, match="not a hessforge exported model"):
        load_core(str(garbage))
    newer = str(tmp_path / "newer.pt")
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), newer,
                       _extra_files={METADATA_NAME: json.dumps(dict(meta, format_version=EXPORT_VERSION + 1))})
    with pytest.raises(HessforgeError, match=f"format version {EXPORT_VERSION + 1} is newer"):
        load_core(newer)
    core = load_core(path)
    with pytest.raises(HessforgeError, match=r"unknown element N \(Z=7\)"):
        core.compute_atoms(Atoms("NH3", positions=np.random.default_rng(0).uniform(0, 2, (4, 3))))
    with pytest.raises(HessforgeError, match=r"unknown element Z=0 at atom 1; the model knows"):
        core.compute(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], [1, 0], np.eye(3) * 4, [False] * 3)
    with pytest.raises(HessforgeError, match="zero volume"):
        core.compute(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], [1, 1], np.zeros((3, 3)), [True] * 3)
    with pytest.raises(HessforgeError, match="NaN or Inf"):
        core.compute(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], [1, 1], np.diag([np.inf, 4.0, 4.0]), [True] * 3)
    pair = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    with pytest.raises(HessforgeError, match="atoms 0 and 2 are 0 Å apart: overlapping atoms"):  # an atom twice
        core.compute(np.vstack([pair, pair[:1]]), [1, 1, 1], np.zeros((3, 3)), [False] * 3)
    with pytest.raises(HessforgeError, match=r"atoms 0 and 1 are [0-9.e-]+ Å apart: overlapping"):  # via an image
        core.compute(np.array([[0.0, 0, 0], [4.0, 0, 0]]), [1, 1], np.eye(3) * 4, [True] * 3)
    with pytest.raises(HessforgeError, match="periodic cell is 0.3 Å thick along cell vector 2"):
        core.compute(pair, [1, 1], np.diag([5.0, 5.0, 0.3]), [True] * 3)  # was E = -1044 eV
    # atoms 1.5e10 Å apart: the bins' count product overflowed int64 and the core wrote out of bounds
    far = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0 ** 32 * 3.5 + 1.0, 2.0 ** 32 * 3.5 + 1.0, 1.0]])
    edges, _ = neighbor_list(far, None, [False] * 3, 3.5)
    assert sorted(map(tuple, np.asarray(edges).T.tolist())) == [(0, 1), (1, 0)]
    # a flipped byte in a weight record: PyTorch's reader skips the CRC-32s, so it loaded and gave wrong
    # energies; the core (and the Python loader) check every record
    flipped = flipped_weights_copy(path, tmp_path / "flipped.pt")
    with pytest.raises(HessforgeError, match="damaged model file .*fails its CRC-32 check"):
        load_core(str(flipped))
    with pytest.raises(HessforgeError, match="damaged model file .*fails its CRC-32 check"):
        ExportedModel(str(flipped))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(path, "rb").read()[:-10])
    with pytest.raises(HessforgeError, match="damaged model file|not a hessforge exported model"):
        load_core(str(cut))


ODD_METADATA = {  # edit of the exported metadata -> what both loaders name
    "format_version 1.5": (dict(format_version=1.5), "format_version"),
    "num_layers 0": (dict(num_layers=0), "num_layers"),
    "num_layers 2.5": (dict(num_layers=2.5), "num_layers"),
    "cutoff -1": (dict(cutoff=-1.0), "cutoff"),
    "interaction_range text": (dict(interaction_range="far"), "interaction_range"),
    "interaction_range below cutoff": (dict(interaction_range=CUTOFF / 2), "interaction_range"),
    "species twice": (dict(species=SPECIES + SPECIES[:1]), "species"),
    "species the weights lack": (dict(species=SPECIES + [7], reference_energies=[0.0] * 4), "but its weights embed"),
    "species missing": (dict(species=SPECIES[:-1], reference_energies=[0.0] * 2), "but its weights embed"),
    "reference_energies short": (dict(reference_energies=[-13.6]), "reference_energies"),
    "reference_energies text": (dict(reference_energies=["a", "b", "c"]), "reference_energies"),
}


@pytest.mark.parametrize("case", list(ODD_METADATA))
def test_odd_metadata_is_refused_by_both_loaders(tmp_path, case):
    """The C++ core and the Python loader read the same metadata the same way: a version or layer count 1.5
    was truncated by one and refused by the other, 0 layers passed in Python; species the weights do not embed
    were looked up at index -1 (another element's weights) by both."""
    edit, named = ODD_METADATA[case]
    path = str(tmp_path / "model.pt")
    meta = export_model(tiny_painn(), path)
    odd = str(tmp_path / "odd.pt")
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), odd, _extra_files={METADATA_NAME: json.dumps(dict(meta, **edit))})
    with pytest.raises(HessforgeError, match=named):
        load_core(odd)
    with pytest.raises(HessforgeError, match=named):
        ExportedModel(odd)


def test_integral_floats_in_metadata_load_in_both_loaders(tmp_path):
    """JSON 2.0 is the integer 2 to the C++ core's parser; the Python loader agrees (it refused them)."""
    path = str(tmp_path / "model.pt")
    meta = export_model(tiny_painn(), path)
    floats = str(tmp_path / "floats.pt")
    edit = dict(format_version=float(meta["format_version"]), num_layers=float(meta["num_layers"]),
                species=[float(z) for z in meta["species"]])
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), floats, _extra_files={METADATA_NAME: json.dumps(dict(meta, **edit))})
    assert load_core(floats).model.num_layers == meta["num_layers"]
    model = ExportedModel(floats)
    assert model.species == SPECIES and model.num_layers == meta["num_layers"]


def test_core_float32_model(tmp_path, rng):
    """A float32 export: edge vectors formed in float64, model in float32, results in float64."""
    model = tiny_painn(seed=int(rng.integers(1000)))
    path = str(tmp_path / "model32.pt")
    export_model(model, path, dtype=torch.float32)
    core = load_core(path)
    assert core.metadata["dtype"] == "float32"
    atoms = structures(rng)["triclinic"]
    atoms.positions += 500.0  # far from the origin: float32 coordinates would lose ~1e-4 Å here
    ref = model(graph_from_atoms([atoms], CUTOFF, torch.float64))
    out = core.compute_atoms(atoms)
    assert out["forces"].dtype == np.float64
    assert rel(out["energy"], ref["energy"].item()) < 1e-6
    assert rel(out["forces"], ref["forces"].detach()) < 1e-4
    # atomic energies to float32 precision of the learned part (~1 eV), not of the ~2000 eV reference energies
    # (students add them in float64; in float32 they rounded every atomic energy to ~1e-4 eV)
    assert np.abs(out["node_energy"] - ref["node_energy"].detach().numpy()).max() < 3e-6
    assert abs(out["energy"] - ref["energy"].item()) < 1e-5
