"""The teacher protocol: energy, forces and Hessian rows of a structure, in eV and Å.

Hessian rows are rows of H = d²E/dr dr (eV/Å²) of the flattened coordinates: row index j = 3*atom + axis,
each row has 3N entries in the same order. Rows are returned for the requested indices only; a full
Hessian is the request of all 3N rows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from engine.errors import HessforgeError, UnknownElementError


@dataclass
class TeacherOutput:
    energy: float  # eV
    forces: np.ndarray  # [N, 3] eV/Å, float64
    rows: Optional[np.ndarray] = None  # [k] int64 indices into the 3N flattened coordinates
    hessian_rows: Optional[np.ndarray] = None  # [k, 3N] eV/Å², float64


class Teacher(ABC):
    """A reference force field. Subclasses set `name` and `elements` (atomic numbers it supports)."""

    name: str = "teacher"
    elements: Optional[frozenset] = None  # None: any element

    def check_elements(self, numbers: Iterable[int], where: str = "") -> None:
        if self.elements is None:
            return
        unknown = set(int(z) for z in numbers) - set(self.elements)
        if unknown:
            raise UnknownElementError(unknown, self.elements, where or f"teacher {self.name}")

    @abstractmethod
    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        """Energy and forces of one `ase.Atoms`; Hessian rows for `rows` if given (all 3N: full Hessian)."""

    def compute_batch(self, atoms_list, rows_list=None) -> list:
        rows_list = rows_list if rows_list is not None else [None] * len(atoms_list)
        return [self.compute(a, r) for a, r in zip(atoms_list, rows_list)]


def validate_rows(rows, n_atoms: int) -> Optional[np.ndarray]:
    if rows is None:
        return None
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= 3 * n_atoms):
        raise HessforgeError(f"Hessian row index out of range [0, {3 * n_atoms}) for {n_atoms} atoms: {rows}")
    return rows


def check_finite_positions(atoms, where: str = "") -> None:
    pos = np.asarray(atoms.get_positions())
    if not np.all(np.isfinite(pos)):
        raise HessforgeError(f"{where or 'structure'}: positions contain NaN or Inf")
