"""Teacher labels: deterministic row sampling, crash-safe resume, rank shards, clear refusals, batching."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.errors import HessforgeError
from training.data.records import Structure
from training.data.store import Dataset, shared_reader, write_dataset
from training.labels import LabelStore, check_labels_match, label_dataset, list_shards, sample_rows
from toy import HarmonicTeacher, harmonic

TESTS = os.path.dirname(os.path.abspath(__file__))


class Harmonic(HarmonicTeacher):
    """The toy teacher, counting its calls and optionally slow (for the crash test)."""

    def __init__(self, delay=0.0, name=None):
        super().__init__()
        self.calls, self.delay = 0, delay
        if name:
            self.name = name

    def compute(self, atoms, rows=None):
        self.calls += 1
        out = super().compute(atoms, rows)
        if self.delay:
            print("computed", flush=True)  # the crash test kills the process between these lines
            time.sleep(self.delay)
        return out


def make_dataset(path, rng, n=12, extra_element_at=None):
    structures = []
    for i in range(n):
        natoms = int(rng.integers(1, 7))
        numbers = rng.choice([1, 6, 8], size=natoms)
        if i == extra_element_at:
            numbers[-1] = 9
        structures.append(Structure(id=f"mol{i}-c{int(rng.integers(100))}", group=f"g{i % 4}", numbers=numbers,
                                    positions=rng.normal(scale=1.5, size=(natoms, 3)), energy=0.0,
                                    forces=np.zeros((natoms, 3))))
    write_dataset(str(path), structures)
    return str(path), structures


def contents(directory):
    store = LabelStore(directory)
    ids = store.ids()
    assert len(ids) == len(set(ids))
    return {i: store.get(i).to_bytes() for i in ids}


def test_sample_rows_are_deterministic_and_distinct(rng):
    seed = int(rng.integers(1 << 30))
    n = int(rng.integers(2, 30))
    k = int(rng.integers(1, 3 * n))
    a = sample_rows("x-1", n, k, seed)
    assert np.array_equal(a, sample_rows("x-1", n, k, seed)) and len(np.unique(a)) == k
    assert a.min() >= 0 and a.max() < 3 * n and a.dtype == np.int64
    assert np.array_equal(sample_rows("x-1", n, None, seed), np.arange(3 * n))
    assert np.array_equal(sample_rows("x-1", n, 3 * n + 5, seed), np.arange(3 * n))
    draws = [tuple(sample_rows(f"id{j}", 10, 3, seed)) for j in range(50)]
    assert len(set(draws)) > 40  # ids draw different rows
    counts = np.bincount(np.concatenate([sample_rows(f"u{j}", 4, 2, seed) for j in range(3000)]), minlength=12)
    assert counts.min() > 400 and counts.max() < 600  # uniform: 500 expected per coordinate


def test_labels_match_teacher_and_store_metadata(tmp_path, rng):
    path, structures = make_dataset(tmp_path / "d.lmdb", rng)
    k = int(rng.integers(1, 6))
    stats = label_dataset(path, Harmonic(), tmp_path / "lab", rows=k, seed=3, dtype="float64")
    assert stats["labelled"] == len(structures)
    store = LabelStore(tmp_path / "lab")
    meta = store.metadata
    assert (meta["teacher"], meta["mode"], meta["k"], meta["seed"], meta["dtype"]) == ("harmonic", "rows", k, 3, "float64")
    assert meta["units"] == {"energy": "eV", "forces": "eV/Å", "hessian": "eV/Å²", "stress": "eV/Å³"} and meta["source_count"] == 12
    for s in structures:
        rec = store.get(s.id)
        e, f, h = harmonic(s.positions)
        assert np.array_equal(rec.rows, sample_rows(s.id, s.natoms, k, 3))
        assert rec.energy == e and np.array_equal(rec.forces, f) and np.array_equal(rec.hessian_rows, h[rec.rows])
    full = label_dataset(path, Harmonic(), tmp_path / "full", rows="full")
    rec = LabelStore(tmp_path / "full").get(structures[0].id)
    assert full["labelled"] == 12 and rec.hessian_rows.dtype == np.float32
    assert rec.hessian_rows.shape == (3 * structures[0].natoms,) * 2


def test_resume_after_simulated_crash_equals_uninterrupted(tmp_path, rng):
    path, structures = make_dataset(tmp_path / "d.lmdb", rng)
    label_dataset(path, Harmonic(), tmp_path / "ref", rows=4, seed=7)

    class Crashing(Harmonic):
        def compute(self, atoms, rows=None):
            if self.calls == 5:
                raise KeyboardInterrupt
            return super().compute(atoms, rows)

    with pytest.raises(KeyboardInterrupt):
        label_dataset(path, Crashing(), tmp_path / "run", rows=4, seed=7)
    assert len(LabelStore(tmp_path / "run")) == 5
    again = Harmonic()
    stats = label_dataset(path, again, tmp_path / "run", rows=4, seed=7)
    assert again.calls == 7 and stats == {"labelled": 7, "skipped": 5, "todo": 7, "unknown": 0, "unknown_elements": []}
    assert contents(tmp_path / "run") == contents(tmp_path / "ref")
    assert label_dataset(path, Harmonic(), tmp_path / "run", rows=4, seed=7)["labelled"] == 0


def test_resume_after_kill_9_equals_uninterrupted(tmp_path, rng):
    path, structures = make_dataset(tmp_path / "d.lmdb", rng)
    script = (f"import sys; sys.path.insert(0, {TESTS!r})\n"
              "from test_labels import Harmonic\nfrom training.labels import label_dataset\n"
              f"label_dataset({path!r}, Harmonic(delay=0.05), {str(tmp_path / 'run')!r}, rows=3, seed=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(int(rng.integers(2, 6))):
        assert proc.stdout.readline().strip() == "computed"
    time.sleep(float(rng.uniform(0, 0.05)))  # land anywhere in compute or commit
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    done = len(LabelStore(tmp_path / "run"))
    assert 1 <= done < len(structures)
    resumed = Harmonic()
    label_dataset(path, resumed, tmp_path / "run", rows=3, seed=1)
    assert resumed.calls == len(structures) - done
    label_dataset(path, Harmonic(), tmp_path / "ref", rows=3, seed=1)
    assert contents(tmp_path / "run") == contents(tmp_path / "ref")


def test_rank_shards_merge_to_single_rank_run(tmp_path, rng):
    path, structures = make_dataset(tmp_path / "d.lmdb", rng, n=int(rng.integers(5, 12)))
    limit = len(structures) - 1
    for r in (1, 0):
        label_dataset(path, Harmonic(), tmp_path / "ddp", rows=2, seed=5, rank=r, world_size=2, limit=limit)
    label_dataset(path, Harmonic(), tmp_path / "one", rows=2, seed=5, limit=limit)
    shards = list_shards(str(tmp_path / "ddp"))
    assert [os.path.basename(s) for s in shards] == ["labels.rank0.lmdb", "labels.rank1.lmdb"]
    assert set(LabelStore(tmp_path / "ddp").ids()) == {s.id for s in structures[:limit]}
    merged = contents(tmp_path / "ddp")
    assert merged == contents(tmp_path / "one") and len(merged) == limit
    # Each shard holds exactly its rank's indices.
    for r, shard in enumerate(shards):
        with shared_reader(shard, "label shard").begin() as txn:
            keys = {bytes(k).decode() for k in txn.cursor().iternext(values=False)} - {"__hessforge_meta__"}
        assert keys == {s.id for i, s in enumerate(structures[:limit]) if i % 2 == r}
    # Resuming with another world size labels only what is missing (here: nothing).
    assert label_dataset(path, Harmonic(), tmp_path / "ddp", rows=2, seed=5, limit=limit)["labelled"] == 0


def test_refuses_to_resume_with_other_settings(tmp_path, rng):
    path, _ = make_dataset(tmp_path / "d.lmdb", rng)
    label_dataset(path, Harmonic(), tmp_path / "lab", rows=3, seed=0, limit=4)
    with pytest.raises(HessforgeError, match=r"different settings: teacher \('harmonic' vs 'other'\)"):
        label_dataset(path, Harmonic(name="other"), tmp_path / "lab", rows=3, seed=0)
    with pytest.raises(HessforgeError, match=r"mode \('rows' vs 'full'\), k \(3 vs None\)"):
        label_dataset(path, Harmonic(), tmp_path / "lab", rows="full", seed=0)
    with pytest.raises(HessforgeError, match=r"seed \(0 vs 1\)"):
        label_dataset(path, Harmonic(), tmp_path / "lab", rows=3, seed=1)
    other, _ = make_dataset(tmp_path / "e.lmdb", rng)
    with pytest.raises(HessforgeError, match="source_ids_sha256"):
        label_dataset(other, Harmonic(), tmp_path / "lab", rows=3, seed=0)
    # the same ids with moved atoms (a file ingested again to the same path): refused, never mixed
    moved = [Structure(id=s.id, group=s.group, numbers=s.numbers, positions=s.positions + 0.01, energy=0.0,
                       forces=np.zeros_like(s.positions)) for s in Dataset(path)]
    write_dataset(str(tmp_path / "moved.lmdb"), moved)
    with pytest.raises(HessforgeError, match="source_geometry_sha256"):
        label_dataset(str(tmp_path / "moved.lmdb"), Harmonic(), tmp_path / "lab", rows=3, seed=0)
    # the same atoms and positions in a periodic cell (a lattice corrected on re-ingest): refused too
    boxed = [Structure(id=s.id, group=s.group, numbers=s.numbers, positions=s.positions, cell=np.eye(3) * 30.0,
                       pbc=True, energy=0.0, forces=np.zeros_like(s.positions)) for s in Dataset(path)]
    write_dataset(str(tmp_path / "boxed.lmdb"), boxed)
    with pytest.raises(HessforgeError, match="source_setting_sha256"):
        label_dataset(str(tmp_path / "boxed.lmdb"), Harmonic(), tmp_path / "lab", rows=3, seed=0)
    with pytest.raises(HessforgeError, match="other cells, periodic boundary conditions or total charges"):
        check_labels_match(LabelStore(tmp_path / "lab"), Dataset(str(tmp_path / "boxed.lmdb")))
    store = LabelStore(tmp_path / "lab")  # labels from before the setting digest was recorded: not checked by it
    del store.metadata["source_setting_sha256"]
    check_labels_match(store, Dataset(str(tmp_path / "boxed.lmdb")))
    with pytest.raises(HessforgeError, match="limit must be a positive number"):
        label_dataset(path, Harmonic(), tmp_path / "lab", rows=3, seed=0, limit=0)
    assert len(LabelStore(tmp_path / "lab")) == 4


def test_a_teacher_file_replaced_at_the_same_path_is_another_teacher(tmp_path, rng):
    """mace:FILE names a file: the labels record its SHA-256, and a resume with other contents is refused."""
    path, _ = make_dataset(tmp_path / "d.lmdb", rng)
    model_file = tmp_path / "teacher.model"
    model_file.write_bytes(b"weights one")
    teacher = Harmonic()
    teacher.path = str(model_file)
    label_dataset(path, teacher, tmp_path / "lab", rows=2, limit=3)
    assert LabelStore(tmp_path / "lab").metadata["teacher_file_sha256"] is not None
    label_dataset(path, teacher, tmp_path / "lab", rows=2, limit=5)  # the same file: resumes
    model_file.write_bytes(b"weights two")
    with pytest.raises(HessforgeError, match="teacher_file_sha256"):
        label_dataset(path, teacher, tmp_path / "lab", rows=2)
    assert len(LabelStore(tmp_path / "lab")) == 5


def test_damaged_shard_is_one_clear_error(tmp_path, rng):
    """A bad page inside a shard (LMDB has no checksums; here both meta pages point the main tree at a
    page past the end) is a HessforgeError naming the file, not an lmdb traceback."""
    import struct

    path, _ = make_dataset(tmp_path / "d.lmdb", rng)
    label_dataset(path, Harmonic(), tmp_path / "lab", rows=2)
    shard = tmp_path / "lab" / "labels.rank0.lmdb"
    with open(shard, "r+b") as fh:
        for meta_page in (0, 4096):  # MDB_meta: the main database's root page number at byte 128
            fh.seek(meta_page + 128)
            fh.write(struct.pack("<Q", 10**6))
    with pytest.raises(HessforgeError, match=r"labels.rank0.lmdb: labels file is damaged \(PageNotFound"):
        LabelStore(tmp_path / "lab")
    with pytest.raises(HessforgeError, match="file is damaged"):
        label_dataset(path, Harmonic(), tmp_path / "lab", rows=2)


def test_unknown_element_fails_before_any_teacher_call(tmp_path, rng):
    bad = int(rng.integers(3, 12))
    path, structures = make_dataset(tmp_path / "d.lmdb", rng, extra_element_at=bad)
    teacher = Harmonic()
    with pytest.raises(HessforgeError, match=rf"structure '{structures[bad].id}': unknown element\(s\) F \(Z=9\)"):
        label_dataset(path, teacher, tmp_path / "lab", rows=2, rank=1, world_size=3)
    assert teacher.calls == 0


def test_structures_with_unknown_elements_can_be_left_unlabelled(tmp_path, rng, monkeypatch, capsys):
    """--skip-unknown-elements labels the structures the teacher can and leaves the others (it refused the whole
    dataset), says which elements and how to train without them; training ids holding them are named."""
    import training.teachers
    from training.cli import main

    bad = int(rng.integers(3, 12))
    path, structures = make_dataset(tmp_path / "d.lmdb", rng, extra_element_at=bad)
    monkeypatch.setattr(training.teachers, "load_teacher", lambda spec: Harmonic())
    out = str(tmp_path / "lab")
    assert main(["label", path, "--teacher", "harmonic", "--rows", "2", "-o", out]) == 2
    assert "or label the others with --skip-unknown-elements" in capsys.readouterr().err
    assert main(["label", path, "--teacher", "harmonic", "--rows", "2", "-o", out, "--skip-unknown-elements"]) == 0
    said = capsys.readouterr().out
    assert "labelled 11 structures" in said and "left 1 structure(s) unlabelled: they hold F" in said
    store = LabelStore(out)
    assert sorted(store.ids()) == sorted(s.id for k, s in enumerate(structures) if k != bad)
    check_labels_match(store, Dataset(path), [s.id for k, s in enumerate(structures) if k != bad])
    with pytest.raises(HessforgeError, match="they hold elements the teacher does not know .*data.elements"):
        check_labels_match(store, Dataset(path), [structures[bad].id])
    # data.elements leaves the unlabelled structure out of a given split file too (it was used unfiltered)
    from training.config import config_from_dict
    from training.data.subsets import save_split
    from training.trainer import Trainer

    save_split(str(tmp_path / "split.json"), {"train": [k for k in range(12) if k % 4], "val": [0, 4, 8]}, count=12)
    cfg = config_from_dict({"data": {"path": path, "labels": out, "split_file": str(tmp_path / "split.json"),
                                     "elements": [1, 6, 8]},
                            "model": {"hidden": 8, "layers": 1, "num_basis": 6, "cutoff": 4.0},
                            "loss": {"hessian_rows": 2}, "train": {"out": str(tmp_path / "run"), "epochs": 1}})
    capsys.readouterr()
    trainer = Trainer(cfg)
    assert bad not in trainer.train_idx + trainer.val_idx
    assert sorted(trainer.train_idx + trainer.val_idx) == [k for k in range(12) if k != bad]
    which = "val" if bad % 4 == 0 else "train"
    assert f"leave out 1 of the {3 if which == 'val' else 9} {which} structures of" in capsys.readouterr().err


def test_label_store_errors(tmp_path):
    with pytest.raises(HessforgeError, match="no such labels directory"):
        LabelStore(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(HessforgeError, match="no label shards"):
        LabelStore(tmp_path / "empty")
    (tmp_path / "empty" / "labels.rank0.lmdb").write_bytes(os.urandom(5000))
    with pytest.raises(HessforgeError, match="labels.rank0.lmdb"):
        LabelStore(tmp_path / "empty")


def test_cli_label_and_resume(tmp_path, rng, monkeypatch, capsys):
    import training.teachers
    from training.cli import main

    path, structures = make_dataset(tmp_path / "d.lmdb", rng, n=5)
    monkeypatch.setattr(training.teachers, "load_teacher", lambda spec: Harmonic())
    out = str(tmp_path / "lab")
    assert main(["label", path, "--teacher", "harmonic", "--rows", "2", "-o", out, "--limit", "3"]) == 0
    assert "labelled 3 structures" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["label", path, "--teacher", "harmonic", "--rows", "2", "-o", out]) == 0
    assert "labelled 2 structures, 3 already done" in capsys.readouterr().out
    assert main(["label", path, "--teacher", "harmonic2", "--rows", "2", "-o", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher_spec ('harmonic' vs 'harmonic2')" in err[0]
    assert main(["label", path, "--teacher", "harmonic", "--rows", "zero", "-o", out]) == 2


def test_batched_vjp_recovers_teacher_rows(tmp_path, rng):
    """The packing contract end to end: one backward pass per sample t with `hessian_grad_outputs` gives, on
    every structure's atoms, exactly the stored teacher row (here the teacher is the same analytic energy)."""
    import torch

    from training.data.batch import hessian_grad_outputs, make_loader

    path, structures = make_dataset(tmp_path / "d.lmdb", rng, n=9)
    label_dataset(path, Harmonic(), tmp_path / "lab", rows=4, dtype="float64")
    labels = LabelStore(tmp_path / "lab")
    s = 3
    loader = make_loader(Dataset(path), list(range(1, 9)), labels, cutoff=1.0, batch_size=4, shuffle=True,
                         seed=int(rng.integers(100)), dtype=torch.float64, s=s)
    seen = 0
    for batch in loader:
        pos = batch.graph.positions.clone().requires_grad_(True)
        i, j = torch.triu_indices(len(pos), len(pos), 1)
        same = batch.graph.batch[i] == batch.graph.batch[j]  # pairs inside one structure only
        r = (pos[j[same]] - pos[i[same]]).norm(dim=1)
        energy = (0.5 * 2.0 * (r - 1.2) ** 2).sum()
        (grad,) = torch.autograd.grad(energy, pos, create_graph=True)
        v = hessian_grad_outputs(batch)
        (hv,) = torch.autograd.grad(grad.reshape(-1), pos, grad_outputs=v, is_grads_batched=True)
        assert torch.allclose(hv, batch.hessian_target, atol=1e-10)
        assert torch.allclose(batch.teacher_forces, -grad.detach(), atol=1e-10)
        seen += batch.num_structures
    assert seen == 8


