"""The command line end to end on a toy dataset: ingest -> label -> train -> evaluate, and its errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from engine.checkpoint import load_student
from engine.graph import graph_from_atoms
from training.data import Dataset
from training.evaluate import evaluate
from training.labels import LabelStore, label_dataset
from toy import HarmonicTeacher, conformer_dataset


def hessforge(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_ingest_train_evaluate_cli(tmp_path, rng):
    path, structures = conformer_dataset(tmp_path / "toy.lmdb", rng)
    frames = [s.to_atoms() for s in structures]
    for a, s in zip(frames, structures):
        a.info["mol_id"] = s.group
        a.calc = SinglePointCalculator(a, energy=s.energy, forces=s.forces)
    write(tmp_path / "toy.extxyz", frames)
    code, out, err = hessforge("ingest", tmp_path / "toy.extxyz", "-o", tmp_path / "data.lmdb")
    assert code == 0, err
    label_dataset(str(tmp_path / "data.lmdb"), HarmonicTeacher(), str(tmp_path / "labels"), rows=4)
    config = {"data": {"path": "data.lmdb", "labels": "labels", "train": 0.6, "val": 0.2, "test": 0.2},
              "model": {"hidden": 8, "layers": 1, "num_basis": 6, "cutoff": 4.0},
              "train": {"out": "run", "epochs": 2, "batch_size": 4}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = hessforge("train", "config.yaml", "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 0, err
    code, out, err = hessforge("evaluate", tmp_path / "run" / "best.pt", tmp_path / "data.lmdb",
                               "--labels", tmp_path / "labels", "--json", tmp_path / "m.json")
    assert code == 0, err
    assert "F MAE (meV/Å)" in out and "teacher" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    split = json.loads((tmp_path / "run" / "split.json").read_text())["splits"]
    assert metrics["n_structures"] == len(split["test"])
    assert metrics["teacher"] == HarmonicTeacher().name  # the report names its teacher row by it
    # the reported numbers are the plain mean absolute errors of the model's predictions
    ds = Dataset(str(tmp_path / "data.lmdb"))
    model = load_student(str(tmp_path / "run" / "best.pt"))
    test = [ds[i] for i in split["test"]]
    out = model(graph_from_atoms([s.to_atoms() for s in test], model.cutoff, torch.float64))
    f_ref = np.concatenate([s.forces for s in test])
    expected = 1000 * np.abs(out["forces"].detach().numpy() - f_ref).mean()
    assert metrics["student_vs_reference"]["forces_mae_mev_per_A"] == pytest.approx(expected, rel=1e-6)


def test_hessian_error_matches_brute_force(tmp_path, rng):
    path, structures = conformer_dataset(tmp_path / "toy.lmdb", rng, per_molecule=1, names=("H2O", "CH4"))
    label_dataset(path, HarmonicTeacher(), str(tmp_path / "labels"), rows="full", dtype="float64")
    store = LabelStore(str(tmp_path / "labels"))
    from engine.models import PaiNN

    torch.manual_seed(0)
    model = PaiNN([1, 6, 8], cutoff=4.0, hidden=8, layers=1, num_basis=6).double()
    metrics = evaluate(model, structures, store)
    errs = []
    for s in structures:
        g = graph_from_atoms([s.to_atoms()], 4.0, torch.float64)

        def energy(pos):
            return model(g._replace(positions=pos), compute_forces=False)["energy"].sum()

        H = torch.autograd.functional.hessian(energy, g.positions.clone()).reshape(3 * len(s.numbers), -1)
        errs.append((H.numpy() - store.get(s.id).hessian_rows).ravel())
    assert metrics["student_vs_teacher"]["hessian_mae_eV_per_A2"] == pytest.approx(np.abs(np.concatenate(errs)).mean(), rel=1e-8)


def test_errors_are_one_clear_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: {path: x.lmdb}\nmodel: {hiden: 3}\n")
    code, out, err = hessforge("train", tmp_path / "bad.yaml")
    assert code == 2 and "unknown config key 'model.hiden'" in err and "Traceback" not in err
    code, out, err = hessforge("evaluate", tmp_path / "missing.pt", tmp_path / "x.lmdb")
    assert code == 2 and "checkpoint not found" in err and "Traceback" not in err
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    code, out, err = hessforge("evaluate", tmp_path / "junk.pt", tmp_path / "x.lmdb")
    assert code == 2 and "not a readable checkpoint" in err
    code, out, err = hessforge("label", tmp_path / "nothing.lmdb", "--teacher", "ani1x", "--rows", "2", "-o", tmp_path / "l")
    assert code == 2 and "Traceback" not in err


def test_evaluate_refuses_another_datasets_split_and_labels(tmp_path, rng):
    """A run's split.json applied to a dataset of another size, or labels made for another dataset, are one
    clear error (they used to evaluate an arbitrary subset, or crash with an IndexError)."""
    from engine.models import PaiNN
    from toy import write_checkpoint
    from training.data.subsets import save_split

    small, _ = conformer_dataset(tmp_path / "small.lmdb", rng, per_molecule=2)
    big, _ = conformer_dataset(tmp_path / "big.lmdb", rng, per_molecule=3)
    label_dataset(big, HarmonicTeacher(), str(tmp_path / "labels"), rows=2)
    (tmp_path / "run").mkdir()
    ckpt = write_checkpoint(tmp_path / "run" / "best.pt", PaiNN([1, 6, 7, 8], cutoff=4.0, hidden=8, layers=1,
                                                                 num_basis=4).double())
    n_big = len(Dataset(big))
    save_split(str(tmp_path / "run" / "split.json"), {"train": list(range(n_big - 2)), "val": [n_big - 2],
                                                      "test": [n_big - 1]}, seed=0, count=n_big, dataset=big)
    code, out, err = hessforge("evaluate", ckpt, small)
    assert code == 2 and "split made for a dataset of" in err and "Traceback" not in err
    code, out, err = hessforge("evaluate", ckpt, small, "--split", "all", "--labels", tmp_path / "labels")
    assert code == 2 and "labels were made for another dataset" in err
    code, out, err = hessforge("evaluate", ckpt, big, "--labels", tmp_path / "labels", "--batch-size", "0")
    assert code == 2 and "--batch-size must be >= 1" in err
    code, out, err = hessforge("evaluate", ckpt, big, "--labels", tmp_path / "labels")
    assert code == 0, err


def test_every_seed_option_takes_only_seeds_numpy_and_torch_accept():
    """--seed -1 (md continuing a run, md-eval) and 1e20 (md) ended in tracebacks from numpy/torch; every
    subcommand's --seed is now checked by argparse, one usage line."""
    import argparse

    from training.cli import SUBCOMMANDS

    checked = []
    for name, (module, _) in SUBCOMMANDS.items():
        parser = argparse.ArgumentParser()
        __import__(module, fromlist=["add_arguments"]).add_arguments(parser)
        action = next((a for a in parser._actions if "--seed" in a.option_strings), None)
        if action is None:
            continue
        checked.append(name)
        assert action.type(str(2 ** 32 - 1)) == 2 ** 32 - 1 and action.type("0") == 0
        for bad in ("-1", str(2 ** 32), "99999999999999999999", "1.5", "abc"):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(bad)
    assert {"md", "md-eval", "label", "quickstart", "build-benchmark"} <= set(checked)
    code, out, err = hessforge("md", "model.pt", "quickstart", "--seed", "-1")
    assert code == 2 and "argument --seed: seed -1 is outside [0, 2**32)" in err and "Traceback" not in err


def test_options_between_positionals_and_usage_errors(capsys):
    """Options may sit between positionals (parse_intermixed_args where plain parsing fails); a usage error keeps
    argparse's usual message, which names every missing argument (intermixed parsing's left positionals out)."""
    from training.cli import build_parser, parse_arguments  # noqa: F401 (build_parser: the CLI imports)
    import argparse

    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--flag", action="store_true")
    args = parse_arguments(parser, ["a", "--flag", "b", "-o", "out"])
    assert args.inputs == ["a", "b"] and args.flag and args.output == "out"
    with pytest.raises(SystemExit):
        parse_arguments(parser, [])
    assert "the following arguments are required: inputs, -o/--output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["a", "--bogus", "-o", "x"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert parser.error.__func__ is argparse.ArgumentParser.error  # restored
