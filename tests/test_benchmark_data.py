"""`hessforge build-benchmark` end to end on 2 tiny structures (QM9 water, sto-3g, 20 MD steps), plus the
shared DFT helpers: units against finite differences, failure recording, resume, torn-file repair."""
import json
import os

import numpy as np
import pytest

from training import dft as D
from training import benchmark_data
from training.benchmark_data import split_molecules

TINY = ["--heavy-atoms", "1", "--require-elements", "O", "--max-molecules", "1", "--conformers", "2",
        "--equil-steps", "10", "--stride", "5", "--basis", "sto-3g", "--no-progress"]


# QM9 molecule 3 (water) as qm9pack's CSV holds it. Written as the folder's selection.json (the builder's cache
# of its QM9 selection) so the end-to-end test runs without the 104 MB qm9pack wheel; test_select_qm9 reads it.
WATER = {"mol_id": "qm9_000003", "qm9_index": 3, "smiles": "O", "symbols": ["O", "H", "H"], "n_atoms": 3,
         "positions": [[-0.0343604951, 0.9775395708, 0.0076015923], [0.0647664923, 0.0205721989, 0.0015346341],
                       [0.8717903737, 1.3007924048, 0.0006931336]]}


def _needs_science():
    for mod in ("pyscf", "torchani"):
        pytest.importorskip(mod)


def _write_selection(out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "selection.json"), "w") as f:
        json.dump({"n_candidates": 1, "filter": {"heavy_atoms": 1, "require": "O", "allowed": "HCNO"}, "seed": 0,
                   "molecules": [WATER]}, f)


def test_select_qm9():
    pytest.importorskip("qm9pack")
    from training.benchmark_data import select_qm9

    mols, n = select_qm9(heavy_atoms=1, require=("O",))
    assert n == 1 and mols == [{k: v for k, v in WATER.items() if k != "n_atoms"}]
    mols, n = select_qm9(heavy_atoms=9, require=("N", "O"), seed=0, max_molecules=3)
    assert n > 50000 and len(mols) == 3
    for m in mols:
        assert set(m["symbols"]) <= set("HCNO") and {"N", "O"} <= set(m["symbols"])
        assert sum(s != "H" for s in m["symbols"]) == 9 and np.shape(m["positions"]) == (len(m["symbols"]), 3)
    assert select_qm9(heavy_atoms=9, require=("N", "O"), seed=0, max_molecules=5)[0][:3] == mols  # a prefix


def test_filters_outside_qm9_and_dry_runs_write_no_settings(tmp_path, capsys):
    """A filter QM9 cannot satisfy is refused by name (it used to select 0 of 0 molecules and record itself), and
    a dry run records no settings, so a real run with other settings is not refused because of it."""
    from training.cli import main as cli

    out = str(tmp_path / "b")
    for bad, msg in ((["--allowed-elements", "HCNXx"], "QM9 holds only H, C, N, O, F; got Xx"),
                     (["--require-elements", "U"], "got U"),
                     (["--require-elements", "F"], "--require-elements F not in --allowed-elements HCNO"),
                     (["--allowed-elements", "CNO"], "must include H"),
                     (["--heavy-atoms", "0"], "--heavy-atoms must be 1 to 9"),
                     (["--split", "0.5,0.5"], "--split needs 3")):
        assert cli(["build-benchmark", "--out", out, *bad]) == 2
        assert msg in capsys.readouterr().err, bad
        assert not os.path.exists(out) or os.listdir(out) == []
    _write_selection(out)
    assert cli(["build-benchmark", "--out", out, *TINY, "--dry-run"]) == 0
    assert not os.path.exists(os.path.join(out, "config.json"))
    assert cli(["build-benchmark", "--out", out, *TINY, "--report-only"]) == 0  # nothing built: nothing recorded
    assert not os.path.exists(os.path.join(out, "config.json"))


def _dft_records(out):
    return [r for r in D.read_log(os.path.join(out, "build.log.jsonl")) if r.get("stage") == "dft"]


def _refuse(*args, **kwargs):
    raise AssertionError("recomputed something a rerun must skip")


