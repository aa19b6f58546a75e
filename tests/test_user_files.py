"""The commands never destroy a user's files and check what they will write before working: an output that
is an input (data, checkpoint), a directory or in a missing folder is refused up front with one clear line.
Also the command-line input checks that used to end in tracebacks, and `hessforge md` restarts."""
import json
import os

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from engine.errors import HessforgeError, UnknownElementError
from engine.models import PaiNN
from engine.paths import atomic_open, atomic_path, check_distinct_outputs, check_output_file, write_json
from toy import HarmonicTeacher, write_checkpoint
from training.labels import label_dataset
from training.cli import main

torch.set_num_threads(1)
SPECIES = [1, 6, 7, 8]
FAST = ["--repeats", "1", "--warmup", "1", "--threads", "1"]


def tiny(seed=0, force_mode="gradient"):
    torch.manual_seed(seed)
    return PaiNN(SPECIES, cutoff=3.5, hidden=8, layers=1, num_basis=4, force_mode=force_mode).double().eval()


@pytest.fixture
def files(tmp_path, rng):
    mols = []
    for name in ("CH4", "H2O", "NH3"):
        a = molecule(name)
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        mols.append(a)
    ase.io.write(tmp_path / "mols.xyz", mols, format="extxyz")
    write_checkpoint(tmp_path / "ckpt.pt", tiny())
    (tmp_path / "adir").mkdir()
    return tmp_path


