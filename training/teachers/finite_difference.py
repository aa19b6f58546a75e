"""A teacher around any ASE calculator: Hessian rows by central differences of its forces.

For teachers with no (or too slow) second derivatives, e.g. float32 CHGNet or DFT. Costs 2 force calls per
requested row, so ask for a few rows per structure, not the full Hessian, with expensive calculators.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from engine.errors import HessforgeError
from training.teachers.base import Teacher, TeacherOutput, check_finite_positions, validate_rows


class FiniteDifferenceTeacher(Teacher):
    """row j = -(F(r + h e_j) - F(r - h e_j)) / (2h); error O(h²). h in Å (1e-3 suits float64 calculators;
    float32 models need larger h, ~1e-2, or round-off dominates). Strictly this is column j of -∂F/∂r (all
    forces under one displacement); it is row j, what the KD loss compares, because a conservative calculator's
    -∂F/∂r is the symmetric Hessian. A direct-force calculator (forces not the gradient of its energy) gives an
    asymmetric matrix: its columns are still labelled here as rows."""

    failure = "calculator failed"  # how the calculator's errors are introduced (subclasses name their code)
    # A user's ASE calculator sees atoms.info and is set up by the user (e.g. tblite's charge=): its business.
    takes_charge = True

    def __init__(self, calculator, h: float = 1e-3, name: Optional[str] = None, elements=None):
        if not h > 0:
            raise HessforgeError(f"finite-difference step must be > 0 Å, got {h}")
        self.calc = calculator
        self.h = float(h)
        self.name = name or f"fd:{type(calculator).__name__}"
        self.elements = None if elements is None else frozenset(int(z) for z in elements)

    def gives_stress(self, atoms=None) -> bool:
        """Stress is asked of the calculator for bulk structures, when it says it can give one."""
        bulk = atoms is None or bool(np.all(atoms.get_pbc()))
        return bulk and "stress" in getattr(self.calc, "implemented_properties", ())

    def _forces_energy(self, atoms, positions, with_stress: bool = False):
        """(forces, energy), and the [3, 3] stress last with with_stress (one calculation: ASE calculators
        that compute stress with the forces keep it in their results). The calculator's own errors (an element
        it lacks, a structure it refuses, a crashed code) come back as one HessforgeError naming the teacher."""
        try:
            return self._calculate(atoms, positions, with_stress)
        except HessforgeError:
            raise
        except Exception as exc:
            raise HessforgeError(f"teacher {self.name}: {self.failure}: {str(exc).strip() or type(exc).__name__}"
                                 ) from None

    def _calculate(self, atoms, positions, with_stress: bool):
        a = atoms.copy()
        a.set_constraint()  # H = -dF/dr of the bare potential: FixAtoms would pin a displaced atom and zero its force
        a.set_positions(positions)
        a.calc = self.calc
        out = np.asarray(a.get_forces(), dtype=np.float64), float(a.get_potential_energy())
        if with_stress:
            out += (np.asarray(a.get_stress(voigt=False), dtype=np.float64).reshape(3, 3),)
        return out

    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        self.check_elements(atoms.numbers, f"teacher {self.name}")
        check_finite_positions(atoms, f"teacher {self.name}")
        n = len(atoms)
        rows = validate_rows(rows, n)
        pos0 = np.asarray(atoms.get_positions(), dtype=np.float64)
        stress = None
        if self.gives_stress(atoms):
            forces, energy, stress = self._forces_energy(atoms, pos0, with_stress=True)
        else:
            forces, energy = self._forces_energy(atoms, pos0)
        h_rows = None
        if rows is not None:
            h_rows = np.empty((rows.size, 3 * n))
            for i, j in enumerate(rows):
                step = np.zeros(3 * n)
                step[j] = self.h
                step = step.reshape(n, 3)
                f_plus, _ = self._forces_energy(atoms, pos0 + step)
                f_minus, _ = self._forces_energy(atoms, pos0 - step)
                h_rows[i] = -(f_plus - f_minus).reshape(-1) / (2 * self.h)
        return TeacherOutput(energy=energy, forces=forces, rows=rows, hessian_rows=h_rows, stress=stress)
