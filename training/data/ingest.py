"""`hessforge ingest`: any ASE-readable file (extxyz, ASE .db, ...) -> an LMDB dataset (store.py).

Energies/forces come from info/arrays keys when present, else from the calculator results ASE attaches
(SinglePointCalculator). Every frame is validated (labels present, all numbers finite, ids unique, no two
atoms closer than 0.3 Å) and the file is written atomically, so a dataset on disk is always complete and
clean. Datasets hold eV and Å: files in other units (Hartree, Bohr, kcal/mol, nm, ...) are converted with
--energy-unit / --length-unit (forces in energy unit per length unit), and hydrogen atoms whose nearest
neighbours sit at Bohr-like distances get a warning.

Stress (optional, 3D-periodic structures only) is read from a `stress` key (ASE's sign, Voigt xx yy zz yz xz xy
or a 3x3 matrix; extxyz files written by ASE hold it in the calculator results) or, failing that, from a
`virial` key (eV; stress = -virial / volume), and stored as a 3x3 matrix in eV/Å³. --stress-unit converts
GPa, kbar, bar; by default stress is read in the energy unit per length unit cubed.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from ase import units

from engine.errors import HessforgeError
from engine.neighbors import complete_cells
from engine.paths import ARTIFACT_KINDS, check_output_file, file_sha256
from training.data.records import Structure
from training.data.store import DatasetWriter, stored_magic

# Factors to eV and Å, from ase.units; keys are matched case-insensitively.
ENERGY_UNITS = {"ev": 1.0, "mev": 1e-3, "hartree": units.Hartree, "ha": units.Hartree, "ry": units.Ry,
                "kcal/mol": units.kcal / units.mol, "kj/mol": units.kJ / units.mol}
LENGTH_UNITS = {"å": 1.0, "a": 1.0, "angstrom": 1.0, "bohr": units.Bohr, "nm": 10.0, "pm": 0.01}
# Stress units to eV/Å³ (the default is the file's energy unit per length unit cubed); VASP writes kbar
UNIT_NAMES = {"ev": "eV", "mev": "meV", "kj/mol": "kJ/mol", "ry": "Ry", "å": "Å", "gpa": "GPa"}  # as written
STRESS_UNITS = {"gpa": units.GPa, "kbar": 0.1 * units.GPa, "bar": 1e-4 * units.GPa, "atm": 1.01325e-4 * units.GPa}
LARGEST_STRESS = 1.0  # eV/Å³ = 160 GPa: beyond any structure a force field is trained on; GPa read as eV/Å³ is
CLOSEST_ALLOWED = 0.3  # Å: no two nuclei are closer in a real structure; in nm, every bond would be
BOHR_LIKE_H_DISTANCE = 1.5  # Å: a bonded H's nearest neighbour is 0.7-1.2 Å away; in Bohr it reads ~1.8-2.1
SHRUNK_H_DISTANCE = 0.65  # Å: below H2's 0.74 Å; Å read as Bohr (x 0.529) puts C-H at 0.58 Å, O-H at 0.51 Å


def unit_factor(unit: str, table: Dict[str, float], what: str) -> float:
    try:
        return table[unit.strip().lower()]
    except KeyError:
        names = sorted({UNIT_NAMES.get(k, k) for k in table if k not in ("a", "ha")}, key=str.lower)
        raise HessforgeError(f"unknown {what} unit {unit!r}; known: {', '.join(names)}") from None


def closest_pair(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                 cutoff: float = CLOSEST_ALLOWED) -> Optional[Tuple[int, int, float]]:
    """(i, j, distance) of the closest two atoms (periodic images included) if closer than `cutoff` Å."""
    from engine.graph import build_graph

    if not np.any(pbc):  # molecules: plain distances (a fraction of build_graph's cost per frame)
        if len(numbers) < 2:
            return None
        if len(numbers) > 2000:
            from scipy.spatial import cKDTree

            pairs = cKDTree(positions).query_pairs(cutoff, output_type="ndarray")
            if len(pairs) == 0:
                return None
            d = np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]], axis=1)
            k = int(np.argmin(d))
            return int(pairs[k, 0]), int(pairs[k, 1]), float(d[k])
        d = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
        d[np.diag_indices(len(numbers))] = np.inf
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        return (int(min(i, j)), int(max(i, j)), float(d[i, j])) if d[i, j] < cutoff else None
    g = build_graph([numbers], [positions], [cell], [pbc], cutoff, torch.float64, check_overlaps=False)
    if g.edge_index.shape[1] == 0:
        return None
    i, j = g.edge_index
    d = torch.linalg.vector_norm(g.positions[j] - g.positions[i] + g.shifts @ g.cell[0], dim=1)
    k = int(torch.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])


def hydrogen_neighbour_distance(numbers: np.ndarray, positions: np.ndarray) -> Optional[float]:
    """Median over the hydrogen atoms of a molecule of the distance to the nearest other atom (None
    without hydrogen or without a second atom)."""
    h = np.flatnonzero(numbers == 1)
    if h.size == 0 or len(numbers) < 2:
        return None
    if len(numbers) > 2000:  # a k-d tree: the dense [N_H, N] distances of a 20k-atom cluster take gigabytes
        from scipy.spatial import cKDTree

        d, _ = cKDTree(positions).query(positions[h], k=2)  # the nearest is the hydrogen itself
        return float(np.median(d[:, 1]))
    d = np.linalg.norm(positions[h, None, :] - positions[None, :, :], axis=-1)
    d[np.arange(h.size), h] = np.inf
    return float(np.median(d.min(axis=1)))


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
        from ase.data import chemical_symbols

        if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str) \
                and err.args[0] not in chemical_symbols:  # ASE's symbol -> number lookup
            raise HessforgeError(f"{path}: unknown element symbol {err.args[0]!r}") from None
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


MISSING_LABELS_HINT = "pass --energy-key/--forces-key, or --allow-missing-labels"


def _stress_matrix(value, where: str, what: str) -> np.ndarray:
    """Voigt 6 (xx yy zz yz xz xy) or 3x3 / 9 values -> a symmetric-as-given 3x3 float64 matrix."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise HessforgeError(f"{where}: {what} has the wrong type ({err})") from None
    if arr.size == 6:
        from ase.stress import voigt_6_to_full_3x3_stress

        return voigt_6_to_full_3x3_stress(arr)
    if arr.size == 9:
        return arr.reshape(3, 3)
    raise HessforgeError(f"{where}: {what} has {arr.size} values; expected 6 (Voigt xx yy zz yz xz xy) or 9 (3x3)")


