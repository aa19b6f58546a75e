"""`hessforge md-eval MODEL DATA`: MD stability, energy conservation and geometry optimization of a student,
through ASE (one structure at a time, the student as an ASE calculator: engine.Calculator).

MODEL is a run directory (its best.pt and split.json are used; the JSON goes to RUN/md.json unless --json
says otherwise), a trainer checkpoint (split.json beside it) or an exported TorchScript student.
DATA is a hessforge LMDB dataset; --structures held-out structures of --split are used, one per molecule
(group) first, in split order.

Three tests, each one can be skipped (--skip nvt,nve,opt):
  nvt  Langevin MD (ASE's Langevin; default 300 K, 1 fs, friction 0.01/fs, --steps 1000) from each structure,
       velocities drawn from Maxwell-Boltzmann at the temperature, checked every --check-interval steps. The
       trajectory is unstable from the first check where the calculator fails or returns non-finite numbers,
       or where the stability criterion (--criterion; auto: rdf for structures periodic in 3 dimensions, bonds
       otherwise) fails:
       bonds  the atom pairs closer than 1.2 x the sum of their covalent radii (ase natural_cutoffs) in the
              starting structure (in a periodic cell also across the cell faces) are bonds; unstable where any
              bond length deviates more than --bond-tolerance (0.5 Å) from its starting length. A molecular
              criterion: in a hot crystal (CHGNet's Si at 1000 K, 0.3 Å rms displacement) every bond-based check
              fails within tens of fs under any model.
       rdf    (bulk) unstable where the mean radial distribution function over the last --rdf-window fs (200)
              has changed by more than --rdf-tolerance (0.25, relative) from the trajectory's own thermalized
              reference (the window after a burn-in of half a window), or where two atoms come closer than
              half the sum of their covalent radii (RdfCriterion). It sees a structure change: melting (not
              always: close-packed metals melting at fixed volume change their RDF little), amorphization,
              collapse, explosion; a run meant to melt is no stability test.
       Reported: time to failure per trajectory (null: survived all steps) and the fraction of trajectories
       still stable at each checked time.
  nve  VelocityVerlet (default 0.5 fs, --nve-steps 1000) from the same structures at the same initial
       temperature, stopped where the stability criterion fails, for gradient-force students only (a
       direct-force student conserves nothing). Drift: slope of a least-squares line through the total energy
       per atom against time, eV/atom/ps.
  opt  FIRE to --fmax 0.05 eV/Å (at most --opt-steps) from each structure; the final structure's energy and
       forces under the --reference calculator (a teacher spec such as ani1x, ani1x:0, mace:FILE; the
       labels' DFT method, dft[:BASIS[:XC[:D]]]; or `none`) beside those of the starting structure, and the
       largest bond deviation of the final structure. Unless --no-reference-relax, the starting structure is
       also relaxed under the reference itself (BFGS to --reference-fmax 0.005 eV/Å, at most 4 x --opt-steps):
       E_ref(student minimum) - E_ref(reference minimum) >= 0 measures
       how far the student's minimum is from the reference's. Bulk (3D-periodic) structures relax their cell
       too (ASE's FrechetCellFilter; --fixed-cell: positions only): reported are the volume change and the
       volume against the reference's own minimum (the reference must give stress: the chgnet, lammps:, mace:,
       ani1x and so3lr teachers do). That volume includes the student's own convergence: at the
       default --fmax 0.05 a cell stops ~0.1 GPa from zero stress (EMT Cu: 0.5 % in volume); give --fmax 0.005
       for cells.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from engine.errors import HessforgeError
from engine.paths import TORCH_FILE, artifact_kind, check_output_file, write_json
from training.arg_types import seed_option

DEFAULTS = dict(steps=1000, timestep_fs=1.0, temperature_K=300.0, friction_per_fs=0.01, check_interval=10,
                bond_tolerance_A=0.5, criterion="auto", rdf_tolerance=0.25, rdf_window_fs=200.0,
                nve_steps=1000, nve_timestep_fs=0.5, nve_interval=10, fmax=0.05,
                opt_steps=500, fixed_cell=False, reference_fmax=0.005)
CRITERIA = ("auto", "bonds", "rdf")


# ------------------------------------------------------------------------------------------ bonds
class Bonds(NamedTuple):
    """Bonded pairs [B, 2] (i, j), their lengths [B] (Å) and the Cartesian offset [B, 3] of j's periodic image
    (zero in molecules): the bond vector is x_j - x_i + offset as long as positions are not wrapped back into
    the cell (ASE's integrators and optimizers never wrap them)."""
    pairs: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray


def bonds(atoms, mult: float = 1.2) -> Bonds:
    """The bonds of `atoms`: pairs closer than the sum of their ase.neighborlist.natural_cutoffs (covalent
    radii times `mult`; with mult 1, C-H at 1.09 Å is no bond: 0.76 + 0.31 = 1.07 Å, so 1.2, the usual
    allowance). In a periodic cell, bonds to periodic images count too (each once, i < j or, between an atom
    and its own image, one of the two directions), so a crystal's bonds across the cell faces are checked."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    if len(atoms) < 2 and not atoms.pbc.any():
        return Bonds(np.zeros((0, 2), dtype=np.int64), np.zeros(0), np.zeros((0, 3)))
    i, j, d, shift = neighbor_list("ijdS", atoms, natural_cutoffs(atoms, mult=mult))
    # each bond appears as (i, j, S) and (j, i, -S): keep i < j, and for i == j the first nonzero component of S > 0
    first = shift[np.arange(len(shift)), np.argmax(shift != 0, axis=1)]
    keep = (i < j) | ((i == j) & (first > 0))
    pairs = np.stack([i[keep], j[keep]], axis=1).astype(np.int64)
    return Bonds(pairs, d[keep].astype(np.float64), shift[keep] @ np.asarray(atoms.cell, dtype=np.float64))


def bond_deviation(positions: np.ndarray, bond_set: Bonds) -> float:
    """Largest |r_ij - r_ij(ref)| over the bonds (Å); inf for non-finite positions, 0 with no bonds."""
    positions = np.asarray(positions, dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        return math.inf
    pairs = bond_set.pairs
    if len(pairs) == 0:
        return 0.0
    r = np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]] + bond_set.offsets, axis=1)
    return float(np.max(np.abs(r - bond_set.lengths)))


def first_failure(frames: Sequence[np.ndarray], times_ps: Sequence[float], bond_set: Bonds,
                  tolerance: float = 0.5) -> Optional[float]:
    """Time of the first frame whose largest bond deviation exceeds `tolerance` (None: all frames stable)."""
    for pos, t in zip(frames, times_ps):
        if bond_deviation(pos, bond_set) > tolerance:
            return float(t)
    return None


# ------------------------------------------------------------------------------------------ RDF
def is_bulk(atoms) -> bool:
    """Periodic in all three directions with a cell of nonzero volume (a crystal, liquid or amorphous solid)."""
    return bool(np.all(atoms.pbc)) and abs(float(np.linalg.det(np.asarray(atoms.cell)))) > 1e-9


def require_bulk(atoms, where: str = "") -> None:
    """The clear error for a structure the RDF criterion cannot judge."""
    if not is_bulk(atoms):
        raise HessforgeError(f"{where + ': ' if where else ''}the RDF criterion needs a structure periodic in 3 "
                             "dimensions with a nonzero cell volume (use --criterion bonds or auto for molecules, "
                             "slabs and wires)")


def radial_distribution(atoms, r_max: float = 6.0, sigma: float = 0.2, spacing: float = 0.02
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """(r, g(r)): the total radial distribution function of a 3D-periodic structure on bin centres up to r_max,
    the pair distances histogrammed and smeared by a Gaussian of width `sigma` (Å), so that one frame of a
    small cell gives a usable curve. Normalized to 1 for an ideal gas of the same density:
    g(r) = n(r) / (N ρ 4π r² dr), n counting every ordered pair (periodic images included)."""
    from ase.neighborlist import neighbor_list

    require_bulk(atoms)
    pad = 4.0 * sigma
    n_bins = int(round((r_max + pad) / spacing))
    d = neighbor_list("d", atoms, r_max + pad)
    counts, edges = np.histogram(d, bins=n_bins, range=(0.0, n_bins * spacing))
    x = np.arange(-int(round(pad / spacing)), int(round(pad / spacing)) + 1) * spacing
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    smeared = np.convolve(counts.astype(np.float64), kernel / kernel.sum(), mode="same")
    r = 0.5 * (edges[1:] + edges[:-1])
    keep = r <= r_max
    n = len(atoms)
    density = n / abs(float(np.linalg.det(np.asarray(atoms.cell))))
    return r[keep], smeared[keep] / (n * density * 4.0 * np.pi * r[keep] ** 2 * spacing)


class BondCriterion:
    """Unstable once any bond of the starting structure deviates more than `tolerance` (Å) from its length."""

    name, key = "bonds", "max_bond_deviation_A"

    def __init__(self, atoms, tolerance: float = 0.5):
        self.bond_set, self.tolerance = bonds(atoms), tolerance

    def info(self) -> Dict:
        return {"criterion": self.name, "n_bonds": int(len(self.bond_set.pairs))}

    def __call__(self, atoms) -> Tuple[float, Optional[str]]:
        dev = bond_deviation(atoms.positions, self.bond_set)
        return dev, (f"bond deviation {dev:.2f} Å > {self.tolerance} Å" if dev > self.tolerance else None)


class RdfCriterion:
    """For bulk (3D-periodic) systems, where thermal motion alone stretches bonds by 0.5 Å: unstable once the
    structure changes (melting, amorphization, collapse, explosion), measured as the relative RDF change
    h = ∫ |ḡ(r) - ḡ_ref(r)| dr / ∫ |ḡ_ref(r) - 1| dr (0: unchanged; the denominator, the reference's departure
    from an ideal gas, makes h comparable between materials) between the mean RDF of the last `window` checked
    frames and the reference: the mean RDF of the window after a burn-in of window/2 checks, in which a
    structure started at another temperature (an ideal lattice, a frame from a hotter run) thermalizes. This is
    the RDF criterion of Fu et al. ("Forces are not enough", TMLR 2023) with the trajectory's own early,
    thermalized structure as reference; so a structure lost within the burn-in and reference windows is seen
    only by the hard checks: from the first frame on, two atoms closer than `close_factor` x the sum of their
    covalent radii (fused atoms) or non-finite positions. Calibration: bench/results/md_stability_rdf_cpu.md."""

    name, key = "rdf", "max_rdf_change"

    def __init__(self, atoms, tolerance: float = 0.25, window: int = 20, r_max: float = 6.0, sigma: float = 0.2,
                 close_factor: float = 0.5):
        from ase.neighborlist import natural_cutoffs

        require_bulk(atoms)
        self.tolerance, self.r_max, self.sigma = tolerance, r_max, sigma
        self.window = max(1, int(window))
        self.burn_in = self.window // 2
        self.checked = 0
        self.reference: Optional[np.ndarray] = None
        self.scale = 1.0
        self.last = 0.0
        self.recent: List[np.ndarray] = []
        self.close_cutoffs = natural_cutoffs(atoms, mult=close_factor)
        self.close_factor = close_factor

    def info(self) -> Dict:
        return {"criterion": self.name, "rdf_window_checks": self.window, "rdf_burn_in_checks": self.burn_in,
                "rdf_r_max_A": self.r_max, "rdf_sigma_A": self.sigma}

    def __call__(self, atoms) -> Tuple[float, Optional[str]]:
        from ase.neighborlist import neighbor_list

        if not np.all(np.isfinite(atoms.positions)):
            return math.inf, "non-finite positions"
        i, j, d = neighbor_list("ijd", atoms, self.close_cutoffs)
        if len(d):
            k = int(np.argmin(d))  # the RDF measure so far stays the reported value; the reason says why
            return self.last, (f"atoms {i[k]} and {j[k]} at {d[k]:.2f} Å, closer than {self.close_factor} x the "
                              f"sum of their covalent radii")
        self.checked += 1
        if self.checked <= self.burn_in:
            return 0.0, None
        g = radial_distribution(atoms, self.r_max, self.sigma)[1]
        self.recent = (self.recent + [g])[-self.window:]
        if self.reference is None:
            if self.checked == self.burn_in + self.window:
                self.reference = np.mean(self.recent, axis=0)
                self.scale = max(float(np.sum(np.abs(self.reference - 1.0))), 1e-12)
            return 0.0, None
        h = self.last = float(np.sum(np.abs(np.mean(self.recent, axis=0) - self.reference))) / self.scale
        return h, (f"RDF changed by {h:.2f} (relative) > {self.tolerance}" if h > self.tolerance else None)


def stability_criterion(atoms, criterion: str = "auto", bond_tolerance: float = 0.5, rdf_tolerance: float = 0.25,
                        rdf_window_fs: float = 200.0, check_every_fs: float = 10.0):
    """`auto`: the RDF criterion for bulk structures, bonds for molecules (and slabs, wires). The RDF window
    is given in time; `check_every_fs` is the simulated time between two checks."""
    if criterion == "auto":
        criterion = "rdf" if is_bulk(atoms) else "bonds"
    if criterion == "bonds":
        return BondCriterion(atoms, bond_tolerance)
    if criterion == "rdf":
        return RdfCriterion(atoms, rdf_tolerance, max(1, round(rdf_window_fs / check_every_fs)))
    raise HessforgeError(f"unknown stability criterion {criterion!r} ({', '.join(CRITERIA)})")


def fraction_stable(times_to_failure: Sequence[Optional[float]], times_ps: Sequence[float]) -> List[float]:
    """Fraction of trajectories not failed at or before each time (failure time None = never failed)."""
    n = len(times_to_failure)
    if n == 0:
        return [math.nan for _ in times_ps]
    return [sum(1 for f in times_to_failure if f is None or f > t) / n for t in times_ps]


# ------------------------------------------------------------------------------------------ tests
def _init_velocities(atoms, temperature_K: float, seed: int) -> None:
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    thermalize_momenta(atoms, temperature_K=temperature_K, rng=np.random.RandomState(seed % 2**32))
    Stationary(atoms)
    if len(atoms) > 2 and not atoms.pbc.any():  # a periodic system has no rotation to remove
        ZeroRotation(atoms)


def _finite_step(dyn, atoms, n: int) -> Optional[str]:
    """Run n steps; the reason if the calculator failed or produced non-finite numbers, else None."""
    try:
        dyn.run(n)
        f = atoms.get_forces()
        e = atoms.get_potential_energy()
    except Exception as err:  # a student driven far out of distribution may fail anywhere: that is instability
        return f"{type(err).__name__}: {err}"
    if not (np.all(np.isfinite(f)) and math.isfinite(e) and np.all(np.isfinite(atoms.positions))):
        return "non-finite energy, forces or positions"
    return None


def nvt_stability(atoms, calc, steps: int = 1000, timestep_fs: float = 1.0, temperature_K: float = 300.0,
                  friction_per_fs: float = 0.01, check_interval: int = 10, tolerance: float = 0.5,
                  seed: int = 0, criterion: str = "auto", rdf_tolerance: float = 0.25,
                  rdf_window_fs: float = 200.0, trace: bool = False) -> Dict:
    """One Langevin trajectory from `atoms`, stopped at the first unstable check (see the module docstring);
    `tolerance` is the bond criterion's, `rdf_*` the RDF criterion's (stability_criterion). trace=True adds
    the criterion's value at every check ("trace") and the mean squared displacement at the end
    ("msd_end_A2"): what a calibration of the criterion needs (bench/science/rdf_calibration.py)."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    atoms = atoms.copy()
    atoms.calc = calc
    check = stability_criterion(atoms, criterion, tolerance, rdf_tolerance, rdf_window_fs,
                                check_interval * timestep_fs)
    _init_velocities(atoms, temperature_K, seed)
    atoms.set_constraint(FixCom())  # ASE's recommended replacement for Langevin(fixcm=True)
    dyn = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_K,
                   friction=friction_per_fs / units.fs, fixcm=False, rng=np.random.RandomState((seed + 1) % 2**32))
    start, done, failure, reason, worst, devs = time.perf_counter(), 0, None, None, 0.0, []
    x0 = atoms.get_positions()
    while done < steps:
        n = min(check_interval, steps - done)
        error = _finite_step(dyn, atoms, n)
        done += n
        dev, unstable = check(atoms) if error is None else (math.inf, error)
        worst = max(worst, dev)
        if math.isfinite(dev):
            devs.append(dev)
        if unstable is not None:
            failure, reason = done * timestep_fs / 1000.0, unstable
            break
    wall = time.perf_counter() - start
    out = {"time_to_failure_ps": failure, "survived": failure is None, "reason": reason, "steps_run": done,
           "simulated_ps": done * timestep_fs / 1000.0, **check.info(),
           check.key: worst if math.isfinite(worst) else None, "wall_s": wall,
           "steps_per_s": done / wall if wall > 0 else None}
    if trace:
        out.update(trace=devs, msd_end_A2=float(np.mean(np.sum((atoms.get_positions() - x0) ** 2, axis=1))))
    return out