def test_loader_with_workers_is_reproducible(tmp_path, rng):
    import torch

    from training.data.batch import make_loader

    path, _ = make_dataset(tmp_path / "d.lmdb", rng, n=10)
    label_dataset(path, Harmonic(), tmp_path / "lab", rows=5)
    labels = LabelStore(tmp_path / "lab")
    labels.get(labels.ids()[0])  # opened in the parent before the workers fork

    def epoch(collate_seed=None):
        loader = make_loader(Dataset(path), None, labels, cutoff=2.0, batch_size=3, shuffle=True, seed=4,
                             dtype=torch.float32, s=2, num_workers=2)
        if collate_seed is not None:
            loader.collate_fn.seed = collate_seed
        return [(b.ids, b.hessian_index.tolist()) for b in loader]

    first = epoch()
    assert first == epoch()
    assert sorted(i for ids, _ in first for i in ids) == sorted(Dataset(path).ids())
    assert [h for _, h in epoch(collate_seed=99)] != [h for _, h in first]  # a new seed draws other rows


def test_concurrent_ranks_like_torchrun(tmp_path, rng):
    """Two ranks started together (as torchrun does, via RANK/WORLD_SIZE) write their own shards at once."""
    path, structures = make_dataset(tmp_path / "d.lmdb", rng, n=10)
    out = str(tmp_path / "ddp")
    script = (f"import os, sys; sys.path.insert(0, {TESTS!r})\n"
              "from test_labels import Harmonic\nfrom training.labels import label_dataset\n"
              f"label_dataset({path!r}, Harmonic(), {out!r}, rows=3, seed=2,\n"
              "              rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    label_dataset(path, Harmonic(), tmp_path / "one", rows=3, seed=2)
    assert len(list_shards(out)) == 2
    assert contents(out) == contents(tmp_path / "one")


def test_two_processes_cannot_label_one_shard(tmp_path):
    """A second labelling run on a shard being written (two runs on one -o, or srun ranks without RANK) is
    refused in one line; the claim ends with the run."""
    from training.labels import _claim_shard

    shard = str(tmp_path / "labels.rank0.lmdb")
    first = _claim_shard(shard, 0)
    with pytest.raises(HessforgeError, match="rank 0 of these labels is being written by another process"):
        _claim_shard(shard, 0)
    first.close()
    _claim_shard(shard, 0).close()


def test_a_teacher_file_under_another_path_spelling_is_the_same_teacher():
    """mace:PATH / lammps:PATH labels resume (and their shards merge) when the path is spelled differently
    but the file's digest is the same; another file is still another teacher."""
    from training.labels import _diff

    a = {"teacher": "mace:/data/m.model", "teacher_spec": "mace:/data/m.model", "teacher_file_sha256": "x", "k": 2}
    b = dict(a, teacher="mace:m.model", teacher_spec="mace:m.model")
    assert _diff(a, b) == ""
    assert "teacher_file_sha256" in _diff(a, dict(b, teacher_file_sha256="y"))
    assert "k (2 vs 3)" in _diff(a, dict(b, k=3))


def test_structure_charge_reaches_the_teacher_and_neutral_teachers_refuse_it(tmp_path, rng):
    """A charged structure's info['charge'] goes to the teacher (SO3LR reads it); a teacher that models neutral
    structures only refuses it by name instead of labelling it as the neutral molecule."""
    charge = int(rng.integers(1, 3)) * int(rng.choice([-1, 1]))
    s = Structure(id="ion", group="ion", numbers=[8, 1], positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.97]],
                  energy=0.0, forces=np.zeros((2, 3)), info={"charge": charge})
    path = str(tmp_path / "d.lmdb")
    write_dataset(path, [s])

    class ChargeAware(Harmonic):
        takes_charge = True

        def compute(self, atoms, rows=None):
            self.seen = atoms.info.get("charge")
            return super().compute(atoms, rows)

    aware = ChargeAware()
    label_dataset(path, aware, tmp_path / "ok", rows=2)
    assert aware.seen == charge
    neutral = Harmonic()
    with pytest.raises(HessforgeError, match=f"structure ion: total charge {charge}.*neutral structures only"):
        label_dataset(path, neutral, tmp_path / "refused", rows=2)
    assert neutral.calls == 0


