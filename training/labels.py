"""Teacher labels (energy, forces, Hessian rows; stress of bulk structures when the teacher gives one) stored
beside a dataset, and `hessforge label`.

A labels directory holds one LMDB shard per rank, `labels.rank{r}.lmdb`, each with the same metadata record
(teacher, units, dtype, mode, k, seed, source dataset) and one record per structure keyed by its id. Rank r
of W labels dataset indices i with i % W == r, so ranks never write the same file. Each record is committed
in its own transaction: a killed run loses at most the structure in flight, and a rerun skips the ids
already present. `LabelStore(dir)` merges the shards for reading.

Rows are chosen per structure by an RNG seeded with (seed, hash of the id): reruns, other ranks and other
machines choose the same rows for the same structure.

For the feature-distillation baselines, `--features` also stores the teacher's per-atom features [N, D]
(float32) in every record (n2n) and `--embeddings` its per-element embeddings in the metadata (a2a). The
metadata then says `features: {"dim": D, "dtype": "float32"}` (None without) and `element_embeddings:
{"dim": D_e, "values": {"Z": [...]}}` (None without). Records and metadata written before these options
existed read as "without".
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.errors import HessforgeError, UnknownElementError
from engine.paths import check_output_dir, file_sha256, write_json
from training.arg_types import seed_option
from training.data.records import RecordError, pack, unpack
from training.data.store import (META_KEY, Dataset, LmdbWriter, check_meta, creation_info, damaged_file_errors,
                                 file_key, open_readonly, read_json_key, release_reader, shared_reader)

LABELS_MAGIC = "hessforge-labels"
LABELS_VERSION = 2  # 2: records carry a CRC-32 (records.py); version 1 labels are still read
SHARD_RE = re.compile(r"^labels\.rank(\d+)\.lmdb$")
# Fields that must agree for a rerun to resume into an existing labels directory.
COMPAT_KEYS = ("teacher", "teacher_spec", "teacher_file_sha256", "mode", "k", "seed", "dtype", "source_count",
               "source_ids_sha256", "source_geometry_sha256", "source_setting_sha256", "features",
               "element_embeddings")
# Keys that labels written by older versions lack: a missing value is not a difference.
RECORDED_LATER = ("teacher_spec", "teacher_file_sha256", "source_geometry_sha256", "source_setting_sha256")


def shard_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"labels.rank{rank}.lmdb")


def list_shards(directory: str) -> List[str]:
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if SHARD_RE.match(n)]
    return [os.path.join(directory, n) for n in sorted(names, key=lambda n: int(SHARD_RE.match(n).group(1)))]


def sample_rows(structure_id: str, n_atoms: int, k: Optional[int], seed: int) -> np.ndarray:
    """Sorted flattened coordinate indices (3*atom + axis) of the Hessian rows to label: all 3N when k is None
    or k >= 3N, else k drawn uniformly without replacement by an RNG seeded with (seed, hash(id))."""
    n = 3 * n_atoms
    if k is None or k >= n:
        return np.arange(n, dtype=np.int64)
    h = int.from_bytes(hashlib.sha256(structure_id.encode()).digest()[:8], "little")  # stable across runs
    rng = np.random.default_rng([int(seed), h])
    return np.sort(rng.choice(n, size=int(k), replace=False)).astype(np.int64)


@dataclass
class LabelRecord:
    id: str
    energy: float  # eV
    forces: np.ndarray  # [N, 3] float64 eV/Å
    rows: np.ndarray  # [k] int64, 3*atom + axis
    hessian_rows: np.ndarray  # [k, 3N] eV/Å², float32 or float64 (the directory's dtype)
    features: Optional[np.ndarray] = None  # [N, D] float32 teacher per-atom features (labels made with --features)
    stress: Optional[np.ndarray] = None  # [3, 3] float64 eV/Å³: bulk structures, teachers that give stress

    def to_bytes(self) -> bytes:
        return pack({"id": self.id, "energy": self.energy},
                    {"forces": self.forces, "rows": self.rows, "hessian_rows": self.hessian_rows,
                     "features": self.features, "stress": self.stress})

    @classmethod
    def from_bytes(cls, buf: bytes) -> "LabelRecord":
        header, arrays = unpack(buf)
        try:
            rec = cls(header["id"], float(header["energy"]), arrays["forces"], arrays["rows"], arrays["hessian_rows"],
                      arrays.get("features"), arrays.get("stress"))
        except KeyError as err:
            raise RecordError(f"label record lacks {err}") from None
        n = rec.forces.shape[0]
        if rec.forces.shape != (n, 3) or rec.hessian_rows.shape != (rec.rows.shape[0], 3 * n):
            raise RecordError("label record arrays have inconsistent shapes")
        if rec.stress is not None and rec.stress.shape != (3, 3):
            raise RecordError(f"label record stress has shape {rec.stress.shape}, expected (3, 3)")
        if rec.features is not None and (rec.features.ndim != 2 or rec.features.shape[0] != n):
            raise RecordError(f"label record features have shape {rec.features.shape}, expected ({n}, D)")
        return rec


class LabelStore:
    """Read-only merged view of a labels directory: `store.get(id)` -> LabelRecord. Shards are opened lazily
    per process (DataLoader workers). Read it once labelling has finished."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        if os.path.isfile(self.directory):
            raise HessforgeError(f"{self.directory}: is a file; labels are a directory written by hessforge label -o")
        if not os.path.isdir(self.directory):
            raise HessforgeError(f"{self.directory}: no such labels directory")
        found = [(path, *_shard_info(path, lock=False)) for path in list_shards(self.directory)]
        found = [(path, meta, n) for path, meta, n in found if meta is not None]
        if any(n for _, _, n in found):  # a shard left without labels by a failed run has no say in the settings
            found = [(path, meta, n) for path, meta, n in found if n]
        self.shards = [path for path, _, _ in found]
        metas = [meta for _, meta, _ in found]
        if not self.shards:
            raise HessforgeError(f"{self.directory}: no label shards (labels.rank*.lmdb); run `hessforge label`")
        for path, meta in zip(self.shards[1:], metas[1:]):
            diff = _diff(metas[0], meta)
            if diff:
                raise HessforgeError(f"{path}: shard disagrees with {self.shards[0]} on {diff}")
        self.metadata: Dict[str, Any] = {k: v for k, v in metas[0].items() if k not in ("rank", "world_size")}
        self._keys = [file_key(p) for p in self.shards]
        self._ids: Optional[List[str]] = None

    def _open(self):
        # Shared per-process readers (see store.shared_reader): safe in DataLoader workers.
        return [shared_reader(p, "label shard", k) for p, k in zip(self.shards, self._keys)]

    def _raw(self, structure_id: str):
        key = structure_id.encode()
        for path, env in zip(self.shards, self._open()):
            with damaged_file_errors(path, "label shard"), env.begin(buffers=False) as txn:
                raw = txn.get(key)
            if raw is not None:
                return path, raw
        return None, None

    def __contains__(self, structure_id: str) -> bool:
        return self._raw(structure_id)[1] is not None

    def get(self, structure_id: str) -> LabelRecord:
        path, raw = self._raw(structure_id)
        if raw is None:
            raise HessforgeError(f"{self.directory}: structure {structure_id!r} has no teacher labels "
                                 "(labelling unfinished, or labels made for another dataset)")
        try:
            return LabelRecord.from_bytes(raw)
        except RecordError as err:
            raise HessforgeError(f"{path}: label record {structure_id!r} is corrupt: {err}") from None

    def ids(self) -> List[str]:
        if self._ids is None:
            seen, out = set(), []
            for path, env in zip(self.shards, self._open()):
                with damaged_file_errors(path, "label shard"), env.begin() as txn:
                    for key in txn.cursor().iternext(keys=True, values=False):
                        key = bytes(key)
                        if key != META_KEY and key not in seen:
                            seen.add(key)
                            out.append(key.decode())
            self._ids = out
        return list(self._ids)

    def __len__(self) -> int:
        return len(self.ids())

    @property
    def feature_dim(self) -> Optional[int]:
        """D of the stored per-atom teacher features; None when labelled without --features."""
        info = self.metadata.get("features")
        return int(info["dim"]) if info else None

    def element_embeddings(self) -> Optional[Dict[int, np.ndarray]]:
        """{Z: [D_e] float64} teacher per-element embeddings; None when labelled without --embeddings."""
        info = self.metadata.get("element_embeddings")
        if not info:
            return None
        return {int(z): np.asarray(v, dtype=np.float64) for z, v in info["values"].items()}

    @property
    def relative_energies(self) -> bool:
        """True when the teacher's absolute energies carry no per-element reference (SO3LR): compare them with
        other energies only through teacher_energy_offsets. Labels written before this was recorded: False."""
        return bool(self.metadata.get("relative_energies", False))


