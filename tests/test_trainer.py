"""Trainer: runs, logs, checkpoints, resumes exactly, repeats with a seed, halves λ_KD, rejects bad configs."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.checkpoint import load_student
from engine.errors import HessforgeError
from training.config import config_from_dict, load_config
from training.labels import LabelStore, label_dataset
from training.trainer import Trainer
from toy import HarmonicTeacher, conformer_dataset, epoch_records


@pytest.fixture
def labelled(tmp_path, rng):
    path, _ = conformer_dataset(tmp_path / "data.lmdb", rng)
    label_dataset(path, HarmonicTeacher(), str(tmp_path / "labels"), rows=3)
    return path, str(tmp_path / "labels")


def _config(labelled, out, epochs=2, **loss):
    path, labels = labelled
    return config_from_dict({
        "data": {"path": path, "labels": labels, "train": 0.6, "val": 0.2, "test": 0.2},
        "model": {"hidden": 8, "layers": 1, "num_basis": 6, "cutoff": 4.0},
        "loss": {"hessian_rows": 2, **loss},
        "train": {"out": str(out), "epochs": epochs, "batch_size": 4, "checkpoint_every": 1},
    })


def test_resume_continues_exactly_and_seed_repeats(labelled, tmp_path):
    straight = Trainer(_config(labelled, tmp_path / "a", epochs=4)).fit()
    Trainer(_config(labelled, tmp_path / "b", epochs=2)).fit()
    resumed = Trainer(_config(labelled, tmp_path / "b", epochs=4)).fit()  # picks up last.pt
    assert resumed["epochs"] == 4 and resumed["steps"] == straight["steps"]
    a, b = epoch_records(tmp_path / "a"), epoch_records(tmp_path / "b")
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["train_total"] == pytest.approx(y["train_total"], rel=1e-6)
        assert x["val_loss_ef"] == pytest.approx(y["val_loss_ef"], rel=1e-6)
    assert "train_hessian" in a[0] and a[0]["train_hessian"] > 0
    # the best checkpoint loads as a student with the fitted reference energies
    model = load_student(str(tmp_path / "a" / "best.pt"))
    assert model.atom_ref.abs().sum() > 0


def test_lambda_kd_is_halved_once_when_student_beats_teacher(labelled, tmp_path):
    trainer = Trainer(_config(labelled, tmp_path / "c", epochs=1))
    trainer.teacher_val = {"loss_ef": 1e12}  # a teacher any student beats
    trainer.fit()
    assert trainer.weights.hessian == 200.0 and trainer.kd_halved
    trainer._maybe_halve_kd({"loss_ef": 0.0})
    assert trainer.weights.hessian == 200.0  # only once
    trainer2 = Trainer(_config(labelled, tmp_path / "d", epochs=1, halve_kd_when_better_than_teacher=False))
    trainer2.teacher_val = {"loss_ef": 1e12}
    trainer2.fit()
    assert trainer2.weights.hessian == 400.0


def test_teacher_validation_loss_and_kd_kept_while_the_student_is_worse(labelled, tmp_path):
    """The teacher's validation loss (what halving compares against) is the paper-code loss of its own labels
    on the validation split, computed here independently; a student that does not beat it keeps λ_KD."""
    from training.reference_energies import offset_energy

    trainer = Trainer(_config(labelled, tmp_path / "t", epochs=1))
    got = trainer.teacher_validation()
    # the toy teacher's energies are ~0.5 eV/atom off the reference's: compared after per-element offsets
    offsets = trainer.teacher_energy_offsets
    assert offsets is not None
    e_terms, f_norms = [], []
    for i in trainer.val_idx:
        s = trainer.dataset[i]
        rec = trainer.labels.get(s.id)
        e_terms.append(abs(rec.energy - offset_energy(s.numbers, offsets) - s.energy) / len(s.numbers))
        f_norms.extend(np.linalg.norm(rec.forces - s.forces, axis=1))
    w = trainer.weights
    assert got["loss_ef"] == pytest.approx(w.energy * np.mean(e_terms) + w.forces * np.mean(f_norms), rel=1e-6)
    assert got["energy_mae_mev_per_atom"] == pytest.approx(1000 * np.mean(e_terms), rel=1e-6)  # float32 batches
    trainer.teacher_val = {"loss_ef": 0.0}  # a perfect teacher: no student beats it
    trainer.fit()
    assert trainer.weights.hessian == 400.0 and not trainer.kd_halved


def test_direct_force_student_trains_with_energy_gradient_term(labelled, tmp_path):
    cfg = _config(labelled, tmp_path / "e", epochs=1, energy_gradient=10.0)
    cfg.model.force_mode = "direct"
    trainer = Trainer(cfg)
    trainer.fit()
    steps = [json.loads(l) for l in open(tmp_path / "e" / "log.jsonl") if '"step"' in l]
    assert all(np.isfinite(s["energy_gradient"]) and np.isfinite(s["hessian"]) for s in steps if s["kind"] == "step")


def test_schnet_student_trains_with_hessian_rows_and_runs_in_ase(labelled, tmp_path):
    """A SchNet student goes the whole way: Hessian-KD training, its checkpoint, the ASE calculator."""
    from ase import Atoms

    from engine import Calculator
    from engine.models import SchNet
    from training.data import Dataset

    cfg = _config(labelled, tmp_path / "s", epochs=2)
    cfg.model.name = "schnet"
    summary = Trainer(cfg).fit()
    assert summary["epochs"] == 2
    records = epoch_records(tmp_path / "s")
    assert all(np.isfinite(r["train_hessian"]) and r["train_hessian"] > 0 for r in records)
    model = load_student(str(tmp_path / "s" / "best.pt"))
    assert isinstance(model, SchNet) and model.atom_ref.abs().sum() > 0
    structure = Dataset(labelled[0])[0]
    atoms = Atoms(numbers=structure.numbers, positions=structure.positions)
    atoms.calc = Calculator(str(tmp_path / "s" / "best.pt"))
    forces = atoms.get_forces()
    assert forces.shape == (len(atoms), 3) and np.isfinite(atoms.get_potential_energy())
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-8)  # no net force on an isolated molecule


def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: x.lmdb}\nloss: {hesian: 3}\n")
    with pytest.raises(HessforgeError, match=r"bad.yaml: unknown config key 'loss.hesian'"):
        load_config(str(bad))
    with pytest.raises(HessforgeError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(HessforgeError, match="needs teacher labels"):
        config_from_dict({"data": {"path": "x"}, "loss": {"hessian": 1.0}})


def test_two_process_data_parallel(labelled, tmp_path, rng):
    """torchrun with 2 CPU processes (gloo) on shards of unequal length (9 training structures, batch 4: 2
    batches on one rank, 1 on the other) and one validation structure (nothing on one rank): trains, stops
    both ranks together at the time limit, writes one finite checkpoint, and logs losses over both ranks."""
    from training.data.subsets import save_split

    # one conformer of each molecule among the 9 training structures: the student's elements come from them
    # (N only from NH3), so a random 9 without NH3 (7 % of draws) would fail on an NH3 validation structure
    firsts = [4 * m + int(rng.integers(4)) for m in range(5)]  # the toy dataset: molecule m at 4m..4m+3
    order = firsts + [i for i in rng.permutation(20).tolist() if i not in firsts]
    split_path = tmp_path / "split.json"
    save_split(str(split_path), {"train": order[:9], "val": order[9:10], "test": order[10:]}, count=20)
    cfg = _config(labelled, tmp_path / "ddp", epochs=3)
    cfg.data.split_file = str(split_path)
    cfg.train.max_time_s = 1e-6  # both ranks stop after the first epoch, together
    cfg_path = tmp_path / "ddp.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.cli", "train", str(cfg_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["stopped"] == "max_time_s" and summary["steps"] == 2
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())
    steps = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl") if '"kind": "step"' in line]
    assert len(steps) == 2 and all(np.isfinite(s["total"]) and s["hessian"] > 0 for s in steps)


def test_shard_sampler_sees_every_structure_once_per_epoch():
    """The data-parallel shards of an epoch: every structure exactly once over the ranks (DistributedSampler
    repeated some to pad), lengths within one, a new order each epoch, and every rank agrees on the steps."""
    from training.trainer import _ShardSampler

    for n, world, batch in ((21, 2, 4), (9, 2, 4), (10, 3, 3), (7, 7, 2), (100, 4, 8)):
        orders = []
        for epoch in range(3):
            shards = []
            for rank in range(world):
                sampler = _ShardSampler(n, rank, world, seed=5)
                sampler.set_epoch(epoch)
                shards.append(list(sampler))
                assert len(shards[-1]) == len(sampler)
                assert sampler.steps(batch) == max(-(-len(range(r, n, world)) // batch) for r in range(world))
            assert sorted(i for shard in shards for i in shard) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            orders.append(shards[0])
        assert orders[0] != orders[1] or n <= world


def test_example_config_lists_every_key_with_its_default():
    from dataclasses import asdict

    from training.config import Config

    path = os.path.join(os.path.dirname(__file__), "..", "training", "quickstart", "example_config.yaml")
    example = load_config(path).to_dict()
    defaults = asdict(Config())
    for section in ("model", "loss", "optim", "train"):
        assert example[section] == defaults[section], section
    assert set(example["data"]) == set(defaults["data"])


def test_config_types_and_ranges_are_checked():
    """Wrong types and values give one error naming the key (they used to give tracebacks from deep inside,
    or ran: epochs 0, epochs 1.5, ema_decay 2, an empty validation split that then validated on the test set);
    PyYAML's string '1e-3' is read as the number it is."""
    from training.config import config_from_dict

    base = {"data": {"path": "x.lmdb"}, "loss": {"hessian": 0.0}}
    assert config_from_dict({**base, "optim": {"lr": "1e-3"}}).optim.lr == 1e-3
    for section, values, pattern in (
            ("optim", {"lr": -1}, "optim.lr must be > 0"), ("train", {"epochs": "two"}, "train.epochs must be an integer"),
            ("train", {"epochs": 0}, "train.epochs must be >= 1"), ("train", {"epochs": 1.5}, "must be an integer"),
            ("data", {"val": 0}, "data.val must be in"), ("optim", {"ema_decay": 2.0}, "ema_decay must be in"),
            ("train", {"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
            ("loss", {"hessian": 0.0, "halve_kd_when_better_than_teacher": "no"}, "must be true or false"),
            ("data", {"train_limit": -2}, "train_limit must be >= 1"), ("model", {"hidden": "8"}, "model.hidden"),
            ("train", {"threads": -1}, "train.threads"), ("data", {"elements": [1, "C"]}, "list of integers"),
            ("train", {"seed": -1}, r"train.seed must be in \[0, 2\*\*32\)"),
            ("data", {"split_seed": 2 ** 32}, "data.split_seed must be in"),
            ("data", {"elements": [1, 999]}, "atomic numbers"), ("data", {"elements": []}, "non-empty list"),
            ("optim", {"lr": float("inf")}, "optim.lr must be a finite number"),
            ("loss", {"energy": float("inf")}, "loss.energy must be a finite number")):
        values = {**base, section: {**base.get(section, {}), **values}}
        with pytest.raises(HessforgeError, match=pattern):
            config_from_dict(values, where="c.yaml")


def _interrupting_loss(monkeypatch, at_call, action):
    """training.trainer.compute_loss that runs `action` on its `at_call`-th call (1-based)."""
    import training.trainer as trainer_module

    real, calls = trainer_module.compute_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_loss", loss)
    return lambda: monkeypatch.setattr(trainer_module, "compute_loss", real)


def test_interrupted_runs_resume_exactly(labelled, tmp_path, monkeypatch):
    """Ctrl-C mid-epoch keeps the last epoch-end checkpoint (it used to save the half-trained weights as that
    epoch, and the rerun replayed the epoch on top of them); SIGTERM finishes the epoch, checkpoints and exits
    as interrupted without the summary.json of a finished run. Both resume to the uninterrupted result,
    with each step logged once."""
    import signal

    straight = Trainer(_config(labelled, tmp_path / "a", epochs=3)).fit()
    steps_per_epoch = straight["steps"] // 3

    def ctrl_c():
        raise KeyboardInterrupt

    undo = _interrupting_loss(monkeypatch, steps_per_epoch + 2, ctrl_c)  # in the second epoch
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(labelled, tmp_path / "b", epochs=3)).fit()
    undo()
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == steps_per_epoch
    resumed = Trainer(_config(labelled, tmp_path / "b", epochs=3)).fit()

    undo = _interrupting_loss(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM after epoch 1 of 3"):
        Trainer(_config(labelled, tmp_path / "c", epochs=3)).fit()
    undo()
    assert not (tmp_path / "c" / "summary.json").exists()
    terminated = Trainer(_config(labelled, tmp_path / "c", epochs=3)).fit()

    # between checkpoints (every 10 epochs): Ctrl-C in the third epoch keeps the second, not nothing
    sparse = _config(labelled, tmp_path / "d", epochs=3)
    sparse.train.checkpoint_every = 10
    undo = _interrupting_loss(monkeypatch, 2 * steps_per_epoch + 1, ctrl_c)
    with pytest.raises(KeyboardInterrupt, match=r"after epoch 2 of 3: saved in .*last.pt; rerun the same command"):
        Trainer(sparse).fit()
    undo()
    assert torch.load(tmp_path / "d" / "last.pt", weights_only=False)["step"] == 2 * steps_per_epoch
    sparse_resumed = Trainer(sparse).fit()
    for run, summary in (("b", resumed), ("c", terminated), ("d", sparse_resumed)):
        assert summary["steps"] == straight["steps"] and summary["finished"]
        assert summary["best_val_loss_ef"] == pytest.approx(straight["best_val_loss_ef"], rel=1e-6)
        steps = [json.loads(line)["step"] for line in open(tmp_path / run / "log.jsonl")
                 if json.loads(line)["kind"] == "step"]
        assert steps == list(range(1, straight["steps"] + 1))


def test_resume_refuses_another_config_and_other_labels(labelled, tmp_path, rng):
    Trainer(_config(labelled, tmp_path / "r", epochs=1)).fit()
    saved = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(HessforgeError, match=r"started with another config \(loss.hessian: 400.0 -> 10.0"):
        Trainer(_config(labelled, tmp_path / "r", epochs=2, hessian=10.0))
    assert (tmp_path / "r" / "config.yaml").read_text() == saved  # not rewritten before the check
    Trainer(_config(labelled, tmp_path / "r", epochs=2)).fit()  # more epochs: allowed
    # resuming on other labels (another teacher of the same name and settings) or another dataset of the same
    # size and ids is refused: the run would keep the first teacher's validation loss for λ_KD halving
    label_dataset(labelled[0], HarmonicTeacher(k=9.0, r0=0.8), str(tmp_path / "labels9"), rows=3)
    with pytest.raises(HessforgeError, match=r"started on other data: the teacher labels \(energies_sample_sha256"):
        Trainer(_config((labelled[0], str(tmp_path / "labels9")), tmp_path / "r", epochs=3))
    twin, _ = conformer_dataset(tmp_path / "twin.lmdb", rng)
    label_dataset(twin, HarmonicTeacher(), str(tmp_path / "twin_labels"), rows=3)
    with pytest.raises(HessforgeError, match=r"started on other data: the dataset \(20 structures then, 20 now"):
        Trainer(_config((twin, str(tmp_path / "twin_labels")), tmp_path / "r", epochs=3))
    moved = tmp_path / "moved.lmdb"
    moved.write_bytes(open(labelled[0], "rb").read())  # the same data at another path: resumes
    Trainer(_config((str(moved), labelled[1]), tmp_path / "r", epochs=3)).fit()
    # labels made for another dataset are refused before training
    other, _ = conformer_dataset(tmp_path / "other.lmdb", rng, per_molecule=3)
    with pytest.raises(HessforgeError, match="labels were made for another dataset"):
        Trainer(_config((other, labelled[1]), tmp_path / "o", epochs=1))
    # the same ids and count (same file stem and size), other geometries: refused too
    with pytest.raises(HessforgeError, match="labels were made for another dataset"):
        Trainer(_config((twin, labelled[1]), tmp_path / "t", epochs=1))


def test_painn_norm_eps_travels_with_the_checkpoint_and_export(labelled, tmp_path):
    """model.norm_eps reaches the trained student, its checkpoint, the ASE calculator's model and the exported
    TorchScript file (same energies as the checkpoint's student); without it the checkpoint's hyperparameters
    are the ones older runs have (so they still resume)."""
    from engine.export import export_checkpoint
    from engine.exported import load_exported, read_metadata
    from engine.graph import graph_from_atoms

    config = _config(labelled, tmp_path / "smooth", epochs=1)
    config.model.norm_eps = 1.0
    trainer = Trainer(config)
    assert trainer.model_hparams["norm_eps"] == 1.0
    trainer.fit()
    model = load_student(str(tmp_path / "smooth" / "best.pt"))
    assert model.norm_eps == 1.0 and all(u.norm_eps == 1.0 for u in model.updates)
    export_checkpoint(str(tmp_path / "smooth" / "best.pt"), str(tmp_path / "smooth.pt"))
    assert read_metadata(str(tmp_path / "smooth.pt"))["hyperparameters"]["norm_eps"] == 1.0
    exported = load_exported(str(tmp_path / "smooth.pt"))
    from training.data import Dataset

    atoms = Dataset(labelled[0])[0].to_atoms()
    graph = graph_from_atoms([atoms], model.cutoff, torch.float64)
    assert float(exported(graph)["energy"].sum()) == pytest.approx(float(model(graph)["energy"].sum()), abs=1e-8)
    assert "norm_eps" not in Trainer(_config(labelled, tmp_path / "plain", epochs=1)).model_hparams


def test_one_trainer_per_run_directory(tmp_path):
    from training.trainer import _RunLock

    lock = _RunLock(str(tmp_path))
    with pytest.raises(HessforgeError, match="another hessforge train is using"):
        _RunLock(str(tmp_path))
    lock.release()
    _RunLock(str(tmp_path)).release()


@pytest.mark.parametrize("unlabelled", ["some", "all"])
def test_teacher_only_training_without_reference_labels(tmp_path, rng, unlabelled, capsys):
    """Structures ingested with --allow-missing-labels: the losses mask them, reference energies are fitted
    on what has labels (on the teacher's energies when nothing has), validation is against the reference
    where it exists and against the teacher otherwise; evaluate reports errors over the labelled ones.
    (This used to end in a NaN loss, a TypeError or a ValueError.)"""
    import dataclasses

    from training.data.store import write_dataset
    from training.evaluate import evaluate

    _, structures = conformer_dataset(tmp_path / "full.lmdb", rng)
    drop = (lambda k: k % 2 == 0) if unlabelled == "some" else (lambda k: True)
    structures = [dataclasses.replace(s, energy=None, forces=None) if drop(k) else s
                  for k, s in enumerate(structures)]
    path = str(tmp_path / "data.lmdb")
    write_dataset(path, structures)
    label_dataset(path, HarmonicTeacher(), str(tmp_path / "labels"), rows=3)
    trainer = Trainer(_config((path, str(tmp_path / "labels")), tmp_path / "run", epochs=2))
    assert trainer.val_against_teacher == (unlabelled == "all")
    summary = trainer.fit()
    assert np.isfinite(summary["best_val_loss_ef"]) and (tmp_path / "run" / "best.pt").exists()
    assert torch.isfinite(trainer.model.atom_ref).all() and trainer.model.atom_ref.abs().sum() > 0
    if unlabelled == "all":  # the energy scale is the RMS of the forces trained on: the teacher's
        store = LabelStore(str(tmp_path / "labels"))
        teacher_f = np.concatenate([store.get(structures[i].id).forces.reshape(-1) for i in trainer.train_idx])
        assert float(trainer.model.energy_scale) == pytest.approx(float(np.sqrt(np.mean(teacher_f**2))), rel=1e-6)
    # the unlabelled structures are trained on the teacher's energies and forces (they used to train nothing
    # but the Hessian term: energy and force losses of exactly 0 when nothing had references)
    records = epoch_records(tmp_path / "run")
    assert all(r["train_energy"] > 0 and r["train_forces"] > 0 for r in records)
    result = evaluate(load_student(str(tmp_path / "run" / "best.pt")), structures, LabelStore(str(tmp_path / "labels")))
    ref = result["student_vs_reference"]
    assert ref["n_energy"] == sum(s.energy is not None for s in structures)
    if unlabelled == "some":
        assert np.isfinite(ref["forces_mae_mev_per_A"])
    else:
        assert np.isnan(ref["forces_mae_mev_per_A"])
    assert np.isfinite(result["student_vs_teacher"]["forces_mae_mev_per_A"])
    # the command prints errors against the teacher when nothing has a reference (not a row of NaNs)
    import argparse

    from training import evaluate as evaluate_cli

    parser = argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    evaluate_cli.run(parser.parse_args([str(tmp_path / "run" / "best.pt"), path, "--labels",
                                        str(tmp_path / "labels"), "--split", "all"]))
    out = capsys.readouterr().out
    tea = result["student_vs_teacher"]
    if unlabelled == "all":
        assert "E MAE vs teacher" in out and "nan" not in out and "errors against the teacher" in out
        assert f"{tea['energy_mae_mev_per_atom']:.2f}" in out and f"{tea['forces_mae_mev_per_A']:.2f}" in out
    else:
        assert "E MAE (meV/atom)" in out and "teacher " in out


def test_more_hessian_rows_than_labelled_is_refused(labelled, tmp_path):
    """loss.hessian_rows above the labels' k rows per structure: refused before training (it trained on k)."""
    with pytest.raises(HessforgeError, match="loss.hessian_rows is 4, but these labels hold 3 Hessian rows"):
        Trainer(_config(labelled, tmp_path / "r", epochs=1, hessian_rows=4))


class ShiftedHarmonic(HarmonicTeacher):
    """The harmonic teacher with relative energies, as SO3LR has: an arbitrary per-element offset added."""

    relative_energies = True

    def __init__(self, offsets):
        super().__init__()
        self.offsets = offsets

    def compute(self, atoms, rows=None):
        out = super().compute(atoms, rows)
        out.energy += sum(self.offsets[int(z)] for z in atoms.numbers)
        return out


def test_relative_energy_teacher_is_aligned_by_per_element_offsets(tmp_path, rng, capsys):
    """A teacher whose energies are relative (SO3LR) is compared on the reference's scale: any per-element
    offset added to its energies changes neither its validation loss (λ_KD halving) nor its evaluation."""
    from training.data import Dataset
    from training.evaluate import evaluate
    from training.reference_energies import fit_element_offsets

    path, structures = conformer_dataset(tmp_path / "data.lmdb", rng)
    offsets = {z: float(rng.uniform(-500, 500)) for z in (1, 6, 7, 8)}
    results = {}
    for name, teacher in (("plain", ShiftedHarmonic({z: 0.0 for z in offsets})), ("shifted", ShiftedHarmonic(offsets))):
        label_dataset(path, teacher, str(tmp_path / name), rows=3)
        store = LabelStore(str(tmp_path / name))
        assert store.relative_energies
        trainer = Trainer(_config((path, str(tmp_path / name)), tmp_path / f"run_{name}", epochs=1))
        summary = trainer.fit()
        fitted = summary["teacher_energy_offsets_eV"]
        results[name] = (summary["teacher_val"], fitted,
                         evaluate(load_student(str(tmp_path / f"run_{name}" / "best.pt")), list(Dataset(path)), store))
    (tv0, off0, ev0), (tv1, off1, ev1) = results["plain"], results["shifted"]
    for key in ("loss_ef", "energy_mae_per_atom"):
        if key in tv0:
            assert tv1[key] == pytest.approx(tv0[key], rel=1e-6, abs=1e-9)
    assert tv0["loss_ef"] < 1e3  # an offset of hundreds of eV per atom would dominate an unaligned loss
    assert set(off0) == set(off1) and off0 != off1  # fitted per run, on the validation split
    for part in ("teacher_vs_reference", "student_vs_teacher"):
        for key, value in ev0[part].items():
            assert ev1[part][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (part, key)
    # `hessforge evaluate` on the test split fits the offsets on the validation split, as the trainer did
    from training.cli import main

    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tmp_path / "run_shifted" / "best.pt"), path, "--labels", str(tmp_path / "shifted"),
                 "--json", str(out)]) == 0
    test_result = json.loads(out.read_text())
    # the toy split holds one molecule in validation and another in test: the validation compositions do not
    # determine the test molecule's offset energy (any value fits), so evaluate fits on the test structures
    # themselves and says so
    assert test_result["teacher_energy_offsets_fitted_on"] == f"the {test_result['n_structures']} evaluated structures"
    assert "do not determine the teacher's per-element offsets" in capsys.readouterr().err
    # where they do determine it (the validation structures themselves), the trainer's offsets are used
    split = json.loads((tmp_path / "run_shifted" / "split.json").read_text())["splits"]
    val = [Dataset(path)[i] for i in split["val"]]
    on_val = evaluate(load_student(str(tmp_path / "run_shifted" / "best.pt")), val, LabelStore(str(tmp_path / "shifted")),
                      offset_structures=val, offset_source="the validation split")
    assert on_val["teacher_energy_offsets_fitted_on"].endswith("structures of the validation split")
    for z, o in on_val["teacher_energy_offsets_eV"].items():
        assert o == pytest.approx(off1[int(z)], abs=1e-9)
    # a split file made for another path of the same dataset: one note, though two of its splits are read
    split = json.loads((tmp_path / "run_shifted" / "split.json").read_text())
    moved = tmp_path / "moved_split.json"
    moved.write_text(json.dumps(dict(split, dataset=str(tmp_path / "elsewhere.lmdb"))))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run_shifted" / "best.pt"), path, "--labels", str(tmp_path / "shifted"),
                 "--split-file", str(moved)]) == 0
    assert capsys.readouterr().err.count("was made for") == 1
    # the fit itself, on fresh random compositions: exact offsets back
    numbers = [rng.choice([1, 6, 7, 8], size=rng.integers(2, 9)) for _ in range(20)]
    ref = rng.normal(size=20)
    shifted = [r + sum(offsets[int(z)] for z in n) for r, n in zip(ref, numbers)]
    fit = fit_element_offsets(numbers, shifted, ref)
    assert all(fit[z] == pytest.approx(offsets[z], abs=1e-6) for z in offsets)