def nve_drift(atoms, calc, steps: int = 1000, timestep_fs: float = 0.5, temperature_K: float = 300.0,
              interval: int = 10, tolerance: float = 0.5, seed: int = 0, criterion: str = "auto",
              rdf_tolerance: float = 0.25, rdf_window_fs: float = 200.0) -> Dict:
    """VelocityVerlet from `atoms`: total energy per atom every `interval` steps and its linear drift, stopped
    where the stability criterion (as in nvt_stability) fails."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    check = stability_criterion(atoms, criterion, tolerance, rdf_tolerance, rdf_window_fs, interval * timestep_fs)
    _init_velocities(atoms, temperature_K, seed)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    n_atoms = len(atoms)
    times, energies = [0.0], [atoms.get_total_energy() / n_atoms]
    done, reason = 0, None
    start = time.perf_counter()
    while done < steps:
        n = min(interval, steps - done)
        reason = _finite_step(dyn, atoms, n)
        done += n
        if reason is None:
            reason = check(atoms)[1]
        if reason is not None:
            break
        times.append(done * timestep_fs / 1000.0)
        energies.append(atoms.get_total_energy() / n_atoms)
    t, e = np.asarray(times), np.asarray(energies)
    slope = float(np.polyfit(t, e, 1)[0]) if len(t) >= 2 else None
    return {"drift_eV_per_atom_per_ps": slope, "max_abs_energy_change_eV_per_atom": float(np.max(np.abs(e - e[0]))),
            "energy_std_eV_per_atom": float(np.std(e)), "simulated_ps": float(t[-1]), "steps_run": done,
            "stopped": reason, "wall_s": time.perf_counter() - start}


def relax(atoms, calc, fmax: float = 0.05, steps: int = 500, cell: bool = False, optimizer: str = "FIRE"
          ) -> Tuple[object, Dict]:
    """FIRE (or BFGS) from `atoms` to fmax (eV/Å): (final atoms, {converged, steps, fmax, energy}). cell=True
    relaxes the cell too (ASE's FrechetCellFilter: fmax then also bounds the stress times the volume, and the
    calculator must give stress); the info then holds the final volume and cell lengths."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE

    atoms = atoms.copy()
    atoms.calc = calc
    opt = {"FIRE": FIRE, "BFGS": BFGS}[optimizer](FrechetCellFilter(atoms) if cell else atoms, logfile=None)
    error = None
    try:
        with warnings.catch_warnings():
            # FrechetCellFilter's matrix logarithm (scipy logm) warns "logm result may be inaccurate, approximate
            # err = 7e-13" at nearly every step: round-off, hundreds of lines. Errors above 1e-9 still warn.
            warnings.filterwarnings("ignore", message=r"logm result may be inaccurate, approximate err = "
                                    r"[0-9.]+e-(1[0-9]|[2-9][0-9])\b", category=RuntimeWarning)
            converged = bool(opt.run(fmax=fmax, steps=steps))
        f = atoms.get_forces()
        e = float(atoms.get_potential_energy())
    except Exception as err:
        converged, f, e, error = False, np.full((len(atoms), 3), np.nan), math.nan, f"{type(err).__name__}: {err}"
    info = {"converged": converged, "steps": int(opt.nsteps), "fmax_eV_per_A": _fmax(f), "energy_eV": e}
    if cell:
        info.update(volume_A3=float(atoms.get_volume()), cell_lengths_A=[float(x) for x in atoms.cell.lengths()])
    if error:
        info["error"] = error
    return atoms, info


