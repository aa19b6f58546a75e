"""Stress end to end: the batched strain derivative of students (engine.stress) against finite differences of the
energy under strain, the stress loss and its parameter gradient, stress in datasets (ingest: Voigt, 3x3, virial,
units), teachers' stress against their own finite differences, labels, training and evaluation."""
import dataclasses
import importlib.util
import json
import warnings

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from engine.errors import HessforgeError
from engine.graph import build_graph, edge_vector_graph, edge_vectors
from engine.models import STUDENTS, build_student
from engine.stress import atom_virials, energy_forces_strain_derivative, stress_from_strain_derivative
from training.config import config_from_dict
from training.data.batch import collate
from training.data.ingest import ingest
from training.data.records import Structure
from training.data.store import Dataset, write_dataset
from training.labels import LabelStore, label_dataset
from training.losses import LossWeights, compute_loss
from training.teachers.finite_difference import FiniteDifferenceTeacher
from toy import epoch_records

GRADIENT_STUDENTS = [name for name, cls in STUDENTS.items() if "gradient" in cls.force_modes]


def random_cell_structures(rng, count=2):
    """Random triclinic cells of a few C/O atoms (at least 1.1 Å apart), plus one molecule."""
    out = []
    for k in range(count):
        cell = np.diag(rng.uniform(3.2, 4.2, 3)) + rng.uniform(-0.5, 0.5, (3, 3)) * (1 - np.eye(3))
        shifts = (np.array(list(np.ndindex(3, 3, 3))) - 1) @ cell
        pos = []
        while len(pos) < 3 + k:
            trial = rng.uniform(0, 1, 3) @ cell
            if all(np.linalg.norm(trial - p - shifts, axis=1).min() > 1.1 for p in pos):
                pos.append(trial)
        numbers = rng.choice([6, 8], len(pos))
        out.append(Structure(id=f"cell{k}", group="cells", numbers=numbers, positions=np.array(pos), cell=cell,
                             pbc=np.ones(3, bool)))
    mol = molecule("CO2")
    out.append(Structure(id="mol", group="mol", numbers=mol.numbers, positions=mol.positions))
    return out


def student(name, rng, dtype=torch.float64):
    torch.manual_seed(int(rng.integers(2**31)))
    model = build_student(name, species=[6, 8], cutoff=3.0, hidden=8, layers=2, num_basis=6, force_mode="gradient")
    with torch.no_grad():  # a visible energy scale: random readouts give tiny energies otherwise
        model.energy_scale.fill_(3.0)
    return model.to(dtype)


def strained_energy(model, s, strain):
    g = build_graph([s.numbers], [s.positions @ strain], [s.cell @ strain], [s.pbc], model.cutoff, torch.float64)
    return float(model(g, compute_forces=False)["energy"].sum())


@pytest.mark.parametrize("name", GRADIENT_STUDENTS)
def test_batched_stress_is_the_strain_derivative(name, rng):
    """stress_b = (1/V_b) dE/dε_b for every bulk structure of a batch (central differences of the energy, with
    the neighbour list rebuilt at each strain), the forces are the model's own, and a molecule gets NaN."""
    model = student(name, rng)
    structures = random_cell_structures(rng)
    graph = build_graph([s.numbers for s in structures], [s.positions for s in structures],
                        [s.cell for s in structures], [s.pbc for s in structures], model.cutoff, torch.float64)
    out = energy_forces_strain_derivative(model, graph)
    stress = stress_from_strain_derivative(out["dE_deps"], graph.cell).numpy()
    plain = model(graph, compute_forces=True)
    torch.testing.assert_close(out["forces"], plain["forces"], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["energy"], plain["energy"], rtol=0, atol=1e-12)
    h = 1e-5
    for b, s in enumerate(structures):
        if not s.pbc.all():
            assert np.all(np.isnan(stress[b]))
            continue
        fd = np.zeros((3, 3))
        for i in range(3):
            for j in range(3):
                e = np.zeros((3, 3))
                e[i, j] = e[j, i] = h / 2 if i != j else h  # symmetric: ε_ij = ε_ji = h/2 moves both entries
                d = strained_energy(model, s, np.eye(3) + e) - strained_energy(model, s, np.eye(3) - e)
                fd[i, j] = d / (2 * h)
        fd /= abs(np.linalg.det(s.cell))
        assert np.abs(stress[b]).max() > 1e-6  # not trivially zero: >= 10x the tolerance below (a random SchNet
        # gave 5.5e-5 eV/Å³ at seed 2852199853, under 1e-5 in 1 draw of ~6600)
        np.testing.assert_allclose(stress[b], fd, atol=1e-7 * max(1.0, np.abs(fd).max()))


