"""Baselines beside Hessian KD: n2n and a2a feature distillation (labels, batches, loss, heads, checkpoints),
the baseline sweep (`hessforge sweep`) and the config checks."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from engine.checkpoint import load_student, read_checkpoint
from engine.errors import HessforgeError
from engine.models import build_student
from training.config import config_from_dict, load_config
from training.data.batch import collate
from training.data.records import pack
from training.labels import LabelRecord, LabelStore, label_dataset
from training.losses import DistillationHeads, LossWeights, compute_loss
from training.trainer import Trainer
from toy import HarmonicTeacher, conformer_dataset, epoch_records

torch.set_num_threads(1)
D_FEAT = 5
D_EMB = 3


class FeatureTeacher(HarmonicTeacher):
    """The toy teacher with per-atom features [N, 5] and per-element embeddings [3] (as MACE has)."""

    name = "harmonic-features"

    def atomic_features(self, atoms):
        pos = atoms.positions
        return np.column_stack([atoms.numbers / 8.0, np.tanh(pos), (pos ** 2).sum(1) / 10.0])

    def element_embeddings(self):
        return {z: np.array([np.sin(z), np.cos(z), z / 8.0]) for z in sorted(self.elements)}


class PartialEmbeddingTeacher(FeatureTeacher):
    name = "harmonic-partial"

    def element_embeddings(self):
        return {z: v for z, v in super().element_embeddings().items() if z != 7}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A dataset and three labels directories: with features and embeddings (k=4), plain (k=3), and with
    embeddings that lack nitrogen."""
    root = tmp_path_factory.mktemp("baselines")
    path, structures = conformer_dataset(root / "data.lmdb", np.random.default_rng(7))
    label_dataset(path, FeatureTeacher(), str(root / "feat"), rows=4, features=True, embeddings=True)
    label_dataset(path, HarmonicTeacher(), str(root / "plain"), rows=3)
    label_dataset(path, PartialEmbeddingTeacher(), str(root / "partial"), rows=3, embeddings=True)
    return {"root": root, "path": path, "structures": structures, "feat": str(root / "feat"),
            "plain": str(root / "plain"), "partial": str(root / "partial")}


def _student(species=(1, 6, 7, 8), seed=0):
    torch.manual_seed(seed)
    return build_student("painn", species=list(species), hidden=8, layers=1, num_basis=6, cutoff=4.0).double()


# ------------------------------------------------------------------------------------------- labels
def test_features_and_embeddings_are_stored_and_loaded(toy):
    store = LabelStore(toy["feat"])
    assert store.metadata["features"] == {"dim": D_FEAT, "dtype": "float32"} and store.feature_dim == D_FEAT
    teacher = FeatureTeacher()
    for s in toy["structures"][:5]:
        rec = store.get(s.id)
        assert rec.features.dtype == np.float32 and rec.features.shape == (s.natoms, D_FEAT)
        np.testing.assert_allclose(rec.features, teacher.atomic_features(s.to_atoms()), rtol=1e-6, atol=1e-7)
    table = store.element_embeddings()
    assert sorted(table) == [1, 6, 7, 8]
    for z, v in teacher.element_embeddings().items():
        np.testing.assert_array_equal(table[z], v)
    summary = json.loads(open(os.path.join(toy["feat"], "labels.json")).read())
    assert summary["features"]["dim"] == D_FEAT and summary["element_embeddings"]["dim"] == D_EMB
    # a batch carries the features, concatenated in atom order
    batch = collate(toy["structures"][:3], store, cutoff=4.0, dtype=torch.float64)
    expected = np.concatenate([store.get(s.id).features for s in toy["structures"][:3]])
    assert torch.equal(batch.teacher_features, torch.from_numpy(expected).double())


def test_labels_without_features_still_load(toy):
    plain = LabelStore(toy["plain"])
    assert plain.feature_dim is None and plain.element_embeddings() is None
    s = toy["structures"][0]
    assert plain.get(s.id).features is None
    assert collate(toy["structures"][:3], plain, cutoff=4.0).teacher_features is None
    # a record written before features existed (no such array) reads as "without"
    rec = plain.get(s.id)
    old = pack({"id": rec.id, "energy": rec.energy},
               {"forces": rec.forces, "rows": rec.rows, "hessian_rows": rec.hessian_rows})
    assert LabelRecord.from_bytes(old).features is None
    # metadata without the new keys (labels made before them) is compatible with labels made without them
    from training.labels import _diff

    meta = dict(plain.metadata)
    old_meta = {k: v for k, v in meta.items() if k not in ("features", "element_embeddings")}
    assert _diff(old_meta, meta) == ""


