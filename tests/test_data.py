"""Datasets: ingest round trips, clear errors on bad input, subsets, group splits and training batches."""
import json
import os
import struct

import lmdb
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

import ase.db
import ase.io
from engine.errors import HessforgeError
from training.data.batch import Batch, batch_to, collate, hessian_grad_outputs, make_loader
from training.data.ingest import closest_pair, ingest
from training.data.records import Structure
from training.data.store import META_KEY, Dataset, index_key, write_dataset
from training.cli import main
from training.data.subsets import load_split, save_split, select, split_by_group
from training.labels import LabelRecord


def random_frames(rng, n=7, periodic_every=3):
    frames = []
    for i in range(n):
        natoms = int(rng.integers(1, 9))
        while True:  # ingest refuses atoms closer than 0.3 Å (images included)
            a = Atoms(numbers=rng.choice([1, 6, 7, 8], size=natoms), positions=rng.normal(scale=2.0, size=(natoms, 3)))
            if i % periodic_every == 1:
                a.cell = np.diag(rng.uniform(6, 9, size=3)) + rng.normal(scale=0.3, size=(3, 3))
                a.pbc = [True, True, bool(rng.integers(2))]
            if closest_pair(a.numbers, a.positions, a.cell[:], a.pbc, 0.5) is None:
                break
        a.info["mol_id"] = f"mol{int(rng.integers(3))}"
        a.calc = SinglePointCalculator(a, energy=float(rng.normal(-1000, 50)), forces=rng.normal(size=(natoms, 3)))
        frames.append(a)
    return frames


def assert_same(structure, atoms, group):
    assert np.array_equal(structure.numbers, atoms.numbers)
    assert np.array_equal(structure.positions, atoms.positions)
    assert np.array_equal(structure.cell, np.asarray(atoms.cell[:]))
    assert np.array_equal(structure.pbc, atoms.pbc)
    assert structure.energy == atoms.get_potential_energy()
    assert np.array_equal(structure.forces, atoms.get_forces())
    assert structure.group == group


def test_ingest_extxyz_round_trip(tmp_path, rng):
    frames = random_frames(rng)
    src = tmp_path / "mols.extxyz"
    ase.io.write(src, frames)
    out = tmp_path / "mols.lmdb"
    assert ingest(src, out) == len(frames)
    back = ase.io.read(src, index=":")  # extxyz keeps ~8 decimals: compare with what ASE itself reads
    ds = Dataset(out)
    assert len(ds) == len(frames) and ds.ids() == [f"mols-{i}" for i in range(len(frames))]
    assert ds.groups() == [a.info["mol_id"] for a in frames]
    order = rng.permutation(len(frames))  # random access order
    for i in order:
        assert_same(ds[int(i)], back[i], frames[i].info["mol_id"])
    assert ds.metadata["magic"] == "hessforge-dataset" and ds.metadata["count"] == len(frames)
    assert ds.metadata["source"] == os.path.abspath(src)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_ingest_ase_db_round_trip_exact(tmp_path, rng):
    frames = random_frames(rng)
    src = tmp_path / "mols.db"
    with ase.db.connect(src) as db:
        for k, a in enumerate(frames):
            db.write(a, mol_id=a.info["mol_id"], name=f"n{k}")
    out = tmp_path / "mols.lmdb"
    ingest(src, out, id_key="name")
    ds = Dataset(out)
    assert ds.ids() == [f"n{k}" for k in range(len(frames))]
    for i, a in enumerate(frames):  # sqlite keeps float64: bit-exact against the original frames
        assert_same(ds[i], a, a.info["mol_id"])


def test_geometry_digest_recorded_at_ingest_equals_a_read_through(tmp_path, rng):
    frames = random_frames(rng)
    src = tmp_path / "mols.extxyz"
    ase.io.write(src, frames)
    ingest(src, tmp_path / "a.lmdb")
    ds = Dataset(tmp_path / "a.lmdb")
    recorded = ds.metadata["geometry_sha256"]
    del ds.metadata["geometry_sha256"]  # a dataset written before the digest was recorded: read through
    assert ds.geometry_digest() == recorded and ds.metadata["geometry_sha256"] == recorded
    # one atom moved by 1e-3 Å (ids, count and elements unchanged) gives another digest
    i = int(rng.integers(len(frames)))
    frames[i].positions[int(rng.integers(len(frames[i])))] += 1e-3
    ase.io.write(src, frames)
    ingest(src, tmp_path / "b.lmdb")
    other = Dataset(tmp_path / "b.lmdb")
    assert other.ids() == ds.ids() and other.geometry_digest() != recorded


