"""Shared pieces of the DFT dataset builders (`training.quickstart.make_dataset`, `training.benchmark_data`):
teacher Langevin MD conformer sampling, pyscf DFT labels (energy eV, forces eV/Å), a crash-safe extxyz
append/read pair, and the JSONL attempt log (ok / failed with the reason) that makes reruns resumable.

pyscf, ase MD and the teacher are imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import io
import json
import os
from typing import Dict, Iterable, List, Optional, Set, Tuple

import numpy as np


def connectivity(atoms) -> frozenset:
    """Bond graph as a set of (i, j) pairs: ase natural cutoffs × 1.2."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))
    return frozenset(zip(i.tolist(), j.tolist()))


def sample_conformers_md(atoms, mol_id, n, seed, temperature_k, equil_steps, stride, timestep_fs,
                         teacher_spec="ani1x", calculator=None):
    """n snapshots of Langevin MD (friction 0.01/fs) of `atoms` on a teacher, after `equil_steps`, one every
    `stride` steps. Returns (frames, rejected).

    Snapshots whose bond graph differs from the starting structure's (a reaction or dissociation in MD) are
    rejected: they would not be conformers of the molecule. More than n rejections raise RuntimeError.
    Each frame carries info mol_id, conf_id (0..n-1) and md_step; no momenta, no calculator.
    """
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    if calculator is None:
        from training.teachers import load_teacher
        from training.teachers.base import teacher_calculator

        calculator = teacher_calculator(load_teacher(teacher_spec))
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.info = {}
    bonds0 = connectivity(atoms)
    atoms.calc = calculator
    thermalize_momenta(atoms, temperature_k, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_k, friction=0.01 / units.fs,
                   fixcm=False, rng=rng)  # fixcm=True is deprecated (biased NVT); momentum zeroed at start
    dyn.run(equil_steps)
    frames, rejected, step = [], 0, equil_steps
    while len(frames) < n:
        dyn.run(stride)
        step += stride
        if connectivity(atoms) != bonds0:
            rejected += 1
            if rejected > n:
                raise RuntimeError(f"{mol_id}: MD keeps breaking bonds at {temperature_k:.0f} K "
                                   f"({rejected} snapshots rejected)")
            continue
        snap = atoms.copy()
        snap.calc = None
        snap.set_momenta(None)  # geometry only: keeps the file small
        snap.info = {"mol_id": mol_id, "conf_id": len(frames), "md_step": step}
        frames.append(snap)
    return frames, rejected


class SCFNotConverged(RuntimeError):
    pass


D_FUNCTIONS = ("auto", "cartesian", "spherical")


def gaussian_cartesian(basis: str) -> bool:
    """Whether Gaussian (the code behind ANI-1x's ωB97x/6-31G(d) labels) uses Cartesian d functions (6D 10F) for
    `basis` by default: the 3-21G, 4-31G, 6-21G and 6-31G families do; 6-311G, Dunning, def2... use pure (5D 7F).
    pyscf's default is pure for every basis: 6-31G* there is another basis (8 meV/atom off for CH3OH)."""
    name = basis.strip().lower().replace("+", "")
    return name.startswith(("3-21g", "4-31g", "6-21g", "6-31g")) and not name.startswith("6-311")


def resolve_d_functions(basis: str, d_functions: str = "auto") -> bool:
    """`auto` (Gaussian's choice for the basis), `cartesian` or `spherical` -> pyscf's gto `cart` flag."""
    if d_functions not in D_FUNCTIONS:
        raise ValueError(f"d functions must be one of {', '.join(D_FUNCTIONS)}, got {d_functions!r}")
    return gaussian_cartesian(basis) if d_functions == "auto" else d_functions == "cartesian"