def read_stress(atoms, where: str, stress_key: str = "stress", stress_factor: Optional[float] = None,
                energy_factor: float = 1.0, length_factor: float = 1.0) -> Optional[np.ndarray]:
    """The frame's stress as 3x3 eV/Å³ (None without one): `stress_key`, else a `virial` (energy unit) divided
    by the volume. stress_factor: to eV/Å³ (None: energy_factor / length_factor³)."""
    stress = _lookup(atoms, stress_key, per_atom=False)
    virial = _lookup(atoms, "virial", per_atom=False) if stress is None else None
    if stress is None and virial is None:
        return None
    if stress is not None:
        matrix = _stress_matrix(stress, where, f"stress ({stress_key!r})")
        factor = stress_factor if stress_factor is not None else energy_factor / length_factor**3
    else:
        volume = abs(np.linalg.det(np.asarray(atoms.cell[:], dtype=np.float64)))
        if not volume > 1e-8:
            raise HessforgeError(f"{where}: a virial but no cell volume to turn it into a stress")
        matrix = -_stress_matrix(virial, where, "virial") / volume
        factor = energy_factor / length_factor**3
    if not np.all(np.isfinite(matrix)):
        raise HessforgeError(f"{where}: stress contains NaN or Inf")
    matrix = matrix * factor
    if np.abs(matrix).max() > LARGEST_STRESS:
        raise HessforgeError(f"{where}: stress up to {np.abs(matrix).max():.3g} eV/Å³ "
                             f"({np.abs(matrix).max() / units.GPa:.3g} GPa) after conversion: is it in GPa or kbar? "
                             "pass --stress-unit GPa|kbar|bar")
    return matrix