def test_setting_digest_covers_cell_pbc_and_charge(tmp_path, rng):
    """setting_sha256 (what labels are also checked against) is recorded at write time, equals a read-through,
    and changes with a cell, a pbc flag or a total charge while the geometry digest does not."""
    frames = random_frames(rng)
    for a in frames:
        a.info["charge"] = 0
    src = tmp_path / "mols.extxyz"

    def digests(name):
        ase.io.write(src, frames)
        ingest(src, tmp_path / name)
        ds = Dataset(tmp_path / name)
        recorded = ds.metadata["setting_sha256"]
        del ds.metadata["setting_sha256"], ds.metadata["geometry_sha256"]
        assert ds.setting_digest() == recorded
        return ds.geometry_digest(), recorded

    geometry, setting = digests("a.lmdb")
    i = int(rng.integers(len(frames)))
    frames[i].info["charge"] = 1
    g_charge, s_charge = digests("charge.lmdb")
    frames[i].info["charge"] = 0
    frames[i].pbc = True
    frames[i].set_cell(np.diag(rng.uniform(20.0, 30.0, size=3)))
    g_cell, s_cell = digests("cell.lmdb")
    frames[i].set_cell(frames[i].cell * 1.01)
    g_cell2, s_cell2 = digests("cell2.lmdb")
    assert geometry == g_charge == g_cell == g_cell2
    assert len({setting, s_charge, s_cell, s_cell2}) == 4


def brute_force_closest(positions, cell, pbc, reach=2):
    """(pairs, d): the smallest distance between two atoms or an atom and an image (lattice translations up to
    `reach`) and every pair (i <= j) at it to 1e-9 Å (an atom and its own image tie across all atoms)."""
    found = []
    ranges = [range(-reach, reach + 1) if p else range(1) for p in pbc]
    for a in ranges[0]:
        for b in ranges[1]:
            for c in ranges[2]:
                shift = np.array([a, b, c]) @ cell
                for i in range(len(positions)):
                    for j in range(len(positions)):
                        if i == j and not (a or b or c):
                            continue
                        found.append((min(i, j), max(i, j), np.linalg.norm(positions[j] + shift - positions[i])))
    d = min((f[2] for f in found), default=np.inf)
    return {(i, j) for i, j, dij in found if dij <= d + 1e-9}, d


def test_closest_pair_matches_brute_force(rng):
    for trial in range(12):
        n = int(rng.integers(1, 7))
        pbc = rng.integers(2, size=3).astype(bool) if trial % 2 else np.zeros(3, bool)
        cell = np.diag(rng.uniform(3.0, 5.0, size=3)) + rng.normal(scale=0.4, size=(3, 3))
        pos = rng.uniform(0, 4.0, size=(n, 3))
        pairs, d = brute_force_closest(pos, cell, pbc)
        found = closest_pair(np.ones(n, dtype=np.int64), pos, cell, pbc, cutoff=d + 1e-6 if np.isfinite(d) else 1.0)
        if not np.isfinite(d):
            assert found is None
            continue
        assert found is not None and found[2] == pytest.approx(d, abs=1e-9) and tuple(sorted(found[:2])) in pairs
        assert closest_pair(np.ones(n, dtype=np.int64), pos, cell, pbc, cutoff=d - 1e-6) is None


def test_ingest_converts_units(tmp_path, rng):
    """A file in Hartree and Bohr (forces Hartree/Bohr) ingested with --energy-unit/--length-unit gives the
    dataset of the same frames written in eV and Å."""
    import ase.units

    frames = random_frames(rng)
    ase.io.write(tmp_path / "ev.extxyz", frames)
    au = []
    for a in frames:
        b = a.copy()
        b.positions = a.positions / ase.units.Bohr
        b.cell = a.cell[:] / ase.units.Bohr
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy() / ase.units.Hartree,
                                       forces=a.get_forces() / (ase.units.Hartree / ase.units.Bohr))
        au.append(b)
    ase.io.write(tmp_path / "au.extxyz", au)
    ingest(tmp_path / "ev.extxyz", tmp_path / "ev.lmdb")
    main(["ingest", str(tmp_path / "au.extxyz"), "-o", str(tmp_path / "au.lmdb"), "--energy-unit", "Hartree",
          "--length-unit", "bohr"])
    ev, au = Dataset(tmp_path / "ev.lmdb"), Dataset(tmp_path / "au.lmdb")
    assert au.metadata["ingest"]["input_units"] == {"energy": "Hartree", "length": "bohr"}
    read_back = ase.io.read(tmp_path / "au.extxyz", index=":")  # extxyz keeps 8 decimals: the exact inputs
    hartree, bohr = ase.units.Hartree, ase.units.Bohr
    for x, y, b in zip(ev, au, read_back):
        np.testing.assert_allclose(y.positions, b.positions * bohr, rtol=1e-14, atol=0)
        np.testing.assert_allclose(y.cell, b.cell[:] * bohr, rtol=1e-14, atol=0)
        np.testing.assert_allclose(y.forces, b.get_forces() * hartree / bohr, rtol=1e-14, atol=0)
        assert y.energy == pytest.approx(b.get_potential_energy() * hartree, rel=1e-14)
        # and the same frames as the eV/Å file, to the file's 8 decimals
        np.testing.assert_allclose(y.positions, x.positions, atol=1e-7)
        np.testing.assert_allclose(y.forces, x.forces, atol=1e-6)
        assert y.energy == pytest.approx(x.energy, rel=1e-9)
    with pytest.raises(HessforgeError, match="unknown energy unit 'kcal'.*kcal/mol"):
        ingest(tmp_path / "ev.extxyz", tmp_path / "x.lmdb", energy_unit="kcal")