def test_feature_requests_fail_clearly(toy, tmp_path):
    with pytest.raises(HessforgeError, match=r"teacher harmonic has no atomic_features.*--features"):
        label_dataset(toy["path"], HarmonicTeacher(), str(tmp_path / "x"), rows=3, features=True)
    with pytest.raises(HessforgeError, match=r"teacher harmonic has no element_embeddings.*--embeddings"):
        label_dataset(toy["path"], HarmonicTeacher(), str(tmp_path / "y"), rows=3, embeddings=True)

    class BadShape(FeatureTeacher):
        def atomic_features(self, atoms):
            return np.zeros((len(atoms) + 1, 2))

    with pytest.raises(HessforgeError, match=r"atomic_features returned shape"):
        label_dataset(toy["path"], BadShape(), str(tmp_path / "z"), rows=3, features=True)
    # resuming a directory labelled without features, now with them, is refused (records would be mixed)
    label_dataset(toy["path"], FeatureTeacher(), str(tmp_path / "w"), rows=3, limit=2)
    with pytest.raises(HessforgeError, match="different settings: features"):
        label_dataset(toy["path"], FeatureTeacher(), str(tmp_path / "w"), rows=3, features=True)


def test_ani_has_features_but_no_embeddings():
    from training.teachers.ani import ANI1xTeacher
    from training.teachers.base import Teacher
    from training.teachers.mace import MACETeacher

    assert Teacher.atomic_features is None and Teacher.element_embeddings is None
    assert callable(ANI1xTeacher.atomic_features) and ANI1xTeacher.element_embeddings is None
    assert callable(MACETeacher.atomic_features) and callable(MACETeacher.element_embeddings)


# ------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["l2mae", "mse"])
def test_n2n_loss_is_brute_force_and_reaches_student_and_projection(toy, kind):
    store = LabelStore(toy["feat"])
    batch = collate(toy["structures"][:4], store, cutoff=4.0, dtype=torch.float64)
    model = _student()
    heads = DistillationHeads(node_features=8, teacher_features=D_FEAT).double()
    weights = LossWeights(energy=0.0, forces=0.0, hessian=0.0, n2n=3.0, kind=kind)
    terms = compute_loss(model, batch, weights, training=True, heads=heads)
    # brute force: atom by atom
    s = model(batch.graph, compute_forces=False)["node_features"].detach()
    W, b = heads.n2n.weight.detach(), heads.n2n.bias.detach()
    per = []
    for i in range(s.shape[0]):
        d = W @ s[i] + b - batch.teacher_features[i]
        per.append(float(d.square().mean()) if kind == "mse" else float(torch.sqrt(d.square().sum())))
    assert float(terms["n2n"].detach()) == pytest.approx(np.mean(per), rel=1e-10)
    assert float(terms["total"].detach()) == pytest.approx(3.0 * np.mean(per), rel=1e-10)
    terms["total"].backward()
    assert heads.n2n.weight.grad.abs().sum() > 0 and heads.n2n.bias.grad.abs().sum() > 0
    assert model.embedding.weight.grad.abs().sum() > 0
    assert model.updates[0].mlp[0].weight.grad.abs().sum() > 0  # through the message passing


def test_a2a_loss_is_brute_force_and_reaches_embedding_only(toy):
    store = LabelStore(toy["feat"])
    batch = collate(toy["structures"][:4], store, cutoff=4.0, dtype=torch.float64)
    model = _student()
    table = store.element_embeddings()
    heads = DistillationHeads(embedding_features=8, teacher_embeddings=table).double()
    weights = LossWeights(energy=0.0, forces=0.0, hessian=0.0, a2a=2.0)
    terms = compute_loss(model, batch, weights, training=True, heads=heads)
    Q, c = heads.a2a.weight.detach(), heads.a2a.bias.detach()
    per = []
    for z in batch.graph.numbers.tolist():
        x = model.embedding.weight.detach()[model.species.index(z)]
        per.append(float(torch.linalg.vector_norm(Q @ x + c - torch.as_tensor(table[z]))))
    assert float(terms["a2a"].detach()) == pytest.approx(np.mean(per), rel=1e-10)
    assert float(terms["total"].detach()) == pytest.approx(2.0 * np.mean(per), rel=1e-10)
    terms["total"].backward()
    assert heads.a2a.weight.grad.abs().sum() > 0 and model.embedding.weight.grad.abs().sum() > 0
    g = model.updates[0].mlp[0].weight.grad  # only the embedding table is pulled
    assert g is None or not g.any()


