"""Teacher adapters: energies in eV, forces = -dE/dr, Hessian rows = -dF/dr (autograd vs finite differences).

Geometries are perturbed with a fresh random seed each run (printed in assertion messages) so the checks do
not pass by accident on one lucky structure.
"""
import contextlib
import os
import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.units import Hartree

from engine.errors import HessforgeError, UnknownElementError
from training.teachers import TEACHERS, load_teacher
from training.teachers.base import teacher_calculator
from training.teachers.finite_difference import FiniteDifferenceTeacher

warnings.filterwarnings("ignore", category=UserWarning)

SEED = int.from_bytes(os.urandom(4), "little")


def perturbed(name, scale=0.05, seed_offset=0):
    atoms = molecule(name)
    rng = np.random.default_rng(SEED + seed_offset)
    atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
    return atoms


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def fd_rows_of(teacher, atoms, rows, h=1e-4):
    """Central differences of the teacher's OWN forces (through an ASE calculator wrapper).

    h=1e-4 Å: float64 round-off is still negligible and the O(h²) error stays small on rattled geometries."""
    return FiniteDifferenceTeacher(teacher_calculator(teacher), h=h).compute(atoms, rows).hessian_rows


def fd_forces_from_energy(teacher, atoms, h=1e-4):
    pos0 = atoms.get_positions()
    f = np.zeros(pos0.size)
    for j in range(pos0.size):
        e = []
        for s in (+1, -1):
            a = atoms.copy()
            p = pos0.reshape(-1).copy()
            p[j] += s * h
            a.set_positions(p.reshape(-1, 3))
            e.append(teacher.compute(a).energy)
        f[j] = -(e[0] - e[1]) / (2 * h)
    return f.reshape(-1, 3)


def check_teacher_derivatives(teacher, atoms, tol=1e-5, h=1e-4, h_rows=None):
    n3 = 3 * len(atoms)
    out = teacher.compute(atoms, rows=np.arange(n3))
    assert out.hessian_rows.shape == (n3, n3) and out.hessian_rows.dtype == np.float64
    assert out.forces.shape == (len(atoms), 3) and out.forces.dtype == np.float64
    assert np.array_equal(out.rows, np.arange(n3))
    hess = out.hessian_rows
    assert rel_err(hess, hess.T) < 1e-10, f"seed {SEED}: Hessian not symmetric"
    assert rel_err(out.forces, fd_forces_from_energy(teacher, atoms, h)) < tol, f"seed {SEED}: forces != -dE/dr"
    rows = np.random.default_rng(SEED).choice(n3, size=5, replace=False)
    fd = fd_rows_of(teacher, atoms, rows, h_rows or h)
    assert rel_err(hess[rows], fd) < tol, f"seed {SEED}: autograd rows {rows} differ from FD"
    return out


def check_rows_order_and_range(teacher, atoms, full):
    n3 = 3 * len(atoms)
    rows = np.random.default_rng(SEED + 1).permutation(n3)[:4]
    out = teacher.compute(atoms, rows=list(rows))
    assert np.array_equal(out.rows, rows)
    np.testing.assert_allclose(out.hessian_rows, full.hessian_rows[rows], rtol=1e-9, atol=1e-9)
    assert out.hessian_rows.shape == (4, n3)
    for bad in ([n3], [0, -1]):
        with pytest.raises(HessforgeError, match="out of range"):
            teacher.compute(atoms, rows=bad)
    empty = teacher.compute(atoms, rows=[])
    assert empty.hessian_rows.shape == (0, n3)


def check_bad_model_files(teacher_name, tmp_path):
    """A missing file and a file that is not a model: one clear error each, naming the problem."""
    with pytest.raises(HessforgeError, match="not found"):
        load_teacher(f"{teacher_name}:{tmp_path / 'missing.model'}")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(HessforgeError, match="cannot load"):
        load_teacher(f"{teacher_name}:{junk}")
    import torch

    not_a_model = tmp_path / "tensor.model"
    torch.save(torch.zeros(3), not_a_model)
    with pytest.raises(HessforgeError, match="not a .* model"):
        load_teacher(f"{teacher_name}:{not_a_model}")