def test_ingest_refuses_overlapping_atoms_and_warns_of_bohr(tmp_path, rng, capsys):
    from ase.build import molecule

    water = molecule("H2O")
    for a in (water,):
        a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((3, 3)))
    # lengths in nm: every bond is shorter than 0.3 "Å"
    nm = water.copy()
    nm.positions = water.positions / 10
    nm.calc = SinglePointCalculator(nm, energy=-1.0, forces=np.zeros((3, 3)))
    ase.io.write(tmp_path / "nm.extxyz", [water, nm])
    with pytest.raises(HessforgeError, match=r"nm\.extxyz: frame 1: atoms 0 \(O\) and 1 \(H\) are 0\.0\d+ Å apart.*--length-unit nm"):
        ingest(tmp_path / "nm.extxyz", tmp_path / "nm.lmdb")
    assert not os.path.exists(tmp_path / "nm.lmdb")
    # an atom on top of another one's periodic image
    box = Atoms("H2", positions=[[0.05, 1, 1], [4.9, 1, 1]], cell=[5, 5, 5], pbc=True)
    box.calc = SinglePointCalculator(box, energy=-1.0, forces=np.zeros((2, 3)))
    ase.io.write(tmp_path / "box.extxyz", box)
    with pytest.raises(HessforgeError, match=r"atoms 0 \(H\) and 1 \(H\) are 0\.15 Å apart"):
        ingest(tmp_path / "box.extxyz", tmp_path / "box.lmdb")
    # an atom written twice in a periodic frame: ingest's own message, naming the file and frame (build_graph's
    # coincident-atom check answered first, as 'structure 0'), and its unit hint for a periodic frame in pm
    good = Atoms("H2", positions=[[1.0, 1, 1], [1.8, 1, 1]], cell=[5, 5, 5], pbc=True)
    good.calc = SinglePointCalculator(good, energy=-1.0, forces=np.zeros((2, 3)))
    twice = good.copy()
    twice.positions[1] = twice.positions[0]
    twice.calc = SinglePointCalculator(twice, energy=-1.0, forces=np.zeros((2, 3)))
    ase.io.write(tmp_path / "twice.extxyz", [good, twice])
    with pytest.raises(HessforgeError, match=r"twice\.extxyz: frame 1: atoms 0 \(H\) and 1 \(H\) are 0 Å apart"):
        ingest(tmp_path / "twice.extxyz", tmp_path / "twice.lmdb")
    big = Atoms("H2", positions=[[100.0, 100, 100], [100.5, 100, 100]], cell=[800, 800, 800], pbc=True)
    big.calc = SinglePointCalculator(big, energy=-1.0, forces=np.zeros((2, 3)))
    ase.io.write(tmp_path / "big.extxyz", big)
    with pytest.raises(HessforgeError, match=r"frame 0: .* after the --length-unit conversion"):
        ingest(tmp_path / "big.extxyz", tmp_path / "big.lmdb", length_unit="pm")
    # lengths in Bohr: ingested (nothing overlaps) with a warning; with --length-unit bohr, none
    bohr = water.copy()
    bohr.positions = water.positions / 0.5291772105638411
    bohr.calc = SinglePointCalculator(bohr, energy=-1.0, forces=np.zeros((3, 3)))
    ase.io.write(tmp_path / "bohr.extxyz", [bohr])
    assert main(["ingest", str(tmp_path / "bohr.extxyz"), "-o", str(tmp_path / "b1.lmdb")]) == 0
    assert "warning:" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "bohr.extxyz"), "-o", str(tmp_path / "b2.lmdb"), "--length-unit", "bohr"]) == 0
    assert "warning" not in capsys.readouterr().err
    np.testing.assert_allclose(Dataset(tmp_path / "b2.lmdb")[0].positions, water.positions, atol=1e-9)
    # the opposite mistake: a file in Å read with --length-unit bohr (O-H 0.51 Å) warns too
    ase.io.write(tmp_path / "water.extxyz", [water])
    assert main(["ingest", str(tmp_path / "water.extxyz"), "-o", str(tmp_path / "b3.lmdb"), "--length-unit", "bohr"]) == 0
    assert "is the file in Å already? --length-unit bohr scaled every length by 0.5292" in capsys.readouterr().err
    # an Å file read as nm (x 10) or pm (x 0.01): the hint is that it is in Å, not Bohr or nm (it said those)
    assert main(["ingest", str(tmp_path / "water.extxyz"), "-o", str(tmp_path / "b4.lmdb"), "--length-unit", "nm"]) == 0
    err = capsys.readouterr().err
    assert "is the file in Å already? --length-unit nm scaled every length by 10" in err and "Bohr?" not in err
    assert main(["ingest", str(tmp_path / "water.extxyz"), "-o", str(tmp_path / "b5.lmdb"), "--length-unit", "pm"]) == 2
    err = capsys.readouterr().err
    assert "every length x 0.01): is the file in Å already? Then leave --length-unit out" in err and "nm?" not in err
    # an existing directory as output is named as such, not as a file --overwrite would replace
    assert main(["ingest", str(tmp_path / "water.extxyz"), "-o", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err


def test_ingest_warns_of_repeated_geometries(tmp_path, rng, capsys):
    """Frames that repeat an earlier frame's exact geometry are counted in a warning, which says when a twin
    is in another group (another split possible: held-out structures that are training data); none: silent."""
    frames = random_frames(rng, n=5)
    for a in frames:
        a.info["mol_id"] = "m"
    ase.io.write(tmp_path / "ok.extxyz", frames)
    assert main(["ingest", str(tmp_path / "ok.extxyz"), "-o", str(tmp_path / "ok.lmdb")]) == 0
    assert "repeat an earlier frame" not in capsys.readouterr().err
    twin = frames[2].copy()
    twin.calc = frames[2].calc
    twin.info["mol_id"] = "other"
    ase.io.write(tmp_path / "twice.extxyz", frames + [frames[1], twin])
    assert main(["ingest", str(tmp_path / "twice.extxyz"), "-o", str(tmp_path / "twice.lmdb")]) == 0
    err = capsys.readouterr().err
    assert ("2 frame(s) repeat an earlier frame's geometry exactly (e.g. 'twice-6' = 'twice-2'); 1 of them in "
            "another group") in err, err


def test_an_explicit_group_key_must_be_in_every_frame(tmp_path, rng, capsys):
    """--group-key given: a frame without it is an error (a typo used to fall back to formulas silently,
    which changes the by-molecule split); not given: mol_id where present, else the formula."""
    frames = random_frames(rng, n=4)
    ase.io.write(tmp_path / "m.extxyz", frames)
    assert main(["ingest", str(tmp_path / "m.extxyz"), "-o", str(tmp_path / "a.lmdb"), "--group-key", "molid"]) == 2
    assert "frame 0: no info key 'molid' (--group-key); its info keys: mol_id" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "m.extxyz"), "-o", str(tmp_path / "b.lmdb"), "--group-key", "mol_id"]) == 0
    assert Dataset(tmp_path / "b.lmdb").groups() == [a.info["mol_id"] for a in frames]