class OtherLevelHarmonic(ShiftedHarmonic):
    """The harmonic teacher with absolute energies at another per-element zero: a teacher at another level of
    theory than the reference energies (MACE-OFF against the user's own DFT)."""

    relative_energies = False


def test_absolute_teacher_on_another_energy_scale_is_aligned(tmp_path, rng, capsys):
    """An absolute-energy teacher whose energies differ from the reference by per-element offsets (1-4 eV per
    atom) is compared after offsets fitted on the validation split: its validation loss and evaluation equal
    those of the same teacher without the offsets (it looked 10^3 times worse, and λ_KD was halved at epoch 1).
    A teacher a few meV per atom from the reference (at its own level), shifted by a few meV more, is compared
    as it is."""
    from training.data import Dataset
    from training.evaluate import evaluate

    # reference energies a few meV per atom from the teacher's: a teacher at the reference's own level
    path, _ = conformer_dataset(tmp_path / "data.lmdb", rng, k_ref=2.004)
    shifts = {"plain": {z: 0.0 for z in (1, 6, 7, 8)}, "other": {1: 1.3, 6: -4.1, 7: 2.2, 8: 3.7},
              "close": {1: 0.002, 6: -0.003, 7: 0.001, 8: 0.004}}
    results = {}
    for name, offsets in shifts.items():
        label_dataset(path, OtherLevelHarmonic(offsets), str(tmp_path / name), rows=3)
        store = LabelStore(str(tmp_path / name))
        assert not store.relative_energies
        summary = Trainer(_config((path, str(tmp_path / name)), tmp_path / f"run_{name}", epochs=1)).fit()
        results[name] = (summary, evaluate(load_student(str(tmp_path / f"run_{name}" / "best.pt")),
                                           list(Dataset(path)), store))
    assert "another per-element scale than the reference energies" in capsys.readouterr().err
    (plain, ev0), (other, ev1), (close, _) = results["plain"], results["other"], results["close"]
    assert plain["teacher_energy_offsets_eV"] is None and close["teacher_energy_offsets_eV"] is None
    assert other["teacher_energy_offsets_eV"] is not None
    # aligned, the teacher is where it is without the offsets (the fit also takes out the few meV/atom of its own
    # composition-linear error); unaligned, the 1-4 eV/atom offsets made its loss ~10^3 times larger
    assert other["teacher_val"]["loss_ef"] == pytest.approx(plain["teacher_val"]["loss_ef"], rel=0.05)
    for key, value in ev0["teacher_vs_reference"].items():
        if key.startswith("forces"):  # forces carry no offset
            assert ev1["teacher_vs_reference"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:  # the fit on the evaluated structures also takes out the teacher's own few meV/atom
            assert ev1["teacher_vs_reference"][key] <= 1.05 * value + 1e-9, key
    assert ev1["teacher_vs_reference"]["energy_mae_mev_per_atom"] < 20  # raw: > 1000


def test_teacher_filled_energies_use_offsets_that_fix_their_compositions(tmp_path, rng, capsys):
    """Energies the teacher fills in (structures without their own) are put on the reference's scale by offsets
    that fix their compositions: N only in training (its validation split is H/C/O) took offset 0, 2.2 eV off per
    N atom; fitted on every structure with both energies they are right. N only in structures without reference
    energies: nothing can fix it, a note says so."""
    from training.data import Dataset
    from training.data.records import Structure
    from training.data.store import write_dataset
    from training.data.subsets import save_split
    from toy import harmonic

    from ase.build import molecule

    offsets = {1: 1.3, 6: -4.1, 7: 2.2, 8: 3.7}

    def build(path, nh3_with_energy):
        structures = []
        for name in ("CH4", "H2O", "CH3OH", "HCOOH", "NH3", "NH3"):
            base = molecule(name)
            for c in range(3):
                pos = base.positions + rng.normal(scale=0.05, size=base.positions.shape)
                e, f, _ = harmonic(pos, k=2.004)
                sid = f"{name}-{len(structures)}"
                own = name != "NH3" or (nh3_with_energy and len(structures) < 15)  # first NH3 group: own E
                structures.append(Structure(id=sid, group=f"{name}{len(structures) // 3}", numbers=base.numbers.copy(),
                                            positions=pos, energy=e if own else None, forces=f if own else None))
        write_dataset(str(path), structures)
        # validation: H/C/O molecules only; NH3 (with and without energies) in training
        save_split(str(tmp_path / "split.json"), {"train": [0, 1, 6, 7, 12, 13, 14, 15, 16, 17], "val": [3, 4, 9, 10],
                                                  "test": [2, 5, 8, 11]}, count=len(structures))
        return str(path), structures

    for nh3_with_energy in (True, False):
        path, structures = build(tmp_path / f"d{nh3_with_energy}.lmdb", nh3_with_energy)
        labels = str(tmp_path / f"l{nh3_with_energy}")
        label_dataset(path, OtherLevelHarmonic(offsets), labels, rows=3)
        cfg = _config((path, labels), tmp_path / f"r{nh3_with_energy}", epochs=1)
        cfg.data.split_file = str(tmp_path / "split.json")
        capsys.readouterr()
        trainer = Trainer(cfg)
        note = "do not determine the teacher's per-element offsets for every structure whose energy the teacher fills"
        filled = []
        for batch in trainer.train_loader:
            for k, sid in enumerate(batch.ids):
                s = structures[int(sid.split("-")[1])]
                if s.energy is None:
                    filled.append(float(batch.energy[k]) - harmonic(s.positions, k=2.0)[0])
        assert len(filled) == 3 if nh3_with_energy else 6
        if nh3_with_energy:  # on the reference's scale, to the teacher's own few meV per atom
            assert max(abs(x) for x in filled) < 0.1, filled
            assert note not in capsys.readouterr().err
        else:
            assert note in capsys.readouterr().err


def test_crystal_student_distilled_from_chgnet_alone(tmp_path, rng, capsys):
    """The materials path end to end with a bundled foundation model: rattled and strained NaCl cells without
    reference labels, CHGNet energies/forces/Hessian rows, teacher-only Hessian-KD training, and the student
    in ASE with stress. Periodic data with PaiNN's published norm_eps print a note naming model.norm_eps."""
    pytest.importorskip("chgnet")
    from ase.build import bulk

    from engine import Calculator
    from training.data.records import Structure
    from training.data.store import write_dataset
    from training.teachers import load_teacher

    structures = []
    for k in range(6):
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
        strain = np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))
        atoms.set_cell(atoms.cell @ strain, scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        structures.append(Structure(id=f"nacl-{k}", group=f"nacl-{k}", numbers=atoms.numbers.copy(),
                                    positions=atoms.positions.copy(), cell=np.array(atoms.cell), pbc=np.ones(3, bool)))
    path = str(tmp_path / "crystals.lmdb")
    write_dataset(path, structures)
    label_dataset(path, load_teacher("chgnet"), str(tmp_path / "labels"), rows=2)
    config = _config((path, str(tmp_path / "labels")), tmp_path / "smooth", epochs=1)
    Trainer(dataclasses.replace(config, model=dataclasses.replace(config.model, norm_eps=1.0)))
    assert "norm_eps" not in capsys.readouterr().err
    trainer = Trainer(_config((path, str(tmp_path / "labels")), tmp_path / "run", epochs=2))
    assert "model.norm_eps: 1.0" in capsys.readouterr().err
    assert trainer.val_against_teacher
    summary = trainer.fit()
    assert np.isfinite(summary["best_val_loss_ef"])
    assert all(np.isfinite(r["train_hessian"]) and r["train_hessian"] > 0 and r["train_forces"] > 0
               for r in epoch_records(tmp_path / "run"))
    crystal = structures[0].to_atoms()
    crystal.calc = Calculator(str(tmp_path / "run" / "best.pt"))
    stress = crystal.get_stress()
    assert stress.shape == (6,) and np.all(np.isfinite(stress)) and np.isfinite(crystal.get_potential_energy())


def _ddp_batch(selection):
    """A loss batch of some of three structures of 3, 2 and 12 atoms (energy and force targets)."""
    from types import SimpleNamespace

    from ase import Atoms

    from engine.graph import graph_from_atoms

    rng = np.random.default_rng(0)
    atoms = [Atoms(numbers=[8, 1, 1], positions=rng.uniform(-1, 1, (3, 3))),
             Atoms(numbers=[8, 1], positions=rng.uniform(-1, 1, (2, 3))),
             Atoms(numbers=[8] * 4 + [1] * 8, positions=rng.uniform(-2, 2, (12, 3)))]
    energies, forces = rng.normal(size=3), [rng.normal(size=(len(a), 3)) for a in atoms]
    graph = graph_from_atoms([atoms[i] for i in selection], 3.0, torch.float64)
    n = graph.positions.shape[0]
    return SimpleNamespace(graph=graph, energy=torch.tensor(energies[selection]),
                           forces=torch.tensor(np.concatenate([forces[i] for i in selection])),
                           energy_mask=torch.ones(len(selection), dtype=bool), forces_mask=torch.ones(n, dtype=bool),
                           hessian_index=None, teacher_forces=None)


def _ddp_model():
    """The same weights in every process whatever torch's global state (default dtype, generator): drawn
    with numpy."""
    from engine.models import PaiNN

    model = PaiNN([1, 8], cutoff=3.0, hidden=8, layers=1, num_basis=6).double()
    rng = np.random.default_rng(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(scale=0.4, size=tuple(p.shape))))
    return model