# ---------------------------------------------------------------- MACE


@pytest.fixture(scope="module")
def mace_model_file(tmp_path_factory):
    import torch

    from toy import small_mace_model

    model = small_mace_model(SEED)  # float32 like released models: the adapter must cast to float64
    path = tmp_path_factory.mktemp("mace") / "small.model"
    torch.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def mace_teacher(mace_model_file):
    return load_teacher(f"mace:{mace_model_file}")


def test_mace_derivatives_and_rows(mace_teacher):
    assert mace_teacher.elements == frozenset({1, 6, 7, 8})
    atoms = perturbed("CH3CONH2")
    full = check_teacher_derivatives(mace_teacher, atoms)
    check_rows_order_and_range(mace_teacher, atoms, full)
    assert np.isfinite(full.energy) and full.energy < -1000  # E0s included, in eV


def test_mace_unknown_element_and_bad_files(mace_teacher, tmp_path):
    with pytest.raises(UnknownElementError, match=r"S \(Z=16\)"):
        mace_teacher.compute(molecule("CH3SH"))
    check_bad_model_files("mace", tmp_path)


# ---------------------------------------------------------------- ANI-1x


@pytest.fixture(scope="module")
def ani_single():
    return load_teacher("ani1x:%d" % (SEED % 8))


@pytest.fixture(scope="module")
def ani_ensemble():
    return load_teacher("ani1x")


def torchani_reference_hartree(atoms, model_index):
    """Energy by torchani's own BuiltinModel/BuiltinEnsemble classes (float32), independent of our adapter."""
    import torch
    import torchani
    from torchani import neurochem

    from training.teachers.ani import ani1x_resource_dir

    d = ani1x_resource_dir()
    consts = neurochem.Constants(os.path.join(d, "rHCNO-5.2R_16-3.5A_a4-8.params"))
    shifter, sae = neurochem.load_sae(os.path.join(d, "sae_linfit.dat"), return_dict=True)
    if model_index is None:
        nets = neurochem.load_model_ensemble(consts.species, os.path.join(d, "train"), 8)
        cls = torchani.models.BuiltinEnsemble
    else:
        nets = neurochem.load_model(consts.species, os.path.join(d, f"train{model_index}", "networks"))
        cls = torchani.models.BuiltinModel
    model = cls(torchani.SpeciesConverter(consts.species), torchani.AEVComputer(**consts), nets, shifter,
                consts.species_to_tensor, consts, sae, True)
    species = torch.tensor(atoms.numbers)[None]
    coords = torch.tensor(atoms.positions, dtype=torch.float32)[None]
    return float(model((species, coords)).energies)


@pytest.mark.parametrize("which", ["single", "ensemble"])
def test_ani_derivatives_rows_and_units(which, ani_single, ani_ensemble):
    teacher = ani_single if which == "single" else ani_ensemble
    atoms = perturbed("CH3OH", seed_offset=7)
    # ANI's CELU activations make the Hessian piecewise continuous (CELU'' jumps from 1/alpha to 0 at 0):
    # an FD step that moves a neuron across 0 mixes two sides. Measured on rattled CH3OH (ensemble):
    # FD vs autograd max rel. error ~1e-2 at h=1e-3, 1e-4..1e-2 at 1e-4, 1e-8 (3 of 15 at 1e-4) at 1e-5,
    # ~1e-9 at 1e-6. A kink can still sit within 1e-6 Å of a random geometry (seen once: rows of one atom off
    # by 1e-4 at h=1e-6, 2e-5 at 3e-7, 1e-9 at 1e-7), so rows are compared at h=1e-7, where float64 round-off
    # is still ~1e-9 of the Hessian; forces (central differences of the energy) at h=1e-6.
    full = check_teacher_derivatives(teacher, atoms, h=1e-6, h_rows=1e-7)
    check_rows_order_and_range(teacher, atoms, full)
    ref = torchani_reference_hartree(atoms, teacher.model_index)
    assert abs(full.energy - ref * Hartree) < 2e-3, f"seed {SEED}: energy not torchani Hartree * {Hartree}"


