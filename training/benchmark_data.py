"""Build the science benchmark dataset: a slice of QM9 (default: 9 heavy atoms, containing both N and O, HCNO
only), conformers sampled by ANI-1x Langevin MD at 300-600 K, labelled with pyscf ωB97x/6-31G(d) (density
fitting; ANI-1x's own level of theory) energies (eV) and forces (eV/Å). Group key: `mol_id` (qm9_<index>).

    hessforge build-benchmark --out bench/data/qm9_no9 --max-molecules 40 --conformers 8 --workers 1 --threads 2

Stages, all resumable (rerunning the same command continues where the last run stopped):
1. selection: QM9 molecules matching the filter, shuffled with --seed; the first --max-molecules are used
   (raising --max-molecules later extends the same list). Written to selection.json.
2. conformers: per molecule, one Langevin MD run at a temperature drawn uniformly from [--t-min, --t-max]
   (seeded by --seed and the QM9 index), all its snapshots appended to conformers.extxyz in one write and
   reused on reruns, so a rerun labels exactly the same geometries.
3. labels: DFT in a process pool (--workers, each pyscf with --threads OpenMP threads); the parent alone
   appends each finished frame to labels.extxyz (one write + fsync) and a JSON line to build.log.jsonl.
   Frames already labelled are skipped; frames that failed (SCF not converged, ...) are logged with the
   reason and not retried unless --retry-failed.
4. report: split.json (by molecule, stable as the selection grows) and PROVENANCE.md are rewritten during
   and after the run; --report-only rewrites them without computing anything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from engine.errors import HessforgeError
from engine.paths import atomic_open, write_json
from training import dft as D
from training.arg_types import seed_option

LABELS, CONFORMERS, LOG, SELECTION, SPLIT, PROVENANCE, CONFIG = (
    "labels.extxyz", "conformers.extxyz", "build.log.jsonl", "selection.json", "split.json", "PROVENANCE.md",
    "config.json")
# Settings that fix which geometries and labels the files hold: a rerun must use the same ones.
FROZEN = ("heavy_atoms", "require_elements", "allowed_elements", "seed", "conformers", "t_min", "t_max",
          "timestep", "equil_steps", "stride", "teacher", "basis", "xc", "d_functions")
# Folders built before d_functions was recorded used pyscf's pure d shells for every basis.
RECORDED_LATER = {"d_functions": "spherical"}
SYMBOL_ORDER = ("H", "C", "N", "O", "F")  # qm9pack Stoichiometry column order
_log_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------- selection
def qm9_data_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("qm9pack")
    if spec is None or spec.origin is None:
        raise HessforgeError("the QM9 geometries come from the `qm9pack` wheel: pip install qm9pack "
                             "(or pip install 'hessforge[science]')")
    return os.path.join(os.path.dirname(spec.origin), "data")


def select_qm9(heavy_atoms: int = 9, require: Sequence[str] = ("N", "O"), allowed: Sequence[str] = "HCNO",
               seed: int = 0, max_molecules: Optional[int] = None) -> tuple:
    """(molecules, n_candidates): QM9 molecules with `heavy_atoms` non-H atoms, containing every element of
    `require`, and only elements of `allowed`, in a seeded random order (the first `max_molecules`).

    Read with the csv module from qm9pack's data/qm9_part{1,2,3}.csv (columns Index, SMILES, Stoichiometry
    = counts of H,C,N,O,F, Elements, XYZ_Ang = B3LYP/6-31G(2df,p) equilibrium positions in Å).
    Each molecule: {"mol_id": "qm9_%06d", "qm9_index", "smiles", "symbols", "positions"}.
    """
    import ast
    import csv

    csv.field_size_limit(1 << 30)
    data = qm9_data_dir()
    require, allowed = set(require), set(allowed)
    rows = []
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        with open(os.path.join(data, part), newline="") as f:
            for row in csv.DictReader(f):
                counts = dict(zip(SYMBOL_ORDER, map(int, row["Stoichiometry"].strip("[]").split(","))))
                present = {s for s, c in counts.items() if c > 0}
                if (sum(c for s, c in counts.items() if s != "H") == heavy_atoms and require <= present
                        and present <= allowed):
                    rows.append(row)
    rows.sort(key=lambda r: int(r["Index"]))
    order = np.random.default_rng(seed).permutation(len(rows))
    if max_molecules is not None:
        order = order[:max_molecules]
    out = []
    for k in order:
        r = rows[k]
        out.append({"mol_id": f"qm9_{int(r['Index']):06d}", "qm9_index": int(r["Index"]), "smiles": r["SMILES"],
                    "symbols": list(ast.literal_eval(r["Elements"])),
                    "positions": json.loads(r["XYZ_Ang"])})
    return out, len(rows)


def molecule_atoms(m):
    from ase import Atoms

    return Atoms(symbols=m["symbols"], positions=np.asarray(m["positions"], dtype=float))


def molecule_temperature(seed: int, qm9_index: int, t_min: float, t_max: float) -> float:
    """One MD temperature per molecule, uniform in [t_min, t_max], fixed by (seed, QM9 index)."""
    return float(np.random.default_rng([seed, qm9_index, 1]).uniform(t_min, t_max))


def split_molecules(mol_ids: Sequence[str], fractions=(0.8, 0.1, 0.1), names=("train", "val", "test")):
    """Assign molecules, in selection order (already a seeded shuffle), to splits: rank r goes to the split
    furthest below its target share of the first r+1 molecules. Depends only on the prefix, so raising
    --max-molecules never moves a molecule to another split."""
    f = np.asarray(fractions, dtype=float)
    if f.shape != (len(names),) or (f < 0).any() or f.sum() <= 0:
        raise HessforgeError(f"--split needs {len(names)} non-negative fractions, got {fractions}")
    f = f / f.sum()
    counts = np.zeros(len(names))
    out = {n: [] for n in names}
    for r, mid in enumerate(mol_ids):
        j = int(np.argmax(f * (r + 1) - counts))
        counts[j] += 1
        out[names[j]].append(mid)
    return out


# ----------------------------------------------------------------------------------------------- workers
def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    warnings.filterwarnings("ignore")
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:
        pass


def label_task(task: Dict) -> Dict:
    """Runs in a worker (or inline): DFT on one frame. Never raises: failures come back with the reason."""
    from ase import Atoms

    t0 = time.time()
    out = {"mol_id": task["mol_id"], "conf_id": task["conf_id"], "pid": os.getpid()}
    try:
        atoms = Atoms(symbols=task["symbols"], positions=np.asarray(task["positions"]))
        energy, forces = D.dft_label(atoms, task["basis"], task["xc"], task["threads"], task["max_cycle"],
                                     d_functions=task["d_functions"])
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
            raise RuntimeError("non-finite energy or forces")
        out.update(status="ok", energy=energy, forces=np.asarray(forces).tolist())
    except Exception as exc:  # recorded by the parent, never silently dropped
        out.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    out["seconds"] = round(time.time() - t0, 2)
    return out


# ----------------------------------------------------------------------------------------------- build
class Builder:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.path = {k: os.path.join(args.out, v) for k, v in
                     dict(labels=LABELS, conformers=CONFORMERS, log=LOG, selection=SELECTION, split=SPLIT,
                          provenance=PROVENANCE, config=CONFIG).items()}

    def config(self) -> Dict:
        a = self.args
        return {"heavy_atoms": a.heavy_atoms, "require_elements": a.require_elements,
                "allowed_elements": a.allowed_elements, "seed": a.seed, "conformers": a.conformers,
                "t_min": a.t_min, "t_max": a.t_max, "timestep": a.timestep, "equil_steps": a.equil_steps,
                "stride": a.stride, "teacher": a.teacher, "basis": a.basis, "xc": a.xc,
                "d_functions": self.d_functions()}

    def d_functions(self) -> str:
        """cartesian or spherical: --d-functions, or when it is not given the folder's own setting (resuming or
        reporting on an existing folder), else auto (Gaussian's choice for the basis)."""
        a = self.args
        if a.d_functions is None and os.path.exists(self.path["config"]):
            with open(self.path["config"]) as f:
                recorded = json.load(f).get("d_functions", RECORDED_LATER["d_functions"])
            if recorded in ("cartesian", "spherical"):
                return recorded
        return "cartesian" if D.resolve_d_functions(a.basis, a.d_functions or "auto") else "spherical"

    def check_config(self, write: bool = True) -> Dict:
        """Refuses settings other than the folder's; `write`: record them (a new folder, or keys an older
        folder lacks). A dry run or a report on a folder without a build records nothing."""
        cfg = self.config()
        p = self.path["config"]
        if os.path.exists(p):
            with open(p) as f:
                old = json.load(f)
            diff = {k: (old.get(k, RECORDED_LATER.get(k)), cfg[k]) for k in FROZEN
                    if old.get(k, RECORDED_LATER.get(k)) != cfg[k]}
            if diff:
                raise HessforgeError(
                    f"{self.out} was built with other settings: " +
                    ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items()) +
                    "; rerun with the same settings to resume, or use another --out")
            if write and any(k not in old for k in cfg):  # an older folder: record what it was built with
                write_json(p, {**old, **cfg})
        elif write and not self.args.report_only:
            write_json(p, cfg)
        return cfg

    def _lock(self) -> None:
        """One builder per folder: a second one would append the same frames twice."""
        import fcntl

        ignore = os.path.join(self.out, ".gitignore")
        if not os.path.exists(ignore):
            with open(ignore, "w") as f:
                f.write("# build-benchmark's lock and temporary files\n.lock\n*.tmp\n")
        self._lock_file = open(os.path.join(self.out, ".lock"), "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HessforgeError(f"{self.out}: another build-benchmark is running on this folder") from None

    def log(self, **rec) -> None:
        rec.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with _log_lock:
            D.log_record(self.path["log"], **rec)

    def select(self):
        """The selected molecules: the cached selection.json when it was made with the same filter and seed
        and holds enough molecules (so reruns do not re-read QM9, and do not depend on the qm9pack version),
        else from qm9pack."""
        a = self.args
        filt = {"heavy_atoms": a.heavy_atoms, "require": a.require_elements, "allowed": a.allowed_elements}
        p = self.path["selection"]
        if os.path.exists(p):
            with open(p) as f:
                old = json.load(f)
            if (old.get("filter") == filt and old.get("seed") == a.seed and len(old["molecules"]) >= a.max_molecules
                    and all("positions" in m for m in old["molecules"])):
                return old["molecules"][: a.max_molecules], old["n_candidates"]
        mols, n_cand = select_qm9(a.heavy_atoms, a.require_elements.split(","), a.allowed_elements, a.seed,
                                  a.max_molecules)
        if not mols:
            raise HessforgeError(f"no QM9 molecule has {a.heavy_atoms} heavy atoms, contains "
                                 f"{a.require_elements} and only {a.allowed_elements}")
        for m in mols:
            m["n_atoms"] = len(m["symbols"])
        with atomic_open(p) as f:
            f.write(json.dumps({"n_candidates": n_cand, "filter": filt, "seed": a.seed,
                                "source": "qm9pack data/qm9_part{1,2,3}.csv (XYZ_Ang, Å)"}, indent=1)[:-2])
            f.write(',\n "molecules": [\n' + ",\n".join(json.dumps(m) for m in mols) + "\n ]\n}\n")
        return mols, n_cand

    def tasks(self, mols, have_conf, done, failed, frames_by_key, stats, slots=None, stop=None):
        """Yields DFT tasks; samples MD for molecules without conformers on the way (in the pool's feeder
        thread when workers > 0, so MD overlaps with DFT). With `slots` (a semaphore released per result) the
        feeder stays at most that many tasks ahead, so MD runs only shortly before its labels are needed and
        does not take CPU from DFT for molecules far down the list."""
        a = self.args
        md_failed = D.failed_molecules(self.path["log"], "md") if not a.retry_failed else {}
        d_functions = self.config()["d_functions"]
        calc = None
        for m in mols:
            mid = m["mol_id"]
            frames = have_conf.get(mid)
            if frames is None:
                if mid in md_failed:
                    continue
                if calc is None:
                    from training.teachers import load_teacher
                    from training.teachers.base import teacher_calculator

                    calc = teacher_calculator(load_teacher(a.teacher))
                temp = molecule_temperature(a.seed, m["qm9_index"], a.t_min, a.t_max)
                t0 = time.time()
                try:
                    frames, rejected = D.sample_conformers_md(
                        molecule_atoms(m), mid, a.conformers, a.seed * 1_000_003 + m["qm9_index"], temp,
                        a.equil_steps, a.stride, a.timestep, a.teacher, calculator=calc)
                except Exception as exc:  # e.g. MD keeps breaking bonds: recorded, molecule skipped
                    self.log(stage="md", mol_id=mid, status="failed", temperature_K=round(temp, 1),
                             reason=f"{type(exc).__name__}: {exc}", seconds=round(time.time() - t0, 2))
                    stats["md_failed"] += 1
                    continue
                for fr in frames:
                    fr.info["temperature_K"] = round(temp, 1)
                # all of a molecule's conformers in one write: never a partial molecule on disk
                import io
                from ase.io import write

                buf = io.StringIO()
                write(buf, frames, format="extxyz")
                with open(self.path["conformers"], "a") as f:
                    f.write(buf.getvalue())
                    f.flush()
                    os.fsync(f.fileno())
                self.log(stage="md", mol_id=mid, status="ok", n=len(frames), rejected_bond_change=rejected,
                         temperature_K=round(temp, 1), seconds=round(time.time() - t0, 2))
                stats["md_s"] += time.time() - t0
            for fr in frames[: a.conformers]:
                key = D.frame_key(fr)
                if key in done or key in failed:
                    continue
                if slots is not None:
                    while not slots.acquire(timeout=1.0):
                        if stop is not None and stop.is_set():
                            return
                frames_by_key[key] = fr
                yield {"mol_id": key[0], "conf_id": key[1], "symbols": fr.get_chemical_symbols(),
                       "positions": fr.positions.tolist(), "basis": a.basis, "xc": a.xc, "threads": a.threads,
                       "d_functions": d_functions,
                       "max_cycle": a.max_cycle}

    def run(self) -> int:
        a = self.args
        os.makedirs(self.out, exist_ok=True)
        self.check_config(write=not a.dry_run)
        if a.report_only:
            self.report()
            return 0
        t_start = time.time()
        argv = getattr(a, "_argv", None)
        if not a.dry_run:
            self._lock()
            self.log(stage="run", status="start", argv=argv, workers=a.workers, threads=a.threads,
                     max_molecules=a.max_molecules, max_cycle=a.max_cycle, host=platform.node(),
                     cpus=os.cpu_count(), versions=_versions())
        mols, n_cand = self.select()
        repair = not a.dry_run  # a dry run never writes the data files
        have_conf = D.group_frames(D.read_extxyz(self.path["conformers"], repair=repair))
        for mid, fr in have_conf.items():
            if len(fr) < a.conformers:
                raise HessforgeError(f"{self.path['conformers']}: {mid} has {len(fr)} conformers, fewer than "
                                     f"--conformers {a.conformers}")
        done = {D.frame_key(f) for f in D.read_extxyz(self.path["labels"], repair=repair)}
        failed = set() if a.retry_failed else D.failed_keys(self.path["log"])
        n_total = sum(a.conformers for m in mols)
        remaining = n_total - len({k for k in done | failed if k[0] in {m["mol_id"] for m in mols}})
        print(f"[build-benchmark] {len(mols)} of {n_cand} candidate molecules; {len(done)} labelled, "
              f"{len(failed)} failed before; up to {remaining} to label with {a.workers} worker(s) x "
              f"{a.threads} thread(s)", flush=True)
        if a.dry_run:
            ids = [m["mol_id"] for m in mols]
            need_md = [i for i in ids if i not in have_conf]
            print(f"[dry-run] conformers on disk for {len(ids) - len(need_md)} of {len(ids)} molecules; MD "
                  f"needed for {len(need_md)}; {remaining} structures to label", flush=True)
            return 0
        stats = {"md_failed": 0, "md_s": 0.0, "ok": 0, "failed": 0, "dft_s": 0.0}
        frames_by_key: Dict = {}
        import torch

        torch.set_num_threads(max(1, a.md_threads))
        warnings.filterwarnings("ignore", category=UserWarning)
        from tqdm import tqdm

        bar = tqdm(total=remaining, desc="label", unit="struct", disable=a.no_progress, mininterval=5,
                   dynamic_ncols=True, file=sys.stderr)
        slots = threading.Semaphore(max(1, a.workers) * (a.conformers + 1)) if a.workers > 0 else None
        stop = threading.Event()
        gen = self.tasks(mols, have_conf, done, failed, frames_by_key, stats, slots, stop)
        pool = None
        try:
            if a.workers <= 0:
                results = (label_task(t) for t in gen)
            else:
                import multiprocessing as mp

                pool = mp.get_context("spawn").Pool(a.workers, initializer=_init_worker, initargs=(a.threads,))
                results = pool.imap_unordered(label_task, gen)
            last_report = time.time()
            for r in results:
                if slots is not None:
                    slots.release()
                key = (r["mol_id"], int(r["conf_id"]))
                fr = frames_by_key.pop(key)
                if r["status"] == "ok":
                    frame = D.labelled_frame(fr, r["energy"], np.asarray(r["forces"]),
                                             {"temperature_K": fr.info.get("temperature_K"),
                                              "dft_seconds": r["seconds"]})
                    D.append_extxyz(self.path["labels"], frame)
                    self.log(stage="dft", mol_id=key[0], conf_id=key[1], status="ok", n_atoms=len(frame),
                             seconds=r["seconds"])
                    stats["ok"] += 1
                    msg = (f"{key[0]}/{key[1]}: E={r['energy']:.4f} eV, |F|max="
                           f"{np.abs(np.asarray(r['forces'])).max():.3f} eV/Å, {r['seconds']:.1f} s")
                else:
                    self.log(stage="dft", mol_id=key[0], conf_id=key[1], status="failed", reason=r["reason"],
                             seconds=r["seconds"])
                    stats["failed"] += 1
                    msg = f"{key[0]}/{key[1]} FAILED: {r['reason']}"
                stats["dft_s"] += r["seconds"]
                bar.update(1)
                bar.write(f"[dft] {msg}")
                if time.time() - last_report > a.report_every:
                    self.report()
                    last_report = time.time()
        finally:
            stop.set()
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        wall = time.time() - t_start
        self.log(stage="run", status="end", labelled=stats["ok"], failed=stats["failed"],
                 md_failed=stats["md_failed"], wall_s=round(wall, 1))
        n = self.report()
        print(f"[build-benchmark] this run: {stats['ok']} labelled, {stats['failed']} failed, "
              f"{stats['md_failed']} molecules failed in MD; {n} structures in {self.path['labels']}; "
              f"wall {wall:.0f} s", flush=True)
        return 0

    # ------------------------------------------------------------------------------------------- report
    def report(self) -> int:
        from training.data.subsets import save_split

        a = self.args
        sel = json.load(open(self.path["selection"])) if os.path.exists(self.path["selection"]) else {
            "molecules": [], "n_candidates": None}
        mols = sel["molecules"]
        labels = D.read_extxyz(self.path["labels"])
        log = D.read_log(self.path["log"])
        mol_split = split_molecules([m["mol_id"] for m in mols], a.split)
        where = {mid: s for s, ids in mol_split.items() for mid in ids}
        idx = {s: [] for s in mol_split}
        for i, fr in enumerate(labels):
            s = where.get(str(fr.info["mol_id"]))
            if s is not None:
                idx[s].append(i)
        save_split(self.path["split"], idx, dataset=LABELS, count=len(labels), group_key="mol_id",
                   groups=mol_split, fractions=list(a.split),
                   note="splits: frame indices of labels.extxyz (= of `hessforge ingest labels.extxyz` output); "
                        "groups: molecules of selection.json, assigned in selection order, stable as it grows")
        write_provenance(self, sel, labels, log, mol_split, idx)
        return len(labels)


def _build_versions(runs, provenance_path: str):
    """The versions the labels were made with, not those of whoever rewrites the report (--report-only runs
    from any later commit): the last build run's, logged at its start; for logs from before runs logged them,
    the line an earlier build wrote into PROVENANCE.md (a str); else the current environment's."""
    logged = [r["versions"] for r in runs if isinstance(r.get("versions"), dict)]
    if logged:
        return logged[-1]
    if os.path.exists(provenance_path):
        lines = open(provenance_path, encoding="utf-8").read().split("\n")
        if "## Versions" in lines:
            line = lines[lines.index("## Versions") + 2] if len(lines) > lines.index("## Versions") + 2 else ""
            if line.startswith("python "):
                return line
    return _versions()


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("hessforge", "numpy", "torch", "torchani", "pyscf", "ase", "qm9pack"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["git commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip() or "?"
    except Exception:
        out["git commit"] = "?"
    return out


def resume_command(b: Builder) -> str:
    a = b.args
    parts = ["hessforge", "build-benchmark", "--out", a.out, "--max-molecules", str(a.max_molecules),
             "--conformers", str(a.conformers), "--seed", str(a.seed), "--workers", str(a.workers),
             "--threads", str(a.threads)]
    defaults = vars(build_parser().parse_args([]))
    for k in FROZEN + ("max_cycle",):
        if k in ("conformers", "seed"):
            continue
        if k == "d_functions":  # spelled out where the folder's setting is not what auto gives for its basis
            auto = "cartesian" if D.resolve_d_functions(a.basis, "auto") else "spherical"
            if b.d_functions() != auto:
                parts += ["--d-functions", b.d_functions()]
        elif getattr(a, k) != defaults[k]:
            parts += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    return shlex.join(parts)


def write_provenance(b: Builder, sel, labels, log, mol_split, idx) -> None:
    a = b.args
    mols = sel["molecules"]
    dft_ok = [r for r in log if r.get("stage") == "dft" and r.get("status") == "ok"]
    failed_dft = D.failed_keys(b.path["log"])
    failed_md = D.failed_molecules(b.path["log"], "md")
    last_reason = {}
    for r in log:
        if r.get("status") == "failed" and r.get("stage") in ("dft", "md"):
            last_reason[(r["mol_id"], r.get("conf_id"))] = (r["stage"], r.get("reason"), r.get("time"))
    md = {r["mol_id"]: r for r in log if r.get("stage") == "md" and r.get("status") == "ok"}
    runs = [r for r in log if r.get("stage") == "run" and r.get("status") == "start"]
    secs = np.array([r["seconds"] for r in dft_ok], dtype=float)
    per_mol: Dict[str, List] = {}
    for fr in labels:
        per_mol.setdefault(str(fr.info["mol_id"]), []).append(fr)
    n_target = len(mols) * a.conformers
    n_failed = len(failed_dft)
    pending = n_target - len(labels) - n_failed - sum(a.conformers for mid in failed_md if mid in
                                                      {m["mol_id"] for m in mols})
    # rate over the last run with dft results
    rate_line = ""
    if len(dft_ok) >= 2:
        from datetime import datetime

        t = [datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%SZ").timestamp() for r in dft_ok[-30:] if "time" in r]
        if len(t) >= 2 and t[-1] > t[0]:
            rate = (len(t) - 1) / (t[-1] - t[0]) * 3600
            rate_line = (f"Recent rate: {rate:.0f} structures/hour (last {len(t)} labels); at that rate the "
                         f"{max(pending, 0)} pending ones need about {max(pending, 0) / rate * 60:.0f} min.")
    ver = _build_versions(runs, os.path.join(b.out, "PROVENANCE.md"))
    L = []
    w = L.append
    w(f"# {os.path.basename(os.path.normpath(b.out))}: QM9 benchmark slice, provenance\n")
    w("Written by `hessforge build-benchmark` (training/benchmark_data.py); regenerated on every run "
      "and by `--report-only`. Do not edit by hand.\n")
    w("## Status\n")
    w(f"- Selection: {len(mols)} of {sel.get('n_candidates')} QM9 molecules with {a.heavy_atoms} heavy atoms, "
      f"containing {a.require_elements.replace(',', ' and ')}, elements only {a.allowed_elements}.")
    w(f"- Target: {n_target} structures ({a.conformers} conformers per molecule).")
    w(f"- **Labelled: {len(labels)}** structures of {len(per_mol)} molecules; failed DFT: {n_failed}; "
      f"molecules failed in MD: {len(failed_md)}; pending: {max(pending, 0)}.")
    if len(secs):
        w(f"- DFT time per structure: mean {secs.mean():.1f} s, median {np.median(secs):.1f} s, "
          f"max {secs.max():.1f} s; total {secs.sum() / 3600:.2f} h (wall per structure; "
          "workers x threads of each run: the table of commands below).")
    if md:
        ms = np.array([r["seconds"] for r in md.values()])
        w(f"- MD time per molecule: mean {ms.mean():.1f} s ({len(ms)} molecules).")
    if rate_line:
        w(f"- {rate_line}")
    w("- Split (by molecule): " + ", ".join(f"{s} {len(mol_split[s])} molecules / {len(idx[s])} structures"
                                             for s in mol_split) + ".\n")
    w("## Resume / extend\n")
    w("From a fresh clone (`pip install -e '.[science]'`, which brings pyscf, torchani and qm9pack), run from the "
      "repository root:\n")
    w("```\n" + resume_command(b) + "\n```\n")
    w("It skips every structure already in labels.extxyz and every one logged as failed (add `--retry-failed` "
      "to try those again), reuses the MD conformers in conformers.extxyz, and only then computes. A larger "
      "`--max-molecules` extends the same seeded selection; the settings in config.json must not change. "
      "Run it in the background with `nohup ... > build.out 2>&1 &`. `--report-only` rewrites this file "
      "and split.json.\n")
    w("## Method\n")
    w(f"- Molecules: QM9 (Ramakrishnan et al. 2014) equilibrium geometries (B3LYP/6-31G(2df,p)) from the "
      f"`qm9pack` wheel's CSV files; filter above; the candidate list (sorted by QM9 index) is shuffled by "
      f"numpy `default_rng({a.seed})` and the first --max-molecules are taken. mol_id = `qm9_<index>`.")
    w(f"- Conformers: ase `Langevin` MD on the {a.teacher} teacher (training.teachers; ANI-1x 8-model "
      f"ensemble unless a member is named), timestep {a.timestep} fs, friction 0.01/fs, `fixcm=False` "
      f"(momentum zeroed at start). **One temperature per molecule**, drawn uniformly from "
      f"[{a.t_min:g}, {a.t_max:g}] K by `default_rng([seed, qm9_index, 1])` (kept in each frame's "
      f"`temperature_K`). The first {a.equil_steps} steps are discarded, then a frame is kept every "
      f"{a.stride} steps ({a.stride * a.timestep:g} fs); frames whose bond graph (ase natural cutoffs × 1.2) "
      f"differs from the QM9 structure's are rejected, and more than {a.conformers} rejections fail the "
      f"molecule (logged).")
    d_shells = "Cartesian" if b.d_functions() == "cartesian" else "pure (spherical)"
    w(f"- Labels: pyscf `dft.RKS(mol).density_fit()`, xc `{a.xc}`, basis `{a.basis}` with {d_shells} d shells, "
      f"neutral singlet, default "
      f"grids, `max_cycle={a.max_cycle}`; on no convergence the Newton solver is tried once from the DIIS "
      f"density, then the frame is logged as failed with the reason and skipped. Energy × Hartree → eV; "
      f"forces = −analytic gradient × Hartree/Bohr → eV/Å (ase.units). Total energies (no atomic reference "
      f"subtracted).\n")
    w("## Files\n")
    w("- `labels.extxyz`: labelled frames (`ase.io.read(path, ':')`: `get_potential_energy()` eV, "
      "`get_forces()` eV/Å; info `mol_id` (group key), `conf_id`, `md_step`, `temperature_K`, `dft_seconds`). "
      "Frames are in completion order. `hessforge ingest labels.extxyz -o qm9.lmdb` (group key mol_id).")
    w("- `conformers.extxyz`: all MD conformers (unlabelled), the geometries the labels were computed on.")
    w("- `build.log.jsonl`: one JSON line per run start/end, MD molecule and DFT attempt (ok / failed + reason, "
      "seconds, UTC time).")
    w("- `split.json`: hessforge split format (`training.data.load_split`): `splits` = frame indices of "
      "labels.extxyz per train/val/test, `groups` = molecule ids per split. Molecules are assigned in "
      f"selection order with fractions {tuple(a.split)}, so the assignment is stable as the build grows.")
    w("- `selection.json`, `config.json`: the selected molecules (id, QM9 index, SMILES, atoms) and the frozen "
      "settings.\n")
    w("## Commands run\n")
    w("| start (UTC) | command | workers × threads | labelled | failed | wall (s) | ended |")
    w("|---|---|---|---|---|---|---|")
    starts = [i for i, r in enumerate(log) if r.get("stage") == "run" and r.get("status") == "start"]
    for n, i in enumerate(starts):
        r = log[i]
        span = log[i + 1: starts[n + 1] if n + 1 < len(starts) else len(log)]
        end = next((e for e in span if e.get("stage") == "run" and e.get("status") == "end"), None)
        ok = sum(1 for e in span if e.get("stage") == "dft" and e.get("status") == "ok")
        bad = sum(1 for e in span if e.get("stage") == "dft" and e.get("status") == "failed")
        cmd = "hessforge build-benchmark " + shlex.join(r.get("argv") or []) if r.get("argv") is not None else "?"
        last = span[-1].get("time", "") if span else ""
        ended = end.get("time", "yes") if end else f"no end record: running, or killed (last record {last})"
        w(f"| {r.get('time', '?')} | `{cmd}` | {r.get('workers')} × {r.get('threads')} | {ok} | {bad} | "
          f"{end['wall_s'] if end else ''} | {ended} |")
    w("")
    w("## Versions\n")
    w(ver if isinstance(ver, str) else ", ".join(f"{k} {v}" for k, v in ver.items()) + f"; machine: "
      f"{platform.machine()}, {runs[-1].get('cpus') if runs else os.cpu_count()} CPUs (shared with other jobs: "
      "timings are pessimistic).")
    w("")
    w("## Failures\n")
    if not last_reason or not (failed_dft or failed_md):
        w("None so far.\n")
    else:
        w("| stage | molecule | conformer | reason | time |")
        w("|---|---|---|---|---|")
        for (mid, cid), (stage, reason, t) in sorted(last_reason.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
            if (stage == "dft" and (mid, cid) in failed_dft) or (stage == "md" and mid in failed_md):
                w(f"| {stage} | {mid} | {'' if cid is None else cid} | {str(reason).replace('|', '/')} | {t} |")
        w("")
    w("## Molecules\n")
    w("| mol_id | SMILES | atoms | split | T (K) | labelled | E range (eV) | max abs F (eV/Å) | DFT s/struct |")
    w("|---|---|---|---|---|---|---|---|---|")
    where = {mid: s for s, ids in mol_split.items() for mid in ids}
    for m in mols:
        mid = m["mol_id"]
        frs = per_mol.get(mid, [])
        t = md.get(mid, {}).get("temperature_K", "")
        if frs:
            e = np.array([f.get_potential_energy() for f in frs])
            fmax = max(np.abs(f.get_forces()).max() for f in frs)
            ds = np.mean([f.info.get("dft_seconds", np.nan) for f in frs])
            extra = f"{np.ptp(e):.3f} | {fmax:.2f} | {ds:.1f}"
        else:
            extra = " | | "
        if mid in failed_md:
            t = f"{t} (MD failed)"
        w(f"| {mid} | `{m['smiles']}` | {m['n_atoms']} | {where.get(mid, '')} | {t} | {len(frs)} | {extra} |")
    text = "\n".join(L) + "\n"
    with atomic_open(b.path["provenance"]) as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--out", default="bench/data/qm9_no9", help="output folder (default bench/data/qm9_no9)")
    p.add_argument("--heavy-atoms", type=int, default=9, help="number of non-H atoms (default 9)")
    p.add_argument("--require-elements", default="N,O", help="elements every molecule must contain (default N,O)")
    p.add_argument("--allowed-elements", default="HCNO", help="elements allowed (default HCNO: ANI-1x's)")
    p.add_argument("--max-molecules", type=int, default=40)
    p.add_argument("--conformers", type=int, default=8, help="MD conformers per molecule (default 8)")
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--t-min", type=float, default=300.0, help="K; one MD temperature per molecule in [t-min, t-max]")
    p.add_argument("--t-max", type=float, default=600.0, help="K")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--equil-steps", type=int, default=400)
    p.add_argument("--stride", type=int, default=40, help="MD steps between kept snapshots")
    p.add_argument("--teacher", default="ani1x", help="MD force field (load_teacher spec; default ani1x ensemble)")
    p.add_argument("--basis", default="6-31g*")
    p.add_argument("--xc", default="wb97x")
    p.add_argument("--d-functions", choices=D.D_FUNCTIONS, default=None,
                   help="d shells: auto (Cartesian where Gaussian uses them, e.g. 6-31G(d), ANI-1x's basis), "
                        "cartesian or spherical (what folders built before this option used). Default: an "
                        "existing --out folder's own setting, auto for a new one")
    p.add_argument("--max-cycle", type=int, default=50, help="SCF iterations (DIIS, then Newton) before failing")
    p.add_argument("--workers", type=int, default=1, help="DFT processes (0: in this process)")
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads per pyscf worker")
    p.add_argument("--md-threads", type=int, default=1, help="torch threads for the MD in the parent")
    p.add_argument("--split", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.8, 0.1, 0.1),
                   help="train,val,test fractions of molecules (default 0.8,0.1,0.1)")
    p.add_argument("--retry-failed", action="store_true", help="try frames/molecules that failed before again")
    p.add_argument("--report-only", action="store_true", help="only rewrite PROVENANCE.md and split.json")
    p.add_argument("--dry-run", action="store_true", help="say what a run would reuse and compute, then stop")
    p.add_argument("--report-every", type=float, default=120.0, help="s between PROVENANCE.md rewrites")
    p.add_argument("--no-progress", action="store_true")


def build_parser():
    p = argparse.ArgumentParser(prog="hessforge build-benchmark")
    add_arguments(p)
    return p


def check_filter(args) -> None:
    """QM9 holds H, C, N, O and F and at most 9 heavy atoms: a filter outside that selects nothing."""
    import re

    require = [e.strip() for e in args.require_elements.split(",") if e.strip()]
    allowed = re.findall(r"[A-Z][a-z]?|.", args.allowed_elements)
    for opt, elements in (("--require-elements", require), ("--allowed-elements", allowed)):
        unknown = [e for e in elements if e not in SYMBOL_ORDER]
        if unknown:
            raise HessforgeError(f"{opt}: QM9 holds only {', '.join(SYMBOL_ORDER)}; got {', '.join(unknown)}")
    if "H" not in allowed:
        raise HessforgeError("--allowed-elements must include H (every QM9 molecule with heavy atoms has some)")
    missing = [e for e in require if e not in allowed]
    if missing:
        raise HessforgeError(f"--require-elements {','.join(missing)} not in --allowed-elements {args.allowed_elements}")
    if not 1 <= args.heavy_atoms <= 9:
        raise HessforgeError(f"--heavy-atoms must be 1 to 9 (QM9's molecules), got {args.heavy_atoms}")


def run(args) -> int:
    if args.conformers < 1 or args.max_molecules < 1:
        raise HessforgeError("--conformers and --max-molecules must be >= 1")
    check_filter(args)
    split_molecules([], args.split)  # a bad --split is refused before anything is written
    if not (0 < args.t_min <= args.t_max):
        raise HessforgeError("need 0 < --t-min <= --t-max")
    if getattr(args, "_argv", None) is None:
        args._argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "build-benchmark" else sys.argv[1:]
    return Builder(args).run()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