def dft_label(atoms, basis="6-31g*", xc="wb97x", threads=2, max_cycle=50, newton_fallback=True, forces=True,
              d_functions="auto"):
    """Energy (eV) and forces (eV/Å; None with forces=False) by pyscf RKS with density fitting (neutral singlet).

    d_functions: `auto` uses Cartesian d shells where Gaussian does (6-31G(d): ANI-1x's own basis), else pure.
    If DIIS does not converge in `max_cycle` iterations, the second-order (Newton) solver is tried once from
    the DIIS density (also `max_cycle` iterations); if that fails too, SCFNotConverged is raised.
    """
    from ase.units import Bohr, Hartree
    from pyscf import dft, gto, lib

    lib.num_threads(threads)
    mol = gto.M(atom=[(s, p) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
                basis=basis, cart=resolve_d_functions(basis, d_functions), unit="Angstrom", charge=0, spin=0,
                verbose=0)
    mf = dft.RKS(mol).density_fit()
    mf.xc = xc
    mf.max_cycle = int(max_cycle)
    energy = mf.kernel()
    if not mf.converged:  # retry with the second-order solver from the DIIS result before giving up
        if not newton_fallback:
            raise SCFNotConverged(f"SCF not converged in {max_cycle} DIIS cycles; last energy {energy} Ha")
        mf = mf.newton()
        mf.max_cycle = int(max_cycle)
        energy = mf.kernel(mf.make_rdm1())
        if not mf.converged:
            raise SCFNotConverged(f"SCF not converged (DIIS, then Newton, {max_cycle} cycles each); "
                                  f"last energy {energy} Ha")
    if not forces:
        return float(energy) * Hartree, None
    grad = mf.nuc_grad_method().kernel()
    return float(energy) * Hartree, -np.asarray(grad) * Hartree / Bohr


def dft_calculator(basis: str = "6-31g*", xc: str = "wb97x", threads: int = 1, max_cycle: int = 50,
                   d_functions: str = "auto"):
    """An ASE calculator over `dft_label` (energy eV, forces eV/Å): the labels' own method as a reference, e.g.
    for the structures a student optimized (`hessforge md-eval --reference dft`). An SCF that does not
    converge raises SCFNotConverged (md-eval records it as that structure's error). Molecules only. An unknown
    basis or functional raises ValueError here, not at every structure."""
    from ase.calculators.calculator import Calculator, all_changes

    check_dft_options(basis, xc)
    resolve_d_functions(basis, d_functions)  # ValueError for an unknown setting

    class DFT(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            if any(self.atoms.pbc):
                raise ValueError("the DFT reference is molecular (pyscf gto): periodic structures are not supported")
            energy, forces = dft_label(self.atoms, basis=basis, xc=xc, threads=threads, max_cycle=max_cycle,
                                       d_functions=d_functions)
            self.results = {"energy": energy, "free_energy": energy, "forces": forces}

    return DFT()


def parse_dft_spec(spec: str) -> Dict[str, str]:
    """`dft[:BASIS[:XC[:D]]]` -> the options given (basis, xc, d_functions: auto, cartesian or spherical);
    the rest take dft_calculator's defaults (the benchmark labels' 6-31g* / wb97x, d shells as Gaussian's)."""
    parts = spec.split(":")
    if parts[0] != "dft" or len(parts) > 4 or any(not p for p in parts[1:]):
        raise ValueError(f"not a DFT reference spec: {spec!r} (dft, dft:BASIS, dft:BASIS:XC or dft:BASIS:XC:D "
                         f"with D one of {', '.join(D_FUNCTIONS)})")
    if len(parts) == 4 and parts[3] not in D_FUNCTIONS:
        raise ValueError(f"DFT reference spec {spec!r}: d shells {parts[3]!r} are not one of {', '.join(D_FUNCTIONS)}")
    return dict(zip(("basis", "xc", "d_functions"), parts[1:]))


def check_dft_options(basis: str = "6-31g*", xc: str = "wb97x") -> None:
    """ValueError naming an unknown basis or functional (the basis loaded for a few elements, the functional
    parsed: milliseconds), so that a run does not record the same error for every structure."""
    from pyscf import dft, gto

    problem = None
    for element in ("H", "C", "Si", "Fe"):  # a basis set may lack some elements: it is known if any loads
        try:
            gto.basis.load(basis, element)
            problem = None
            break
        except Exception as err:
            problem = problem or err
    if problem is not None:
        raise ValueError(f"unknown basis {basis!r} for pyscf ({type(problem).__name__})") from None
    try:
        dft.libxc.parse_xc(xc)
    except Exception as err:
        raise ValueError(f"unknown functional {xc!r} for pyscf ({type(err).__name__})") from None


def frame_key(atoms) -> Tuple[str, int]:
    return str(atoms.info["mol_id"]), int(atoms.info["conf_id"])


def _complete_extxyz_length(text: str) -> int:
    """Number of characters of `text` that hold whole extxyz frames (count line, comment, count atom lines)."""
    pos, end = 0, len(text)
    while pos < end:
        nl = text.find("\n", pos)
        if nl < 0:
            break
        head = text[pos:nl].strip()
        if not head:  # blank line: skip
            pos = nl + 1
            continue
        try:
            n = int(head)
        except ValueError:
            break
        p, ok = nl + 1, True
        for _ in range(n + 1):  # comment + n atom lines
            q = text.find("\n", p)
            if q < 0:
                ok = False
                break
            p = q + 1
        if not ok:
            break
        pos = p
    return pos


def read_extxyz(path, repair: bool = False) -> list:
    """All whole frames of an extxyz file ([] if absent or empty).

    A truncated last frame (a kill during a write, or a copy taken mid-write) is ignored; with repair=True
    it is also cut off the file, so that later appends start on a frame boundary.
    """
    from ase.io import read

    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    with open(path) as f:
        text = f.read()
    good = _complete_extxyz_length(text)
    if good < len(text) and text[good:].strip():
        if repair:
            with open(path, "r+") as f:
                f.truncate(len(text[:good].encode()))
        text = text[:good]
    if not text.strip():
        return []
    return read(io.StringIO(text), index=":", format="extxyz")


def append_extxyz(path, atoms) -> None:
    """Append one frame in one write + fsync: a kill leaves whole frames only (or a tail read_extxyz drops)."""
    from ase.io import write

    buf = io.StringIO()
    write(buf, atoms, format="extxyz")
    with open(path, "a") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def log_record(path, **record) -> None:
    """Append one JSON line to the attempt log (one write + flush)."""
    line = json.dumps(record) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:  # a torn last line (kill mid-write, copy taken mid-write): end it, don't extend it
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()


def read_log(path) -> List[Dict]:
    """Records of a JSONL log; a torn last line (kill mid-write) is skipped."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def failed_keys(log_path, stage: str = "dft") -> Set[Tuple[str, int]]:
    """(mol_id, conf_id) of the frames logged as failed in `stage` (and not logged ok later)."""
    state: Dict[Tuple[str, int], str] = {}
    for r in read_log(log_path):
        if r.get("stage") == stage and "conf_id" in r:
            state[(str(r["mol_id"]), int(r["conf_id"]))] = r.get("status")
    return {k for k, s in state.items() if s == "failed"}


def failed_molecules(log_path, stage: str = "md") -> Dict[str, str]:
    """mol_id -> reason for the molecules whose `stage` failed (and did not succeed later)."""
    state: Dict[str, Optional[str]] = {}
    for r in read_log(log_path):
        if r.get("stage") == stage:
            state[str(r["mol_id"])] = r.get("reason") if r.get("status") == "failed" else None
    return {k: v for k, v in state.items() if v is not None}


def labelled_frame(atoms, energy, forces, extra_info: Optional[Dict] = None):
    """Copy of a conformer with a SinglePointCalculator holding energy (eV) and forces (eV/Å)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    info = {"mol_id": atoms.info["mol_id"], "conf_id": int(atoms.info["conf_id"]), "md_step": atoms.info.get("md_step")}
    info.update(extra_info or {})
    frame.info = info
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
    return frame


def group_frames(frames: Iterable) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for a in frames:
        out.setdefault(str(a.info["mol_id"]), []).append(a)
    return out