def test_loss_refuses_missing_pieces(toy):
    plain = collate(toy["structures"][:2], LabelStore(toy["plain"]), cutoff=4.0, dtype=torch.float64)
    model = _student()
    with pytest.raises(HessforgeError, match="no teacher features"):
        compute_loss(model, plain, LossWeights(hessian=0.0, n2n=1.0), heads=DistillationHeads(8, D_FEAT).double())
    with pytest.raises(HessforgeError, match="needs the distillation heads"):
        compute_loss(model, plain, LossWeights(hessian=0.0, a2a=1.0))
    with pytest.raises(HessforgeError, match="no a2a projection"):
        compute_loss(model, plain, LossWeights(hessian=0.0, a2a=1.0), heads=DistillationHeads())


# ------------------------------------------------------------------------------------------- trainer
def _config(toy, out, labels="feat", epochs=2, **loss):
    return config_from_dict({
        "data": {"path": toy["path"], "labels": toy[labels], "train": 0.6, "val": 0.2, "test": 0.2},
        "model": {"hidden": 8, "layers": 1, "num_basis": 6, "cutoff": 4.0},
        "loss": {"hessian": 0.0, **loss},
        "train": {"out": str(out), "epochs": epochs, "batch_size": 4, "checkpoint_every": 1},
    })


def test_trainer_keeps_heads_through_checkpoints_and_resume(toy, tmp_path):
    loss = dict(n2n=2.0, a2a=1.0)
    straight = Trainer(_config(toy, tmp_path / "a", epochs=3, **loss))
    straight.fit()
    Trainer(_config(toy, tmp_path / "b", epochs=2, **loss)).fit()
    state = read_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert {"n2n.weight", "n2n.bias", "a2a.weight", "a2a.bias", "a2a_table", "a2a_known"} <= set(state["heads_state"])
    resumed = Trainer(_config(toy, tmp_path / "b", epochs=3, **loss))
    for k, v in state["heads_state"].items():  # restored, not re-initialized
        assert torch.equal(resumed.heads.state_dict()[k], v)
    resumed.fit()
    a, b = epoch_records(tmp_path / "a"), epoch_records(tmp_path / "b")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["train_n2n"] == pytest.approx(y["train_n2n"], rel=1e-6)
        assert x["train_a2a"] == pytest.approx(y["train_a2a"], rel=1e-6)
    for k, v in straight.heads.state_dict().items():  # the heads were optimized, identically
        assert torch.allclose(resumed.heads.state_dict()[k], v, rtol=1e-5, atol=1e-7)
    assert not torch.equal(straight.heads.n2n.weight, torch.as_tensor(state["heads_state"]["n2n.weight"]))
    # the student alone is what load_student / export see
    model = load_student(str(tmp_path / "a" / "best.pt"))
    assert not any(k.startswith(("n2n", "a2a")) for k in model.state_dict())
    # resuming under other n2n/a2a settings is refused
    with pytest.raises(HessforgeError, match=r"started with another config \(loss.n2n: 2.0 -> 0.0; loss.a2a"):
        Trainer(_config(toy, tmp_path / "b", epochs=4))


def test_bad_configs(toy, tmp_path):
    base = {"data": {"path": "x.lmdb"}}
    for loss, pattern in (({"n2n": -1.0}, "loss.n2n must be a number >= 0"),
                          ({"a2a": "big"}, "loss.a2a must be a number, got .big."),
                          ({"hessian": 0.0, "n2n": 1.0}, r"loss.n2n > 0 needs teacher labels.*--features"),
                          ({"hessian": 0.0, "a2a": 1.0}, r"loss.a2a > 0 needs teacher labels.*--embeddings"),
                          ({"hessian_rows": 0}, "hessian_rows must be an integer >= 1")):
        with pytest.raises(HessforgeError, match=pattern):
            config_from_dict({**base, "loss": loss}, where="c.yaml")
    plain = toy["plain"]
    with pytest.raises(HessforgeError, match=rf"{plain}: loss.n2n > 0 needs teacher per-atom features"):
        Trainer(_config(toy, tmp_path / "n", labels="plain", n2n=1.0))
    with pytest.raises(HessforgeError, match=rf"{plain}: loss.a2a > 0 needs teacher per-element embeddings"):
        Trainer(_config(toy, tmp_path / "e", labels="plain", a2a=1.0))
    with pytest.raises(HessforgeError, match=r"no element embedding for Z=\[7\]"):
        Trainer(_config(toy, tmp_path / "p", labels="partial", a2a=1.0))