def _ddp_worker(rank, world, port, selections, queue):
    import torch.distributed as dist

    from training.losses import LossWeights, compute_loss
    from training.trainer import _average_gradients, _globally_weighted, _reduce_terms

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, weights = _ddp_model(), LossWeights(energy=5.0, forces=100.0)
    sel = selections[rank]
    terms = compute_loss(model, _ddp_batch(sel), weights) if sel else None
    loss, record, weight = _globally_weighted(terms, weights)
    if loss is not None:
        loss.backward()
    _average_gradients(model, weight)
    record = _reduce_terms(record, weight)
    if rank == 0:
        queue.put((torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).numpy(),
                   record))
    dist.destroy_process_group()


def test_data_parallel_step_equals_one_process():
    """Ranks with 2 structures / 5 atoms, 1 structure / 12 atoms, and none (a shard run out): the averaged
    gradient and the logged losses are those of one process with all three structures, energy (a mean over
    structures) and force (a mean over atoms) terms together. Weighting the ranks by structures, as before,
    was off by 1.56 (relative) in the force term's gradient."""
    import socket

    import torch.multiprocessing as mp

    from training.losses import LossWeights, compute_loss

    model, weights = _ddp_model(), LossWeights(energy=5.0, forces=100.0)
    terms = compute_loss(model, _ddp_batch([0, 1, 2]), weights)
    terms["total"].backward()
    single = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).numpy()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    selections = [[0, 1], [2], []]
    procs = [ctx.Process(target=_ddp_worker, args=(r, 3, port, selections, queue)) for r in range(3)]
    for p in procs:
        p.start()
    grad, record = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert np.linalg.norm(grad - single) / np.linalg.norm(single) < 1e-12
    for name in ("total", "energy", "forces"):
        assert record[name] == pytest.approx(float(terms[name]), rel=1e-12), name