# A teacher whose energies differ from the reference energies by more than this (mean |ΔE| per atom) is on
# another energy scale: another level of theory puts each element's zero elsewhere (pyscf, against ωB97x/6-31G(d):
# B3LYP/def2-SVP +63 / +256 meV/atom, PBE/def2-SVP +461 / +1035 meV/atom for CH4 / H2O), while a teacher at the
# reference's own level is off by meV (ANI-1x against its ωB97x/6-31G(d): 2.3 meV/atom on the quickstart's data).
ENERGY_SCALE_MISMATCH_EV_PER_ATOM = 0.05


def teacher_energy_offsets(labels, structures, records: Optional[Sequence] = None) -> Optional[Dict[int, float]]:
    """Per-element offsets {Z: eV} between the teacher's energies and the reference energies of `structures`
    (least squares over those that have a reference energy), for a teacher whose energies are not on the
    reference's scale: relative energies (SO3LR), or absolute energies with another per-element zero (a teacher
    at another level of theory than the user's reference: mean |ΔE| above ENERGY_SCALE_MISMATCH_EV_PER_ATOM per
    atom, which would otherwise make the teacher look far worse than it is and halve λ_KD at once). None when
    the teacher is on the reference's scale or no structure has a reference energy (nothing to align to).
    Subtract Σ_atoms o_Z from a teacher energy to put it on the reference's scale. `records`: the structures'
    label records, in order, when the caller has read them already (else read from `labels`)."""
    from training.reference_energies import fit_element_offsets

    if labels is None:
        return None
    if records is None:
        records = [labels.get(s.id) if s.energy is not None else None for s in structures]
    pairs = [(s, r) for s, r in zip(structures, records) if s.energy is not None]
    if not pairs:
        return None
    if not getattr(labels, "relative_energies", False):
        gap = np.mean([abs(r.energy - s.energy) / len(s.numbers) for s, r in pairs])
        if not gap > ENERGY_SCALE_MISMATCH_EV_PER_ATOM:
            return None
    return fit_element_offsets([s.numbers for s, _ in pairs], [r.energy for _, r in pairs],
                               [s.energy for s, _ in pairs])