def atoms_to_structure(atoms, index: int, path: str, stem: str, energy_key: str = "energy",
                       forces_key: str = "forces", group_key: str = "mol_id", id_key: Optional[str] = None,
                       allow_missing_labels: bool = False, energy_factor: float = 1.0,
                       length_factor: float = 1.0, missing_hint: str = MISSING_LABELS_HINT,
                       require_group: bool = False, stress_key: str = "stress",
                       stress_factor: Optional[float] = None) -> Structure:
    """One frame as a Structure in eV and Å (`energy_factor`, `length_factor`: the file's units to those;
    `stress_factor`: its stresses to eV/Å³, None: energy over length cubed). A stress on a structure that is
    not periodic in all 3 directions is dropped (info["stress_dropped"] says so): it has no volume to mean.
    missing_hint: what the error for a frame without energy or forces tells the user to do."""
    where = f"{path}: frame {index}"
    n = len(atoms)
    energy = _lookup(atoms, energy_key, per_atom=False)
    forces = _lookup(atoms, forces_key, per_atom=True)
    missing = [name for name, v in (("energy", energy), ("forces", forces)) if v is None]
    if missing and not allow_missing_labels:
        raise HessforgeError(f"{where}: no {' and no '.join(missing)} (looked for "
                             f"{energy_key!r}/{forces_key!r} in info, arrays and calculator results); "
                             f"{missing_hint}")
    try:
        energy = None if energy is None else float(np.asarray(energy, dtype=np.float64).reshape(()))
        forces = None if forces is None else np.asarray(forces, dtype=np.float64).reshape(n, 3)
    except (TypeError, ValueError) as err:
        raise HessforgeError(f"{where}: energy/forces have the wrong type or shape ({err})") from None
    pos, cell = np.asarray(atoms.positions, dtype=np.float64), np.asarray(atoms.cell[:], dtype=np.float64)
    for name, value in (("positions", pos), ("cell", cell), ("energy", energy), ("forces", forces)):
        if value is not None and not np.all(np.isfinite(value)):
            raise HessforgeError(f"{where}: {name} contain NaN or Inf")
    if length_factor != 1.0:
        pos, cell = pos * length_factor, cell * length_factor
    if energy_factor != 1.0 or length_factor != 1.0:
        energy = None if energy is None else energy * energy_factor
        forces = None if forces is None else forces * (energy_factor / length_factor)
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
    close = closest_pair(numbers, pos, cell, periodic)
    if close is not None:
        i, j, d = close
        symbols = atoms.get_chemical_symbols()
        raise HessforgeError(
            f"{where}: atoms {i} ({symbols[i]}) and {j} ({symbols[j]}) are {d:.3g} Å apart"
            + (" (an atom and its own periodic image)" if i == j else "")
            + (": overlapping atoms, or lengths in another unit than the one given (nm? pass --length-unit nm)"
               if length_factor == 1.0 else
               f" after the --length-unit conversion (every length x {length_factor:.4g}): is the file in Å "
               "already? Then leave --length-unit out (or overlapping atoms)"))
    sid = atoms.info.get(id_key) if id_key else None
    sid = str(sid) if sid is not None else f"{stem}-{index}"
    group = atoms.info.get(group_key) if group_key else None
    if group is None and require_group:
        raise HessforgeError(f"{where}: no info key {group_key!r} (--group-key); its info keys: "
                             f"{', '.join(sorted(atoms.info)) or 'none'}")
    group = str(group) if group is not None else atoms.get_chemical_formula()
    skip = {energy_key, forces_key, group_key, id_key, stress_key, "virial"}
    info: Dict[str, Any] = {k: v for k, v in atoms.info.items() if k not in skip}
    info["source_index"] = index
    stress = read_stress(atoms, where, stress_key, stress_factor, energy_factor, length_factor)
    if stress is not None and not periodic.all():
        stress, info["stress_dropped"] = None, True
    return Structure(id=sid, group=group, numbers=numbers, positions=pos, cell=cell, pbc=np.asarray(atoms.pbc),
                     energy=energy, forces=forces, info=info, stress=stress)