def test_a_run_that_failed_before_its_first_label_does_not_hold_the_folder(tmp_path, rng):
    """The wrong teacher (chgnet on molecules) failed at its first structure after writing the shard's
    settings; the corrected rerun into the same folder was refused as 'made with different settings' though
    nothing was labelled. Once a structure is labelled, other settings are still refused."""
    path, structures = make_dataset(tmp_path / "d.lmdb", rng)

    class Refusing(Harmonic):
        def compute(self, atoms, rows=None):
            raise HessforgeError("teacher refusing: molecules are not its kind")

    for world_size in (1, 2):  # a sharded run leaves a settings-only shard per rank
        out = tmp_path / f"labels{world_size}"
        for rank in range(world_size):
            with pytest.raises(HessforgeError, match="molecules are not its kind"):
                label_dataset(path, Refusing(name="refusing"), out, rows=2, seed=1, rank=rank, world_size=world_size)
        stats = label_dataset(path, Harmonic(), out, rows=4, seed=7)
        assert stats["labelled"] == len(structures)
        store = LabelStore(out)
        assert store.metadata["teacher"] == Harmonic().name and store.metadata["k"] == 4
        with pytest.raises(HessforgeError, match="made with different settings"):
            label_dataset(path, Harmonic(), out, rows=2, seed=7)
    assert len(list_shards(tmp_path / "labels2")) == 2  # rank 1's settings-only shard is left, and ignored
    assert contents(tmp_path / "labels2") == contents(tmp_path / "labels1")
    # a settings-only shard that a live run holds (still at its first, slow label) is not a failed run's
    from training.labels import _claim_shard, shard_path

    out = tmp_path / "live"
    with pytest.raises(HessforgeError, match="molecules are not its kind"):
        label_dataset(path, Refusing(name="refusing"), out, rows=2, seed=1, rank=1, world_size=2)
    owner = _claim_shard(shard_path(out, 1), 1)
    try:
        with pytest.raises(HessforgeError, match="made with different settings"):
            label_dataset(path, Harmonic(), out, rows=4, seed=7, rank=0, world_size=2)
    finally:
        owner.close()
    assert label_dataset(path, Harmonic(), out, rows=4, seed=7, rank=0, world_size=2)["labelled"] > 0
