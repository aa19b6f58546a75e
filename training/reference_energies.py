"""Per-element reference energies and the energy scale of a student, fitted on the training set."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def fit_reference_energies(structures: Sequence, species: Sequence[int], ridge: float = 1e-8) -> np.ndarray:
    """Least-squares e_z with E ≈ Σ_z n_z(structure) e_z; a tiny ridge keeps collinear compositions
    (e.g. conformers of one molecule only) well posed. Structures without a reference energy (ingested with
    --allow-missing-labels) take no part; none at all gives zeros."""
    structures = [s for s in structures if s.energy is not None]
    return _per_element_least_squares([s.numbers for s in structures], [s.energy for s in structures], species,
                                      ridge)


def _composition_matrix(numbers_list, species) -> np.ndarray:
    """[structures, species] atom counts."""
    index = {z: k for k, z in enumerate(species)}
    counts = np.zeros((len(numbers_list), len(species)))
    for row, numbers in enumerate(numbers_list):
        for z in numbers:
            counts[row, index[int(z)]] += 1
    return counts


def _per_element_least_squares(numbers_list, values, species, ridge: float = 1e-8) -> np.ndarray:
    """e_z minimising Σ_structures (value - Σ_z n_z e_z)² + ridge Σ_z e_z²."""
    counts = _composition_matrix(numbers_list, species)
    a = counts.T @ counts + ridge * np.eye(len(species))
    return np.linalg.solve(a, counts.T @ np.asarray(values, dtype=np.float64).reshape(-1))


def fit_element_offsets(numbers_list, energies, reference_energies) -> Dict[int, float]:
    """{Z: o_Z} with energies ≈ reference_energies + Σ_Z n_Z o_Z, least squares: the per-element offset
    between two energy conventions (a teacher whose absolute energies carry no per-element reference, such
    as SO3LR, against DFT). Only energy differences survive the alignment, which is all such a teacher means."""
    species = sorted({int(z) for numbers in numbers_list for z in numbers})
    diffs = np.asarray(energies, dtype=np.float64) - np.asarray(reference_energies, dtype=np.float64)
    # minimum-norm least squares (SVD), no ridge: a ridge would bias offsets of hundreds of eV per atom by
    # ~1e-7 eV, and compositions that cannot pin down every element's offset are still fitted exactly
    offsets = np.linalg.lstsq(_composition_matrix(numbers_list, species), diffs, rcond=None)[0]
    return {z: float(o) for z, o in zip(species, offsets)}


def offsets_determine(fit_numbers_list, target_numbers_list) -> bool:
    """Whether offsets fitted on the compositions of `fit_numbers_list` fix Σ_Z n_Z o_Z for every structure of
    `target_numbers_list`: each target composition lies in the span of the fitted ones. Conformers of one
    molecule pin down only that molecule's sum; another molecule's offset energy is then arbitrary (the
    minimum-norm fit picks one of many), and so would be a teacher's energy error measured with it."""
    species = sorted({int(z) for numbers in list(fit_numbers_list) + list(target_numbers_list) for z in numbers})
    fit = _composition_matrix(fit_numbers_list, species)
    target = _composition_matrix(target_numbers_list, species)
    if fit.size == 0:
        return target.size == 0
    residual = target - target @ np.linalg.pinv(fit) @ fit
    return bool(np.abs(residual).max(initial=0.0) < 1e-8 * max(1.0, np.abs(target).max(initial=0.0)))


def offset_energy(numbers, offsets: Dict[int, float]) -> float:
    """Σ_atoms o_Z: what fit_element_offsets' offsets add to one structure's energy (0 for elements without
    an offset)."""
    return float(sum(offsets.get(int(z), 0.0) for z in numbers))


def fit_energy_scale(structures: Sequence) -> float:
    """RMS of the reference force components (eV/Å): the natural scale of learned atomic energies."""
    parts = [np.asarray(s.forces).reshape(-1) for s in structures if s.forces is not None]
    forces = np.concatenate(parts) if parts else np.zeros(0)
    rms = float(np.sqrt(np.mean(forces**2))) if forces.size else 1.0
    return rms if rms > 1e-6 else 1.0