def test_group_falls_back_to_formula_and_keys_are_configurable(tmp_path, rng):
    frames = random_frames(rng, n=3)
    for a in frames:
        a.info.pop("mol_id")
        a.info["REF_e"] = float(rng.normal())
        a.arrays["REF_f"] = rng.normal(size=(len(a), 3))
        a.calc = None
    src = tmp_path / "x.extxyz"
    ase.io.write(src, frames)
    ingest(src, tmp_path / "x.lmdb", energy_key="REF_e", forces_key="REF_f")
    ds = Dataset(tmp_path / "x.lmdb")
    back = ase.io.read(src, index=":")
    for i, a in enumerate(back):
        assert ds.groups()[i] == a.get_chemical_formula()
        assert ds[i].energy == a.info["REF_e"] and np.array_equal(ds[i].forces, a.arrays["REF_f"])


def test_missing_forces_names_file_and_frame(tmp_path, rng):
    frames = random_frames(rng)
    bad = int(rng.integers(len(frames)))
    frames[bad].calc = SinglePointCalculator(frames[bad], energy=1.0)
    src = tmp_path / "m.extxyz"
    ase.io.write(src, frames)
    with pytest.raises(HessforgeError, match=rf"m\.extxyz: frame {bad}: no forces"):
        ingest(src, tmp_path / "m.lmdb")
    assert not os.path.exists(tmp_path / "m.lmdb")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the half-written temp file is removed
    ingest(src, tmp_path / "m.lmdb", allow_missing_labels=True)
    s = Dataset(tmp_path / "m.lmdb")[bad]
    assert s.forces is None and s.energy == 1.0


