"""LMDB dataset of `Structure` records: one file (subdir=False), O(1) access by integer index.

Layout (all keys bytes):
  b"__hessforge_meta__"   JSON: magic, format version, count, source, units, creation info, and
                          geometry_sha256 and setting_sha256 (GeometryDigest of all structures: numbers and
                          positions; cells, pbc and charges; computed once while writing)
  b"__hessforge_index__"  JSON: ids, groups, natoms, elements of every structure (splits and subsets read
                          this alone instead of decoding every record)
  b"i" + uint64 BE index  packed Structure record (records.py)

Readers open read-only with lock=False (files are written once, atomically) and lazily per process, so a
`Dataset` can be handed to DataLoader workers (fork or spawn). The same low-level helpers serve the label
shards in training/labels.py.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import socket
import struct
import time
from typing import Any, Dict, Iterable, List, Optional

import lmdb
import numpy as np

from engine.errors import HessforgeError
from training.data.records import RecordError, Structure

DATASET_MAGIC = "hessforge-dataset"
FORMAT_VERSION = 2  # 2: records carry a CRC-32 (records.py); version 1 files are still read
META_KEY = b"__hessforge_meta__"
INDEX_KEY = b"__hessforge_index__"
INITIAL_MAP_SIZE = 64 << 20  # grows by doubling on MapFullError; LMDB files stay as small as their data


def index_key(i: int) -> bytes:
    return b"i" + struct.pack(">Q", i)


def creation_info() -> Dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "user": user,
            "python": platform.python_version(), "hessforge": _version()}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hessforge")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------- reading
def open_readonly(path: str, what: str = "dataset", lock: bool = False) -> lmdb.Environment:
    """Open an LMDB file read-only, turning every low-level failure into one clear HessforgeError.
    lock=True only for files another process may be writing right now (label shards during labelling)."""
    if not os.path.exists(path):
        raise HessforgeError(f"{path}: no such {what} file")
    if os.path.isdir(path):
        raise HessforgeError(f"{path}: is a directory; a hessforge {what} is a single LMDB file")
    try:
        env = lmdb.open(path, subdir=False, readonly=True, lock=lock, readahead=False, max_readers=2048)
    except lmdb.Error as err:
        raise HessforgeError(f"{path}: not a readable LMDB {what} file ({_short(err)})") from None
    # A truncated file would make LMDB touch pages past its end (SIGBUS): check the size first.
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if os.path.getsize(path) < need:
        env.close()
        raise HessforgeError(f"{path}: {what} file is truncated ({os.path.getsize(path)} bytes, needs {need})")
    return env


def stored_magic(path: str) -> Optional[str]:
    """The magic of a hessforge LMDB file's metadata (a dataset's or a label shard's); None for any other or
    unreadable file."""
    try:
        env = open_readonly(path, "LMDB")
    except HessforgeError:
        return None
    try:
        meta = read_json_key(env, META_KEY, path, "LMDB")
    except HessforgeError:
        return None
    finally:
        env.close()
    return None if meta is None else meta.get("magic")


def _short(err: Exception) -> str:
    text = str(err)
    return text.split(": ", 1)[-1] if text.startswith("/") else text


@contextlib.contextmanager
def damaged_file_errors(path: str, what: str):
    """LMDB reads of a damaged file (a bad page: MDB_PAGE_NOTFOUND, MDB_CORRUPTED) as one HessforgeError
    naming the file, not a traceback from inside lmdb."""
    try:
        yield
    except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.BadValsizeError) as err:
        raise HessforgeError(f"{path}: {what} file is damaged ({type(err).__name__}: {_short(err)}); "
                             "recreate it") from None
    except lmdb.Error as err:  # not the file's fault: a full disk, a quota, a file grown by a writer meanwhile
        raise HessforgeError(f"{path}: cannot access the {what} file ({type(err).__name__}: {_short(err)}); "
                             "the file itself may be fine (disk full? written by another process?)") from None


def read_json_key(env: lmdb.Environment, key: bytes, path: str, what: str) -> Optional[Dict[str, Any]]:
    with damaged_file_errors(path, what), env.begin(buffers=False) as txn:
        raw = txn.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (ValueError, UnicodeDecodeError) as err:
        raise HessforgeError(f"{path}: {what} record {key.decode()} is damaged ({err})") from None


def check_meta(meta: Optional[Dict[str, Any]], path: str, magic: str, version: int, what: str) -> Dict[str, Any]:
    if meta is None or meta.get("magic") != magic:
        raise HessforgeError(f"{path}: LMDB file without hessforge {what} metadata (a foreign LMDB, not made "
                             f"by hessforge {'ingest' if what == 'dataset' else 'label'})")
    v = meta.get("format_version")
    if not isinstance(v, int):
        raise HessforgeError(f"{path}: {what} metadata has no valid format version")
    if v > version:
        raise HessforgeError(f"{path}: {what} format version {v} is newer than this hessforge supports "
                             f"({version}); upgrade hessforge")
    return meta


# One read-only environment per (process, file): LMDB (and py-lmdb) refuse to open the same file twice in a
# process, yet a trainer may hold a Dataset and a LabelStore on files that labelling also opens. Objects look
# their environment up here on each access; an entry inherited through fork is closed and reopened.
_READERS: Dict[tuple, tuple] = {}


def file_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        raise HessforgeError(f"{path}: no such file") from None
    return (st.st_dev, st.st_ino)


def shared_reader(path: str, what: str, key: Optional[tuple] = None) -> lmdb.Environment:
    key = key or file_key(path)
    entry = _READERS.get(key)
    if entry is not None:
        pid, env = entry
        if pid == os.getpid():
            return env
        del _READERS[key]
        try:
            env.close()  # inherited through fork: unusable here; closing only drops this process's mapping
        except lmdb.Error:
            pass
    if file_key(path) != key:  # the path now names another file (re-ingested while this object was open)
        raise HessforgeError(f"{path}: the {what} file was replaced since it was opened (another ingest or label "
                             "run?); restart so that everything reads the new file")
    env = open_readonly(path, what)
    _READERS[key] = (os.getpid(), env)
    return env


def release_reader(path: str) -> None:
    """Close this process's shared reader of `path` (before writing that file in the same process)."""
    try:
        key = file_key(path)
    except HessforgeError:
        return
    entry = _READERS.pop(key, None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def _charge_text(charge) -> str:
    """The same text for a charge before and after the record's JSON round trip (np.int64(1), 1 and 1.0)."""
    try:
        return repr(float(charge))
    except (TypeError, ValueError):
        return repr(charge)


class GeometryDigest:
    """SHA-256 over structures' atomic numbers and positions (rounded to 1e-5 Å), in order: what labels are
    checked against, so that labels of another dataset with the same ids and count are refused. A second digest,
    `setting_hexdigest`, covers what else a teacher's labels depend on: cell (1e-5 Å), pbc and total charge
    (kept apart so that datasets and labels recorded before it still match by geometry)."""

    def __init__(self):
        self._hash = hashlib.sha256()
        self._setting = hashlib.sha256()

    def update(self, s: Structure) -> None:
        self._hash.update(np.ascontiguousarray(s.numbers, dtype=np.int64).tobytes())
        self._hash.update(np.ascontiguousarray(np.round(np.asarray(s.positions, dtype=np.float64), 5)).tobytes())
        self._setting.update(np.ascontiguousarray(np.round(np.asarray(s.cell, dtype=np.float64), 5)).tobytes())
        self._setting.update(np.ascontiguousarray(s.pbc, dtype=np.uint8).tobytes())
        self._setting.update(_charge_text(s.info.get("charge", 0)).encode() + b"\0")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def setting_hexdigest(self) -> str:
        return self._setting.hexdigest()


class Dataset:
    """Read-only structures, usable as a torch Dataset: `ds[i]` -> Structure. Safe across DataLoader workers:
    no environment is pickled, and each process opens its own on first access."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise HessforgeError(f"{self.path}: no such dataset file")
        self._key = file_key(self.path)
        env = self._open()  # validate now, in the caller's process, so errors surface early
        self.metadata = check_meta(read_json_key(env, META_KEY, self.path, "dataset"), self.path,
                                   DATASET_MAGIC, FORMAT_VERSION, "dataset")
        index = read_json_key(env, INDEX_KEY, self.path, "dataset")
        count = self.metadata.get("count")
        if index is None or not isinstance(count, int) or any(len(index.get(k, ())) != count
                                                               for k in ("ids", "groups", "natoms", "elements")):
            raise HessforgeError(f"{self.path}: dataset index is missing or disagrees with count {count}")
        self._ids: List[str] = index["ids"]
        self._groups: List[str] = index["groups"]
        self._natoms: List[int] = index["natoms"]
        self._elements: List[List[int]] = index["elements"]
        self._id_to_index: Optional[Dict[str, int]] = None

    def _open(self) -> lmdb.Environment:
        return shared_reader(self.path, "dataset", self._key)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> Structure:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: index {i} out of range for {len(self)} structures")
        with damaged_file_errors(self.path, "dataset"), self._open().begin(buffers=False) as txn:
            raw = txn.get(index_key(i))
        if raw is None:
            raise HessforgeError(f"{self.path}: record {i} ({self._ids[i]}) is missing (damaged dataset)")
        try:
            return Structure.from_bytes(raw)
        except RecordError as err:
            raise HessforgeError(f"{self.path}: record {i} ({self._ids[i]}) is corrupt: {err}") from None

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def ids(self) -> List[str]:
        return list(self._ids)

    def groups(self) -> List[str]:
        return list(self._groups)

    def natoms(self) -> List[int]:
        return list(self._natoms)

    def elements(self) -> List[List[int]]:
        """Sorted distinct atomic numbers of each structure."""
        return [list(e) for e in self._elements]

    def geometry_digest(self) -> str:
        """GeometryDigest of all structures: recorded by the writer (datasets written before it was recorded
        are read through once, and the result kept for this object)."""
        if not isinstance(self.metadata.get("geometry_sha256"), str):
            self._compute_digests()
        return self.metadata["geometry_sha256"]

    def setting_digest(self) -> str:
        """GeometryDigest.setting_hexdigest of all structures (cells, pbc, charges), recorded like geometry_digest."""
        if not isinstance(self.metadata.get("setting_sha256"), str):
            self._compute_digests()
        return self.metadata["setting_sha256"]

    def _compute_digests(self) -> None:
        d = GeometryDigest()
        for s in self:
            d.update(s)
        self.metadata["geometry_sha256"], self.metadata["setting_sha256"] = d.hexdigest(), d.setting_hexdigest()

    def index_of(self, structure_id: str) -> int:
        if self._id_to_index is None:
            self._id_to_index = {s: i for i, s in enumerate(self._ids)}
        try:
            return self._id_to_index[structure_id]
        except KeyError:
            raise HessforgeError(f"{self.path}: no structure with id {structure_id!r}") from None

    def close(self) -> None:
        release_reader(self.path)

    def __repr__(self) -> str:
        return f"Dataset({self.path!r}, {len(self)} structures)"


# ---------------------------------------------------------------------------------------------- writing
class LmdbWriter:
    """A writable single-file LMDB that doubles its map size when full. `put_many` commits its items in one
    transaction: all or nothing, which is what makes label shards crash-safe and resumable."""

    def __init__(self, path: str, lock: bool = True):
        self.path = path
        self.env = lmdb.open(path, subdir=False, map_size=INITIAL_MAP_SIZE, lock=lock, readahead=False,
                             meminit=False, max_dbs=0)
        size = os.path.getsize(path)
        if size > self.env.info()["map_size"] // 2:
            self.env.set_mapsize(2 * size)

    def put_many(self, items: Iterable[tuple], overwrite: bool = True, append: bool = False) -> None:
        """append=True for keys in increasing order past every existing key: LMDB then fills pages instead
        of splitting them in half (sequential dataset records take ~2x less disk)."""
        items = list(items)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value, overwrite=overwrite, append=append)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:  # another writer grew the file: adopt its size and retry
                self.env.set_mapsize(0)
            except lmdb.Error as err:  # the transaction is rolled back: what was committed before stays
                raise HessforgeError(f"{self.path}: cannot write ({type(err).__name__}: {_short(err)}); disk full "
                                     "or over quota? Earlier writes are intact") from None

    def get(self, key: bytes) -> Optional[bytes]:
        with self.env.begin(buffers=False) as txn:
            return txn.get(key)

    def keys(self) -> List[bytes]:
        with self.env.begin() as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    def close(self) -> None:
        self.env.close()


class DatasetWriter:
    """Writes a dataset atomically: records go to a temporary file beside `path`, which is renamed over
    `path` only by `finish()`. An interrupted ingest leaves a stray temp file, never a dataset that looks
    complete."""

    BATCH = 512  # records per transaction: fewer fsyncs than one per record, bounded memory

    def __init__(self, path: str, source: str = "", extra_meta: Optional[Dict[str, Any]] = None):
        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        for p in (self.tmp, self.tmp + "-lock"):
            if os.path.exists(p):
                os.remove(p)
        self.writer = LmdbWriter(self.tmp, lock=False)  # private temp file: one writer, no lock needed
        self.source = source
        self.extra_meta = extra_meta or {}
        self.ids: List[str] = []
        self.groups: List[str] = []
        self.natoms: List[int] = []
        self.elements: List[List[int]] = []
        self._seen = set()
        self._pending: List[tuple] = []
        self._geometry = GeometryDigest()

    def add(self, s: Structure) -> None:
        # Ids are LMDB keys of the label shards: non-empty, at most 511 bytes, not a reserved key.
        if not s.id or len(s.id.encode()) > 500 or s.id.startswith("__hessforge"):
            raise HessforgeError(f"invalid structure id {s.id!r} (empty, over 500 bytes, or reserved)")
        if s.id in self._seen:
            raise HessforgeError(f"duplicate structure id {s.id!r}")
        self._seen.add(s.id)
        self._pending.append((index_key(len(self.ids)), s.to_bytes()))
        self.ids.append(s.id)
        self.groups.append(s.group)
        self.natoms.append(s.natoms)
        self.elements.append(sorted(set(int(z) for z in s.numbers)))
        self._geometry.update(s)
        if len(self._pending) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.writer.put_many(self._pending, append=True)  # index keys only grow
            self._pending = []

    def finish(self) -> None:
        self._flush()
        meta = {"magic": DATASET_MAGIC, "format_version": FORMAT_VERSION, "count": len(self.ids),
                "source": self.source, "units": {"energy": "eV", "length": "Å", "forces": "eV/Å"},
                "created": creation_info(), "geometry_sha256": self._geometry.hexdigest(),
                "setting_sha256": self._geometry.setting_hexdigest(), **self.extra_meta}
        index = {"ids": self.ids, "groups": self.groups, "natoms": self.natoms, "elements": self.elements}
        self.writer.put_many([(INDEX_KEY, json.dumps(index).encode()), (META_KEY, json.dumps(meta).encode())])
        self.writer.env.sync(True)
        self.writer.close()
        os.replace(self.tmp, self.path)  # atomic on POSIX: readers see the old file or the complete new one

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            for p in (self.tmp, self.tmp + "-lock"):
                if os.path.exists(p):
                    os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.finish()
        except BaseException:  # a full disk at the last flush: no stray temp file keeping the disk full
            self.abort()
            raise
        return False


def write_dataset(path: str, structures: Iterable[Structure], source: str = "",
                  extra_meta: Optional[Dict[str, Any]] = None) -> int:
    """Write structures to a new dataset file (atomically). Returns the count."""
    with DatasetWriter(path, source, extra_meta) as w:
        for s in structures:
            w.add(s)
    return len(w.ids)