def test_ani_periodic_structures_use_their_cell(ani_single):
    """ANI labels of periodic structures: an atom moved by a lattice vector gives the molecule's own
    numbers (it used to be read as a broken molecule: 0.1 eV and 1.5 eV/Å off); a cell small enough for the
    atoms to see their images gives other numbers, and a 2x1x1 supercell twice the energy, the same forces."""
    water = perturbed("H2O", seed_offset=3)
    water.positions += 5.0
    alone = ani_single.compute(water, rows=[0, 4, 8])
    boxed = water.copy()
    boxed.cell, boxed.pbc = np.eye(3) * 10.0, True
    boxed.positions[1] += [10.0, 0.0, -10.0]
    wrapped = ani_single.compute(boxed, rows=[0, 4, 8])
    assert abs(wrapped.energy - alone.energy) < 1e-9
    np.testing.assert_allclose(wrapped.forces, alone.forces, atol=1e-9)
    np.testing.assert_allclose(wrapped.hessian_rows, alone.hessian_rows, atol=1e-8)
    np.testing.assert_allclose(ani_single.atomic_features(boxed), ani_single.atomic_features(water), atol=1e-9)
    small = water.copy()
    small.cell, small.pbc = np.diag([3.1, 3.3, 3.6]), True
    cell = ani_single.compute(small)
    # the images change the forces by ~1 eV/Å; the energy change can cancel by chance (0.8 meV in one CI run)
    assert np.abs(cell.forces - alone.forces).max() > 0.1, f"seed {SEED}"
    double = ani_single.compute(small.repeat((2, 1, 1)))
    assert abs(double.energy - 2 * cell.energy) < 1e-6
    np.testing.assert_allclose(double.forces, np.tile(cell.forces, (2, 1)), atol=1e-6)
    # the same lattice in a skewed basis (faces 0.26 Å apart: refused before as thinner than any crystal)
    skewed = small.copy()
    skewed.set_cell(np.array([[1, 0, 0], [12, 1, 0], [0, 0, 1]]) @ small.cell[:], scale_atoms=False)
    a, b = ani_single.compute(small, rows=[0, 4]), ani_single.compute(skewed, rows=[0, 4])
    assert abs(a.energy - b.energy) < 1e-9
    np.testing.assert_allclose(b.forces, a.forces, atol=1e-9)
    np.testing.assert_allclose(b.hessian_rows, a.hessian_rows, atol=1e-8)
    assert a.stress is not None and np.abs(a.stress).max() > 1e-4
    np.testing.assert_allclose(b.stress, a.stress, atol=1e-9)


def test_ani_matches_its_level_of_theory(ani_ensemble):
    # ωB97x/6-31G(d) with Gaussian's Cartesian d shells (pyscf 2.14, RKS density fitting, cart=True) energy of
    # ase's g2 ethanol: -154.99004 Ha (pure d shells: -154.98787, 2.2 mHa higher). ANI-1x was fitted to this
    # level: the ensemble is 0.1 mHa off it; a wrong SAE table, unit or basis convention misses by more.
    e = ani_ensemble.compute(molecule("CH3CH2OH")).energy
    assert abs(e / Hartree - (-154.99004252929902)) < 5e-4


def test_ani_ensemble_is_mean_of_members(ani_ensemble):
    atoms = perturbed("CH3CHO", seed_offset=3)
    members = [load_teacher(f"ani1x:{i}").compute(atoms, rows=[0, 4]) for i in range(8)]
    ens = ani_ensemble.compute(atoms, rows=[0, 4])
    np.testing.assert_allclose(ens.energy, np.mean([m.energy for m in members]), rtol=1e-12)
    np.testing.assert_allclose(ens.forces, np.mean([m.forces for m in members], axis=0), atol=1e-9)
    np.testing.assert_allclose(ens.hessian_rows, np.mean([m.hessian_rows for m in members], axis=0), atol=1e-8)