_PAGE = max(4096, os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096)  # LMDB's page: the OS page


def labelled_count(directory: str) -> int:
    """How many structures a labels directory holds (0 when it does not exist or only a failed run's
    settings are there)."""
    if not os.path.isdir(directory):
        return 0
    return sum(_shard_info(path, lock=False)[1] for path in list_shards(directory))


def _shard_meta(path: str, lock: bool) -> Optional[Dict[str, Any]]:
    """A shard's metadata; None for an empty shard (a run killed before its first write, or between creating
    the file and LMDB writing its first page: 0 bytes)."""
    return _shard_info(path, lock)[0]


def _shard_info(path: str, lock: bool) -> Tuple[Optional[Dict[str, Any]], int]:
    """(metadata or None as in _shard_meta, number of structures labelled in the shard)."""
    if os.path.getsize(path) == 0:
        return None, 0
    if lock:
        release_reader(path)  # LMDB allows one open per file and process
    env = shared_reader(path, "label shard") if not lock else open_readonly(path, "label shard", lock=True)
    try:
        entries = env.stat()["entries"]
        if entries == 0:
            return None, 0
        meta = check_meta(read_json_key(env, META_KEY, path, "labels"), path, LABELS_MAGIC, LABELS_VERSION, "labels")
        return meta, entries - 1
    finally:
        if lock:
            env.close()


def _diff(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    # A spec is only recorded by the CLI; labels made through the API (spec None) may be resumed by either.
    # A teacher named by its file (mace:PATH, lammps:PATH) is the same teacher under another spelling of the path
    # (relative vs absolute, another node's mount) when the files' digests agree.
    same_file = a.get("teacher_file_sha256") is not None and a.get("teacher_file_sha256") == b.get("teacher_file_sha256")
    keys = [k for k in COMPAT_KEYS if a.get(k) != b.get(k)
            and not (k in RECORDED_LATER and None in (a.get(k), b.get(k)))
            and not (same_file and k in ("teacher", "teacher_spec"))]
    return ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys)