def _fmax(forces) -> Optional[float]:
    f = np.asarray(forces)
    v = float(np.max(np.linalg.norm(f, axis=1))) if f.size else 0.0
    return v if math.isfinite(v) else None


def _reference_point(atoms, calc) -> Dict:
    a = atoms.copy()
    a.calc = calc
    try:
        f = a.get_forces()
        e = float(a.get_potential_energy())
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    norms = np.linalg.norm(f, axis=1)
    return {"energy_eV": e, "fmax_eV_per_A": float(norms.max()), "force_rms_eV_per_A": float(np.sqrt(np.mean(f**2))),
            "force_norm_mean_eV_per_A": float(norms.mean())}


def optimization(atoms, calc, reference_calc=None, fmax: float = 0.05, steps: int = 500,
                 reference_relax: bool = True, relax_cell: Optional[bool] = None,
                 reference_fmax: float = DEFAULTS["reference_fmax"]) -> Dict:
    """The student's minimum from `atoms` (positions, and the cell where relax_cell; None: the cell of bulk
    structures) judged by the reference calculator and against the reference's own minimum, which BFGS finds to
    the tighter reference_fmax: FIRE to the student's fmax stops short on floppy torsions (measured 1-29 meV above
    the minimum), and the energy above it would be understated, or even negative."""
    relax_cell = is_bulk(atoms) if relax_cell is None else relax_cell
    bond_set = bonds(atoms)
    final, info = relax(atoms, calc, fmax, steps, cell=relax_cell)
    out = {"student": info, "max_bond_deviation_A": (bond_deviation(final.positions, bond_set)
                                                     if np.all(np.isfinite(final.positions)) else None)}
    if reference_calc is not None:
        out["reference_start"] = _reference_point(atoms, reference_calc)
        out["reference_final"] = _reference_point(final, reference_calc)
        s, f = out["reference_start"], out["reference_final"]
        if "energy_eV" in s and "energy_eV" in f:
            out["reference_energy_change_eV"] = f["energy_eV"] - s["energy_eV"]
        if reference_relax:
            ref_final, ref_info = relax(atoms, reference_calc, min(fmax, reference_fmax), 4 * steps,
                                        cell=relax_cell, optimizer="BFGS")
            out["reference_relaxed"] = ref_info
            if "energy_eV" in f and math.isfinite(ref_info["energy_eV"]):
                out["energy_above_reference_minimum_eV"] = f["energy_eV"] - ref_info["energy_eV"]
                out["rmsd_to_reference_minimum_A"] = float(np.sqrt(np.mean(
                    np.sum((final.positions - ref_final.positions) ** 2, axis=1))))
            if relax_cell and "error" not in info and "error" not in ref_info:
                out["volume_vs_reference_minimum_percent"] = 100.0 * (info["volume_A3"] / ref_info["volume_A3"] - 1)
    if relax_cell and "error" not in info:
        out["volume_change_percent"] = 100.0 * (info["volume_A3"] / atoms.get_volume() - 1)
    return out