def test_ani_unknown_element_and_bad_specs(ani_single):
    with pytest.raises(UnknownElementError, match=r"Cl \(Z=17\).*supported: H, C, N, O"):
        ani_single.compute(molecule("CH3Cl"))
    with pytest.raises(HessforgeError, match="0..7"):
        load_teacher("ani1x:8")
    with pytest.raises(HessforgeError, match="integer"):
        load_teacher("ani1x:first")
    with pytest.raises(HessforgeError, match="unknown teacher"):
        load_teacher("schnet")
    assert {"ani1x", "mace"} <= set(TEACHERS)
    bad = molecule("CH4")
    bad.positions[0, 0] = np.nan
    with pytest.raises(HessforgeError, match="NaN"):
        ani_single.compute(bad)


def test_ani_hidden_features_reproduce_energy(ani_single):
    import torch

    atoms = perturbed("HCOOH", seed_offset=11)
    feats = ani_single.atomic_features(atoms)
    assert feats.shape == (len(atoms), 96)
    # last Linear of each element network on the features + self energies = the model energy
    e = 0.0
    for k, z in enumerate(atoms.numbers):
        idx = ani_single.species.index({1: "H", 6: "C", 7: "N", 8: "O"}[int(z)])
        net = list(ani_single.nets.values())[idx]
        e += float(net[-1](torch.tensor(feats[k:k + 1]))) + float(ani_single.shifter.self_energies[idx])
    assert abs(e * Hartree - ani_single.compute(atoms).energy) < 1e-8


# ---------------------------------------------------------------- finite differences


def lj_hessian(pos, eps, sigma):
    """Analytic Hessian of the (unshifted, uncut) Lennard-Jones pair sum."""
    n = len(pos)
    h = np.zeros((n, 3, n, 3))
    for i in range(n):
        for j in range(i + 1, n):
            d = pos[j] - pos[i]
            r = np.linalg.norm(d)
            u = d / r
            sr6 = (sigma / r) ** 6
            d1 = 4 * eps * (-12 * sr6 ** 2 + 6 * sr6) / r
            d2 = 4 * eps * (156 * sr6 ** 2 - 42 * sr6) / r ** 2
            k = d2 * np.outer(u, u) + d1 / r * (np.eye(3) - np.outer(u, u))
            h[i, :, i, :] += k
            h[j, :, j, :] += k
            h[i, :, j, :] -= k
            h[j, :, i, :] -= k
    return h.reshape(3 * n, 3 * n)