def fails(capsys, argv, message):
    """The command exits with status 2 and one line naming the problem."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


def test_directory_outputs_that_are_files(tmp_path, capsys):
    """Outputs that are directories (labels, report, sweep, quickstart, train.out) given as an existing file:
    one line naming the option (it was a bare 'File exists')."""
    from engine.paths import check_output_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    check_output_dir(str(tmp_path), "-o")
    check_output_dir(str(tmp_path / "new"), "-o")
    with pytest.raises(HessforgeError, match="-o .*afile: is a file; give a directory"):
        check_output_dir(str(afile), "-o")
    assert main(["report", str(tmp_path), "-o", str(afile)]) == 2
    assert "report -o" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(afile)]) == 2
    assert "--out" in capsys.readouterr().err and afile.read_text() == "x"


def test_check_output_file(tmp_path):
    data = tmp_path / "data.xyz"
    data.write_text("x")
    (tmp_path / "d").mkdir()
    check_output_file(str(tmp_path / "new.json"), "--json", inputs=[str(data), "quickstart", None])
    for path, message in ((data, "is the input"), (tmp_path / "d", "is a directory"),
                          (tmp_path / "missing" / "x.json", "does not exist")):
        with pytest.raises(HessforgeError, match=message):
            check_output_file(str(path), "--json", inputs=[str(data)])
    # the same file spelled differently is still the input
    with pytest.raises(HessforgeError, match="is the input"):
        check_output_file(str(tmp_path / "d" / ".." / "data.xyz"), "-o", inputs=[str(data)])
    check_output_file(str(tmp_path / "missing" / "x.json"), "--json", create_parent=True)
    if os.path.isdir("/proc/self"):  # a folder nobody (root included) can create files in: said before the work
        with pytest.raises(HessforgeError, match="cannot write in /proc"):
            check_output_file("/proc/x.json", "--json")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hessforge")] == []  # the probe is gone
    with pytest.raises(HessforgeError, match="--trajectory and -o are the same file"):
        check_distinct_outputs({"--trajectory": "t.xyz", "-o": "./t.xyz"})
    check_distinct_outputs({"--trajectory": "t.xyz", "-o": None})


def test_atomic_writes_leave_old_file_or_new_one(tmp_path):
    target = tmp_path / "summary.json"
    write_json(str(target), {"epochs": 1})
    assert json.loads(target.read_text()) == {"epochs": 1}
    # a write that fails half-way (a kill, a full disk) keeps the old file whole and leaves no temporary file
    with pytest.raises(RuntimeError):
        with atomic_open(str(target)) as fh:
            fh.write('{"epochs": 2, "finis')
            fh.flush()
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"epochs": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    # writers that take a path (torch.save) write a temporary file beside the target, which is not the target
    with atomic_path(str(target)) as tmp:
        assert tmp != str(target) and tmp.startswith(str(tmp_path))
        assert json.loads(target.read_text()) == {"epochs": 1}  # the target is untouched until the end
        torch.save({"w": torch.ones(2)}, tmp)
    assert torch.load(str(target))["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_outputs_never_overwrite_inputs(files, capsys):
    data, ckpt = files / "mols.xyz", files / "ckpt.pt"
    data_bytes, ckpt_bytes = data.read_bytes(), ckpt.read_bytes()
    fails(capsys, ["bench", ckpt, data, "--batch-size", "2", *FAST, "--json", data], "is the input")
    fails(capsys, ["export", ckpt, "-o", ckpt], "is the input")
    fails(capsys, ["md", ckpt, data, "--batch-size", "2", "--steps", "2", "--trajectory", data], "is the input")
    fails(capsys, ["md", ckpt, data, "--batch-size", "2", "--steps", "2", "-o", data], "is the input")
    fails(capsys, ["ingest", data, "-o", data, "--overwrite"], "is the input")
    assert data.read_bytes() == data_bytes and ckpt.read_bytes() == ckpt_bytes
    # outputs that cannot be written are refused before the work, and leave nothing behind
    fails(capsys, ["md", ckpt, data, "--batch-size", "2", "--steps", "2", "-o", files / "nodir" / "x.xyz"],
          "does not exist")
    fails(capsys, ["md", ckpt, data, "--steps", "2", "-o", files / "t.xyz", "--trajectory", files / "t.xyz"],
          "same file")
    fails(capsys, ["bench", ckpt, data, "--batch-size", "2", *FAST, "--json", files / "adir"], "is a directory")
    fails(capsys, ["export", ckpt, "-o", files / "adir"], "is a directory")
    assert not list(files.glob("*.tmp*"))


def test_bench_input_errors(files, capsys):
    ckpt, data = files / "ckpt.pt", files / "mols.xyz"
    base = ["bench", ckpt, data, "--batch-size", "2", *FAST[:4]]
    fails(capsys, ["bench", ckpt, files / "adir"], "is a directory")
    fails(capsys, ["bench", files / "adir", data], "is a directory; give the checkpoint file")
    fails(capsys, base + ["--device", "gpu"], "unknown device 'gpu'")
    fails(capsys, base + ["--sweep", "--batch-sizes", "2,x"], "--batch-sizes '2,x'")
    fails(capsys, base + ["--sweep", "--max-batch", "0"], "--max-batch must be >= 1")
    fails(capsys, base + ["--threads", "0"], "--threads must be >= 1")
    fails(capsys, base + ["--modes", ","], "no mode given")
    fails(capsys, ["bench", "painn:hidden=0", data], "hidden must be >= 2")
    fails(capsys, ["bench", "painn:hidden=abc", data], "painn:hidden=abc: ")
    fails(capsys, ["bench", "painn:force_mode=bad", data], "painn:force_mode=bad: ")
    fails(capsys, base + ["--sweep", "--memory-cap-gb", "0"], "--memory-cap-gb must be > 0")
    fails(capsys, base + ["--sweep", "--max-call-s", "-1"], "--max-call-s must be > 0")  # stopped every sweep
    # an exported model in a compiled mode: named as what it is (was 'no energies() core')
    assert main(["export", str(ckpt), "-o", str(files / "exp.pt")]) == 0
    fails(capsys, ["md", files / "exp.pt", data, "--steps", "1", "--mode", "compiled"],
          "an exported (TorchScript) model runs in mode eager only")
    fails(capsys, base + ["--batch-sizes", "1,2"], "add --sweep")
    fails(capsys, base + ["--sweep", "--batch-sizes", "8,64", "--max-batch", "16"], "goes above --max-batch 16")
    (files / "empty.xyz").write_text("")
    err = fails(capsys, ["bench", ckpt, files / "empty.xyz"], "cannot tell the file format")
    assert "--format" not in err  # bench has no such option
    # an element the model lacks anywhere in the data: refused before anything is timed
    ase.io.write(files / "si.xyz", [molecule("CH4"), molecule("SiH4")], format="extxyz")
    assert main(["bench", str(ckpt), str(files / "si.xyz"), "--batch-size", "1", *FAST, "--sweep",
                 "--batch-sizes", "1,2"]) == 2
    captured = capsys.readouterr()
    assert "unknown element(s) Si" in captured.err and "ms/call" not in captured.err + captured.out


def test_bench_labels_models_apart(files, capsys):
    """Two runs' best.pt (the README's use) get distinct rows, sweeps and speedups; a file given twice too."""
    for run, seed in (("runA", 1), ("runB", 2)):
        (files / run).mkdir()
        write_checkpoint(files / run / "best.pt", tiny(seed))
    out = files / "two.json"
    assert main(["bench", str(files / "runA" / "best.pt"), str(files / "runB" / "best.pt"), str(files / "ckpt.pt"),
                 str(files / "ckpt.pt"), str(files / "mols.xyz"), "--batch-size", "2", *FAST, "--sweep",
                 "--batch-sizes", "1,2", "--json", str(out)]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    names = ["runA/best.pt", "runB/best.pt", "ckpt.pt", "ckpt.pt (2)"]
    assert [r["name"] for r in data["fixed"]] == names and [s["name"] for s in data["sweeps"]] == names
    assert list(data["speedups"]["best"]) == [f"{n} [eager]" for n in names]


def test_unknown_element_error_names_impossible_numbers():
    err = UnknownElementError([200, 14], [1, 6])
    assert "Si (Z=14)" in str(err) and "Z=200" in str(err)


def test_md_restarts_from_its_output(files, capsys):
    """-o keeps the momenta; rerunning from that file continues them (no new velocities, frames numbered on) unless
    --init-temperature asks; the trajectory starts at frame 0 and labels each frame; a data set larger than
    the batch is announced."""
    ckpt, data = files / "ckpt.pt", files / "mols.xyz"
    first, traj = files / "first.xyz", files / "traj.xyz"
    common = ["--integrator", "verlet", "--timestep", "0.25", "--threads", "1", "--dtype", "float64"]
    assert main(["md", str(ckpt), str(data), "--batch-size", "2", "--steps", "6", "--interval", "3", "--seed", "1",
                 "-o", str(first), "--trajectory", str(traj), *common]) == 0
    err = capsys.readouterr().err
    assert "has 3 structure(s); integrating the first 2" in err and "drawn at 300 K" in err
    frames = ase.io.read(traj, ":")
    assert [f.info["md_step"] for f in frames] == [0, 0, 3, 3, 6, 6]
    assert [f.info["md_system"] for f in frames[:2]] == [0, 1] and frames[0].arrays["md_forces"].shape == (5, 3)
    end = ase.io.read(first, ":")
    again = files / "again.xyz"
    assert main(["md", str(ckpt), str(first), "--batch-size", "2", "--steps", "0", "--seed", "7", "-o", str(again),
                 *common]) == 0
    assert "initial velocities: the momenta in" in capsys.readouterr().err
    assert [f.info["md_step"] for f in ase.io.read(again, ":")] == [6, 6]  # a continued run numbers on
    for a, b in zip(end, ase.io.read(again, ":")):
        np.testing.assert_allclose(b.get_momenta(), a.get_momenta(), atol=1e-12)
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-12)
    redrawn = files / "redrawn.xyz"
    assert main(["md", str(ckpt), str(first), "--batch-size", "2", "--steps", "0", "--seed", "7", "-o", str(redrawn),
                 "--init-temperature", "50", *common]) == 0
    assert "drawn at 50 K" in capsys.readouterr().err
    assert not np.allclose(ase.io.read(redrawn, 0).get_momenta(), end[0].get_momenta())


def test_md_interrupted_writes_its_output_and_checks_names(files, capsys, monkeypatch):
    """SIGTERM (or Ctrl-C) mid-run stops after the step under way and still writes -o, whose frames are that
    step's consistent state (the restart point used to be lost); outputs not named .xyz/.extxyz, which ASE
    would read back as another format, and data with an empty structure are refused before the run."""
    import os
    import signal

    from engine.calculator import Calculator
    from engine.md import BatchedMD

    ckpt, data, out = files / "ckpt.pt", files / "mols.xyz", files / "end.xyz"
    real = BatchedMD._evaluate

    def evaluate(self, positions, step=None):
        if self.nsteps == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, positions, step)

    monkeypatch.setattr(BatchedMD, "_evaluate", evaluate)
    assert main(["md", str(ckpt), str(data), "--batch-size", "2", "--steps", "50", "--seed", "1", "-o", str(out),
                 "--threads", "1"]) == 130
    err = capsys.readouterr().err
    assert "SIGTERM after step 5 of 50" in err and f"that step's state is in {out}" in err
    monkeypatch.setattr(BatchedMD, "_evaluate", real)
    calc = Calculator(str(ckpt))
    for frame in ase.io.read(out, ":"):
        assert frame.info["md_step"] == 5
        atoms = frame.copy()
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(frame.info["md_potential_energy"], abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), frame.arrays["md_forces"], atol=1e-6)  # 8-decimal file
    for name in ("o.cif", "o", "o.traj.gz"):
        fails(capsys, ["md", ckpt, data, "--steps", "1", "-o", files / name], "name the file .xyz, .extxyz or .traj")
    fails(capsys, ["md", ckpt, data, "--steps", "1", "--trajectory", files / "t.cif"], "writes extended XYZ or ASE")
    assert main(["md", str(ckpt), str(data), "--batch-size", "1", "--steps", "1", "-o", str(files / "o.xyz.gz"),
                 "--threads", "1"]) == 0
    assert len(ase.io.read(files / "o.xyz.gz", ":")) == 1
    ase.io.write(files / "empty.xyz", [molecule("CH4"), Atoms()], format="extxyz")
    fails(capsys, ["md", ckpt, files / "empty.xyz", "--steps", "1"], "structure 1 has no atoms")
    fails(capsys, ["bench", ckpt, files / "empty.xyz", "--batch-size", "1", *FAST], "structure 1 has no atoms")


def test_ani_bench_refuses_periodic_data(files, capsys):
    box = Atoms("CH4", positions=molecule("CH4").positions + 2.0, cell=[5.0, 5.0, 5.0], pbc=True)
    ase.io.write(files / "box.xyz", box, format="extxyz")
    fails(capsys, ["bench", "ani1x:0", str(files / "box.xyz"), "--batch-size", "1", *FAST],
          "times ANI-1x on molecules only")


def test_ani_bench_target_leaves_the_teacher_alone():
    """A float32 ANI-1x bench target works on a copy: the teacher's networks are cached per process, and
    casting them in place broke every later float64 ANI-1x teacher (labels, md-eval) of the process."""
    from training.bench import AniTarget
    from training.teachers import load_teacher

    water = molecule("H2O")
    before = load_teacher("ani1x:0").compute(water, rows=[0, 4])
    AniTarget(load_teacher("ani1x:0"), "cpu", torch.float32)
    after = load_teacher("ani1x:0").compute(water, rows=[0, 4])
    assert after.energy == before.energy and np.array_equal(after.hessian_rows, before.hessian_rows)


def test_outputs_never_replace_datasets_checkpoints_or_models(files, capsys, rng):
    """An output name that is a dataset, a checkpoint or an exported model (a typo, a tab-completion) is refused
    before any work; export may replace an older export, ingest --overwrite anything (asked for)."""
    from engine.paths import EXPORTED_MODEL, LMDB_DATASET, TORCH_FILE, artifact_kind
    from toy import conformer_dataset

    data, ckpt = files / "mols.xyz", files / "ckpt.pt"
    lmdb_path, _ = conformer_dataset(files / "set.lmdb", rng)
    other = files / "other.pt"
    write_checkpoint(other, tiny(1))
    assert main(["export", str(ckpt), "-o", str(files / "model.pt")]) == 0
    model = files / "model.pt"
    kinds = {p: artifact_kind(str(p)) for p in (lmdb_path, other, model, data)}
    assert list(kinds.values()) == [LMDB_DATASET, TORCH_FILE, EXPORTED_MODEL, None]
    before = {p: open(p, "rb").read() for p in kinds}
    fails(capsys, ["export", ckpt, "-o", lmdb_path], "is an LMDB dataset")
    fails(capsys, ["export", ckpt, "-o", data], "exists and is not an exported model")  # the structure file
    fails(capsys, ["export", ckpt, "-o", other], "is a PyTorch file")
    fails(capsys, ["md", ckpt, data, "--batch-size", "2", "--steps", "1", "-o", lmdb_path], "is an LMDB dataset")
    fails(capsys, ["md", ckpt, data, "--batch-size", "2", "--steps", "1", "--trajectory", model],
          "is an exported model")
    fails(capsys, ["bench", ckpt, data, "--batch-size", "2", *FAST, "--json", other], "is a PyTorch file")
    assert {p: open(p, "rb").read() for p in kinds} == before
    assert main(["export", str(other), "-o", str(model)]) == 0  # a new export over the old one
    assert main(["ingest", str(data), "-o", str(other), "--overwrite", "--allow-missing-labels"]) == 0
    assert artifact_kind(str(other)) == LMDB_DATASET
    # but never a teacher's label shard (an LMDB too)
    label_dataset(lmdb_path, HarmonicTeacher(), str(files / "labels"), rows=1)
    shard = files / "labels" / "labels.rank0.lmdb"
    labels_before = shard.read_bytes()
    fails(capsys, ["ingest", data, "-o", shard, "--overwrite", "--allow-missing-labels"], "holds teacher labels")
    assert shard.read_bytes() == labels_before
    fails(capsys, ["export", model, "-o", files / "again.pt"], "is an exported model")  # not a checkpoint
    fails(capsys, ["export", ckpt, "-o", "/proc/no/model.pt"], "")


def test_checkpoint_and_json_faults_are_named(files, capsys):
    """A checkpoint whose weights do not fit its settings, or hold NaN: one line, not a state_dict dump;
    JSON outputs are strict (NaN and inf as null)."""
    state = torch.load(files / "ckpt.pt", weights_only=False)
    state["model_hparams"]["hidden"] = 16
    torch.save(state, files / "mismatch.pt")
    fails(capsys, ["export", files / "mismatch.pt", "-o", files / "m.pt"], "weights do not fit its model settings")
    # damaged settings: missing, of a wrong type, unknown to this version (were KeyError/TypeError tracebacks)
    for name, change, message in (("nohp", lambda hp: None, "no model settings"),
                                  ("noname", lambda hp: {k: v for k, v in hp.items() if k != "name"}, "no model settings"),
                                  ("type", lambda hp: dict(hp, hidden="abc"), "do not build a painn student"),
                                  ("newer", lambda hp: dict(hp, gates=2), "another hessforge version"),
                                  ("mode", lambda hp: dict(hp, force_mode="weird"), "do not build a painn student"),
                                  ("arch", lambda hp: dict(hp, name="gemnet"), "unknown student architecture 'gemnet'")):
        state = torch.load(files / "ckpt.pt", weights_only=False)
        state["model_hparams"] = change(state["model_hparams"])
        torch.save(state, files / f"{name}.pt")
        fails(capsys, ["export", files / f"{name}.pt", "-o", files / "m.pt"], message)
    state = torch.load(files / "ckpt.pt", weights_only=False)
    next(v for v in state["model_state"].values() if v.is_floating_point()).fill_(float("nan"))
    state["ema_model_state"] = state["model_state"]
    torch.save(state, files / "nan.pt")
    fails(capsys, ["export", files / "nan.pt", "-o", files / "m.pt"], "NaN or Inf")
    write_json(str(files / "s.json"), {"loss": float("inf"), "mae": [1.0, float("nan")], "n": 0})
    assert json.loads((files / "s.json").read_text()) == {"loss": None, "mae": [1.0, None], "n": 0}


def test_split_files_are_checked(tmp_path, rng, capsys):
    """Split files (data.split_file, evaluate --split-file) missing the split asked for, or with a structure in
    two splits (validation on training data), are refused with the split named."""
    from toy import conformer_dataset
    from training.data.subsets import load_split, save_split

    lmdb_path, _ = conformer_dataset(tmp_path / "data.lmdb", rng)
    from training.data import Dataset

    count = len(Dataset(lmdb_path))
    good = {"train": list(range(0, count - 4)), "val": [count - 4, count - 3], "test": [count - 2, count - 1]}
    save_split(str(tmp_path / "good.json"), good, count=count)
    assert load_split(str(tmp_path / "good.json"), count=count, require=("train", "val")) == good
    for name, split, message in (
            ("overlap", dict(good, val=good["val"] + [0]), "structure 0 is in splits 'train' and 'val'"),
            ("twice", dict(good, test=[count - 1, count - 1]), f"structure {count - 1} is twice in split 'test'"),
            ("noval", {"train": good["train"], "test": good["test"]}, "no 'val' split (it has: train, test)")):
        save_split(str(tmp_path / f"{name}.json"), split, count=count)
        with pytest.raises(HessforgeError) as err:
            load_split(str(tmp_path / f"{name}.json"), count=count, require=("train", "val"))
        assert message in str(err.value)
    (tmp_path / "string.json").write_text(json.dumps({"splits": {"train": "123", "val": [4]}}))
    with pytest.raises(HessforgeError, match="each split must be a list"):  # was read as indices 1, 2, 3
        load_split(str(tmp_path / "string.json"))
    save_split(str(tmp_path / "notest.json"), {"train": good["train"], "val": good["val"]}, count=count)
    write_checkpoint(tmp_path / "ckpt.pt", tiny())
    fails(capsys, ["evaluate", tmp_path / "ckpt.pt", lmdb_path, "--split-file", tmp_path / "notest.json"],
          "notest.json has no 'test' split (it has: train, val); pass --split train|val|all")
    assert main(["evaluate", str(tmp_path / "ckpt.pt"), lmdb_path, "--split-file", str(tmp_path / "notest.json"),
                 "--split", "val"]) == 0


def test_more_command_line_faults_are_named(tmp_path, files, capsys):
    """The rest of an audit's list: each of these ended in a traceback, a silent NaN or a misleading message."""
    config = tmp_path / "c.yaml"
    config.write_text("data: {path: x.lmdb}\nmodel: {hidden: 8}\ndata: {path: y.lmdb}\n")
    fails(capsys, ["train", config], "key 'data' given twice")
    config.write_text("data: {path: x.lmdb}\n")
    fails(capsys, ["train", config, "--epochs", "0"], "--epochs must be >= 1, got 0")
    fails(capsys, ["train", tmp_path], "is a directory; pass its YAML config file")
    (tmp_path / "qq.xyz").write_text("2\nx\nQq 0 0 0\nH 0 0 0.74\n")
    fails(capsys, ["ingest", tmp_path / "qq.xyz", "-o", tmp_path / "qq.lmdb"], "unknown element symbol 'Qq'")
    fails(capsys, ["ingest", tmp_path, "-o", tmp_path / "qq.lmdb"], "is a directory; give a structure file")
    data, ckpt = files / "mols.xyz", files / "ckpt.pt"
    fails(capsys, ["bench", ckpt, data, "--warmup", "-1"], "--warmup must be >= 0")
    assert main(["ingest", str(data), "-o", str(tmp_path / "bare.lmdb"), "--allow-missing-labels"]) == 0
    fails(capsys, ["evaluate", ckpt, tmp_path / "bare.lmdb", "--split", "all"], "have no reference energies or forces")
    fails(capsys, ["evaluate", ckpt, tmp_path / "bare.lmdb", "--split", "all", "--labels", data], "is a file; labels")