@pytest.mark.parametrize("where", ["positions", "energy", "forces"])
def test_nan_names_file_and_frame(tmp_path, rng, where):
    frames = random_frames(rng)
    bad = int(rng.integers(len(frames)))
    for a in frames:  # labels as info/arrays keys: ASE drops calculator results of NaN positions
        a.info["E"], a.arrays["F"] = a.get_potential_energy(), a.get_forces().copy()
        a.calc = None
    a = frames[bad]
    if where == "positions":
        a.positions[0, 1] = np.nan
    elif where == "energy":
        a.info["E"] = np.inf
    else:
        a.arrays["F"][-1, 2] = np.nan
    src = tmp_path / "n.extxyz"
    ase.io.write(src, frames)
    with pytest.raises(HessforgeError, match=rf"n\.extxyz: frame {bad}: {where} contain NaN or Inf"):
        ingest(src, tmp_path / "n.lmdb", energy_key="E", forces_key="F")


def test_refuses_overwrite_and_duplicate_ids(tmp_path, rng):
    frames = random_frames(rng, n=4)
    src = tmp_path / "d.extxyz"
    ase.io.write(src, frames)
    out = tmp_path / "d.lmdb"
    ingest(src, out)
    with pytest.raises(HessforgeError, match="already exists"):
        ingest(src, out)
    ingest(src, out, overwrite=True)
    for a in frames:
        a.info["name"] = "same"
    ase.io.write(src, frames)
    with pytest.raises(HessforgeError, match="frame 1: duplicate structure id 'same'"):
        ingest(src, out, id_key="name", overwrite=True)
    assert len(Dataset(out)) == 4  # the failed overwrite left the old, complete dataset in place