@pytest.mark.parametrize("name", GRADIENT_STUDENTS)
def test_atom_virials_split_finite_difference_edge_forces(name, rng):
    """Per-atom virials against a brute-force reference: dE/dr_e of every edge by central differences of the
    energy with that one edge vector moved (the edge-vector graph), then W_i = -1/2 sum of r_e ⊗ dE/dr_e over
    the edges touching i, in a plain loop. Each structure's W_i sum to its strain-derivative virial."""
    model = student(name, rng)
    structures = random_cell_structures(rng)
    graph = build_graph([s.numbers for s in structures], [s.positions for s in structures],
                        [s.cell for s in structures], [s.pbc for s in structures], model.cutoff, torch.float64)
    got = atom_virials(model, graph).numpy()
    vectors = edge_vectors(graph).detach()

    def energy(vec):
        with torch.no_grad():
            return float(model(edge_vector_graph(graph.numbers, graph.edge_index, vec), compute_forces=False)
                         ["energy"].sum())

    h = 1e-5
    ref = np.zeros_like(got)
    for e, (i, j) in enumerate(graph.edge_index.T.tolist()):
        grad = np.zeros(3)
        for a in range(3):
            step = torch.zeros_like(vectors)
            step[e, a] = h
            grad[a] = (energy(vectors + step) - energy(vectors - step)) / (2 * h)
        w = -np.outer(vectors[e].numpy(), grad)
        ref[i] += 0.5 * w
        ref[j] += 0.5 * w
    assert np.abs(ref).max() > 1e-3  # not trivially zero
    # central differences at 1e-5 err by h^2 E'''/6: 1.3e-8 seen on CO2's 1.16 Å bonds (seed 186750523); a wrong
    # split, sign or edge is off by >= 1e-2 of the largest entry
    np.testing.assert_allclose(got, ref, atol=1e-6 * np.abs(ref).max())
    asymmetry = np.abs(got - got.transpose(0, 2, 1)).max()
    if name == "schnet":  # distances only: every dE/dr_e lies along r_e, so each r_e ⊗ dE/dr_e is symmetric
        assert asymmetry < 1e-14
    else:  # PaiNN's vector features: per atom the centroid form is not symmetric (their sums are)
        assert asymmetry > 1e-6
    dE_deps = energy_forces_strain_derivative(model, graph)["dE_deps"].numpy()
    for b in range(len(structures)):
        np.testing.assert_allclose(got[graph.batch.numpy() == b].sum(0), -dE_deps[b], atol=1e-12)


def _bulk_batch(rng, dtype=torch.float64):
    structures = random_cell_structures(rng)
    for s in structures:
        if s.pbc.all():
            s.energy, s.forces = 0.0, np.zeros((s.natoms, 3))
            s.stress = rng.normal(scale=0.01, size=(3, 3))
            s.stress = 0.5 * (s.stress + s.stress.T)
    return collate(structures, cutoff=3.0, dtype=dtype)