def test_an_earlier_runs_best_checkpoint_is_never_deleted_unasked(labelled, tmp_path):
    """A finished run whose last.pt was deleted (to save space) keeps its best.pt: a new run there is refused
    unless --restart (it deleted best.pt, log and summary silently, under any config). A config refused during
    setup leaves no empty run directory; a run already past a lowered --epochs keeps its config.yaml."""
    out = tmp_path / "run"
    Trainer(_config(labelled, out, epochs=2)).fit()
    config_text = (out / "config.yaml").read_text()
    assert Trainer(_config(labelled, out, epochs=1)).fit()["epochs"] == 2  # nothing to do
    assert (out / "config.yaml").read_text() == config_text  # still says 2 epochs, what best.pt was trained for
    (out / "last.pt").unlink()
    best = (out / "best.pt").read_bytes()
    with pytest.raises(HessforgeError, match="holds a finished run's best.pt but no last.pt to resume from; .*--restart"):
        Trainer(_config(labelled, out, epochs=1))
    assert (out / "best.pt").read_bytes() == best
    Trainer(_config(labelled, out, epochs=1), restart=True).fit()
    assert (out / "best.pt").read_bytes() != best
    # a run that crashed before its first last.pt (best.pt written at epoch 1, last.pt every 10 epochs) is rerun
    (out / "last.pt").unlink()
    (out / "summary.json").unlink()
    Trainer(_config(labelled, out, epochs=1)).fit()
    bad = _config(labelled, tmp_path / "never", epochs=1)
    bad.model.hidden = 1
    with pytest.raises(HessforgeError, match="hidden"):
        Trainer(bad)
    assert not (tmp_path / "never").exists()


