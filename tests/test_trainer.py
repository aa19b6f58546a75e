"""Trainer: runs, logs, checkpoints, resumes exactly, repeats with a seed, halves λ_KD, rejects bad configs."""
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
from training.labels import label_dataset
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


def test_direct_force_student_trains_with_energy_gradient_term(labelled, tmp_path):
    cfg = _config(labelled, tmp_path / "e", epochs=1, energy_gradient=10.0)
    cfg.model.force_mode = "direct"
    trainer = Trainer(cfg)
    trainer.fit()
    steps = [json.loads(l) for l in open(tmp_path / "e" / "log.jsonl") if '"step"' in l]
    assert all(np.isfinite(s["energy_gradient"]) and np.isfinite(s["hessian"]) for s in steps if s["kind"] == "step")


def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: x.lmdb}\nloss: {hesian: 3}\n")
    with pytest.raises(HessforgeError, match=r"bad.yaml: unknown config key 'loss.hesian'"):
        load_config(str(bad))
    with pytest.raises(HessforgeError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(HessforgeError, match="needs teacher labels"):
        config_from_dict({"data": {"path": "x"}, "loss": {"hessian": 1.0}})


def test_two_process_data_parallel(labelled, tmp_path):
    """torchrun with 2 CPU processes (gloo): trains to the end and writes one finite checkpoint."""
    cfg = _config(labelled, tmp_path / "ddp", epochs=2)
    cfg_path = tmp_path / "ddp.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.cli", "train", str(cfg_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["epochs"] == 2
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())


def test_example_config_lists_every_key_with_its_default():
    from dataclasses import asdict

    from training.config import Config

    path = os.path.join(os.path.dirname(__file__), "..", "training", "quickstart", "example_config.yaml")
    example = load_config(path).to_dict()
    defaults = asdict(Config())
    for section in ("model", "loss", "optim", "train"):
        assert example[section] == defaults[section], section
    assert set(example["data"]) == set(defaults["data"])