# ------------------------------------------------------------------------------------------ driver
def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def _median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(xs)) if xs else None


def summarize_nve(runs: Sequence[Dict]) -> Dict:
    """Mean and median |drift| over all runs, and over the runs that ran all their steps (a run stopped by a
    broken bond fits its drift over a shorter, often violent, stretch)."""
    drift = [abs(r["drift_eV_per_atom_per_ps"]) for r in runs if r.get("drift_eV_per_atom_per_ps") is not None]
    full = [abs(r["drift_eV_per_atom_per_ps"]) for r in runs
            if r.get("drift_eV_per_atom_per_ps") is not None and not r.get("stopped")]
    return {"mean_abs_drift_eV_per_atom_per_ps": _mean(drift), "median_abs_drift_eV_per_atom_per_ps": _median(drift),
            "n_completed": len(full), "n_runs": len(runs),
            "mean_abs_drift_completed_eV_per_atom_per_ps": _mean(full)}


def summarize_opt(runs: Sequence[Dict]) -> Dict:
    """Fraction converged; mean and median of the reference numbers over the structures (one outlier, a
    student minimum that broke the molecule, can dominate a mean)."""
    out = {"fraction_converged": sum(r["student"]["converged"] for r in runs) / len(runs) if runs else None}
    if any("reference_final" in r for r in runs):
        series = {"reference_fmax_eV_per_A": [r.get("reference_final", {}).get("fmax_eV_per_A") for r in runs],
                  "reference_force_rms_eV_per_A": [r.get("reference_final", {}).get("force_rms_eV_per_A")
                                                   for r in runs],
                  "reference_energy_change_eV": [r.get("reference_energy_change_eV") for r in runs],
                  "energy_above_reference_minimum_eV": [r.get("energy_above_reference_minimum_eV") for r in runs]}
        for name, xs in series.items():
            out[f"mean_{name}"] = _mean(xs)
            out[f"median_{name}"] = _median(xs)
    errors = [next(v["error"] for k, v in r.items() if k.startswith("reference") and isinstance(v, dict)
                   and "error" in v)
              for r in runs if any(k.startswith("reference") and isinstance(v, dict) and "error" in v
                                   for k, v in r.items())]
    if errors:  # structures the reference could not evaluate (an SCF that did not converge): counted, not hidden
        out["reference_failed"] = len(errors)
        out["reference_first_error"] = errors[0]
    volume = [abs(r["volume_vs_reference_minimum_percent"]) for r in runs if "volume_vs_reference_minimum_percent" in r]
    if volume:  # cells relaxed (bulk structures)
        out["mean_abs_volume_error_vs_reference_minimum_percent"] = _mean(volume)
    return out


