"""Per-element reference energies and the energy scale of a student, fitted on the training set."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def fit_reference_energies(structures: Sequence, species: Sequence[int], ridge: float = 1e-8) -> np.ndarray:
    """Least-squares e_z with E ≈ Σ_z n_z(structure) e_z; a tiny ridge keeps collinear compositions
    (e.g. conformers of one molecule only) well posed. Structures without a reference energy (ingested with
    --allow-missing-labels) take no part; none at all gives zeros."""
    structures = [s for s in structures if s.energy is not None]
    index = {z: k for k, z in enumerate(species)}
    counts = np.zeros((len(structures), len(species)))
    energies = np.zeros(len(structures))
    for row, s in enumerate(structures):
        for z in s.numbers:
            counts[row, index[int(z)]] += 1
        energies[row] = s.energy
    a = counts.T @ counts + ridge * np.eye(len(species))
    return np.linalg.solve(a, counts.T @ energies)


def fit_energy_scale(structures: Sequence) -> float:
    """RMS of the reference force components (eV/Å): the natural scale of learned atomic energies."""
    parts = [np.asarray(s.forces).reshape(-1) for s in structures if s.forces is not None]
    forces = np.concatenate(parts) if parts else np.zeros(0)
    rms = float(np.sqrt(np.mean(forces**2))) if forces.size else 1.0
    return rms if rms > 1e-6 else 1.0
