"""One structure and its compact, pickle-free binary form.

Records are packed as: magic b"HFR2", a uint32 header length, the uint32 CRC-32 of everything after it, a
JSON header (scalars and the dtype/shape of each array), then the raw little-endian array bytes. Pickle is
avoided on purpose: a dataset file passed between people must not be able to run code when it is opened.
A truncated or damaged record is detected rather than half-decoded: every length is checked, and the
checksum finds flipped bits inside the arrays (LMDB itself checks nothing), which would otherwise train a
student on a wrong force or Hessian row without a word. Records of the first format (b"HFR1", no checksum)
are still read.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

MAGIC = b"HFR2"
MAGIC_V1 = b"HFR1"  # no checksum
_PREFIX_BYTES = {MAGIC: 12, MAGIC_V1: 8}
# Only plain numeric dtypes may appear in a record (no object arrays, so no code paths through pickle).
_DTYPES = {"<f8": np.float64, "<f4": np.float32, "<i8": np.int64, "|b1": np.bool_}


class RecordError(ValueError):
    """A record's bytes cannot be decoded; callers name the file and the record."""


def pack(header: Dict[str, Any], arrays: Dict[str, Optional[np.ndarray]]) -> bytes:
    specs, chunks = [], []
    for name, arr in arrays.items():
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        arr = arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.byteorder == ">" else arr
        key = arr.dtype.str
        if key not in _DTYPES:
            raise TypeError(f"array {name!r} has unsupported dtype {arr.dtype}")
        specs.append([name, key, list(arr.shape)])
        chunks.append(arr.tobytes())
    head = json.dumps({**header, "_arrays": specs}, separators=(",", ":"), allow_nan=False).encode()
    crc = zlib.crc32(head)
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return b"".join([MAGIC, struct.pack("<II", len(head), crc), head, *chunks])


def unpack(buf: bytes) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    buf = bytes(buf)
    start = _PREFIX_BYTES.get(buf[:4])  # magic, header length (and checksum)
    if start is None:
        raise RecordError("bad record magic (not a hessforge record, or damaged)")
    if len(buf) < start:
        raise RecordError(f"record truncated inside its {start}-byte prefix ({len(buf)} bytes)")
    (n,) = struct.unpack("<I", buf[4:8])
    if buf[:4] == MAGIC:
        (crc,) = struct.unpack("<I", buf[8:12])
        if zlib.crc32(memoryview(buf)[start:]) != crc:
            raise RecordError("record checksum does not match its bytes (damaged)")
    if start + n > len(buf):
        raise RecordError("record truncated inside its header")
    try:
        header = json.loads(buf[start : start + n])
        specs = header.pop("_arrays")
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        raise RecordError(f"record header is not valid: {err}") from None
    arrays, pos = {}, start + n
    for name, key, shape in specs:
        if key not in _DTYPES:
            raise RecordError(f"record array {name!r} has unsupported dtype {key!r}")
        dtype = np.dtype(key)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if pos + size > len(buf):
            raise RecordError(f"record truncated inside array {name!r}")
        arrays[name] = np.frombuffer(buf, dtype=dtype, count=size // dtype.itemsize, offset=pos).reshape(shape).copy()
        pos += size
    if pos != len(buf):
        raise RecordError(f"record has {len(buf) - pos} trailing bytes")
    return header, arrays


def _jsonable(value):
    """Small info extras worth keeping: scalars and short strings (arrays and big blobs are dropped)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, str) and len(value) <= 256:
        return value
    return None


@dataclass
class Structure:
    id: str
    group: str
    numbers: np.ndarray  # [N] int64 atomic numbers
    positions: np.ndarray  # [N, 3] float64 Å
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))  # [3, 3] float64 Å, rows = vectors
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))  # [3] bool
    energy: Optional[float] = None  # eV
    forces: Optional[np.ndarray] = None  # [N, 3] float64 eV/Å
    info: Dict[str, Any] = field(default_factory=dict)
    stress: Optional[np.ndarray] = None  # [3, 3] float64 eV/Å³ (ASE's sign: (1/V) dE/dε), 3D-periodic only

    def __post_init__(self):
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.array(np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)))  # pbc=True as in ASE
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
        if self.energy is not None:
            self.energy = float(self.energy)
        if self.stress is not None:
            self.stress = np.asarray(self.stress, dtype=np.float64).reshape(3, 3)

    @property
    def natoms(self) -> int:
        return int(self.numbers.shape[0])

    def to_bytes(self) -> bytes:
        info = {k: v for k, v in ((str(k), _jsonable(v)) for k, v in self.info.items()) if v is not None}
        header = {"id": self.id, "group": self.group, "energy": self.energy, "info": info}
        arrays = {"numbers": self.numbers, "positions": self.positions, "cell": self.cell, "pbc": self.pbc,
                  "forces": self.forces, "stress": self.stress}
        return pack(header, arrays)

    @classmethod
    def from_bytes(cls, buf: bytes) -> "Structure":
        header, arrays = unpack(buf)
        try:
            s = cls(id=header["id"], group=header["group"], numbers=arrays["numbers"],
                    positions=arrays["positions"], cell=arrays["cell"], pbc=arrays["pbc"],
                    energy=header["energy"], forces=arrays.get("forces"), info=header.get("info", {}),
                    stress=arrays.get("stress"))
        except (KeyError, ValueError) as err:
            raise RecordError(f"record is missing or has malformed fields: {err}") from None
        if s.positions.shape[0] != s.natoms or (s.forces is not None and s.forces.shape[0] != s.natoms):
            raise RecordError("record arrays disagree on the number of atoms")
        return s

    def to_atoms(self):
        """An `ase.Atoms` (no calculator attached): what teachers take. Carries the structure's info (its total
        charge, atoms.info["charge"], is what a charge-aware teacher such as SO3LR reads)."""
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc,
                     info=dict(self.info))
