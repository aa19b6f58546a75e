"""`hessforge ingest`: any ASE-readable file (extxyz, ASE .db, ...) -> an LMDB dataset (store.py).

Energies/forces come from info/arrays keys when present, else from the calculator results ASE attaches
(SinglePointCalculator). Every frame is validated (labels present, all numbers finite, ids unique) and the
file is written atomically, so a dataset on disk is always complete and clean.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from engine.errors import HessforgeError
from engine.neighbors import complete_cells
from engine.paths import check_output_file
from training.data.records import Structure
from training.data.store import DatasetWriter


def _iter_atoms(path: str, fmt: Optional[str], hint: str = "pass --format") -> Iterator:
    """The frames of `path`; hint: what the error for an unknown format tells the user to do."""
    import ase.io
    from ase.io.formats import filetype

    try:
        fmt = fmt or filetype(path, guess=True)
    except Exception as err:
        raise HessforgeError(f"{path}: cannot tell the file format ({err}); {hint}") from None
    if fmt == "db":
        # ase.io.read drops a row's key_value_pairs and data; they carry group ids and custom labels.
        import ase.db

        with ase.db.connect(path) as db:
            for row in db.select():
                atoms = row.toatoms()
                atoms.info.update(row.key_value_pairs)
                atoms.info.update(row.data)
                yield atoms
        return
    try:
        yield from ase.io.iread(path, index=":", format=fmt)
    except HessforgeError:
        raise
    except Exception as err:  # ASE raises many types for unreadable input
        raise HessforgeError(f"{path}: cannot read with ASE (format {fmt}): {type(err).__name__}: {err}") from None


def _lookup(atoms, key: str, per_atom: bool):
    """A label under `key`: in arrays/info first, then in the calculator's results."""
    if per_atom and key in atoms.arrays:
        return atoms.arrays[key]
    if key in atoms.info:
        return atoms.info[key]
    calc = atoms.calc
    results = getattr(calc, "results", None) or {}
    if key in results:
        return results[key]
    if key == "energy" and "free_energy" in results:
        return results["free_energy"]
    return None


def atoms_to_structure(atoms, index: int, path: str, stem: str, energy_key: str = "energy",
                       forces_key: str = "forces", group_key: str = "mol_id", id_key: Optional[str] = None,
                       allow_missing_labels: bool = False) -> Structure:
    where = f"{path}: frame {index}"
    n = len(atoms)
    energy = _lookup(atoms, energy_key, per_atom=False)
    forces = _lookup(atoms, forces_key, per_atom=True)
    missing = [name for name, v in (("energy", energy), ("forces", forces)) if v is None]
    if missing and not allow_missing_labels:
        raise HessforgeError(f"{where}: no {' and no '.join(missing)} (looked for "
                             f"{energy_key!r}/{forces_key!r} in info, arrays and calculator results); "
                             "pass --energy-key/--forces-key, or --allow-missing-labels")
    try:
        energy = None if energy is None else float(np.asarray(energy, dtype=np.float64).reshape(()))
        forces = None if forces is None else np.asarray(forces, dtype=np.float64).reshape(n, 3)
    except (TypeError, ValueError) as err:
        raise HessforgeError(f"{where}: energy/forces have the wrong type or shape ({err})") from None
    pos, cell = np.asarray(atoms.positions, dtype=np.float64), np.asarray(atoms.cell[:], dtype=np.float64)
    for name, value in (("positions", pos), ("cell", cell), ("energy", energy), ("forces", forces)):
        if value is not None and not np.all(np.isfinite(value)):
            raise HessforgeError(f"{where}: {name} contain NaN or Inf")
    if n == 0:
        raise HessforgeError(f"{where}: structure has no atoms")
    periodic = np.asarray(atoms.pbc, dtype=bool)
    # the criterion build_graph applies: wires and slabs may have zero vectors along non-periodic directions
    if periodic.any() and not abs(np.linalg.det(complete_cells(torch.tensor(cell)[None],
                                                               torch.tensor(periodic)[None])[0].numpy())) > 1e-8:
        raise HessforgeError(f"{where}: periodic structure with a zero-volume cell")
    numbers = np.asarray(atoms.numbers, dtype=np.int64)
    if numbers.min() < 1 or numbers.max() > 118:
        raise HessforgeError(f"{where}: atomic numbers outside 1..118")
    sid = atoms.info.get(id_key) if id_key else None
    sid = str(sid) if sid is not None else f"{stem}-{index}"
    group = atoms.info.get(group_key) if group_key else None
    group = str(group) if group is not None else atoms.get_chemical_formula()
    skip = {energy_key, forces_key, group_key, id_key}
    info: Dict[str, Any] = {k: v for k, v in atoms.info.items() if k not in skip}
    info["source_index"] = index
    return Structure(id=sid, group=group, numbers=numbers, positions=pos, cell=cell, pbc=np.asarray(atoms.pbc),
                     energy=energy, forces=forces, info=info)