def test_config_yaml_merge_keys_still_load(tmp_path):
    """The duplicate-key check of config files leaves YAML anchors and merge keys working."""
    from training.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text("data: {path: x.lmdb}\nloss: {hessian: 0.0}\nmodel: &m {hidden: 8}\n"
                      "train:\n  <<: {epochs: 3, batch_size: 4}\n  epochs: 5\n")
    loaded = load_config(str(config))
    assert loaded.train.epochs == 5 and loaded.train.batch_size == 4 and loaded.model.hidden == 8


def test_md_continued_with_its_seed_draws_new_noise(files):
    """A run continuing another's -o with the same --seed used to replay the first segment's Langevin noise step
    for step; it now draws from (seed, step), still reproducibly."""
    ckpt, data = files / "ckpt.pt", files / "mols.xyz"
    common = ["--integrator", "langevin", "--timestep", "0.25", "--threads", "1", "--dtype", "float64",
              "--batch-size", "2", "--steps", "4", "--seed", "5"]
    first = files / "seg1.xyz"
    assert main(["md", str(ckpt), str(data), "-o", str(first), *common]) == 0
    unnumbered = files / "seg1_unnumbered.xyz"  # the same state, read as a fresh start: the plain seed's stream
    frames = ase.io.read(first, ":")
    for f in frames:
        del f.info["md_step"]
    ase.io.write(unnumbered, frames)
    outs = {}
    for name, start in (("continued", first), ("again", first), ("plain", unnumbered)):
        outs[name] = files / f"seg2_{name}.xyz"
        assert main(["md", str(ckpt), str(start), "-o", str(outs[name]), *common]) == 0
    pos = {k: np.concatenate([a.positions for a in ase.io.read(v, ":")]) for k, v in outs.items()}
    assert np.array_equal(pos["continued"], pos["again"])  # reproducible
    assert np.abs(pos["continued"] - pos["plain"]).max() > 1e-6  # but not the seed's own stream again