@pytest.mark.parametrize("kind", ["l2mae", "mse"])
def test_stress_loss_gradient_matches_finite_differences(rng, kind):
    """The stress term trains the parameters: its autograd gradient along a random parameter direction equals
    the central difference of the loss (float64), and the molecule of the batch (no stress) is left out."""
    model = student("painn", rng)
    batch = _bulk_batch(rng)
    assert batch.stress_mask.tolist() == [True, True, False]
    weights = LossWeights(energy=0.0, forces=0.0, hessian=0.0, stress=1.0, kind=kind)
    loss = compute_loss(model, batch, weights)["stress"]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # random magnitudes, signs along the gradient: the slope cannot land near zero by chance (a plain random
    # direction left |slope| < 1e-6 in 0.5 % of draws)
    direction = [torch.randn_like(p).abs() * (g.sign() if g is not None else 1.0) for p, g in zip(params, grads)]
    slope = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
    h = 1e-6

    def loss_at(t):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(t * d)
        value = float(compute_loss(model, batch, weights, training=False)["stress"])
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(t * d)
        return value

    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert abs(slope) > 1e-6
    assert slope == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_stress_path_gives_the_same_forces_and_hessian_rows(rng):
    """With loss.stress > 0 the forces and Hessian rows come from the strained graph: at zero strain they are
    those of the plain path (the KD term does not change), and the stress term is there."""
    from training.data.batch import collate as collate_batch
    from training.labels import LabelRecord

    model = student("painn", rng)
    structures = random_cell_structures(rng)[:2]
    for s in structures:
        s.energy, s.forces, s.stress = 0.0, np.zeros((s.natoms, 3)), np.zeros((3, 3))
    records = [LabelRecord(s.id, 0.0, np.zeros((s.natoms, 3)), np.arange(3 * s.natoms),
                           rng.normal(size=(3 * s.natoms, 3 * s.natoms))) for s in structures]
    batch = collate_batch(structures, records, 3.0, torch.float64, 2, torch.Generator().manual_seed(0))
    base = LossWeights(energy=1.0, forces=1.0, hessian=1.0)
    plain = compute_loss(model, batch, base, training=False)
    with_stress = compute_loss(model, batch, dataclasses.replace(base, stress=1.0), training=False)
    assert "stress" in with_stress and "stress" not in plain
    for key in ("energy", "forces", "hessian"):
        assert float(with_stress[key]) == pytest.approx(float(plain[key]), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(with_stress["_forces_pred"], plain["_forces_pred"], rtol=0, atol=1e-12)


def _cu_frames(rng, count=4):
    frames = []
    for k in range(count):
        a = bulk("Cu", "fcc", a=3.6 * (1 + 0.02 * (k - count / 2)), cubic=True)
        a.rattle(0.03, rng=rng)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        a.info["mol_id"] = f"cu{k}"
        frames.append(a)
    return frames


def test_ingest_reads_stress_in_its_units(tmp_path, rng):
    """Voigt stress from ASE's extxyz, a 3x3 virial (eV) from info, GPa with --stress-unit; a molecule's stress
    is dropped with a warning; a stress in GPa read as eV/Å³ is refused with the unit named."""
    frames = _cu_frames(rng)
    want = [a.get_stress(voigt=False) for a in frames]
    ase.io.write(tmp_path / "ev.extxyz", frames)
    assert ingest(tmp_path / "ev.extxyz", tmp_path / "ev.lmdb") == 4
    got = [s.stress for s in Dataset(tmp_path / "ev.lmdb")]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    assert np.abs(want[0]).max() > 1e-3

    gpa = []
    for a, w in zip(frames, want):
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(), forces=a.get_forces(), stress=w / units.GPa)
        gpa.append(b)
    ase.io.write(tmp_path / "gpa.extxyz", gpa)
    with pytest.raises(HessforgeError, match="stress-unit GPa"):
        ingest(tmp_path / "gpa.extxyz", tmp_path / "bad.lmdb")
    from training.cli import main

    main(["ingest", str(tmp_path / "gpa.extxyz"), "-o", str(tmp_path / "gpa.lmdb"), "--stress-unit", "GPa"])
    for g, w in zip(Dataset(tmp_path / "gpa.lmdb"), want):
        np.testing.assert_allclose(g.stress, w, rtol=1e-9, atol=1e-12)

    virial = []
    for a, w in zip(frames, want):
        b = Atoms(a.numbers, a.positions, cell=a.cell, pbc=True)
        b.info.update(energy=a.get_potential_energy(), virial=-w * a.get_volume(), mol_id=a.info["mol_id"])
        b.arrays["forces"] = a.get_forces()
        virial.append(b)
    mol = molecule("CH4")
    mol.info.update(energy=-1.0, stress=np.zeros(6))
    mol.arrays["forces"] = np.zeros((5, 3))
    ase.io.write(tmp_path / "virial.extxyz", virial + [mol])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ingest(tmp_path / "virial.extxyz", tmp_path / "virial.lmdb")
    assert any("stress of 1 frame" in str(w.message) for w in caught)
    ds = Dataset(tmp_path / "virial.lmdb")
    for g, w in zip(list(ds)[:4], want):
        np.testing.assert_allclose(g.stress, w, rtol=1e-8, atol=1e-12)
    assert ds[4].stress is None
    # the same virial frames with lengths in Bohr (virial in eV): stress = -virial / V with V converted to Å³
    # (a virial scaled as energy/length² instead of energy/length³ was off by a factor of 0.53)
    for b in virial:
        b.positions = b.positions / units.Bohr
        b.cell = b.cell[:] / units.Bohr
        b.arrays["forces"] = b.arrays["forces"] * units.Bohr  # eV/Bohr
    ase.io.write(tmp_path / "bohr.extxyz", virial)
    ingest(tmp_path / "bohr.extxyz", tmp_path / "bohr.lmdb", length_unit="bohr")
    for g, w in zip(Dataset(tmp_path / "bohr.lmdb"), want):
        np.testing.assert_allclose(g.stress, w, rtol=1e-7, atol=1e-12)


