"""engine.Calculator: forces and stress against finite differences (ASE's sign and Voigt order), the same
numbers from a checkpoint, an exported file and the model object, ASE MD energy conservation, FIRE, errors."""
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE

from engine import Calculator
from engine.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from engine.errors import HessforgeError, UnknownElementError
from engine.graph import graph_from_atoms
from engine.models import PaiNN
from engine.neighbors import cell_heights

torch.set_num_threads(1)
SPECIES = [1, 6, 8]


def tiny(force_mode="gradient", cutoff=3.0):
    model = PaiNN(SPECIES, cutoff=cutoff, hidden=16, layers=2, num_basis=8, force_mode=force_mode)
    with torch.no_grad():
        model.energy_scale.fill_(2.0)
        model.atom_ref.copy_(torch.tensor([-13.6, -1029.0, -2041.0]))
    return model.double().eval()


def periodic(rng, n=7):
    """A random triclinic cell whose shortest height is below the cutoff (several images of each atom)."""
    cell = np.diag(rng.uniform(3.2, 4.2, 3)) + rng.uniform(-0.6, 0.6, (3, 3)) * (1 - np.eye(3))
    frac = rng.uniform(0, 1, (n, 3))
    return Atoms(numbers=rng.choice(SPECIES, n), positions=frac @ cell, cell=cell, pbc=True)


def molecule_perturbed(name, rng, scale=0.1):
    a = molecule(name)
    a.positions += rng.normal(scale=scale, size=a.positions.shape)
    return a


def strain_energy(atoms, calc, strain):
    b = atoms.copy()
    b.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    b.calc = calc
    return b.get_potential_energy()


def test_forces_match_finite_differences(rng):
    calc = Calculator(tiny())
    for atoms in (molecule_perturbed("CH3OH", rng), periodic(rng)):
        atoms.calc = calc
        forces = atoms.get_forces()
        assert np.abs(forces).max() > 1e-3  # not trivially zero
        fd = calculate_numerical_forces(atoms, eps=1e-5)
        # central differences at 1e-5 Å err by eps²·E'''/6: seen up to 1.4e-7 eV/Å on random inputs (seed
        # 129445646), so 1e-6 absolute; a wrong sign, factor or missing term is off by >= 1e-3
        assert np.allclose(forces, fd, rtol=1e-6, atol=1e-6), np.abs(forces - fd).max()
        # per-atom energies sum to the energy
        assert np.isclose(atoms.get_potential_energies().sum(), atoms.get_potential_energy())


def test_stress_is_the_strain_derivative(rng):
    model = tiny()
    calc = Calculator(model)
    atoms = periodic(rng)
    atoms.calc = calc
    stress = atoms.get_stress()  # Voigt xx yy zz yz xz xy
    assert np.abs(stress).max() > 1e-5
    h, vol = 1e-5, atoms.get_volume()
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    fd = []
    for a, b in voigt:
        eps = np.zeros((3, 3))
        eps[a, b] = eps[b, a] = h if a != b else h
        e_plus = strain_energy(atoms, calc, eps)
        e_minus = strain_energy(atoms, calc, -eps)
        d = (e_plus - e_minus) / (2 * h)
        fd.append(d / vol if a == b else d / (2 * vol))  # symmetric off-diagonal strain moves two entries
    assert np.allclose(stress, fd, atol=1e-8), (stress, fd)
    # ASE's own finite-difference stress (its sign and Voigt order)
    assert np.allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), atol=1e-8)
    # full 3x3 form is symmetric and agrees
    full = atoms.get_stress(voigt=False)
    assert np.allclose(full, full.T)