def evaluate_md(calc, structures: Sequence, reference_calc=None, tests: Sequence[str] = ("nvt", "nve", "opt"),
                seed: int = 0, log=None, **settings) -> Dict:
    """All requested tests on `structures` (a list of (id, ase.Atoms)); settings override DEFAULTS."""
    s = dict(DEFAULTS)
    unknown = set(settings) - set(s) - {"reference_relax"}
    if unknown:
        raise HessforgeError(f"unknown md-eval settings: {sorted(unknown)}")
    s.update({k: v for k, v in settings.items() if k in s})
    if s["criterion"] not in CRITERIA:
        raise HessforgeError(f"unknown stability criterion {s['criterion']!r} ({', '.join(CRITERIA)})")
    if s["criterion"] == "rdf" and ("nvt" in tests or "nve" in tests):
        for sid, atoms in structures:
            require_bulk(atoms, f"structure {sid}")
    if ("opt" in tests and reference_calc is not None and settings.get("reference_relax", True)
            and not s["fixed_cell"] and any(is_bulk(a) for _, a in structures)
            and "stress" not in getattr(reference_calc, "implemented_properties", ())):
        raise HessforgeError("the reference calculator gives no stress, so it cannot relax the cells of these "
                             "periodic structures: pass --fixed-cell (positions only) or --no-reference-relax")
    log = log or (lambda msg: None)
    result: Dict = {"settings": dict(s), "structures": [{"id": i, "formula": a.get_chemical_formula(),
                                                         "natoms": len(a)} for i, a in structures]}
    if "nvt" in tests:
        trajs = []
        for k, (sid, atoms) in enumerate(structures):
            r = nvt_stability(atoms, calc, s["steps"], s["timestep_fs"], s["temperature_K"], s["friction_per_fs"],
                              s["check_interval"], s["bond_tolerance_A"], seed + 1000 * k, s["criterion"],
                              s["rdf_tolerance"], s["rdf_window_fs"])
            r["id"] = sid
            trajs.append(r)
            log(f"nvt {sid}: " + ("survived" if r["survived"] else f"failed at {r['time_to_failure_ps']:.3f} ps "
                                  f"({r['reason']})") + f" [{r['steps_run']} steps, {r['wall_s']:.1f} s]")
        grid = [n * s["timestep_fs"] / 1000.0 for n in range(0, s["steps"] + 1, s["check_interval"])]
        if grid[-1] < s["steps"] * s["timestep_fs"] / 1000.0:
            grid.append(s["steps"] * s["timestep_fs"] / 1000.0)
        ttf = [t["time_to_failure_ps"] for t in trajs]
        result["nvt"] = {"trajectories": trajs, "time_ps": grid, "fraction_stable": fraction_stable(ttf, grid),
                         "fraction_survived": sum(t["survived"] for t in trajs) / len(trajs) if trajs else None,
                         "mean_time_to_failure_ps_censored": _mean([t if t is not None else grid[-1] for t in ttf]),
                         "simulated_ps_per_trajectory": grid[-1]}
    if "nve" in tests:
        if getattr(calc, "direct_forces", False):
            result["nve"] = {"skipped": "direct-force student: its forces are not an energy gradient"}
        else:
            runs = []
            for k, (sid, atoms) in enumerate(structures):
                r = nve_drift(atoms, calc, s["nve_steps"], s["nve_timestep_fs"], s["temperature_K"],
                              s["nve_interval"], s["bond_tolerance_A"], seed + 1000 * k, s["criterion"],
                              s["rdf_tolerance"], s["rdf_window_fs"])
                r["id"] = sid
                runs.append(r)
                log(f"nve {sid}: drift {r['drift_eV_per_atom_per_ps']} eV/atom/ps over {r['simulated_ps']:.3f} ps"
                    + (f" (stopped: {r['stopped']})" if r["stopped"] else ""))
            result["nve"] = dict(summarize_nve(runs), runs=runs)
    if "opt" in tests:
        runs = []
        for sid, atoms in structures:
            r = optimization(atoms, calc, reference_calc, s["fmax"], s["opt_steps"], settings.get("reference_relax", True),
                             reference_fmax=s["reference_fmax"],
                             relax_cell=False if s["fixed_cell"] else None)
            r["id"] = sid
            runs.append(r)
            msg = f"opt {sid}: {'converged' if r['student']['converged'] else 'not converged'} in {r['student']['steps']} steps"
            if "reference_final" in r and "fmax_eV_per_A" in r["reference_final"]:
                msg += f", reference fmax at the student minimum {r['reference_final']['fmax_eV_per_A']:.3f} eV/Å"
            if "energy_above_reference_minimum_eV" in r:
                msg += f", {1000 * r['energy_above_reference_minimum_eV']:.1f} meV above the reference minimum"
            if "volume_change_percent" in r:
                msg += f", volume {r['volume_change_percent']:+.2f} % from the start"
            if "volume_vs_reference_minimum_percent" in r:
                msg += f" ({r['volume_vs_reference_minimum_percent']:+.2f} % vs the reference minimum)"
            log(msg)
        summary = summarize_opt(runs)
        result["opt"] = dict(summary, runs=runs)
    return result