def check_labels_match(store: "LabelStore", dataset, ids: Sequence[str] = ()) -> None:
    """The labels in `store` were made for `dataset` (same structure count and ids, in order), and every
    structure of `ids` is labelled: fail before training or evaluating, not at the batch that misses one."""
    meta = store.metadata
    count, digest = meta.get("source_count"), meta.get("source_ids_sha256")
    # labels made before these digests were recorded: not checked by them
    geometry, setting = meta.get("source_geometry_sha256"), meta.get("source_setting_sha256")
    if count is not None and (count != len(dataset) or digest != _ids_digest(dataset.ids())
                              or (geometry is not None and geometry != dataset.geometry_digest())):
        raise HessforgeError(
            f"{store.directory}: labels were made for another dataset ({meta.get('source')}, {count} structures; "
            f"this is {dataset.path}, {len(dataset)} structures, or the same count with other ids or geometries); "
            "label this dataset with `hessforge label`")
    if count is not None and setting is not None and setting != dataset.setting_digest():
        raise HessforgeError(
            f"{store.directory}: labels were made for {meta.get('source')} with other cells, periodic boundary "
            f"conditions or total charges than {dataset.path} has now (the same atoms and positions): the teacher's "
            "values depend on them; label this dataset again with `hessforge label`")
    labelled = set(store.ids())
    missing = [i for i in ids if i not in labelled]
    if missing:
        why = ("labelling is unfinished (rerun `hessforge label` to resume it), or they hold elements the teacher "
               "does not know (labelled with --skip-unknown-elements: set data.elements to the teacher's to leave "
               "them out; it filters a data.split_file too)"
               if meta.get("skip_unknown_elements")
               else "labelling is unfinished; rerun `hessforge label` to resume it")
        raise HessforgeError(f"{store.directory}: {len(missing)} structure(s) to be used have no teacher labels "
                             f"(e.g. {missing[0]!r}): {why}")


def _teacher_file_digest(teacher) -> Optional[str]:
    """SHA-256 of the teacher's model file (mace:FILE): a file replaced at the same path is another teacher.
    A teacher made of several files (lammps: the snippet and the potential files it names) gives its own."""
    if getattr(teacher, "file_sha256", None):
        return teacher.file_sha256
    path = getattr(teacher, "path", None)
    return file_sha256(path) if path and os.path.isfile(path) else None


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _check_output(out, structure_id: str, n: int, rows: np.ndarray, teacher_name: str):
    where = f"teacher {teacher_name} on structure {structure_id!r}"
    forces = np.asarray(out.forces, dtype=np.float64)
    h = None if out.hessian_rows is None else np.asarray(out.hessian_rows, dtype=np.float64)
    if forces.shape != (n, 3) or h is None or h.shape != (len(rows), 3 * n):
        raise HessforgeError(f"{where}: returned forces {forces.shape} / Hessian rows "
                             f"{None if h is None else h.shape}, expected ({n}, 3) / ({len(rows)}, {3 * n})")
    if out.rows is not None and not np.array_equal(np.asarray(out.rows).reshape(-1), rows):
        raise HessforgeError(f"{where}: returned other Hessian rows than requested")
    stress = getattr(out, "stress", None)
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape != (3, 3):
            raise HessforgeError(f"{where}: returned a stress of shape {stress.shape}, expected (3, 3)")
    if not (np.isfinite(out.energy) and np.all(np.isfinite(forces)) and np.all(np.isfinite(h))
            and (stress is None or np.all(np.isfinite(stress)))):
        raise HessforgeError(f"{where}: energy, forces, Hessian or stress contain NaN or Inf")
    return float(out.energy), forces, h, stress


def _check_features(feats, structure_id: str, n: int, teacher_name: str, dim: Optional[int] = None) -> np.ndarray:
    where = f"teacher {teacher_name} on structure {structure_id!r}"
    f = np.asarray(feats)
    if f.ndim != 2 or f.shape[0] != n or f.shape[1] < 1 or (dim is not None and f.shape[1] != dim):
        raise HessforgeError(f"{where}: atomic_features returned shape {f.shape}, expected ({n}, "
                             f"{'D' if dim is None else dim})")
    if not np.all(np.isfinite(f)):
        raise HessforgeError(f"{where}: atomic features contain NaN or Inf")
    return f.astype(np.float32)