# ------------------------------------------------------------------------------------------- sweep
def _base(toy, tmp_path, labels, **loss):
    values = {"data": {"path": toy["path"], "labels": toy[labels], "train": 0.6, "val": 0.2, "test": 0.2},
              "model": {"hidden": 8, "layers": 1, "num_basis": 6, "cutoff": 4.0},
              "loss": {"energy": 7.0, "forces": 50.0, **loss},
              "train": {"out": "ignored", "epochs": 1, "batch_size": 4}}
    path = tmp_path / f"base_{labels}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_sweep_writes_every_baseline(toy, tmp_path):
    from training.baselines import write_sweep

    out = tmp_path / "sweep"
    index = write_sweep(_base(toy, tmp_path, "feat"), str(out))
    names = [r["name"] for r in index["runs"]]
    assert names == ["undistilled", "force_distill", "n2n", "a2a", "kd_s1", "kd_s4", "kd_s1_nohalve",
                     "kd_lambda10", "kd_lambda100", "kd_lambda1000"]
    assert index["aliases"] == {"kd_lambda400": "kd_s1"} and index["skipped"] == []
    expect = {  # name: (hessian, rows, halve, force_distill, n2n, a2a)
        "undistilled": (0, 1, True, 0, 0, 0), "force_distill": (0, 1, True, 50, 0, 0),
        "n2n": (0, 1, True, 0, 100, 0), "a2a": (0, 1, True, 0, 0, 100), "kd_s1": (400, 1, True, 0, 0, 0),
        "kd_s4": (400, 4, True, 0, 0, 0), "kd_s1_nohalve": (400, 1, False, 0, 0, 0),
        "kd_lambda10": (10, 1, True, 0, 0, 0), "kd_lambda100": (100, 1, True, 0, 0, 0),
        "kd_lambda1000": (1000, 1, True, 0, 0, 0)}
    for r in index["runs"]:
        cfg = load_config(r["config"])
        lc = cfg.loss
        got = (lc.hessian, lc.hessian_rows, lc.halve_kd_when_better_than_teacher, lc.force_distill, lc.n2n, lc.a2a)
        assert got == expect[r["name"]], r["name"]
        assert (lc.energy, lc.forces) == (7.0, 50.0)  # the same loss weights everywhere
        assert cfg.train.out == str(out / r["name"]) and cfg.data.labels == toy["feat"]
    assert json.loads((out / "sweep.json").read_text())["runs"] == index["runs"]


def test_sweep_skips_what_the_labels_cannot_support_and_runs_resumably(toy, tmp_path, capsys):
    from training.cli import main

    base = _base(toy, tmp_path, "plain", hessian=100.0)
    out = tmp_path / "sweep"
    assert main(["sweep", base, "-o", str(out), "--lambdas", "10,100", "--n2n-weight", "1,10"]) == 0
    index = json.loads((out / "sweep.json").read_text())
    skipped = {s["name"]: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"n2n_w1", "n2n_w10", "a2a", "kd_s4"}
    assert "--features" in skipped["n2n_w1"] and "ANI-1x does not" in skipped["a2a"] and "k = 3" in skipped["kd_s4"]
    assert index["aliases"] == {"kd_lambda100": "kd_s1"}
    assert load_config(str(out / "kd_s1.yaml")).loss.hessian == 100.0
    capsys.readouterr()
    assert main(["sweep", base, "-o", str(out), "--run", "--only", "undistilled,kd_lambda100"]) == 0
    assert (out / "undistilled" / "summary.json").exists() and (out / "kd_s1" / "summary.json").exists()
    assert not (out / "force_distill").exists()
    capsys.readouterr()
    assert main(["sweep", base, "-o", str(out), "--run", "--only", "undistilled"]) == 0
    assert "already done" in capsys.readouterr().err
    # bad input: one clear line
    assert main(["sweep", base, "-o", str(out), "--run", "--only", "nope"]) == 2
    assert "no run named ['nope']" in capsys.readouterr().err
    # a started run's config is never silently rewritten with other settings
    changed = yaml.safe_load(open(base))
    changed["loss"]["energy"] = 8.0
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    assert main(["sweep", str(tmp_path / "changed.yaml"), "-o", str(out)]) == 2
    assert "undistilled.yaml exists with other settings and its run has started" in capsys.readouterr().err
    # more epochs for a started sweep: accepted, and the finished runs train on
    longer = yaml.safe_load(open(base))
    longer["train"]["epochs"] += 1
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(longer))
    assert main(["sweep", str(tmp_path / "longer.yaml"), "-o", str(out), "--run", "--only", "undistilled"]) == 0
    assert "already done" not in capsys.readouterr().err
    summary = json.loads((out / "undistilled" / "summary.json").read_text())
    assert summary["epochs"] == longer["train"]["epochs"] and summary["finished"]
    # --only without --run, and an unknown --only name: refused before anything is written
    assert main(["sweep", base, "-o", str(tmp_path / "s3"), "--only", "undistilled"]) == 2
    assert "add --run" in capsys.readouterr().err
    assert main(["sweep", base, "-o", str(tmp_path / "s3"), "--run", "--only", "nope"]) == 2
    assert not (tmp_path / "s3").exists()
    nolabels = tmp_path / "nolabels.yaml"
    nolabels.write_text(yaml.safe_dump({"data": {"path": toy["path"]}, "loss": {"hessian": 0.0}}))
    assert main(["sweep", str(nolabels), "-o", str(tmp_path / "s2")]) == 2
    assert "needs teacher labels" in capsys.readouterr().err