def test_teacher_stress_is_their_strain_derivative(rng, tmp_path):
    """Teachers' stress against finite differences of their own energy under strain (ASE's numerical stress):
    an ASE calculator through finite differences (EMT), ANI-1x, SO3LR and a MACE model in a periodic box."""
    from ase.calculators.fd import calculate_numerical_stress

    from training.teachers.base import teacher_calculator

    cu = bulk("Cu", "fcc", a=3.6).repeat(2)
    cu.set_cell(cu.cell[:] @ (np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))), scale_atoms=True)
    cu.rattle(0.05, rng=rng)
    out = FiniteDifferenceTeacher(EMT()).compute(cu, [0])
    ref = cu.copy()
    ref.calc = EMT()
    np.testing.assert_allclose(out.stress, calculate_numerical_stress(ref, eps=1e-6, voigt=False), atol=1e-7)

    box = molecule("CH4")
    box.set_cell(np.diag(rng.uniform(4.4, 5.0, 3)))
    box.pbc = True
    box.center()
    box.rattle(0.05, rng=rng)
    teachers = []
    from training.teachers.ani import ANI1xTeacher

    teachers.append(ANI1xTeacher(0))
    if importlib.util.find_spec("so3krates_torch") is not None:
        from training.teachers.so3lr import SO3LRTeacher

        teachers.append(SO3LRTeacher())  # both neighbour lists (short range, 12 Å long range) strained
    if importlib.util.find_spec("mace") is not None:
        from toy import small_mace_model
        from training.teachers.mace import MACETeacher

        torch.save(small_mace_model(int(rng.integers(100))), tmp_path / "small.model")
        teachers.append(MACETeacher(str(tmp_path / "small.model")))
    for teacher in teachers:
        out = teacher.compute(box, [0])
        calc_atoms = box.copy()
        calc_atoms.calc = teacher_calculator(teacher)
        fd = calculate_numerical_stress(calc_atoms, eps=1e-5, voigt=False)
        assert np.abs(fd).max() > 1e-4, teacher.name
        np.testing.assert_allclose(out.stress, fd, atol=1e-6 * max(1.0, np.abs(fd).max() * 100), err_msg=teacher.name)
        np.testing.assert_allclose(calc_atoms.get_stress(voigt=False), out.stress, atol=1e-12)  # md-eval's view
        assert teacher.compute(molecule("CH4"), [0]).stress is None  # no cell, no stress
        free = molecule("CH4")
        free.calc = teacher_calculator(teacher)
        with pytest.raises(PropertyNotImplementedError, match="periodic in all 3 directions"):
            free.get_stress()


@pytest.fixture
def cu_labelled(tmp_path, rng):
    """Teacher-only bulk Cu at several volumes, labelled by EMT (energies, forces, rows, stress)."""
    structures = []
    for k, a in enumerate(_cu_frames(rng, 8)):
        structures.append(Structure(id=f"cu{k}", group=f"cu{k}", numbers=a.numbers, positions=a.positions,
                                    cell=np.array(a.cell), pbc=np.ones(3, bool)))
    path = str(tmp_path / "cu.lmdb")
    write_dataset(path, structures)
    label_dataset(path, FiniteDifferenceTeacher(EMT(), name="emt"), str(tmp_path / "labels"), rows=2)
    return path, str(tmp_path / "labels")


def _cu_config(cu_labelled, out, **loss):
    path, labels = cu_labelled
    return config_from_dict({
        "data": {"path": path, "labels": labels, "train": 0.5, "val": 0.25, "test": 0.25},
        "model": {"hidden": 8, "layers": 1, "num_basis": 6, "cutoff": 4.0, "norm_eps": 1.0},
        "loss": {"hessian": 0.0, "energy": 10.0, **loss},
        "train": {"out": str(out), "epochs": 3, "batch_size": 2, "checkpoint_every": 1},
    })