def test_per_atom_stresses(tmp_path, rng):
    """atoms.get_stresses(): per-atom stresses -sym(W_i)/V (engine.stress.atom_virials, tested against finite
    differences in test_stress.py) summing to the stress, the same from the object, exported and batched
    predict; refused where stress is."""
    from engine.export import export_model
    from engine.stress import atom_virials

    model = tiny()
    exported = str(tmp_path / "exported.pt")
    export_model(model, exported)
    atoms = periodic(rng)
    graph = graph_from_atoms([atoms], model.cutoff, torch.float64)
    w = atom_virials(model, graph).numpy()
    ref = -0.5 * (w + w.transpose(0, 2, 1))[:, [0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]] / atoms.get_volume()
    for source in (model, exported):
        atoms.calc = Calculator(source)
        stresses = atoms.get_stresses()
        assert stresses.shape == (len(atoms), 6) and np.abs(stresses).max() > 1e-6
        assert np.allclose(stresses, ref, rtol=0, atol=1e-12)
        assert np.allclose(stresses.sum(0), atoms.get_stress(), rtol=0, atol=1e-12)
    # one backward pass through the edge vectors gives forces, stress and stresses: get_stress after get_stresses
    # makes no second model call, and equals the strain-derivative stress and forces of a fresh calculator
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    atoms.calc = Calculator(model)
    stresses, stress, forces = atoms.get_stresses(), atoms.get_stress(), atoms.get_forces()
    assert len(calls) == 1
    hook.remove()
    fresh = atoms.copy()
    fresh.calc = Calculator(model)
    assert np.allclose(stress, fresh.get_stress(), rtol=0, atol=1e-13)
    assert np.allclose(forces, fresh.get_forces(), rtol=0, atol=1e-12)
    assert np.allclose(stresses.sum(0), stress, rtol=0, atol=1e-13)
    other = periodic(rng)
    results = Calculator(model).predict([other, atoms, molecule("H2O")], stresses=True)
    plain = Calculator(model).predict([other, atoms, molecule("H2O")], stress=True)
    for got, want in zip(results, plain):  # per-structure energies and forces of the one-pass batch
        assert abs(got["energy"] - want["energy"]) < 1e-10 and np.allclose(got["forces"], want["forces"], atol=1e-12)
        assert (got["stress"] is None) == (want["stress"] is None)
    assert np.allclose(results[1]["stresses"], ref, rtol=0, atol=1e-12) and results[2]["stresses"] is None
    water = molecule("H2O")
    water.calc = Calculator(model)
    with pytest.raises(PropertyNotImplementedError, match="stress needs a periodic cell"):
        water.get_stresses()
    atoms.calc = Calculator(tiny(force_mode="direct"))
    with pytest.raises(PropertyNotImplementedError, match="direct-force student has no conservative stress"):
        atoms.get_stresses()


def test_checkpoint_exported_and_object_agree(tmp_path, rng):
    from engine.export import export_model

    model = tiny()
    ckpt = tmp_path / "student.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model_hparams": dict(model.hyperparameters(), name="painn"),
                "model_state": model.state_dict(), "ema_model_state": model.state_dict()}, ckpt)
    exported = tmp_path / "exported.pt"
    export_model(model, str(exported))
    atoms = periodic(rng)
    results = []
    for source in (model, str(ckpt), str(exported)):
        atoms.calc = Calculator(source)
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    for e, f, s in results[1:]:
        assert np.isclose(e, results[0][0], atol=1e-9)
        assert np.allclose(f, results[0][1], atol=1e-9)
        assert np.allclose(s, results[0][2], atol=1e-10)
    # every kind pickles (multiprocessing workers): the exported one by its path
    import pickle

    for source in (model, str(ckpt), str(exported)):
        copy = pickle.loads(pickle.dumps(Calculator(source)))
        assert copy.get_potential_energy(atoms) == pytest.approx(results[0][0], abs=1e-9)


def test_ase_md_conserves_energy(rng):
    atoms = molecule_perturbed("CH3OH", rng, 0.05)
    atoms.calc = Calculator(tiny(cutoff=4.0))
    atoms.set_momenta(rng.normal(scale=0.4, size=(len(atoms), 3)))
    e0 = atoms.get_total_energy()
    energies = []
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=5)
    dyn.run(200)
    ke_scale = max(atoms.get_kinetic_energy(), 1e-3)
    assert np.abs(np.array(energies) - e0).max() < 0.02 * ke_scale + 1e-6


class Springs(torch.nn.Module):
    """Any model with the student interface works: E = sum over edges of k/4 (|r_ij| - r0)² (each pair counted
    from both ends), a landscape with a minimum for the optimizer test (a random PaiNN may have none nearby).
    The cutoff holds every pair of a small molecule: a pair crossing it would make the energy jump (a 2 Å
    cutoff let 0.2 % of relaxations end above their start)."""

    cutoff, species = 5.0, SPECIES

    def check_species(self, numbers, where=""):
        pass

    def forward(self, graph, compute_forces=False):
        from engine.graph import edge_vectors

        r = edge_vectors(graph).norm(dim=1)
        e_edge = 0.25 * 10.0 * (r - 1.2) ** 2
        node = torch.zeros(len(graph.numbers), dtype=r.dtype).index_add(0, graph.edge_index[0], e_edge)
        energy = torch.zeros(graph.cell.shape[0], dtype=r.dtype).index_add(0, graph.batch, node)
        return {"energy": energy, "node_energy": node}