def test_fd_teacher_on_lennard_jones():
    from ase.calculators.lj import LennardJones

    rng = np.random.default_rng(SEED)
    eps, sigma = 0.0104, 3.4
    pos = rng.uniform(0, 7.0, size=(6, 3))
    while min(np.linalg.norm(pos[i] - pos[j]) for i in range(6) for j in range(i)) < 3.2:  # no overlaps
        pos = rng.uniform(0, 7.0, size=(6, 3))
    atoms = Atoms("Ar6", positions=pos)
    teacher = FiniteDifferenceTeacher(LennardJones(epsilon=eps, sigma=sigma, rc=100.0), h=1e-3)
    rows = rng.permutation(18)[:6]
    out = teacher.compute(atoms, rows=rows)
    exact = lj_hessian(pos, eps, sigma)
    assert np.array_equal(out.rows, rows)
    assert rel_err(out.hessian_rows, exact[rows]) < 1e-5, f"seed {SEED}"
    # constraints are for dynamics, not for the potential's Hessian: a fixed atom's rows are still its rows
    from ase.constraints import FixAtoms

    fixed = atoms.copy()
    fixed.set_constraint(FixAtoms(indices=[int(rows[0]) // 3]))
    pinned = teacher.compute(fixed, rows=rows)
    np.testing.assert_array_equal(pinned.hessian_rows, out.hessian_rows)
    np.testing.assert_array_equal(pinned.forces, out.forces)
    with pytest.raises(HessforgeError, match="out of range"):
        teacher.compute(atoms, rows=[18])
    with pytest.raises(HessforgeError, match="step"):
        FiniteDifferenceTeacher(LennardJones(), h=0)


def test_fd_teacher_on_ani_calculator_matches_autograd(ani_single):
    from training.teachers.ani import ani1x_calculator

    atoms = perturbed("CH3OH", seed_offset=5)
    rows = np.random.default_rng(SEED + 2).permutation(18)[:4]
    # h=1e-7, not the default 1e-3: see the CELU note in test_ani_derivatives_rows_and_units (seed 2527178045,
    # model 5: rel. error 8e-3 at h=1e-5, 8e-4 at 1e-6, 1.5e-9 at 3e-7, 1.3e-9 at 1e-7)
    fd = FiniteDifferenceTeacher(ani1x_calculator(ani_single.model_index), h=1e-7).compute(atoms, rows=rows)
    ad = ani_single.compute(atoms, rows=rows)
    assert abs(fd.energy - ad.energy) < 1e-9
    np.testing.assert_allclose(fd.forces, ad.forces, atol=1e-9)
    assert rel_err(fd.hessian_rows, ad.hessian_rows) < 1e-5, f"seed {SEED}"


def test_rows_use_one_batched_backward_and_fallback_agrees(ani_single, mace_teacher, monkeypatch):
    import torch

    import training.teachers.base as base

    atoms = perturbed("CH3OH", seed_offset=13)
    rows = np.random.default_rng(SEED + 3).permutation(18)[:6]

    def no_loop(*a, **k):
        raise AssertionError("row-by-row fallback used although the batched backward should work")

    with monkeypatch.context() as m:
        m.setattr(base, "_grad_or_zeros", no_loop)
        batched = [t.compute(atoms, rows=rows).hessian_rows for t in (ani_single, mace_teacher)]

    real_grad = torch.autograd.grad

    def grad_without_batching(*a, **k):
        if k.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented (simulated)")
        return real_grad(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.autograd, "grad", grad_without_batching)
        looped = [t.compute(atoms, rows=rows).hessian_rows for t in (ani_single, mace_teacher)]
    for b, l in zip(batched, looped):
        np.testing.assert_allclose(b, l, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- SO3LR (weights bundled in so3krates-torch)


@pytest.fixture(scope="module")
def so3lr_teacher():
    return load_teacher("so3lr")


def test_so3lr_derivatives_and_rows(so3lr_teacher):
    atoms = perturbed("CH3CONH2", seed_offset=21)
    full = check_teacher_derivatives(so3lr_teacher, atoms)
    check_rows_order_and_range(so3lr_teacher, atoms, full)
    assert so3lr_teacher.relative_energies  # its absolute energies carry no per-element reference


@contextlib.contextmanager
def so3lr_reference_calculator(teacher, r_max_lr, compute_stress=False):
    """so3krates-torch's own ASE calculator, in float64. It works only while torch's global default dtype is
    the model's (it sets it itself); restored afterwards, since other tests expect float32."""
    import torch
    from so3krates_torch.calculator.so3 import TorchkratesCalculator

    default = torch.get_default_dtype()
    try:
        yield TorchkratesCalculator(model_paths=teacher.path, r_max_lr=r_max_lr,
                                    dispersion_energy_cutoff_lr_damping=2.0, default_dtype="float64",
                                    compute_stress=compute_stress)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("periodic", [False, True])
def test_so3lr_matches_the_packages_own_calculator(so3lr_teacher, periodic):
    """Energy, forces and Hessian rows (and in the periodic cell the stress) equal so3krates-torch's ASE
    calculator at the authors' long-range settings: 1000 Å in vacuum, 12 Å in a (here triclinic) periodic cell.
    The water sits 9 Å from the ethanol, where the two cutoffs give different electrostatics."""
    atoms = perturbed("CH3CH2OH", seed_offset=22)
    if not periodic:
        water = perturbed("H2O", seed_offset=25)
        water.positions += [9.0, 0.0, 0.0]
        atoms += water
    if periodic:
        atoms.set_cell([[7.0, 0, 0], [1.0, 7.5, 0], [0.5, 0.3, 8.0]])
        atoms.pbc = True
        atoms.wrap()
    n3 = 3 * len(atoms)
    rows = np.random.default_rng(SEED + 4).permutation(n3)[:5]
    out = so3lr_teacher.compute(atoms, rows=rows)
    with so3lr_reference_calculator(so3lr_teacher, 12.0 if periodic else 1000.0, compute_stress=periodic) as calc:
        ref = atoms.copy()
        ref.calc = calc
        energy, forces = ref.get_potential_energy(), ref.get_forces()
        hess = calc.get_hessian(ref).reshape(n3, n3)
        stress = ref.get_stress(voigt=False) if periodic else None
    assert abs(out.energy - energy) < 1e-6
    np.testing.assert_allclose(out.forces, forces, atol=1e-6)
    np.testing.assert_allclose(out.hessian_rows, hess[rows], atol=1e-6)
    if periodic:
        assert np.abs(stress).max() > 1e-3
        np.testing.assert_allclose(out.stress, stress, atol=1e-9)
    else:
        assert out.stress is None


def test_so3lr_periodic_images_and_charge(so3lr_teacher):
    atoms = perturbed("CH3OH", seed_offset=23)
    atoms.set_cell([6.0, 6.5, 7.0])
    atoms.pbc = True
    e = so3lr_teacher.compute(atoms).energy
    shifted = atoms.copy()
    shifted.positions[2] += shifted.cell[1]  # the same crystal: one atom moved to a periodic image
    assert abs(so3lr_teacher.compute(shifted).energy - e) < 1e-8
    vacuum = atoms.copy()
    vacuum.pbc = False
    assert abs(so3lr_teacher.compute(vacuum).energy - e) > 1e-4  # the images interact
    cation = vacuum.copy()
    cation.info["charge"] = 1
    assert abs(so3lr_teacher.compute(cation).energy - so3lr_teacher.compute(vacuum).energy) > 1e-3
    cation.info["charge"] = 0.5
    import torch

    before = torch.get_default_dtype()
    with pytest.raises(HessforgeError, match="charge must be an integer"):
        so3lr_teacher.compute(cation)
    assert torch.get_default_dtype() == before  # the error left the process in float64 (a leak into later tests)


def test_so3lr_features_elements_and_bad_files(so3lr_teacher, tmp_path):
    import torch

    atoms = perturbed("CH3CHO", seed_offset=24)
    feats = so3lr_teacher.atomic_features(atoms)
    assert feats.shape == (len(atoms), 128) and np.all(np.isfinite(feats))
    table = so3lr_teacher.element_embeddings()
    assert set(table) == set(so3lr_teacher.elements) and {1, 6, 7, 8, 16, 17} <= set(table)
    one_hot = torch.zeros(1, 118, dtype=torch.float64)
    one_hot[0, 7] = 1.0  # oxygen
    expected = so3lr_teacher.model.inv_feature_embedding(one_hot)[0].detach().numpy()
    np.testing.assert_allclose(table[8], expected, rtol=1e-12)
    with pytest.raises(UnknownElementError, match=r"Si \(Z=14\)"):
        so3lr_teacher.compute(molecule("SiH4"))
    check_bad_model_files("so3lr", tmp_path)


# ---------------------------------------------------------------- CHGNet (weights bundled in chgnet)


@pytest.fixture(scope="module")
def chgnet_teacher():
    return load_teacher("chgnet")


def rattled_crystal(seed_offset=0):
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.03, seed=(SEED + seed_offset) % 2**31)
    return atoms


def test_chgnet_energy_is_total_and_rows_are_physical(chgnet_teacher):
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = rattled_crystal()
    n3 = 3 * len(atoms)
    out = chgnet_teacher.compute(atoms, rows=np.arange(n3))
    # CHGNet predicts energy per atom; the teacher protocol is the total energy in eV
    per_atom = chgnet_teacher.model.predict_structure(AseAtomsAdaptor.get_structure(atoms), task="e")["e"]
    assert abs(out.energy - float(per_atom) * len(atoms)) < 1e-3 * len(atoms)
    h = out.hessian_rows
    scale = np.abs(h).max()
    assert np.abs(h - h.T).max() < 0.1 * scale  # symmetric up to float32 CHGNet's own roughness (module docstring)
    # translating the whole crystal changes nothing: every row sums to zero over the atoms, per axis
    sums = h.reshape(n3, len(atoms), 3).sum(axis=1)
    assert np.abs(sums).max() < 0.05 * scale, f"seed {SEED}"
    rows = np.random.default_rng(SEED + 5).permutation(n3)[:3]
    np.testing.assert_allclose(chgnet_teacher.compute(atoms, rows=rows).hessian_rows, h[rows], atol=1e-9)


def test_chgnet_refuses_what_it_cannot_label(chgnet_teacher):
    with pytest.raises(HessforgeError, match="crystal model"):
        chgnet_teacher.compute(molecule("H2O"))
    lonely = Atoms("Si2", positions=[[0, 0, 0], [6, 6, 6]], cell=[12, 12, 12], pbc=True)
    with pytest.raises(HessforgeError, match="isolated"):
        chgnet_teacher.compute(lonely)
    with pytest.raises(HessforgeError, match="unknown CHGNet model"):
        load_teacher("chgnet:9.9")
    feats = chgnet_teacher.atomic_features(rattled_crystal(1))
    assert feats.shape == (8, 64) and np.all(np.isfinite(feats))
    emb = chgnet_teacher.element_embeddings()
    assert len(emb) == 94 and emb[11].shape == (64,)


def test_so3lr_labels_with_features_for_the_baselines(so3lr_teacher, tmp_path):
    """`hessforge label --teacher so3lr --features --embeddings`: the stored labels say the teacher's energies
    are relative, and hold its per-atom features and element embeddings for the n2n / a2a baselines."""
    from training.data.records import Structure
    from training.data.store import write_dataset
    from training.labels import LabelStore, label_dataset

    structures = []
    for k, name in enumerate(("CH3OH", "HCOOH")):
        a = perturbed(name, seed_offset=30 + k)
        structures.append(Structure(id=name, group=name, numbers=a.numbers.copy(), positions=a.positions.copy()))
    path = str(tmp_path / "data.lmdb")
    write_dataset(path, structures)
    label_dataset(path, so3lr_teacher, str(tmp_path / "labels"), rows=2, features=True, embeddings=True,
                  teacher_spec="so3lr")
    store = LabelStore(str(tmp_path / "labels"))
    assert store.relative_energies and store.metadata["teacher"] == "so3lr"
    assert store.metadata["teacher_file_sha256"]  # the bundled weights file, hashed
    assert store.feature_dim == 128
    assert set(store.element_embeddings()) == set(so3lr_teacher.elements)
    rec = store.get("HCOOH")
    direct = so3lr_teacher.compute(structures[1].to_atoms(), rows=rec.rows)
    np.testing.assert_allclose(rec.hessian_rows, direct.hessian_rows, rtol=1e-5, atol=1e-5)  # float32 storage
    assert rec.features.shape == (5, 128)


def test_foundation_teachers_check_cells_like_the_engine(so3lr_teacher, chgnet_teacher):
    """A periodic cell without volume is refused by the engine's criterion, which completes the zero vectors
    of a slab's non-periodic direction: a slab is accepted."""
    flat = molecule("H2O")
    flat.cell, flat.pbc = [[1.0, 0, 0], [2.0, 0, 0], [0, 0, 3.0]], True
    for teacher in (so3lr_teacher, chgnet_teacher):
        with pytest.raises(HessforgeError, match="zero volume"):
            teacher.compute(flat)
    slab = perturbed("H2O", seed_offset=40)
    slab.cell, slab.pbc = [[6.0, 0, 0], [0, 6.0, 0], [0, 0, 0]], [True, True, False]
    assert np.isfinite(so3lr_teacher.compute(slab).energy)