def ingest(input_path: str, output_path: str, energy_key: str = "energy", forces_key: str = "forces",
           group_key: str = "mol_id", id_key: Optional[str] = None, fmt: Optional[str] = None,
           allow_missing_labels: bool = False, overwrite: bool = False, progress: bool = False) -> int:
    """Read every frame of `input_path` into a new dataset at `output_path`. Returns the number of structures."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not os.path.isfile(input_path):
        raise HessforgeError(f"{input_path}: no such input file")
    if os.path.exists(output_path) and not overwrite:
        raise HessforgeError(f"{output_path}: already exists; pass --overwrite to replace it")
    if os.path.isdir(output_path):
        raise HessforgeError(f"{output_path}: is a directory")
    check_output_file(output_path, "output", inputs=[input_path])
    stem = os.path.splitext(os.path.basename(input_path))[0]
    extra = {"ingest": {"energy_key": energy_key, "forces_key": forces_key, "group_key": group_key,
                        "id_key": id_key, "format": fmt}}
    from tqdm import tqdm

    with DatasetWriter(output_path, source=os.path.abspath(input_path), extra_meta=extra) as writer:
        frames = tqdm(_iter_atoms(input_path, fmt), desc="ingest", unit="frame", disable=not progress)
        for index, atoms in enumerate(frames):
            s = atoms_to_structure(atoms, index, input_path, stem, energy_key, forces_key, group_key, id_key,
                                   allow_missing_labels)
            try:
                writer.add(s)
            except HessforgeError as err:
                raise HessforgeError(f"{input_path}: frame {index}: {err}") from None
        if not writer.ids:
            raise HessforgeError(f"{input_path}: no frames found")
    return len(writer.ids)


def add_arguments(parser) -> None:
    parser.add_argument("input", help="any file ase.io.read can read (extxyz, ASE .db, ...)")
    parser.add_argument("-o", "--output", required=True, help="output dataset file (.lmdb)")
    parser.add_argument("--group-key", default="mol_id",
                        help="info key naming the group (molecule) of a frame; default mol_id, falling back "
                             "to the chemical formula")
    parser.add_argument("--id-key", default=None, help="info key holding a unique id (default: <stem>-<index>)")
    parser.add_argument("--energy-key", default="energy", help="info key or calculator result (default energy)")
    parser.add_argument("--forces-key", default="forces", help="arrays key or calculator result (default forces)")
    parser.add_argument("--format", default=None, help="ASE format name, when it cannot be guessed")
    parser.add_argument("--allow-missing-labels", action="store_true",
                        help="keep frames without energy/forces (teacher-only training)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args) -> int:
    import sys

    n = ingest(args.input, args.output, args.energy_key, args.forces_key, args.group_key, args.id_key,
               args.format, args.allow_missing_labels, args.overwrite, progress=sys.stderr.isatty())
    print(f"wrote {n} structures to {args.output}")
    return 0