def test_a_fresh_run_replaces_an_earlier_runs_files_and_a_resume_keeps_its_split(labelled, tmp_path):
    """A run started over (--restart) splits by its own config and leaves none of the earlier run's log,
    checkpoints or summary (they used to stay: the log held both runs' epochs, and the old best.pt was
    evaluated on the new split, whose held-out structures it had trained on); one refused during setup changes
    nothing; resuming on, and evaluating with, an edited split.json are refused (checkpoints record the split)."""
    import argparse

    from training import evaluate as evaluate_cli
    from training.data.subsets import split_by_group, split_digest
    from training.data import Dataset

    out = tmp_path / "run"
    Trainer(_config(labelled, out, epochs=1)).fit()
    before = {name: (out / name).read_bytes() for name in ("split.json", "config.yaml", "best.pt", "log.jsonl")}
    groups = Dataset(labelled[0]).groups()
    first = split_by_group(groups, (0.6, 0.2, 0.2), seed=0)
    seed = next(s for s in range(1, 50) if split_by_group(groups, (0.6, 0.2, 0.2), seed=s) != first)

    refused = _config(labelled, out, epochs=1)
    refused.data.split_seed, refused.model.hidden = seed, 1
    with pytest.raises(HessforgeError, match="hidden"):
        Trainer(refused, restart=True)
    assert {name: (out / name).read_bytes() for name in before} == before

    again = _config(labelled, out, epochs=1)
    again.data.split_seed = seed
    trainer = Trainer(again, restart=True)
    assert not (out / "best.pt").exists() and not (out / "log.jsonl").exists()
    saved = json.loads((out / "split.json").read_text())
    assert saved["seed"] == seed and saved["splits"] == split_by_group(groups, (0.6, 0.2, 0.2), seed=seed)
    trainer.fit()
    assert [r["epoch"] for r in epoch_records(out)] == [1]
    assert torch.load(out / "best.pt", weights_only=False)["split_sha256"] == split_digest(saved["splits"])

    # an edited split.json: resuming on it and evaluating with it are refused
    edited = dict(saved, splits=dict(saved["splits"], train=saved["splits"]["train"][1:],
                                      test=saved["splits"]["test"] + saved["splits"]["train"][:1]))
    (out / "split.json").write_text(json.dumps(edited))
    more = _config(labelled, out, epochs=2)
    more.data.split_seed = seed
    with pytest.raises(HessforgeError, match="trained on another split than .*split.json holds now"):
        Trainer(more)
    parser = argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    with pytest.raises(HessforgeError, match="is not the split the model was trained on"):
        evaluate_cli.run(parser.parse_args([str(out / "best.pt"), labelled[0], "--labels", labelled[1]]))