def test_cli_ingest_error_is_one_line(tmp_path, capsys):
    from training.cli import main

    assert main(["ingest", str(tmp_path / "nope.xyz"), "-o", str(tmp_path / "o.lmdb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.xyz: no such input file" in err[0]


def small_dataset(tmp_path, rng, n=6, name="s.lmdb"):
    structures = []
    for i in range(n):
        natoms = int(rng.integers(2, 7))
        structures.append(Structure(id=f"s{i}", group=f"g{i % 3}", numbers=rng.choice([1, 6, 8], size=natoms),
                                    positions=rng.normal(scale=1.5, size=(natoms, 3)), energy=float(rng.normal()),
                                    forces=rng.normal(size=(natoms, 3))))
    path = str(tmp_path / name)
    write_dataset(path, structures, source="test")
    return path, structures


def test_random_bytes_file_is_rejected(tmp_path, rng):
    bad = tmp_path / "junk.lmdb"
    bad.write_bytes(rng.bytes(int(rng.integers(100, 20000))))
    with pytest.raises(HessforgeError, match="junk.lmdb"):
        Dataset(bad)
    with pytest.raises(HessforgeError, match="no such dataset file"):
        Dataset(tmp_path / "missing.lmdb")


def test_foreign_lmdb_and_newer_version_are_rejected(tmp_path, rng):
    foreign = str(tmp_path / "foreign.lmdb")
    env = lmdb.open(foreign, subdir=False)
    with env.begin(write=True) as txn:
        for i in range(5):
            txn.put(f"key{i}".encode(), rng.bytes(16))
    env.close()
    with pytest.raises(HessforgeError, match=r"foreign\.lmdb: LMDB file without hessforge dataset metadata"):
        Dataset(foreign)

    path, _ = small_dataset(tmp_path, rng)
    env = lmdb.open(path, subdir=False)
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(META_KEY))
        txn.put(META_KEY, json.dumps({**meta, "format_version": 99}).encode())
    env.close()
    with pytest.raises(HessforgeError, match="format version 99 is newer"):
        Dataset(path)


def test_corrupt_and_truncated_records(tmp_path, rng):
    path, structures = small_dataset(tmp_path, rng)
    bad, short = rng.choice(len(structures), size=2, replace=False)
    env = lmdb.open(path, subdir=False)
    with env.begin(write=True) as txn:
        raw = txn.get(index_key(bad))
        txn.put(index_key(bad), raw[: int(rng.integers(12, len(raw) - 1))])  # truncated record
        # cut inside the magic + length + checksum prefix: the magic still reads, the checksum cannot
        txn.put(index_key(short), txn.get(index_key(short))[: int(rng.integers(5, 12))])
    env.close()
    ds = Dataset(path)
    with pytest.raises(HessforgeError, match=rf"s\.lmdb: record {bad} \(s{bad}\) is corrupt: record checksum"):
        ds[bad]
    with pytest.raises(HessforgeError, match=rf"s\.lmdb: record {short} \(s{short}\) is corrupt: record truncated"):
        ds[short]
    ok = next(i for i in range(len(structures)) if i not in (bad, short))
    assert np.array_equal(ds[ok].positions, structures[ok].positions)

    path2, _ = small_dataset(tmp_path, rng, name="t.lmdb")
    size = os.path.getsize(path2)
    with open(path2, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(HessforgeError, match="t.lmdb"):
        Dataset(path2)[0]


def test_flipped_bit_in_a_record_is_found(tmp_path, rng):
    """LMDB checks nothing: one flipped bit inside a force array must not reach training as a wrong force."""
    path, structures = small_dataset(tmp_path, rng)
    bad = int(rng.integers(len(structures)))
    env = lmdb.open(path, subdir=False)
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(index_key(bad)))
        k = len(raw) - 1 - int(rng.integers(8 * len(structures[bad].forces.ravel())))  # inside the last arrays
        raw[k] ^= 1 << int(rng.integers(8))
        txn.put(index_key(bad), bytes(raw))
    env.close()
    ds = Dataset(path)
    with pytest.raises(HessforgeError, match=rf"record {bad} \(s{bad}\) is corrupt: record checksum does not match"):
        ds[bad]


def test_records_of_the_first_format_are_still_read(rng):
    """Version-1 records (b"HFR1", no checksum) in datasets and labels written before the checksum."""
    s = Structure("old", "g", rng.integers(1, 9, size=5), rng.normal(size=(5, 3)), energy=float(rng.normal()),
                  forces=rng.normal(size=(5, 3)))
    new = s.to_bytes()
    (n, _crc) = struct.unpack("<II", new[4:12])
    old = b"HFR1" + struct.pack("<I", n) + new[12:]
    back = Structure.from_bytes(old)
    assert np.array_equal(back.positions, s.positions) and np.array_equal(back.forces, s.forces)
    assert back.energy == s.energy and back.id == "old"


def test_dataset_works_in_worker_processes(tmp_path, rng):
    path, structures = small_dataset(tmp_path, rng, n=8)
    ds = Dataset(path)
    ds[0]  # open the environment in the parent first: workers must not reuse it
    loader = make_loader(ds, None, None, cutoff=3.0, batch_size=3, shuffle=True, seed=1, num_workers=2)
    seen = [i for b in loader for i in b.ids]
    assert sorted(seen) == sorted(s.id for s in structures)


def test_select_matches_brute_force(tmp_path, rng):
    path, structures = small_dataset(tmp_path, rng, n=12)
    ds = Dataset(path)
    zs = [set(s.numbers.tolist()) for s in structures]
    assert select(ds, only_elements=["H", "O"]) == [i for i, z in enumerate(zs) if z <= {1, 8}]
    assert select(ds, must_contain=[6]) == [i for i, z in enumerate(zs) if 6 in z]
    assert select(ds, natoms=(3, 5)) == [i for i, s in enumerate(structures) if 3 <= s.natoms <= 5]
    pred = lambda s: s.energy > 0  # noqa: E731
    sub = list(range(0, 12, 2))
    assert select(ds, indices=sub, predicate=pred) == [i for i in sub if structures[i].energy > 0]
    with pytest.raises(HessforgeError, match="unknown element symbol 'Xx'"):
        select(ds, only_elements=["Xx"])


def test_group_split_is_whole_groups_and_reproducible(tmp_path, rng):
    n_groups = int(rng.integers(5, 40))
    groups = [f"m{int(g)}" for g in rng.integers(n_groups, size=300)]
    seed = int(rng.integers(1000))
    split = split_by_group(groups, (0.8, 0.1, 0.1), seed)
    assert sorted(i for v in split.values() for i in v) == list(range(300))
    owner = {}
    for name, idx in split.items():
        assert idx, f"{name} is empty"
        for i in idx:
            assert owner.setdefault(groups[i], name) == name  # no group straddles two splits
    assert split_by_group(list(groups), (0.8, 0.1, 0.1), seed) == split
    assert abs(len(split["train"]) / 300 - 0.8) < 0.35
    f = tmp_path / "split.json"
    save_split(str(f), split, seed=seed, count=300)
    assert load_split(str(f), count=300) == split
    with pytest.raises(HessforgeError, match="split made for a dataset of 300"):
        load_split(str(f), count=10)


def test_tiny_split_non_empty_or_clear_error():
    for g in (["a", "b", "c"], ["a", "a", "b", "c", "c", "c"]):
        for fractions in ((0.9, 0.05, 0.05), (0.05, 0.05, 0.9), (0.05, 0.9, 0.05)):
            for seed in range(5):
                split = split_by_group(g, fractions, seed)
                assert all(split[k] for k in ("train", "val", "test"))
    split = split_by_group(["a", "b"], (0.9, 0.1, 0.0), 0)
    assert split["train"] and split["val"] and not split["test"]
    with pytest.raises(HessforgeError, match="cannot split 2 group"):
        split_by_group(["a", "b", "b"], (0.8, 0.1, 0.1), 0)


def random_labels(rng, structures, k_max):
    recs = []
    for s in structures:
        n3 = 3 * s.natoms
        k = int(rng.integers(1, min(k_max, n3) + 1))
        rows = np.sort(rng.choice(n3, size=k, replace=False)).astype(np.int64)
        recs.append(LabelRecord(s.id, float(rng.normal()), rng.normal(size=(s.natoms, 3)), rows,
                                rng.normal(size=(k, n3)).astype(np.float32)))
    return recs


def test_collate_hessian_rows_are_consistent(tmp_path, rng):
    _, structures = small_dataset(tmp_path, rng, n=5)
    structures[2].forces, structures[3].energy = None, None  # partly unlabelled reference data
    recs = random_labels(rng, structures, k_max=6)
    s = 4
    b = collate(structures, recs, cutoff=2.5, dtype=torch.float64, hessian_rows_per_structure=s,
                generator=torch.Generator().manual_seed(0))
    natoms = [st.natoms for st in structures]
    off = np.concatenate([[0], np.cumsum(natoms)[:-1]])
    assert b.hessian_index.shape == (s, 5) and b.hessian_target.shape == (s, sum(natoms), 3)
    assert b.energy.dtype == torch.float64 and b.energy_mask.tolist() == [True, True, True, False, True]
    assert not b.forces_mask[off[2]:off[2] + natoms[2]].any() and b.forces_mask.sum() == sum(natoms) - natoms[2]
    assert torch.equal(b.teacher_forces, torch.from_numpy(np.concatenate([r.forces for r in recs])))
    for bi, (rec, o, n) in enumerate(zip(recs, off, natoms)):
        m = min(s, len(rec.rows))
        assert b.hessian_mask[:, bi].tolist() == [True] * m + [False] * (s - m)
        picked = []
        for t in range(s):
            g = int(b.hessian_index[t, bi])
            assert 3 * o <= g < 3 * (o + n)  # index lies on this structure's own atoms
            if t < m:
                local = g - 3 * o
                j = int(np.flatnonzero(rec.rows == local)[0])  # the stored row it was drawn from
                picked.append(local)
                expect = torch.from_numpy(rec.hessian_rows[j].astype(np.float64)).reshape(n, 3)
                assert torch.equal(b.hessian_target[t, o:o + n], expect)
            else:
                assert not b.hessian_target[t, o:o + n].any()
        assert len(set(picked)) == len(picked)  # without replacement
    # grad_outputs: one-hot per valid (t, b), zero on padding; sums over t of B ones at most.
    v = hessian_grad_outputs(b)
    assert torch.equal(v.sum(1), b.hessian_mask.sum(1).to(v.dtype))
    b2 = collate(structures, recs, 2.5, torch.float64, s, torch.Generator().manual_seed(0))
    assert torch.equal(b2.hessian_index, b.hessian_index)  # reproducible with the same generator
    moved = batch_to(b, "cpu")
    assert isinstance(moved, Batch) and moved.graph.positions.shape == (sum(natoms), 3)


def test_collate_teacher_fills_missing_targets(tmp_path, rng):
    """Training batches (teacher_fills_missing): a structure without a reference energy / forces gets the
    teacher's (offset-corrected) values as targets, a structure with references keeps them; validation batches
    (default) keep the masks."""
    _, structures = small_dataset(tmp_path, rng, n=4)
    structures[1].energy, structures[1].forces = None, None
    structures[2].forces = None
    recs = random_labels(rng, structures, k_max=3)
    offsets = {z: float(rng.normal()) for z in {int(z) for st in structures for z in st.numbers}}
    kept = collate(structures, recs, 2.5, torch.float64, teacher_energy_offsets=offsets)
    assert kept.energy_mask.tolist() == [True, False, True, True] and not kept.forces_mask.all()
    b = collate(structures, recs, 2.5, torch.float64, teacher_energy_offsets=offsets, teacher_fills_missing=True)
    assert b.energy_mask.all() and b.forces_mask.all()
    off = np.concatenate([[0], np.cumsum([st.natoms for st in structures])])
    for k, (st, rec) in enumerate(zip(structures, recs)):
        teacher_e = rec.energy - sum(offsets[int(z)] for z in st.numbers)
        assert float(b.energy[k]) == pytest.approx(st.energy if st.energy is not None else teacher_e, abs=1e-12)
        want_f = st.forces if st.forces is not None else rec.forces
        np.testing.assert_array_equal(b.forces[off[k]:off[k + 1]].numpy(), want_f)


def test_collate_errors_name_the_structure(tmp_path, rng):
    _, structures = small_dataset(tmp_path, rng, n=3)
    recs = random_labels(rng, structures, 3)
    recs[1] = None
    with pytest.raises(HessforgeError, match="'s1' has no teacher labels"):
        collate(structures, recs, 2.0)
    structures[2].positions[0, 0] = np.nan
    with pytest.raises(HessforgeError, match="s2: positions contain NaN"):
        collate(structures, None, 2.0)


def test_ingest_cells_of_wires_and_flat_boxes():
    """A wire with zero vectors along its non-periodic directions is a valid structure; a periodic box
    whose periodic vectors span no volume is refused."""
    from ase.build import nanotube

    from training.data.ingest import atoms_to_structure

    wire = nanotube(3, 3, length=1, symbol="C")
    wire.info["energy"], wire.arrays["forces"] = 1.0, np.zeros((len(wire), 3))
    s = atoms_to_structure(wire, 0, "wire.xyz", "wire")
    assert s.pbc.tolist() == [False, False, True] and not s.cell[:2].any()
    flat = wire.copy()
    flat.pbc = [False, True, True]
    with pytest.raises(HessforgeError, match="zero-volume"):
        atoms_to_structure(flat, 0, "flat.xyz", "flat")


def _structures(rng, n, prefix="s"):
    return [Structure(id=f"{prefix}-{k}", group=f"g{k % 3}", numbers=np.array([8, 1, 1]),
                      positions=rng.normal(size=(3, 3)), energy=float(k), forces=np.zeros((3, 3))) for k in range(n)]


def test_data_layer_faults_found_by_review(tmp_path, rng, monkeypatch):
    """A dataset file replaced under an open Dataset is refused, not read against the old index; a write that
    fails at the end leaves no temporary file; LMDB write errors are one line that does not call the file
    damaged; an empty (0-byte) label shard from a killed run does not block reading the others."""
    import subprocess
    import sys

    from training.data import store

    path = str(tmp_path / "d.lmdb")
    write_dataset(path, _structures(rng, 5, "A"))
    ds = Dataset(path)
    assert ds[0].id == "A-0"
    write_dataset(path + ".new", _structures(rng, 5, "B"))
    os.replace(path + ".new", path)
    pid, env = store._READERS[ds._key]
    store._READERS[ds._key] = (-1, env)  # as a forked DataLoader worker sees it: the reader must be reopened
    with pytest.raises(HessforgeError, match="was replaced since it was opened"):
        ds[0]
    # a failure in finish(): the temporary file is removed
    def full_disk(*args, **kwargs):
        raise HessforgeError("cannot write (disk full)")
    monkeypatch.setattr(store.DatasetWriter, "_flush", full_disk)
    with pytest.raises(HessforgeError, match="disk full"):
        write_dataset(str(tmp_path / "e.lmdb"), _structures(rng, 3))
    monkeypatch.undo()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # a real write error (file size limit) in a subprocess: one line, "cannot write", no "damaged"
    code = ("import resource, numpy as np\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))\n"
            "from training.data.records import Structure\nfrom training.data.store import write_dataset\n"
            "rng = np.random.default_rng(0)\n"
            "s = [Structure(id=f'x{k}', group='g', numbers=np.array([8] * 50), positions=rng.normal(size=(50, 3)),"
            " energy=0.0, forces=np.zeros((50, 3))) for k in range(600)]\n"
            f"write_dataset({str(tmp_path / 'big.lmdb')!r}, s)\n")
    import signal

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(),
                          preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    assert proc.returncode != 0 and "cannot write" in proc.stderr and "damaged" not in proc.stderr, proc.stderr[-800:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("big.lmdb.tmp")]


def test_an_empty_label_shard_from_a_killed_run_is_skipped(tmp_path, rng):
    from toy import HarmonicTeacher, conformer_dataset
    from training.labels import LabelStore, label_dataset

    path, _ = conformer_dataset(tmp_path / "data.lmdb", rng, per_molecule=2)
    label_dataset(path, HarmonicTeacher(), str(tmp_path / "labels"), rows=2)
    (tmp_path / "labels" / "labels.rank1.lmdb").write_bytes(b"")  # killed between creating it and its meta pages
    store = LabelStore(str(tmp_path / "labels"))
    assert len(store.ids()) == 10
    label_dataset(path, HarmonicTeacher(), str(tmp_path / "labels"), rows=2)  # a rerun resumes past it too


def test_hydrogen_distance_of_large_molecules_by_kd_tree(rng):
    """Above 2000 atoms the Bohr check uses a k-d tree (the dense distances of a 20k-atom cluster took GBs):
    the same median as brute force."""
    from training.data.ingest import hydrogen_neighbour_distance

    n = 2500
    numbers, positions = rng.choice([1, 6, 8], n), rng.uniform(0, 40, (n, 3))
    h = np.flatnonzero(numbers == 1)
    d = np.linalg.norm(positions[h, None] - positions[None], axis=-1)
    d[np.arange(h.size), h] = np.inf
    assert hydrogen_neighbour_distance(numbers, positions) == pytest.approx(float(np.median(d.min(1))), rel=1e-12)