def test_build_benchmark_end_to_end(tmp_path, monkeypatch):
    _needs_science()
    from ase.units import Hartree

    from training.cli import main as cli

    out = str(tmp_path / "bench")
    _write_selection(out)
    # 1. SCF capped at one cycle (DIIS, then Newton): both frames fail in a worker process, each recorded with
    #    the reason, none written, none silently dropped.
    assert cli(["build-benchmark", "--out", out, *TINY, "--max-cycle", "1", "--workers", "1"]) == 0
    recs = _dft_records(out)
    assert sorted(r["conf_id"] for r in recs) == [0, 1]
    assert all(r["status"] == "failed" and "SCFNotConverged" in r["reason"] for r in recs)
    assert D.read_extxyz(os.path.join(out, "labels.extxyz")) == []
    assert "SCFNotConverged" in open(os.path.join(out, "PROVENANCE.md")).read()
    assert len(D.read_extxyz(os.path.join(out, "conformers.extxyz"))) == 2

    # 2. Rerun: failed frames are not retried (no loop forever), MD is not redone.
    monkeypatch.setattr(D, "dft_label", _refuse)
    monkeypatch.setattr(D, "sample_conformers_md", _refuse)
    assert cli(["build-benchmark", "--out", out, *TINY, "--workers", "0"]) == 0
    assert len(_dft_records(out)) == 2
    monkeypatch.undo()

    # 3. --retry-failed with the default max_cycle labels both (in this process; the MD is still reused).
    monkeypatch.setattr(D, "sample_conformers_md", _refuse)
    assert cli(["build-benchmark", "--out", out, *TINY, "--workers", "0", "--retry-failed"]) == 0
    frames = D.read_extxyz(os.path.join(out, "labels.extxyz"))
    assert sorted(D.frame_key(f) for f in frames) == [("qm9_000003", 0), ("qm9_000003", 1)]
    for f in frames:
        e, forces = f.get_potential_energy(), f.get_forces()
        assert f.get_chemical_formula() == "H2O" and forces.shape == (3, 3)
        assert -80 < e / Hartree < -70  # water, total energy in eV (about -75 Ha)
        assert np.all(np.isfinite(forces)) and 0.01 < np.abs(forces).max() < 50  # eV/Å of a 300-600 K snapshot
        assert abs(forces.sum(axis=0)).max() < 0.05  # no net force
        assert 300 <= f.info["temperature_K"] <= 600

    # 4. Rerun: nothing recomputed, nothing appended.
    monkeypatch.setattr(D, "dft_label", _refuse)
    n_log = len(_dft_records(out))
    assert cli(["build-benchmark", "--out", out, *TINY, "--workers", "0"]) == 0
    assert len(_dft_records(out)) == n_log
    assert len(D.read_extxyz(os.path.join(out, "labels.extxyz"))) == 2
    monkeypatch.undo()

    # 5. Other settings in the same folder are refused (they would mix two datasets).
    assert cli(["build-benchmark", "--out", out, *[x.replace("sto-3g", "6-31g*") for x in TINY]]) == 2
    assert cli(["build-benchmark", "--out", out, *TINY, "--d-functions", "cartesian"]) == 2
    # a folder built before d_functions was recorded used pure d shells: what auto means for sto-3g
    config = json.load(open(os.path.join(out, "config.json")))
    assert config.pop("d_functions") == "spherical"
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    monkeypatch.setattr(D, "dft_label", _refuse)
    assert cli(["build-benchmark", "--out", out, *TINY, "--workers", "0"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["d_functions"] == "spherical"  # now recorded
    assert cli(["build-benchmark", "--out", out, *TINY, "--d-functions", "cartesian"]) == 2
    # without --d-functions a folder is resumed and reported on with its own setting, not auto's (the
    # committed qm9_no9, pure d shells in 6-31G*, was refused by bench/science/run.sh's --report-only)
    json.dump(dict(config, d_functions="cartesian"), open(os.path.join(out, "config.json"), "w"))
    for extra in ([], ["--report-only"], ["--dry-run"]):
        assert cli(["build-benchmark", "--out", out, *TINY, "--workers", "0", *extra]) == 0, extra
    assert json.load(open(os.path.join(out, "config.json")))["d_functions"] == "cartesian"
    assert "with Cartesian d shells" in open(os.path.join(out, "PROVENANCE.md")).read()
    assert cli(["build-benchmark", "--out", out, *TINY, "--d-functions", "spherical"]) == 2
    json.dump(dict(config, d_functions="spherical"), open(os.path.join(out, "config.json"), "w"))
    monkeypatch.undo()

    # Outputs: a split the trainer can load, a provenance with the resume command.
    from training.data.subsets import load_split

    split = load_split(os.path.join(out, "split.json"), count=2)
    assert split["train"] == [0, 1] and split["val"] == [] and split["test"] == []
    meta = json.load(open(os.path.join(out, "split.json")))
    assert meta["groups"]["train"] == ["qm9_000003"]
    prov = open(os.path.join(out, "PROVENANCE.md")).read()
    assert "**Labelled: 2**" in prov and f"hessforge build-benchmark --out {out}" in prov

    # --report-only from another code version keeps the versions the labels were made with (the log's)
    versions = next(line for line in prov.split("\n") if line.startswith("python "))
    monkeypatch.setattr(benchmark_data, "_versions", lambda: {"python": "9.9", "git commit": "elsewhere"})
    assert cli(["build-benchmark", "--out", out, *TINY, "--report-only"]) == 0
    again = open(os.path.join(out, "PROVENANCE.md")).read()
    assert versions in again and "elsewhere" not in again


def test_one_builder_per_folder(tmp_path):
    import fcntl

    from training.cli import main as cli

    out = str(tmp_path / "bench")
    _write_selection(out)
    with open(os.path.join(out, ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a build running on the folder
        assert cli(["build-benchmark", "--out", out, *TINY, "--workers", "0"]) == 2
    assert D.read_log(os.path.join(out, "build.log.jsonl")) == []  # refused before doing or logging anything


def test_dft_forces_match_finite_differences():
    """eV and eV/Å: the analytic forces equal minus the central difference of the energy."""
    _needs_science()
    from ase import Atoms

    atoms = Atoms("OH2", positions=[[0.0, 0.0, 0.1], [0.0, 0.80, -0.45], [0.0, -0.70, -0.50]])  # strained
    e0, forces = D.dft_label(atoms, basis="sto-3g", xc="wb97x", threads=2)
    i, k, h = 1, 1, 2e-3  # H1, y, Å
    es = []
    for s in (+1, -1):
        a = atoms.copy()
        a.positions[i, k] += s * h
        es.append(D.dft_label(a, basis="sto-3g", xc="wb97x", threads=2, forces=False)[0])
    fd = -(es[0] - es[1]) / (2 * h)
    assert abs(forces[i, k]) > 1.0  # a force worth comparing
    assert abs(fd - forces[i, k]) < 0.02 + 0.01 * abs(fd), (fd, forces[i, k])


def test_d_shells_follow_gaussian_as_ani1x_labels_did():
    """ANI-1x's ωB97x/6-31G(d) comes from Gaussian, which uses Cartesian d shells (6D) for the 6-31G family and
    pure ones (5D) for most others; pyscf uses pure shells unless told: another basis, another energy."""
    for basis in ("6-31g*", "6-31G(d)", "6-31g**", "6-31G(d,p)", "6-31+g*", "3-21g"):
        assert D.gaussian_cartesian(basis), basis
    for basis in ("6-311g*", "6-311+G(d,p)", "cc-pvdz", "def2-svp", "sto-3g"):
        assert not D.gaussian_cartesian(basis), basis
    with pytest.raises(ValueError, match="d functions must be one of"):
        D.resolve_d_functions("6-31g*", "pure")
    _needs_science()
    from ase import Atoms

    water = Atoms("OH2", positions=[[0.0, 0.0, 0.12], [0.0, 0.76, -0.47], [0.0, -0.76, -0.47]])
    e = {d: D.dft_label(water, basis="6-31g*", threads=1, forces=False, d_functions=d)[0]
         for d in ("auto", "cartesian", "spherical")}
    assert e["auto"] == e["cartesian"]
    assert e["cartesian"] < e["spherical"] - 1e-3  # one more (s-like) function per d shell: variationally lower


def test_dft_label_records_nonconvergence():
    _needs_science()
    from ase import Atoms

    water = Atoms("OH2", positions=[[0.0, 0.0, 0.1], [0.0, 0.80, -0.45], [0.0, -0.70, -0.50]])
    with pytest.raises(D.SCFNotConverged, match="not converged in 1 DIIS cycles"):
        D.dft_label(water, basis="sto-3g", xc="wb97x", max_cycle=1, newton_fallback=False)


def test_read_extxyz_drops_and_repairs_a_torn_frame(tmp_path):
    from ase import Atoms

    path = str(tmp_path / "f.extxyz")
    for c in range(2):
        a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74 + 0.01 * c]])
        a.info = {"mol_id": "m", "conf_id": c}
        D.append_extxyz(path, a)
    whole = open(path).read()
    with open(path, "a") as f:
        f.write(whole[: len(whole) // 4])  # a kill mid-write (or a copy taken then)
    assert [D.frame_key(a) for a in D.read_extxyz(path)] == [("m", 0), ("m", 1)]
    assert open(path).read() != whole  # read alone leaves the file as it is
    assert len(D.read_extxyz(path, repair=True)) == 2
    assert open(path).read() == whole  # repaired: the next append starts on a frame boundary


def test_log_reader_skips_a_torn_line_and_tracks_retries(tmp_path):
    path = str(tmp_path / "log.jsonl")
    D.log_record(path, stage="dft", mol_id="a", conf_id=0, status="failed", reason="x")
    D.log_record(path, stage="dft", mol_id="a", conf_id=1, status="failed", reason="y")
    D.log_record(path, stage="dft", mol_id="a", conf_id=1, status="ok")
    with open(path, "a") as f:
        f.write('{"stage": "dft", "mol_')
    assert D.failed_keys(path) == {("a", 0)}


def test_split_by_molecule_is_stable_as_the_selection_grows():
    ids = [f"m{i}" for i in range(50)]
    small, big = split_molecules(ids[:20]), split_molecules(ids)
    for name in small:
        assert big[name][: len(small[name])] == small[name]
    assert [len(big[n]) for n in ("train", "val", "test")] == [40, 5, 5]
    assert not set(big["train"]) & set(big["test"])