def _teacher_method(teacher, attr: str, option: str):
    fn = getattr(teacher, attr, None)
    if not callable(fn):
        raise HessforgeError(f"teacher {getattr(teacher, 'name', type(teacher).__name__)} has no {attr}() "
                             f"({'per-atom features' if attr == 'atomic_features' else 'per-element embeddings'}), "
                             f"so {option} cannot be stored; label without {option}")
    return fn


def _embeddings_meta(teacher) -> Dict[str, Any]:
    table = _teacher_method(teacher, "element_embeddings", "--embeddings")()
    if not table:
        raise HessforgeError(f"teacher {getattr(teacher, 'name', '?')}: element_embeddings() returned nothing")
    values, dims = {}, set()
    for z, vec in sorted(table.items(), key=lambda kv: int(kv[0])):
        vec = np.asarray(vec, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(vec)):
            raise HessforgeError(f"teacher {getattr(teacher, 'name', '?')}: embedding of Z={z} contains NaN or Inf")
        dims.add(vec.size)
        values[str(int(z))] = [float(x) for x in vec]
    if len(dims) != 1:
        raise HessforgeError(f"teacher {getattr(teacher, 'name', '?')}: element embeddings of different sizes {dims}")
    return {"dim": dims.pop(), "values": values}


def label_dataset(dataset: Union[str, Dataset], teacher, out_dir: str, rows: Union[int, str, None] = "full",
                  seed: int = 0, limit: Optional[int] = None, dtype: str = "float32", rank: int = 0,
                  world_size: int = 1, teacher_spec: Optional[str] = None, progress: bool = False,
                  features: bool = False, embeddings: bool = False,
                  skip_unknown_elements: bool = False) -> Dict[str, Any]:
    """Label dataset indices i < limit with i % world_size == rank into `out_dir`/labels.rank{rank}.lmdb,
    skipping ids already labelled. rows: "full" (all 3N rows) or k. features: also store the teacher's
    per-atom features (teacher.atomic_features) in each record; embeddings: store its per-element embeddings
    (teacher.element_embeddings) in the metadata. skip_unknown_elements: leave structures with elements the
    teacher does not know unlabelled (training leaves them out with data.elements) instead of refusing the
    dataset. Returns counts {labelled, skipped (already labelled), todo, unknown (left unlabelled)} and
    unknown_elements (their atomic numbers)."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    k = parse_rows(rows)
    if dtype not in ("float32", "float64"):
        raise HessforgeError(f"label dtype must be float32 or float64, got {dtype!r}")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise HessforgeError(f"seed must be a non-negative integer, got {seed!r}")
    if not (0 <= rank < world_size):
        raise HessforgeError(f"rank {rank} out of range for world size {world_size}")
    if limit is not None and not (isinstance(limit, (int, np.integer)) and limit >= 1):
        raise HessforgeError(f"limit must be a positive number of structures, got {limit!r}")
    n_total = len(ds) if limit is None else min(int(limit), len(ds))
    ids, elements = ds.ids(), ds.elements()

    # Every structure that will be labelled (by any rank) is checked before the first, possibly slow,
    # teacher call: an unsupported element should fail in a second, not after hours.
    unknown: Dict[int, set] = {}  # index -> elements the teacher does not know (skip_unknown_elements)
    for i in range(n_total):
        try:
            teacher.check_elements(elements[i], where=f"{ds.path}: structure {ids[i]!r}")
        except UnknownElementError as err:
            if not skip_unknown_elements:
                err.args = (f"{err}; or label the others with --skip-unknown-elements and train with "
                            "data.elements",)
                raise
            unknown[i] = set(int(z) for z in elements[i]) - set(getattr(teacher, "elements", None) or ())
    if unknown and len(unknown) == n_total:
        raise HessforgeError(f"{ds.path}: every structure holds an element teacher "
                             f"{getattr(teacher, 'name', '?')} does not know; nothing to label")
    tname = getattr(teacher, "name", "?")
    features_meta, feature_fn = None, None
    if features:
        feature_fn = _teacher_method(teacher, "atomic_features", "--features")
        if n_total:  # D from the first structure, so every rank (and a rerun) records the same metadata
            s0 = ds[0]
            dim = _check_features(feature_fn(s0.to_atoms()), s0.id, s0.natoms, tname).shape[1]
            features_meta = {"dim": int(dim), "dtype": "float32"}
    embeddings_meta = _embeddings_meta(teacher) if embeddings else None

    meta = {"magic": LABELS_MAGIC, "format_version": LABELS_VERSION, "teacher": getattr(teacher, "name", None),
            "teacher_spec": teacher_spec, "teacher_file_sha256": _teacher_file_digest(teacher),
            "relative_energies": bool(getattr(teacher, "relative_energies", False)),
            "mode": "full" if k is None else "rows", "k": k, "seed": int(seed),
            "dtype": dtype, "units": {"energy": "eV", "forces": "eV/Å", "hessian": "eV/Å²", "stress": "eV/Å³"},
            "source": os.path.abspath(ds.path), "source_count": len(ds), "source_ids_sha256": _ids_digest(ids),
            "source_geometry_sha256": ds.geometry_digest(), "source_setting_sha256": ds.setting_digest(),
            "features": features_meta, "element_embeddings": embeddings_meta,
            "skip_unknown_elements": bool(skip_unknown_elements),
            "rank": rank, "world_size": world_size, "created": creation_info()}
    check_output_dir(out_dir, "labels -o")
    os.makedirs(out_dir, exist_ok=True)
    mine = shard_path(out_dir, rank)
    done, stale_meta = set(), False
    for path in list_shards(out_dir):
        if path != mine and os.path.getsize(path) < 2 * _PAGE:
            continue  # another rank is creating this shard right now (LMDB writes its 2 meta pages first)
        old, labelled = _shard_info(path, lock=True)  # lock: other ranks may be writing their shards right now
        if old is None:  # empty (a run killed right after creating it; this rank's is written below)
            continue
        diff = _diff(old, meta)
        # a run that failed before its first label (the wrong teacher): nothing to mix up; this rank's shard
        # takes the new settings below, another rank's its own when it runs (not one still at its first label)
        if diff and labelled == 0 and (path == mine or not _shard_in_use(path)):
            stale_meta |= path == mine
            continue
        if diff:
            raise HessforgeError(f"{out_dir}: labels there were made with different settings: {diff}; use "
                                 "another output directory (or delete it) to label with these settings")
        if path != mine:  # ids labelled by an earlier run with another world size
            env = open_readonly(path, "label shard", lock=True)
            try:
                with damaged_file_errors(path, "label shard"), env.begin() as txn:
                    done.update(bytes(k) for k in txn.cursor().iternext(keys=True, values=False))
            finally:
                env.close()
    _write_summary(out_dir, meta)

    owner = _claim_shard(mine, rank)
    release_reader(mine)
    writer = LmdbWriter(mine, lock=True)
    try:
        with damaged_file_errors(mine, "label shard"):
            if writer.get(META_KEY) is None or stale_meta:
                writer.put_many([(META_KEY, json.dumps(meta).encode())])
            done.update(writer.keys())
        todo = [i for i in range(n_total) if i % world_size == rank and ids[i].encode() not in done
                and i not in unknown]
        left_out = sum(1 for i in unknown if i % world_size == rank)
        skipped = sum(1 for i in range(n_total) if i % world_size == rank) - len(todo) - left_out
        from tqdm import tqdm

        np_dtype = np.float32 if dtype == "float32" else np.float64
        for i in tqdm(todo, desc=f"label rank {rank}", unit="structure", disable=not progress):
            s = ds[i]
            want = sample_rows(s.id, s.natoms, k, seed)
            atoms = s.to_atoms()
            check_charge = getattr(teacher, "check_charge", None)  # duck-typed teachers (API) have none
            if check_charge is not None:
                check_charge(atoms, f"{ds.path}: structure {s.id}")
            out = teacher.compute(atoms, want)
            energy, forces, h, stress = _check_output(out, s.id, s.natoms, want, getattr(teacher, "name", "?"))
            # float32 Hessian rows by default: half the storage of float64 (full Hessians grow as 9N²), and
            # their ~1e-7 relative rounding is far below any student's Hessian error.
            feats = None
            if features_meta is not None:
                feats = _check_features(feature_fn(atoms), s.id, s.natoms, tname, features_meta["dim"])
            rec = LabelRecord(s.id, energy, forces, want, h.astype(np_dtype), feats, stress)
            writer.put_many([(s.id.encode(), rec.to_bytes())], overwrite=False)  # one commit per structure
    finally:
        writer.close()
        owner.close()  # releases the claim
    return {"labelled": len(todo), "skipped": skipped, "todo": len(todo), "unknown": left_out,
            "unknown_elements": sorted(set().union(*unknown.values())) if unknown else []}


def _claim_shard(path: str, rank: int):
    """An exclusive lock on `path`'s owner file for this process's run, or one clear error: two processes on
    one shard (two `hessforge label` runs on one -o, or srun/mpirun ranks without RANK and WORLD_SIZE, all
    rank 0) would each label everything and fight over the file. The returned file holds the lock until closed."""
    import fcntl

    owner = open(path + ".owner", "a")
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner.close()
        hint = (" (SLURM_PROCID is set but RANK is not: launch with torchrun, or set RANK and WORLD_SIZE)"
                if os.environ.get("SLURM_PROCID") and not os.environ.get("RANK") else "")
        raise HessforgeError(f"{path}: rank {rank} of these labels is being written by another process right now "
                             f"(two label runs on one output directory?){hint}") from None
    return owner


def _shard_in_use(path: str) -> bool:
    """Whether a process holds `path`'s claim (_claim_shard) right now: a run labelling into it."""
    import fcntl

    if not os.path.exists(path + ".owner"):
        return False
    with open(path + ".owner", "a") as owner:
        try:
            fcntl.flock(owner, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(owner, fcntl.LOCK_UN)
    return False


def _write_summary(out_dir: str, meta: Dict[str, Any]) -> None:
    """labels.json: a human-readable copy of the metadata (the shards hold the authoritative one)."""
    info = {k: v for k, v in meta.items() if k not in ("rank", "world_size", "created")}
    write_json(os.path.join(out_dir, "labels.json"), info, ensure_ascii=False)


def parse_rows(rows) -> Optional[int]:
    if rows is None or (isinstance(rows, str) and rows.strip().lower() == "full"):
        return None
    try:
        k = int(rows)
    except (TypeError, ValueError):
        raise HessforgeError(f"--rows must be a positive integer or 'full', got {rows!r}") from None
    if k < 1:
        raise HessforgeError(f"--rows must be a positive integer or 'full', got {rows!r}")
    return k


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise HessforgeError(f"environment variable {name}={value!r} is not an integer") from None


def add_arguments(parser) -> None:
    parser.add_argument("dataset", help="dataset file made by `hessforge ingest`")
    parser.add_argument("--teacher", required=True,
                        help="teacher spec: ani1x, ani1x:0, so3lr, chgnet, mace:/path/file.model, "
                             "lammps:/path/potential.in (LAMMPS commands defining the interaction)")
    parser.add_argument("--rows", required=True, help="Hessian rows per structure: an integer k, or 'full'")
    parser.add_argument("-o", "--output", required=True, help="labels directory (created; resumed if present)")
    parser.add_argument("--seed", type=seed_option, default=0, help="row-sampling seed (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="label only the first N structures")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="storage dtype of Hessian rows (default float32)")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    parser.add_argument("--features", action="store_true",
                        help="also store the teacher's per-atom features [N, D] (float32) for the n2n baseline")
    parser.add_argument("--embeddings", action="store_true",
                        help="also store the teacher's per-element embeddings (metadata) for the a2a baseline")
    parser.add_argument("--skip-unknown-elements", action="store_true",
                        help="leave structures with elements the teacher does not know unlabelled (train with "
                             "data.elements set to the teacher's) instead of refusing the dataset")


def run(args) -> int:
    from training.teachers import load_teacher

    rank = args.rank if args.rank is not None else _env_int("RANK", 0)
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE", 1)
    parse_rows(args.rows)
    ds = Dataset(args.dataset)  # fail on a bad dataset before loading a heavy teacher
    teacher = load_teacher(args.teacher)
    stats = label_dataset(ds, teacher, args.output, args.rows, args.seed, args.limit, args.dtype, rank, world,
                          teacher_spec=args.teacher, progress=sys.stderr.isatty(), features=args.features,
                          embeddings=args.embeddings, skip_unknown_elements=args.skip_unknown_elements)
    print(f"rank {rank}/{world}: labelled {stats['labelled']} structures, {stats['skipped']} already done "
          f"-> {shard_path(args.output, rank)}")
    if stats["unknown"]:
        from ase.data import chemical_symbols

        known = sorted(getattr(teacher, "elements", None) or ())
        print(f"left {stats['unknown']} structure(s) unlabelled: they hold "
              f"{', '.join(chemical_symbols[z] for z in stats['unknown_elements'])}, which teacher {teacher.name} "
              f"does not know; train with data.elements: {known} to leave them out")
    return 0