def test_resumed_log_drops_events_after_the_checkpoint(tmp_path):
    """Records after the checkpoint's step go, events included (they had no step and were always kept, so a
    λ_KD halving after the last checkpoint was logged twice); step-less events of older logs go by epoch."""
    from training.trainer import _truncate_log

    log = tmp_path / "log.jsonl"
    records = [{"kind": "step", "epoch": 0, "step": 1}, {"kind": "epoch", "epoch": 1, "step": 1},
               {"kind": "event", "epoch": 1, "step": 1, "event": "a"}, {"kind": "step", "epoch": 1, "step": 2},
               {"kind": "event", "epoch": 2, "step": 2, "event": "b"}, {"kind": "event", "epoch": 1, "event": "old"},
               {"kind": "event", "epoch": 2, "event": "old"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "st')  # and a line cut by a kill
    _truncate_log(str(log), step=1, epoch=1)
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert kept == [records[0], records[1], records[2], records[5]]


def test_a_second_trainer_leaves_a_running_ones_files_alone(labelled, tmp_path):
    """A --restart on a directory whose run is still going (its lock held) fails before it removes or
    rewrites anything of that run."""
    from training.trainer import _RunLock

    out = tmp_path / "busy"
    Trainer(_config(labelled, out, epochs=1)).fit()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    running = _RunLock(str(out))
    try:
        with pytest.raises(HessforgeError, match="another hessforge train is using this run directory"):
            Trainer(_config(labelled, out, epochs=1), restart=True)
    finally:
        running.release()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_resume_data_check_covers_cells_and_charges_and_accepts_older_checkpoints(tmp_path, rng):
    """A run resumes only on data with the same cells/pbc/charges (setting_sha256); a checkpoint written before
    that digest was recorded is checked by the rest alone."""
    from training.data.records import Structure
    from training.data.store import Dataset, write_dataset
    from training.trainer import _check_resume_data, _data_identity

    def dataset(name, cell):
        natoms = int(rng.integers(2, 6))
        s = Structure(id="a", group="a", numbers=np.full(natoms, 6), positions=np.arange(3 * natoms).reshape(-1, 3),
                      cell=np.zeros((3, 3)) if cell is None else cell, pbc=cell is not None, energy=0.0, forces=np.zeros((natoms, 3)))
        write_dataset(str(tmp_path / name), [s])
        return Dataset(str(tmp_path / name))

    rng = np.random.default_rng(int(rng.integers(1 << 30)))
    state = rng.bit_generator.state
    vacuum = _data_identity(dataset("v.lmdb", None), None)
    rng.bit_generator.state = state  # the same atoms and positions, now in a box
    boxed = _data_identity(dataset("b.lmdb", np.eye(3) * 20.0), None)
    assert vacuum["dataset"]["geometry_sha256"] == boxed["dataset"]["geometry_sha256"]
    _check_resume_data("ckpt", vacuum, vacuum)
    with pytest.raises(HessforgeError, match="started on other data: the dataset"):
        _check_resume_data("ckpt", vacuum, boxed)
    older = {"dataset": {k: v for k, v in vacuum["dataset"].items() if k != "setting_sha256"}, "labels": None}
    _check_resume_data("ckpt", older, boxed)


def test_resume_of_a_run_trained_on_an_unfiltered_split_file(labelled, tmp_path, capsys):
    """Runs started before data.max_atoms / data.elements filtered a data.split_file were trained on all of it
    (their checkpoints record that split's digest): they resume on it, with a note, instead of being refused
    as trained on another split."""
    from training.data.subsets import save_split, split_digest

    given = {"train": [k for k in range(20) if k not in (0, 4, 8)], "val": [0, 4, 8]}
    save_split(str(tmp_path / "split.json"), given, count=20)
    cfg = _config(labelled, tmp_path / "run", epochs=1)
    cfg.data.split_file, cfg.data.max_atoms = str(tmp_path / "split.json"), 5  # CH3OH (6 atoms, 12-15) out
    trainer = Trainer(cfg)
    assert sorted(trainer.train_idx) == [k for k in given["train"] if not 12 <= k <= 15]
    assert "leave out 4 of the 17 train structures" in capsys.readouterr().err
    trainer.fit()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    state["split_sha256"] = split_digest(given)  # what the same run recorded before the filter applied
    torch.save(state, tmp_path / "run" / "last.pt")
    cfg.train.epochs = 2
    resumed = Trainer(cfg)
    assert "resuming on that split" in capsys.readouterr().err
    assert sorted(resumed.train_idx) == given["train"]
    assert resumed.fit()["epochs"] == 2
