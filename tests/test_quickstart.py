"""`hessforge quickstart`, the main job, end to end on a tiny dataset of one's own (one epoch each, ANI-1x
member 0, 2 Hessian rows): the table and results files, a rerun into the same --out, another --data into it
(refused: the old data would be used silently), and option errors before any work."""
import json

import ase.io
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from training.cli import main

FAST = ["--epochs", "1", "--rows", "2", "--teacher", "ani1x:0", "--threads", "1"]


def write_frames(path, rng, n=12):
    frames = []
    for k in range(n):
        a = molecule(("H2O", "CH4", "NH3")[k % 3])
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.calc = SinglePointCalculator(a, energy=float(rng.normal(-1000.0, 1.0)),
                                       forces=rng.normal(scale=0.5, size=(len(a), 3)))
        a.info["mol_id"] = a.get_chemical_formula()
        frames.append(a)
    ase.io.write(path, frames)


def test_quickstart_on_own_data_and_rerun(tmp_path, rng, capsys):
    data = tmp_path / "mine.extxyz"
    write_frames(data, rng)
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--data", str(data), *FAST]) == 0
    printed = capsys.readouterr().out
    assert f"reference: the energies and forces in {data}" in printed and "ωB97x" not in printed
    assert "PaiNN Hessian-distilled" in printed and "teacher ani1x:0" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == str(data) and results["seed"] == 0 and results["reference"].startswith("the energies")
    assert {t["epochs"] for t in results["training"].values()} == {1}
    assert set(results["results"]) == {"PaiNN undistilled", "PaiNN Hessian-distilled"}
    assert results["kd_weight"] == 50.0
    import yaml

    assert yaml.safe_load((out / "hessian_kd" / "config.yaml").read_text())["loss"]["hessian"] == 50.0
    # the same command again continues the same quickstart (nothing retrained: one epoch was asked)
    assert main(["quickstart", "--out", str(out), "--data", str(data), *FAST]) == 0
    assert "already trained 1 epochs" in capsys.readouterr().out
    # other data into the same --out: refused, naming the data it holds (it used to reuse it silently)
    other = tmp_path / "other.extxyz"
    write_frames(other, rng, n=9)
    assert main(["quickstart", "--out", str(out), "--data", str(other), *FAST]) == 2
    assert f"holds the quickstart of {data}" in capsys.readouterr().err
    # another λ_KD into the same --out would resume the distilled student under other settings: refused
    assert main(["quickstart", "--out", str(out), "--data", str(data), *FAST, "--kd-weight", "400"]) == 2
    assert "loss.hessian: 50.0 -> 400.0" in capsys.readouterr().err
    write_frames(data, rng)  # the same file, edited
    assert main(["quickstart", "--out", str(out), "--data", str(data), *FAST]) == 2
    assert "as it was before an edit" in capsys.readouterr().err


def test_quickstart_with_a_schnet_student(tmp_path, rng, capsys):
    data = tmp_path / "mine.extxyz"
    write_frames(data, rng, n=9)
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--data", str(data), "--student", "schnet", *FAST]) == 0
    assert "SchNet Hessian-distilled" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["student"]["name"] == "schnet"
    assert set(results["results"]) == {"SchNet undistilled", "SchNet Hessian-distilled"}
    # a PaiNN quickstart into the same --out would resume SchNet checkpoints: refused, naming the model
    assert main(["quickstart", "--out", str(out), "--data", str(data), *FAST]) == 2
    assert "holds a schnet quickstart; give another --out for --student painn" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [("--epochs", "0", "--epochs must be >= 1"),
                                                    ("--minutes-per-student", "0", "--minutes-per-student must be > 0"),
                                                    ("--teacher", "ani2x", "ani2x"),
                                                    ("--rows", "0", "--rows must be a positive integer"),
                                                    ("--kd-weight", "0", "--kd-weight must be > 0"),
                                                    ("--kd-weight", "nan", "--kd-weight must be > 0")])
def test_quickstart_option_errors_come_first(tmp_path, capsys, option, value, message):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), *FAST, option, value]) == 2  # argparse: the last one counts
    assert message in capsys.readouterr().err
    assert not (out / "data.lmdb").exists()  # nothing ingested or labelled before the error


def test_quickstart_data_without_labels_names_what_it_needs(tmp_path, capsys):
    frames = [molecule("H2O"), molecule("CH4")]
    ase.io.write(tmp_path / "bare.extxyz", frames)
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--data", str(tmp_path / "bare.extxyz"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "needs reference energies and forces" in err and "--allow-missing-labels" not in err


def test_a_quickstart_stopped_by_its_teacher_reruns_on_the_fixed_file(tmp_path, rng, capsys):
    """A frame with an element the teacher lacks stops the quickstart after ingest; the fixed file into the
    same --out was refused as 'the quickstart of that file before an edit', though nothing was labelled or
    trained on the old copy. It is ingested again."""
    data = tmp_path / "mine.extxyz"
    write_frames(data, rng, n=9)
    frames = ase.io.read(data, ":")
    frames[4].numbers[0] = 16  # sulfur: not an ANI-1x element
    ase.io.write(data, frames)
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--data", str(data), *FAST]) == 2
    assert "S (Z=16)" in capsys.readouterr().err and (out / "data.lmdb").exists()
    write_frames(data, rng, n=9)  # fixed
    assert main(["quickstart", "--out", str(out), "--data", str(data), *FAST]) == 0
    assert "holds no labels yet: ingesting" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["data"] == str(data)