def pick_structures(structures: Sequence, n: int) -> list:
    """Up to n structures, one per group (molecule) first, keeping their order."""
    chosen, seen = [], set()
    for s in structures:
        if len(chosen) < n and s.group not in seen:
            chosen.append(s)
            seen.add(s.group)
    for s in structures:
        if len(chosen) >= n:
            break
        if all(s is not c for c in chosen):
            chosen.append(s)
    return chosen


def resolve_model(path: str) -> Tuple[str, Optional[str], Optional[str]]:
    """(model file, split file or None, default JSON output or None) for a run dir / checkpoint / export."""
    if os.path.isdir(path):
        ckpt = os.path.join(path, "best.pt")
        if not os.path.exists(ckpt):
            raise HessforgeError(f"{path}: a run directory needs best.pt")
        return ckpt, os.path.join(path, "split.json"), os.path.join(path, "md.json")
    if not os.path.exists(path):
        raise HessforgeError(f"model not found: {path}")
    split = os.path.join(os.path.dirname(os.path.abspath(path)), "split.json")
    return path, split if os.path.exists(split) else None, None


def reference_calculator(spec: Optional[str], threads: int = 1):
    """None, a DFT calculator (`dft[:BASIS[:XC[:D]]]`, pyscf, the benchmark labels' method by default) or a
    teacher spec's ASE calculator."""
    if spec in (None, "", "none"):
        return None
    if spec == "dft" or spec.startswith("dft:"):
        from training.dft import dft_calculator, parse_dft_spec

        try:
            options = parse_dft_spec(spec)
        except ValueError as err:
            raise HessforgeError(f"--reference: {err}") from None
        try:
            import pyscf  # noqa: F401
        except ImportError:
            raise HessforgeError("--reference dft needs pyscf: pip install 'hessforge[dft]'") from None
        try:
            return dft_calculator(threads=threads, **options)
        except ValueError as err:  # an unknown basis or functional, found before the run
            raise HessforgeError(f"--reference {spec}: {err}") from None
    from training.teachers import load_teacher
    from training.teachers.base import teacher_calculator

    return teacher_calculator(load_teacher(spec))


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    parser.add_argument("model", help="run directory, checkpoint or exported student")
    parser.add_argument("data", help="LMDB dataset")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--split-file", help="split.json (default: the run's own)")
    parser.add_argument("--structures", type=int, default=4, help="number of structures (default 4)")
    parser.add_argument("--skip", default="", help="comma-separated tests to skip: nvt, nve, opt")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="NVT steps (default 1000)")
    parser.add_argument("--timestep", type=float, default=DEFAULTS["timestep_fs"], help="NVT step, fs (default 1)")
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature_K"], help="K (default 300)")
    parser.add_argument("--friction", type=float, default=DEFAULTS["friction_per_fs"], help="1/fs (default 0.01)")
    parser.add_argument("--check-interval", type=int, default=DEFAULTS["check_interval"],
                        help="steps between stability checks (default 10)")
    parser.add_argument("--bond-tolerance", type=float, default=DEFAULTS["bond_tolerance_A"],
                        help="largest bond deviation, Å (default 0.5)")
    parser.add_argument("--criterion", choices=CRITERIA, default=DEFAULTS["criterion"],
                        help="stability criterion: bonds, rdf (3D-periodic structures only) or auto (default: rdf "
                             "for 3D-periodic structures, bonds otherwise)")
    parser.add_argument("--rdf-tolerance", type=float, default=DEFAULTS["rdf_tolerance"],
                        help="largest relative RDF change for the rdf criterion (default 0.25)")
    parser.add_argument("--rdf-window", type=float, default=DEFAULTS["rdf_window_fs"],
                        help="time window over which the rdf criterion averages the RDF, fs (default 200; burn-in: "
                             "half of it)")
    parser.add_argument("--nve-steps", type=int, default=DEFAULTS["nve_steps"], help="default 1000")
    parser.add_argument("--nve-timestep", type=float, default=DEFAULTS["nve_timestep_fs"], help="fs (default 0.5)")
    parser.add_argument("--fmax", type=float, default=DEFAULTS["fmax"], help="FIRE target, eV/Å (default 0.05; 0.005 for cell volumes)")
    parser.add_argument("--fixed-cell", action="store_true",
                        help="relax positions only (default: bulk structures relax their cell too, "
                             "FrechetCellFilter; the reference must give stress)")
    parser.add_argument("--opt-steps", type=int, default=DEFAULTS["opt_steps"], help="FIRE step limit (default 500)")
    parser.add_argument("--reference", default="none",
                        help="reference calculator for the optimized structures: a teacher spec (ani1x, "
                             "ani1x:0, mace:FILE), dft[:BASIS[:XC[:D]]] (pyscf; default 6-31g*/wb97x, the benchmark "
                             "labels' method; D: d shells auto (Gaussian's: Cartesian for 6-31g*), cartesian "
                             "or spherical (the committed qm9_no9 labels'); ~30 s per call for 18 atoms on 2 cores: pair it with "
                             "--no-reference-relax) or none (default)")
    parser.add_argument("--reference-fmax", type=float, default=DEFAULTS["reference_fmax"],
                        help="eV/Å: BFGS target of the reference's own relaxation (default 0.005)")
    parser.add_argument("--no-reference-relax", action="store_true",
                        help="do not relax the structures under the reference itself")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--json", dest="json_out", help="output JSON (default RUN/md.json for a run directory)")