def test_sweep_energy_weights_and_unweighted_validation_errors(toy, tmp_path, capsys):
    """--energy-weights adds undistilled and kd_s1 at each λ_U (the base's own value is an alias); their
    results are printed with unweighted validation errors, which compare across loss weights."""
    from training.cli import main

    base = _base(toy, tmp_path, "plain", hessian=100.0)
    out = tmp_path / "sweep"
    assert main(["sweep", base, "-o", str(out), "--lambdas", "100", "--energy-weights", "7,70"]) == 0
    index = json.loads((out / "sweep.json").read_text())
    assert {"undistilled_u70", "kd_s1_u70"} <= {r["name"] for r in index["runs"]}
    assert index["aliases"]["undistilled_u7"] == "undistilled" and index["aliases"]["kd_s1_u7"] == "kd_s1"
    und, kd = load_config(str(out / "undistilled_u70.yaml")), load_config(str(out / "kd_s1_u70.yaml"))
    assert (und.loss.energy, und.loss.hessian) == (70.0, 0.0)
    assert (kd.loss.energy, kd.loss.hessian, kd.loss.hessian_rows, kd.loss.forces) == (70.0, 100.0, 1, 50.0)
    capsys.readouterr()
    assert main(["sweep", base, "-o", str(out), "--lambdas", "100", "--energy-weights", "7,70", "--run",
                 "--only", "kd_s1_u70"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "kd_s1_u70" / "summary.json").read_text())
    epochs = [json.loads(line) for line in open(out / "kd_s1_u70" / "log.jsonl") if '"kind": "epoch"' in line]
    best = [r for r in epochs if r["val_loss_ef"] == summary["best_val_loss_ef"]][-1]
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best_val"]["forces_mae_mev_per_A"] == best["val_forces_mae_mev_per_A"]
    assert f"F {best['val_forces_mae_mev_per_A']:.1f} meV/Å (epoch {best['epoch']})" in printed
    assert main(["sweep", base, "-o", str(tmp_path / "s4"), "--energy-weights", "0"]) == 2
    assert "--energy-weights must be positive" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- real teachers
def test_mace_features_are_invariant_and_embeddings_per_element(tmp_path):
    pytest.importorskip("mace")
    from ase.build import molecule
    from toy import small_mace_model
    from training.teachers.mace import MACETeacher

    model = small_mace_model(0)
    torch.save(model, tmp_path / "m.model")
    teacher = MACETeacher(str(tmp_path / "m.model"))
    atoms = molecule("CH3CONH2")
    atoms.positions += np.random.default_rng(3).normal(scale=0.05, size=atoms.positions.shape)
    feats = teacher.atomic_features(atoms)
    assert feats.shape == (len(atoms), 32)  # the 16 invariant channels of each of the 2 layers
    rotated = atoms.copy()
    rotated.rotate(37, (1, 2, 3), center="COM")
    np.testing.assert_allclose(teacher.atomic_features(rotated), feats, atol=1e-9)
    emb = teacher.element_embeddings()
    assert sorted(emb) == [1, 6, 7, 8] and all(v.shape == (16,) for v in emb.values())
    one_hot = torch.zeros(1, 4, dtype=torch.float64)
    one_hot[0, 2] = 1.0  # index 2 of the model's table is nitrogen
    np.testing.assert_allclose(emb[7], teacher.model.node_embedding(one_hot)[0].numpy())