def ingest(input_path: str, output_path: str, energy_key: str = "energy", forces_key: str = "forces",
           group_key: str = "mol_id", id_key: Optional[str] = None, fmt: Optional[str] = None,
           allow_missing_labels: bool = False, overwrite: bool = False, progress: bool = False,
           energy_unit: str = "eV", length_unit: str = "Å", missing_hint: str = MISSING_LABELS_HINT,
           require_group: bool = False, stress_key: str = "stress", stress_unit: Optional[str] = None) -> int:
    """Read every frame of `input_path` into a new dataset at `output_path`, converting energies, forces,
    positions and cells from `energy_unit` / `length_unit` to eV and Å, stresses from `stress_unit` (default:
    energy unit per length unit cubed) to eV/Å³. Returns the number of structures. Warns (UserWarning) when the
    molecules' hydrogen atoms sit at Bohr-like distances from their neighbours, and when stresses of structures
    that are not periodic in 3 directions were dropped."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    energy_factor = unit_factor(energy_unit, ENERGY_UNITS, "energy")
    length_factor = unit_factor(length_unit, LENGTH_UNITS, "length")
    stress_factor = None if stress_unit is None else unit_factor(stress_unit, STRESS_UNITS, "stress")
    if os.path.isdir(input_path):
        raise HessforgeError(f"{input_path}: is a directory; give a structure file (extxyz, xyz, traj, ...)")
    if not os.path.isfile(input_path):
        raise HessforgeError(f"{input_path}: no such input file")
    if os.path.isdir(output_path):
        raise HessforgeError(f"{output_path}: is a directory; give a file name for the dataset (e.g. data.lmdb)")
    if os.path.exists(output_path) and not overwrite:
        raise HessforgeError(f"{output_path}: already exists; pass --overwrite to replace it")
    check_output_file(output_path, "output", inputs=[input_path], may_replace=ARTIFACT_KINDS)  # --overwrite given
    if os.path.exists(output_path):
        from training.labels import LABELS_MAGIC

        if stored_magic(output_path) == LABELS_MAGIC:  # --overwrite replaces a dataset, never a teacher's labels
            raise HessforgeError(f"{output_path}: holds teacher labels (a `hessforge label` shard), not a dataset; "
                                 "--overwrite replaces datasets only: give another output name")
    stem = os.path.splitext(os.path.basename(input_path))[0]
    extra = {"ingest": {"energy_key": energy_key, "forces_key": forces_key, "group_key": group_key,
                        "id_key": id_key, "format": fmt,
                        "stress_key": stress_key,
                        "input_units": {"energy": energy_unit, "length": length_unit,
                                        **({"stress": stress_unit} if stress_unit else {})},
                        "source_sha256": file_sha256(input_path)}}
    h_distances: List[float] = []
    dropped_stress = 0
    first_of: Dict[bytes, Tuple[str, str]] = {}  # exact geometry -> (id, group) of its first frame
    repeats: List[Tuple[str, str, bool]] = []  # (id, id of the earlier frame, in another group)
    from tqdm import tqdm

    with DatasetWriter(output_path, source=os.path.abspath(input_path), extra_meta=extra) as writer:
        frames = tqdm(_iter_atoms(input_path, fmt), desc="ingest", unit="frame", disable=not progress)
        for index, atoms in enumerate(frames):
            s = atoms_to_structure(atoms, index, input_path, stem, energy_key, forces_key, group_key, id_key,
                                   allow_missing_labels, energy_factor, length_factor, missing_hint, require_group,
                                   stress_key, stress_factor)
            dropped_stress += bool(s.info.get("stress_dropped"))
            if not s.pbc.any():
                d = hydrogen_neighbour_distance(s.numbers, s.positions)
                if d is not None:
                    h_distances.append(d)
            try:
                writer.add(s)
            except HessforgeError as err:
                raise HessforgeError(f"{input_path}: frame {index}: {err}") from None
            key = _geometry_key(s)
            if key in first_of:
                repeats.append((s.id, first_of[key][0], first_of[key][1] != s.group))
            else:
                first_of[key] = (s.id, s.group)
        if not writer.ids:
            raise HessforgeError(f"{input_path}: no frames found")
    if repeats:
        across = [r for r in repeats if r[2]]
        example = (across or repeats)[0]
        warnings.warn(f"{input_path}: {len(repeats)} frame(s) repeat an earlier frame's geometry exactly (e.g. "
                      f"{example[0]!r} = {example[1]!r})"
                      + (f"; {len(across)} of them in another group, so they can land in another split than their "
                         "twin: test or validation structures that are also training data" if across else ""),
                      UserWarning, stacklevel=2)
    if dropped_stress:
        warnings.warn(f"{input_path}: the stress of {dropped_stress} frame(s) that are not periodic in all 3 "
                      "directions was not kept (a stress needs a bulk volume)", UserWarning, stacklevel=2)
    if h_distances and length_factor > 1 and np.median(h_distances) > BOHR_LIKE_H_DISTANCE:
        warnings.warn(f"{input_path}: hydrogen atoms are {np.median(h_distances):.2f} Å from their nearest "
                      "neighbours after conversion (median over the molecules; bonded hydrogens: 0.7-1.2 Å): "
                      f"is the file in Å already? --length-unit {length_unit} scaled every length by "
                      f"{length_factor:.4g}", UserWarning, stacklevel=2)
    elif h_distances and np.median(h_distances) > BOHR_LIKE_H_DISTANCE:
        warnings.warn(f"{input_path}: hydrogen atoms are {np.median(h_distances):.2f} Å from their nearest "
                      "neighbours (median over the molecules; bonded hydrogens: 0.7-1.2 Å): are the lengths in "
                      "Bohr? If so, ingest again with --length-unit bohr (and --energy-unit hartree if the "
                      "energies are atomic units too)", UserWarning, stacklevel=2)
    if h_distances and length_factor < 1 and np.median(h_distances) < SHRUNK_H_DISTANCE:
        warnings.warn(f"{input_path}: hydrogen atoms are {np.median(h_distances):.2f} Å from their nearest "
                      "neighbours after conversion (median over the molecules; bonded hydrogens: 0.7-1.2 Å): "
                      f"is the file in Å already? --length-unit {length_unit} scaled every length by "
                      f"{length_factor:.4g}", UserWarning, stacklevel=2)
    return len(writer.ids)


def _geometry_key(s) -> bytes:
    """The exact geometry of a structure (elements, positions, cell, pbc) as one hashable key."""
    import hashlib

    h = hashlib.sha256()
    for part in (np.asarray(s.numbers, dtype=np.int64), np.asarray(s.positions, dtype=np.float64),
                 np.asarray(s.cell, dtype=np.float64), np.asarray(s.pbc, dtype=bool)):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.digest()


def add_arguments(parser) -> None:
    parser.add_argument("input", help="any file ase.io.read can read (extxyz, ASE .db, ...)")
    parser.add_argument("-o", "--output", required=True, help="output dataset file (.lmdb)")
    parser.add_argument("--group-key", default=None,
                        help="info key naming the group (molecule) of a frame, required in every frame (default: "
                             "mol_id where a frame has it, else the chemical formula)")
    parser.add_argument("--id-key", default=None, help="info key holding a unique id (default: <stem>-<index>)")
    parser.add_argument("--energy-key", default="energy", help="info key or calculator result (default energy)")
    parser.add_argument("--forces-key", default="forces", help="arrays key or calculator result (default forces)")
    parser.add_argument("--stress-key", default="stress",
                        help="info key or calculator result holding the stress (default stress; a 'virial' key "
                             "is used when there is none); optional, periodic structures only")
    parser.add_argument("--stress-unit", default=None,
                        help="unit of the file's stresses: GPa, kbar, bar, atm (default: --energy-unit per "
                             "--length-unit cubed, eV/Å³ for eV and Å)")
    parser.add_argument("--format", default=None, help="ASE format name, when it cannot be guessed")
    parser.add_argument("--allow-missing-labels", action="store_true",
                        help="keep frames without energy/forces (teacher-only training)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--energy-unit", default="eV",
                        help="unit of the file's energies: eV (default), meV, hartree, Ry, kcal/mol, kJ/mol; "
                             "forces are read in this unit per --length-unit")
    parser.add_argument("--length-unit", default="Å", help="unit of the file's positions and cell: Å (default), "
                                                           "bohr, nm, pm")


def run(args) -> int:
    import sys

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        n = ingest(args.input, args.output, args.energy_key, args.forces_key, args.group_key or "mol_id",
                   args.id_key, args.format, args.allow_missing_labels, args.overwrite, progress=sys.stderr.isatty(),
                   energy_unit=args.energy_unit, length_unit=args.length_unit,
                   require_group=args.group_key is not None, stress_key=args.stress_key,
                   stress_unit=args.stress_unit)
    print(f"wrote {n} structures to {args.output}")
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    return 0