def run(args) -> int:
    import torch

    from engine.calculator import Calculator
    from engine.checkpoint import read_checkpoint
    from training.data import Dataset
    from training.evaluate import select_structures

    torch.set_num_threads(max(1, args.threads))
    tests = [t for t in ("nvt", "nve", "opt") if t not in {x.strip() for x in args.skip.split(",") if x.strip()}]
    bad = {x.strip() for x in args.skip.split(",") if x.strip()} - {"nvt", "nve", "opt"}
    if bad:
        raise HessforgeError(f"--skip: unknown tests {sorted(bad)} (nvt, nve, opt)")
    if args.structures < 1 or args.steps < 0 or args.check_interval < 1:
        raise HessforgeError("--structures and --check-interval must be >= 1, --steps >= 0")
    for option, value, ok in (("--timestep", args.timestep, args.timestep > 0),
                              ("--nve-timestep", args.nve_timestep, args.nve_timestep > 0),
                              ("--temperature", args.temperature, args.temperature >= 0),
                              ("--friction", args.friction, args.friction > 0),
                              ("--bond-tolerance", args.bond_tolerance, args.bond_tolerance > 0),
                              ("--rdf-tolerance", args.rdf_tolerance, args.rdf_tolerance > 0),
                              ("--rdf-window", args.rdf_window, args.rdf_window > 0),
                              ("--reference-fmax", args.reference_fmax, args.reference_fmax > 0)):
        if not ok:  # also NaN
            raise HessforgeError(f"{option} must be {'>= 0' if option == '--temperature' else '> 0'}, got {value}")
    model_file, split_file, default_json = resolve_model(args.model)
    if args.json_out or default_json:
        check_output_file(args.json_out or default_json, "--json", inputs=[model_file, args.data], create_parent=True)
    split_file = args.split_file or split_file
    if args.split != "all" and (split_file is None or not os.path.exists(split_file)):
        raise HessforgeError(f"no split file for --split {args.split} (pass --split-file or --split all)")
    calc = Calculator(model_file, dtype=args.dtype)
    dataset = Dataset(args.data)
    trained_on = None  # a trainer checkpoint's own split.json (no --split-file) must be the one it trained on
    if not args.split_file and artifact_kind(model_file) == TORCH_FILE:
        trained_on = read_checkpoint(model_file).get("split_sha256")
    chosen = pick_structures(select_structures(dataset, split_file, args.split, trained_on), args.structures)
    if not chosen:
        raise HessforgeError("no structures selected")
    for s in chosen:
        calc.model.check_species(s.numbers, f"structure {s.id}")
    reference = reference_calculator(args.reference, args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    result = evaluate_md(calc, [(s.id, s.to_atoms()) for s in chosen], reference, tests, args.seed, log,
                         steps=args.steps, timestep_fs=args.timestep, temperature_K=args.temperature,
                         friction_per_fs=args.friction, check_interval=args.check_interval,
                         bond_tolerance_A=args.bond_tolerance, criterion=args.criterion,
                         rdf_tolerance=args.rdf_tolerance, rdf_window_fs=args.rdf_window, nve_steps=args.nve_steps,
                         nve_timestep_fs=args.nve_timestep, fmax=args.fmax, opt_steps=args.opt_steps, fixed_cell=args.fixed_cell,
                         reference_fmax=args.reference_fmax,
                         reference_relax=not args.no_reference_relax)
    result.update({"model": os.path.abspath(model_file), "data": os.path.abspath(args.data), "split": args.split,
                   "reference": args.reference, "tests": tests, "wall_s": time.perf_counter() - start,
                   "command": "hessforge md-eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["md-eval"]
                                                              else sys.argv[1:])})
    nvt, nve, opt = result.get("nvt"), result.get("nve"), result.get("opt")
    if nvt:
        print(f"NVT {args.temperature:g} K: {nvt['fraction_survived']:.2f} of {len(nvt['trajectories'])} trajectories "
              f"stable for {nvt['simulated_ps_per_trajectory']:.3f} ps; mean time to failure (censored at the end) "
              f"{nvt['mean_time_to_failure_ps_censored']:.3f} ps")
    if nve and "skipped" not in nve:
        d = nve["mean_abs_drift_eV_per_atom_per_ps"]
        print(f"NVE: mean |drift| {d:.3g} eV/atom/ps, median {nve['median_abs_drift_eV_per_atom_per_ps']:.3g}; "
              f"{nve['n_completed']} of {nve['n_runs']} runs completed without a stability failure"
              if d is not None else "NVE: no drift measured")
    if opt:
        line = f"FIRE: {opt['fraction_converged']:.2f} converged to fmax {args.fmax} eV/Å"
        if opt.get("mean_reference_fmax_eV_per_A") is not None:
            line += (f"; reference fmax at the student minima {opt['mean_reference_fmax_eV_per_A']:.3f} eV/Å mean, "
                     f"{opt['median_reference_fmax_eV_per_A']:.3f} median")
        if opt.get("mean_energy_above_reference_minimum_eV") is not None:
            line += (f"; {1000 * opt['mean_energy_above_reference_minimum_eV']:.1f} meV mean, "
                     f"{1000 * opt['median_energy_above_reference_minimum_eV']:.1f} median above the reference minima")
        if opt.get("mean_abs_volume_error_vs_reference_minimum_percent") is not None:
            line += (f"; cell volume {opt['mean_abs_volume_error_vs_reference_minimum_percent']:.2f} % (mean |error|) "
                     f"from the reference minima")
        print(line)
        if opt.get("reference_failed"):
            print(f"FIRE: the reference failed on {opt['reference_failed']} of {len(opt['runs'])} structures "
                  f"(first: {opt['reference_first_error'].splitlines()[0]}); their numbers are left out")
    out = args.json_out or default_json
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_json(out, result)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print("per-structure results not saved: give --json FILE (a run directory gets md.json)", file=sys.stderr)
    return 0