def test_training_on_teacher_stress_and_evaluating_it(cu_labelled, tmp_path, capsys):
    """Labels hold EMT's stress; a student trained with loss.stress logs the term and its validation stress
    MAE, and `hessforge evaluate` reports the student's stress error against the teacher."""
    from training.cli import main
    from training.trainer import Trainer

    path, labels = cu_labelled
    store = LabelStore(labels)
    for k, s in enumerate(Dataset(path)):
        a = s.to_atoms()
        a.calc = EMT()
        np.testing.assert_allclose(store.get(s.id).stress, a.get_stress(voigt=False), atol=1e-12)
    summary = Trainer(_cu_config(cu_labelled, tmp_path / "run", stress=100.0)).fit()
    records = epoch_records(tmp_path / "run")
    assert all(r["train_stress"] > 0 and np.isfinite(r["val_stress_mae_gpa"]) for r in records)
    assert "stress_mae_gpa" in summary["best_val"]
    main(["evaluate", str(tmp_path / "run" / "best.pt"), path, "--labels", labels, "--json", str(tmp_path / "m.json")])
    assert "stress MAE (GPa" in capsys.readouterr().out
    result = json.load(open(tmp_path / "m.json"))
    assert result["student_vs_teacher"]["n_stress"] == 2 and np.isfinite(result["student_vs_teacher"]["stress_mae_gpa"])
    assert "stress_mae_gpa" not in result["student_vs_reference"]  # no reference stress in this dataset


def test_stress_loss_needs_targets_and_gradient_forces(cu_labelled, tmp_path, rng):
    from toy import HarmonicTeacher, conformer_dataset
    from training.trainer import Trainer

    with pytest.raises(HessforgeError, match="force_mode: gradient"):
        config = _cu_config(cu_labelled, tmp_path / "direct", stress=1.0)
        config_from_dict({**config.to_dict(), "model": {**config.to_dict()["model"], "force_mode": "direct"}})
    mol_path, _ = conformer_dataset(tmp_path / "mol.lmdb", rng)
    label_dataset(mol_path, HarmonicTeacher(), str(tmp_path / "mol_labels"), rows=2)
    config = _cu_config((mol_path, str(tmp_path / "mol_labels")), tmp_path / "mol_run", stress=1.0)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, norm_eps=None))
    with pytest.raises(HessforgeError, match="none of the .* training structures has a stress target"):
        Trainer(config)


def test_calculator_errors_come_back_as_one_clear_error():
    """A finite-difference teacher over any ASE calculator names itself and the calculator's complaint (EMT has
    no uranium) instead of a traceback from inside the calculator."""
    teacher = FiniteDifferenceTeacher(EMT(), name="emt")
    with pytest.raises(HessforgeError, match="teacher emt: calculator failed: .*U"):
        teacher.compute(Atoms("U2", positions=[[0, 0, 0], [2.5, 0, 0]]), [0])


def test_two_process_training_with_stress_reduces_validation_over_ranks(cu_labelled, tmp_path):
    """torchrun with 2 CPU processes (gloo), loss.stress on: each rank validates its half of the validation set;
    the logged validation stress MAE (sums reduced over the ranks) equals `evaluate` of best.pt in one process."""
    import os
    import subprocess
    import sys

    import yaml

    from training.data.subsets import save_split
    from training.evaluate import evaluate

    path, labels = cu_labelled
    save_split(str(tmp_path / "split.json"), {"train": [0, 1, 2, 3], "val": [4, 5, 6], "test": [7]}, count=8)
    config = _cu_config(cu_labelled, tmp_path / "ddp", stress=100.0).to_dict()
    config["data"]["split_file"] = str(tmp_path / "split.json")
    config["train"]["epochs"] = 1
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.cli", "train", str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = epoch_records(tmp_path / "ddp")[-1]
    assert record["train_stress"] > 0
    from engine.checkpoint import load_student

    model = load_student(str(tmp_path / "ddp" / "best.pt"))
    dataset = Dataset(path)
    result = evaluate(model, [dataset[i] for i in (4, 5, 6)], LabelStore(labels))
    assert record["val_stress_mae_gpa"] == pytest.approx(result["student_vs_teacher"]["stress_mae_gpa"], rel=1e-4)