def test_fire_reduces_fmax(rng):
    atoms = molecule_perturbed("CH3OH", rng, 0.1)
    atoms.calc = Calculator(Springs())
    fmax0 = np.linalg.norm(atoms.get_forces(), axis=1).max()
    e0 = atoms.get_potential_energy()
    converged = FIRE(atoms, logfile=None).run(fmax=1e-3, steps=500)
    fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
    assert converged and fmax < 1e-3 < fmax0, (fmax0, fmax)
    assert atoms.get_potential_energy() < e0


def test_direct_force_student(rng):
    model = tiny("direct")
    atoms = periodic(rng)
    atoms.calc = Calculator(model)
    from engine.graph import graph_from_atoms

    expected = model(graph_from_atoms([atoms], model.cutoff, torch.float64))["forces"].detach().numpy()
    assert np.allclose(atoms.get_forces(), expected, atol=1e-12)
    with pytest.raises(PropertyNotImplementedError, match="direct-force"):
        atoms.get_stress()


def test_bad_input(rng, tmp_path):
    calc = Calculator(tiny())
    with pytest.raises(UnknownElementError, match=r"N \(Z=7\)"):
        calc.get_potential_energy(molecule("NH3"))
    nan = molecule("CH4")
    nan.positions[2, 1] = np.nan
    with pytest.raises(HessforgeError, match="NaN"):
        calc.get_potential_energy(nan)
    flat = Atoms("CH4", positions=molecule("CH4").positions, cell=[[3, 0, 0], [0, 3, 0], [6, 6, 0]], pbc=True)
    with pytest.raises(HessforgeError, match="zero volume"):
        calc.get_potential_energy(flat)
    with pytest.raises(HessforgeError, match="no atoms"):
        calc.get_potential_energy(Atoms())
    tiny_cell = Atoms("H", cell=[0.3, 4.0, 4.0], pbc=True)  # gave E = -2e11 eV; at 0.05 Å it never returned
    with pytest.raises(HessforgeError, match="periodic cell is 0.3 Å thick along cell vector 0"):
        calc.get_potential_energy(tiny_cell)
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        calc.get_stress(molecule("CH4"))
    with pytest.raises(HessforgeError, match="not found"):
        Calculator(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(HessforgeError, match="not a readable model file, neither a hessforge checkpoint nor an "
                                             "exported model"):
        Calculator(str(junk))
    with pytest.raises(HessforgeError, match="not a hessforge student"):
        Calculator(torch.nn.Linear(2, 2))
    for dtype in ("float16", torch.float16, torch.bfloat16, torch.int64):
        with pytest.raises(HessforgeError, match="dtype must be one of float32, float64"):
            Calculator(tiny(), dtype=dtype)
    with pytest.raises(HessforgeError, match="dtype torch.float16 is not supported"):
        Calculator(tiny().half(), dtype=None)
    with pytest.raises(HessforgeError, match=r"unknown device 'cudax' \(cpu, cuda, cuda:N or auto\)"):
        Calculator(tiny(), device="cudax")  # was torch's own RuntimeError


def test_wire_with_zero_nonperiodic_vectors(rng):
    """ase.build.nanotube's cell has zero vectors along x and y (pbc FFT): the same energy and forces as
    with vacuum vectors there; stress, which needs a volume, is refused with the reason."""
    from ase.build import nanotube

    wire = nanotube(3, 3, length=2, symbol="C")
    wire.positions += rng.normal(scale=0.05, size=wire.positions.shape)
    boxed = wire.copy()
    boxed.cell[0, 0] = boxed.cell[1, 1] = 30.0
    model = tiny()
    results = []
    for atoms in (wire, boxed):
        atoms.calc = Calculator(model)
        results.append((atoms.get_potential_energy(), atoms.get_forces()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-9)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-9)
    np.testing.assert_allclose(boxed.get_stress(), calculate_numerical_stress(boxed), atol=1e-5)
    with pytest.raises(PropertyNotImplementedError, match="stress needs a cell with a volume"):
        wire.get_stress()


def test_skewed_basis_of_a_cell_gives_the_same_results(rng, tmp_path):
    """A crystal written in a skewed basis of its lattice (b -> b + 12 a, c -> c - 9 a: faces < 0.4 Å apart,
    refused before as "thinner than any crystal"), a slab likewise, and a slab with a slanted vacuum vector: the
    ordinary basis' energy, forces and
    stress through the calculator (model object and exported file), predict and the C++ core; the core's
    neighbor list gives ASE's edges in the caller's basis."""
    from ase.neighborlist import primitive_neighbor_list

    from engine.export import export_model
    from engine.exported import core_available, load_core, neighbor_list

    model = tiny()
    export_model(model, str(tmp_path / "model.pt"))
    crystal, slab = periodic(rng, 8), periodic(rng, 6)
    slab.pbc = [True, True, False]
    # the last: a slab whose vacuum vector leans along a periodic one (c -> c + 12 a), no periodic vector skewed
    for atoms, u in ((crystal, [[1, 0, 0], [12, 1, 0], [-9, 0, 1]]), (slab, [[1, 0, 0], [11, 1, 0], [0, 0, 1]]),
                     (slab, [[1, 0, 0], [0, 1, 0], [12, 0, 1]])):
        skewed = atoms.copy()
        skewed.set_cell(np.array(u) @ atoms.cell[:], scale_atoms=False)
        assert float(cell_heights(torch.as_tensor(skewed.cell[:]))[:2].min()) < 0.4  # refused before
        def results(calc, a):
            a = a.copy()
            a.calc = calc
            return {"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress()}

        for source in (model, str(tmp_path / "model.pt")):
            calc = Calculator(source)
            want, got = results(calc, atoms), results(calc, skewed)
            assert got["energy"] == pytest.approx(want["energy"], abs=1e-9)
            np.testing.assert_allclose(got["forces"], want["forces"], atol=1e-9)
            np.testing.assert_allclose(got["stress"], want["stress"], atol=1e-10)
            (one,) = calc.predict([skewed], stress=True)
            assert one["energy"] == pytest.approx(want["energy"], abs=1e-9)
        if core_available():
            core = load_core(str(tmp_path / "model.pt"))
            want, got = core.compute_atoms(atoms), core.compute_atoms(skewed)
            assert got["energy"] == pytest.approx(want["energy"], abs=1e-9)
            np.testing.assert_allclose(got["forces"], want["forces"], atol=1e-9)
            edges, shifts = neighbor_list(skewed.positions, skewed.cell[:], skewed.pbc, 3.0)
            i, j, S = primitive_neighbor_list("ijS", skewed.pbc, skewed.cell[:], skewed.positions, 3.0)
            assert sorted(zip(edges[0].tolist(), edges[1].tolist(), map(tuple, np.asarray(shifts).tolist()))) \
                == sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


def test_float32_keeps_its_precision_far_from_the_origin(rng):
    """ASE MD never wraps positions: a periodic structure unwrapped by up to 1000 lattice vectors, and a
    molecule 10^4 Å from the origin, give float32 forces and stress as close to float64 as at the origin
    (they used to lose two digits in the float32 edge vectors: 2e-4..2e-3 eV/Å)."""
    model = tiny()
    base = periodic(rng)
    far = base.copy()
    far.positions += rng.integers(-1000, 1000, (len(far), 3)) @ far.cell[:]
    mol = molecule_perturbed("CH3OH", rng)
    distant = mol.copy()
    distant.positions += 1.0e4
    for near, moved in ((base, far), (mol, distant)):
        want = Calculator(model, dtype=torch.float64)
        got = Calculator(model, dtype=torch.float32)
        props = ["energy", "forces"] + (["stress"] if near.pbc.any() else [])
        want.calculate(near, props)
        got.calculate(moved, props)
        # totals of ~-10^3..10^4 eV (atom_ref): float32 rounds them to ~1e-3 eV wherever the atoms are
        assert got.results["energy"] == pytest.approx(want.results["energy"], rel=1e-6)
        # float32 rounding alone: up to ~1e-5 eV/Å here; unrecentred, 1000 cells out: ~2e-3
        np.testing.assert_allclose(got.results["forces"], want.results["forces"], rtol=1e-5, atol=3e-5)
        np.testing.assert_allclose(got.results["energies"], want.results["energies"], rtol=1e-6, atol=1e-4)
        if near.pbc.any():
            np.testing.assert_allclose(got.results["stress"], want.results["stress"], atol=1e-6)
    # each calculator cast its own copy: the caller's model (shared by both) is untouched
    assert all(p.dtype == torch.float64 and p.requires_grad for p in model.parameters())


def test_nan_from_the_model_is_an_error(rng):
    """Damaged weights make NaN energies: an error naming it, not numbers an MD run carries on with."""
    model = tiny()
    with torch.no_grad():
        model.readout[0].weight.fill_(float("nan"))
    atoms = molecule_perturbed("CH3OH", rng)
    atoms.calc = Calculator(model)
    with pytest.raises(HessforgeError, match="returned NaN or Inf"):
        atoms.get_potential_energy()


def test_overlapping_atoms_are_refused(rng):
    """An atom written twice (or onto another's periodic image) gave finite nonsense through the students'
    safe norm; it is one error naming the atoms, in the structure's own numbering. Close is not coincident."""
    calc = Calculator(tiny())
    twice = molecule_perturbed("CH3OH", rng)
    k = int(rng.integers(len(twice)))
    twice += twice[k : k + 1]
    with pytest.raises(HessforgeError, match=rf"atoms {k} \(Z=\d\) and {len(twice) - 1} \(Z=\d\) are 0 Å apart: "
                                             "overlapping atoms"):
        calc.get_potential_energy(twice)
    crystal = periodic(rng)
    image = crystal[:1].copy()
    image.positions += crystal.cell[int(rng.integers(3))]  # the first atom's periodic image, in another atom
    crystal += image
    with pytest.raises(HessforgeError, match=r"and 7 \(Z=\d\) are [0-9.e-]+ Å apart: overlapping"):
        calc.get_potential_energy(crystal)
    # a batch: the second structure's atoms are named in its own numbering, the structure by its formula
    from engine.graph import graph_from_atoms

    with pytest.raises(HessforgeError, match=rf"^structure 1 \({twice.get_chemical_formula()}\): atoms {k} "):
        graph_from_atoms([molecule("CH4"), twice], 3.0)
    close = molecule_perturbed("CH3OH", rng)
    u = rng.normal(size=3)
    close.positions[1] = close.positions[0] + 0.02 * u / np.linalg.norm(u)
    assert np.isfinite(calc.get_potential_energy(close))


@pytest.mark.parametrize("kind", ["object", "exported"])
def test_predict_many_structures_equals_the_calculator_one_by_one(rng, tmp_path, kind):
    """Calculator.predict: screening without an ASE call per structure; grouped model calls (or one) give each
    structure the calculator's own energy, per-atom energies, forces and stress (None where calculate refuses it)."""
    model = tiny()
    if kind == "exported":
        from engine.export import export_model

        export_model(model, str(tmp_path / "model.pt"))
        model = str(tmp_path / "model.pt")
    calc = Calculator(model)
    structures = [molecule_perturbed("CH3OH", rng), periodic(rng), molecule_perturbed("H2O", rng), periodic(rng, 4)]
    wire = periodic(rng, 5)
    wire.pbc = [True, False, False]  # vacuum vectors along y and z: a volume, so a stress
    bare_wire = wire.copy()
    bare_wire.cell[1] = bare_wire.cell[2] = 0.0  # no volume: no stress (calculate refuses it)
    structures += [wire, bare_wire]
    expected = []
    for a in structures:
        b = a.copy()
        b.calc = calc
        row = {"energy": b.get_potential_energy(), "energies": b.get_potential_energies(), "forces": b.get_forces()}
        try:
            row["stress"] = b.get_stress()
        except PropertyNotImplementedError:
            row["stress"] = None
        expected.append(row)
    assert [e["stress"] is None for e in expected] == [True, False, True, False, False, True]
    for per_call in (0, 8, 1):
        got = calc.predict(structures, stress=True, max_atoms_per_call=per_call)
        assert len(got) == len(structures)
        for g, e in zip(got, expected):
            assert g["energy"] == pytest.approx(e["energy"], abs=1e-9)
            np.testing.assert_allclose(g["energies"], e["energies"], atol=1e-9)
            np.testing.assert_allclose(g["forces"], e["forces"], atol=1e-9)
            if e["stress"] is None:
                assert g["stress"] is None
            else:
                np.testing.assert_allclose(g["stress"], e["stress"], atol=1e-10)
    assert "stress" not in calc.predict(structures[:1])[0]
    with pytest.raises(HessforgeError, match=r"structure 2 \(H3N\): unknown element"):
        calc.predict([molecule("CH4"), molecule("H2O"), molecule("NH3")])
    with pytest.raises(HessforgeError, match=r"structure 1 \(empty\): no atoms"):
        calc.predict([molecule("CH4"), Atoms()])
    with pytest.raises(HessforgeError, match="empty list"):
        calc.predict([])
    one = calc.predict(structures[1], stress=True)  # one Atoms: a list of one (it was iterated atom by atom)
    assert len(one) == 1 and one[0]["energy"] == pytest.approx(expected[1]["energy"], abs=1e-9)
    with pytest.raises(HessforgeError, match="structure 1 is a str, not an ase.Atoms"):
        calc.predict([molecule("CH4"), "H2O"])
    with pytest.raises(PropertyNotImplementedError, match="direct-force"):
        Calculator(tiny("direct")).predict(structures, stress=True)
