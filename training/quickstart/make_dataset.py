"""Build the quickstart dataset: ANI-1x Langevin MD conformers of small HCNO molecules, labelled with DFT at
ωB97x/6-31G(d) (ANI-1x's own level of theory) by pyscf.

    python -m training.quickstart.make_dataset --out training/quickstart/data/quickstart.extxyz \
        --per-molecule 15 --basis 6-31g* --seed 0

Two resumable stages, so an interrupted run loses at most the structure being labelled:
1. conformers: MD snapshots are written once to `<out>.conformers.extxyz` and reused on reruns (so a rerun
   labels exactly the same geometries even if MD were not bit-reproducible);
2. labels: each finished frame is appended to `<out>` in one write; frames already there are skipped.
Every labelling attempt (ok / failed with the reason) is a JSON line in `<out>.log`; failed frames are not
retried unless --retry-failed. The MD, DFT, extxyz and log helpers live in training/dft.py (shared with
`hessforge build-benchmark`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

from training.dft import append_extxyz as _append_extxyz
from training.dft import dft_label
from training.dft import failed_keys as _failed_keys
from training.dft import frame_key as _frame_key
from training.dft import log_record as _log
from training.dft import read_extxyz as _read_extxyz
from training.dft import sample_conformers_md
from training.arg_types import seed_option

DEFAULT_MOLECULES = ("CH3OH", "HCOOH", "CH3CHO", "CH3NO2", "CH3CH2OH", "CH3CONH2")  # ase g2 names, 5-9 atoms


def sample_conformers(name, n, seed, temperature_k, equil_steps, stride, timestep_fs, teacher_spec):
    """n snapshots of ANI-1x Langevin MD of ase g2 molecule `name` (training.dft.sample_conformers_md)."""
    from ase.build import molecule

    return sample_conformers_md(molecule(name), name, n, seed, temperature_k, equil_steps, stride, timestep_fs,
                                teacher_spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="training/quickstart/data/quickstart.extxyz")
    p.add_argument("--per-molecule", type=int, default=15)
    p.add_argument("--molecules", default=",".join(DEFAULT_MOLECULES), help="comma-separated ase g2 names")
    p.add_argument("--basis", default="6-31g*")
    p.add_argument("--xc", default="wb97x")
    p.add_argument("--d-functions", choices=("auto", "cartesian", "spherical"), default="auto",
                   help="d shells: auto (Cartesian for 6-31G(d), as Gaussian and so ANI-1x's labels use), or forced")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--temperature", type=float, default=400.0, help="K")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--equil-steps", type=int, default=400)
    p.add_argument("--stride", type=int, default=40, help="MD steps between kept snapshots")
    p.add_argument("--teacher", default="ani1x", help="MD force field (load_teacher spec)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retry-failed", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    out, log = args.out, args.out + ".log"
    conf_path = args.out + ".conformers.extxyz"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    names = [m.strip() for m in args.molecules.split(",") if m.strip()]
    t_start = time.time()

    # Stage 1: conformers (per molecule, appended, so a rerun only samples missing molecules)
    have = {}
    for a in _read_extxyz(conf_path):
        have.setdefault(a.info["mol_id"], []).append(a)
    for k, name in enumerate(names):
        if len(have.get(name, [])) >= args.per_molecule:
            continue
        if name in have:
            raise SystemExit(f"{conf_path}: {name} has {len(have[name])} conformers, fewer than --per-molecule "
                             f"{args.per_molecule}; delete the file (and {out}) to resample")
        t0 = time.time()
        try:
            frames, rejected = sample_conformers(name, args.per_molecule, args.seed * 1000 + k, args.temperature,
                                                 args.equil_steps, args.stride, args.timestep, args.teacher)
        except Exception as exc:  # e.g. an unknown g2 name or an element ANI-1x lacks: log it, go on
            _log(log, stage="md", mol_id=name, status="failed", reason=f"{type(exc).__name__}: {exc}")
            print(f"[md] {name} FAILED: {exc}", flush=True)
            continue
        for f in frames:
            _append_extxyz(conf_path, f)
        have[name] = frames
        _log(log, stage="md", mol_id=name, status="ok", n=len(frames), rejected_bond_change=rejected,
             seconds=round(time.time() - t0, 2))
        print(f"[md] {name}: {len(frames)} conformers ({rejected} rejected) in {time.time() - t0:.1f} s", flush=True)

    # Stage 2: DFT labels
    from ase.calculators.singlepoint import SinglePointCalculator

    done = {_frame_key(a) for a in _read_extxyz(out)}
    failed = set() if args.retry_failed else _failed_keys(log)
    todo = [a for n in names for a in have.get(n, [])[: args.per_molecule]
            if _frame_key(a) not in done and _frame_key(a) not in failed]
    print(f"[dft] {len(done)} done, {len(failed)} failed before, {len(todo)} to label", flush=True)
    for i, atoms in enumerate(todo):
        mol_id, conf_id = _frame_key(atoms)
        t0 = time.time()
        try:
            energy, forces = dft_label(atoms, args.basis, args.xc, args.threads, d_functions=args.d_functions)
        except Exception as exc:  # recorded, not silently dropped
            _log(log, stage="dft", mol_id=mol_id, conf_id=conf_id, status="failed",
                 reason=f"{type(exc).__name__}: {exc}", seconds=round(time.time() - t0, 2))
            print(f"[dft] {mol_id}/{conf_id} FAILED: {exc}", flush=True)
            continue
        frame = atoms.copy()
        frame.info = {"mol_id": mol_id, "conf_id": conf_id, "md_step": atoms.info.get("md_step")}
        frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
        _append_extxyz(out, frame)
        dt = time.time() - t0
        _log(log, stage="dft", mol_id=mol_id, conf_id=conf_id, status="ok", n_atoms=len(frame),
             seconds=round(dt, 2))
        print(f"[dft] {i + 1}/{len(todo)} {mol_id}/{conf_id}: E={energy:.4f} eV, |F|max="
              f"{np.abs(forces).max():.3f} eV/Å, {dt:.1f} s", flush=True)
    n_out = len(_read_extxyz(out))
    _log(log, stage="summary", structures=n_out, failed=len(_failed_keys(log)), wall_s=round(time.time() - t_start, 1),
         argv=sys.argv[1:] if argv is None else list(argv))
    print(f"[done] {n_out} structures in {out}; wall {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