def test_md_restart_from_a_traj_file_is_exact(files):
    """-o end.traj keeps positions and momenta in full float64 (extxyz keeps 8 decimals): 6 steps, then 4 more
    from that file, give the 10-step run's state to float64 rounding; the info and momenta numbering carry on."""
    ckpt, data = files / "ckpt.pt", files / "mols.xyz"
    common = ["--integrator", "verlet", "--timestep", "0.5", "--threads", "1", "--dtype", "float64",
              "--batch-size", "2", "--seed", "3"]
    assert main(["md", str(ckpt), str(data), "--steps", "10", "-o", str(files / "ten.traj"), *common]) == 0
    assert main(["md", str(ckpt), str(data), "--steps", "6", "-o", str(files / "six.traj"),
                 "--trajectory", str(files / "t.traj"), "--interval", "3", *common]) == 0
    assert main(["md", str(ckpt), str(files / "six.traj"), "--steps", "4", "-o", str(files / "four.traj"),
                 *common]) == 0
    assert main(["md", str(ckpt), str(data), "--steps", "6", "-o", str(files / "six.xyz"), *common]) == 0
    assert main(["md", str(ckpt), str(files / "six.xyz"), "--steps", "4", "-o", str(files / "four.xyz"),
                 *common]) == 0
    # the 6-step run's --trajectory file continues from its last step's frames (not step 0's)
    assert main(["md", str(ckpt), str(files / "t.traj"), "--steps", "4", "-o", str(files / "four_t.traj"),
                 *common]) == 0
    ten, four = ase.io.read(files / "ten.traj", ":"), ase.io.read(files / "four.traj", ":")
    continued = ase.io.read(files / "four_t.traj", ":")
    assert len(continued) == 2
    for a, b in zip(ten, continued):
        assert b.info["md_step"] == 10 and np.abs(b.positions - a.positions).max() < 1e-12
    # --all-frames: the trajectory's frames as starting structures (its first two: step 0's)
    assert main(["md", str(ckpt), str(files / "t.traj"), "--steps", "0", "--all-frames", "-o",
                 str(files / "zero.traj"), *common]) == 0
    assert [a.info["md_step"] for a in ase.io.read(files / "zero.traj", ":")] == [0, 0]
    assert [a.info["md_step"] for a in four] == [10, 10] and [a.info["md_system"] for a in four] == [0, 1]
    assert [a.info["md_step"] for a in ase.io.read(files / "t.traj", ":")] == [0, 0, 3, 3, 6, 6]
    via_xyz = ase.io.read(files / "four.xyz", ":")
    worst_traj = max(np.abs(b.positions - a.positions).max() for a, b in zip(ten, four))
    worst_xyz = max(np.abs(b.positions - a.positions).max() for a, b in zip(ten, via_xyz))
    assert worst_traj < 1e-12 < worst_xyz, (worst_traj, worst_xyz)
    for a, b in zip(ten, four):
        np.testing.assert_allclose(b.get_momenta(), a.get_momenta(), rtol=0, atol=1e-12)


def test_md_continues_from_the_last_complete_step_of_a_trajectory(capsys):
    """A trajectory whose last report was cut short (a killed run) continues from the last step that has every
    system; files that are not md trajectories (no md_step, or one step: an -o file) are left as they are."""
    from ase import Atoms

    from training.md_cli import last_snapshot

    def frame(step, system):
        return Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7 + step + 0.1 * system]],
                     info={"md_step": step, "md_system": system})

    frames = [frame(s, k) for s in (0, 5, 10) for k in (1, 0)] + [frame(15, 0)]
    got = last_snapshot(frames, "t.xyz")
    assert [(a.info["md_step"], a.info["md_system"]) for a in got] == [(10, 0), (10, 1)]
    err = capsys.readouterr().err
    assert "step 15 has 1 of 2 systems; continuing from step 10" in err and "steps 0 to 15" in err
    assert last_snapshot([frame(5, 0), frame(5, 1)], "end.xyz") is None
    assert last_snapshot([Atoms("H"), Atoms("H")], "plain.xyz") is None
