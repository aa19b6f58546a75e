"""A materials distillation study with a bundled foundation model and no DFT: crystalline silicon, CHGNet as
the only source of labels (teacher-only training), PaiNN students with and without CHGNet's Hessian rows.
bench/science/materials.sh runs it end to end; this file holds its steps that are not hessforge commands:

  frames OUT_DIR   CHGNet Langevin MD of a 64-atom diamond Si cell at several temperatures and lattice
                   constants -> OUT_DIR/frames.extxyz (positions and cells only: the labels come from
                   `hessforge label --teacher chgnet`) and OUT_DIR/split.json (train/val from the training
                   trajectories, test = a separate trajectory at a temperature and lattice constant between them)
  cold-frames SRC_DIR OUT_DIR
                   SRC_DIR's frames and split plus 14 near-ideal cells (a = 5.38-5.56 Å, rattled 0.01 Å) in the
                   training split: the 0 K equation of state that MD frames do not sample
  sheared-frames SRC_DIR OUT_DIR [--strain 0.02]
                   SRC_DIR's frames and split with every training frame's cell (and atoms) under its own random
                   volume-preserving shear (a symmetric traceless strain, components uniform in ±strain): the
                   MD frames are cubic cells, so they leave the shear elastic constants unconstrained
  shear-modulus RUN_DIR... [--teacher SPEC] [--work WORK]
                   C11 - C12 (tetragonal shear, no internal relaxation in diamond) of the teacher and each run's
                   student at the teacher's finite-temperature lattice constant, from the stress of ±0.5 % strains
  phonons WORK RUN_DIR... [--teacher SPEC]
                   Lattice dynamics of each run's student (RUN_DIR/phonons.json) against the teacher's (CHGNet by
                   default, any `--teacher` spec of hessforge label; computed once, WORK/NAME_phonons.json):
                   the full Hessian of the ideal 64-atom cell (at
                   CHGNet's lattice constant) by central differences of forces, its frequencies (the phonons at the
                   q-points of the 2x2x2 supercell), and each model's equilibrium lattice constant and bulk
                   modulus from an E(V) fit. Students are loaded through engine.Calculator, as a user would.
  pressure RUN_DIR... [--teacher SPEC]
                   pressure of the teacher and the students on ideal and rattled 64-atom cells at three lattice
                   constants: where students follow the teacher's stress and where they extrapolate
  report DIR       the study's table (DIR/table.md) from the eval.json and phonons.json copied into DIR
                   and the teacher's NAME_phonons.json (one per report directory)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings

import numpy as np

# MD of the training data: (temperature K, lattice constant Å) per trajectory; the test trajectory sits between
TRAIN_RUNS = [(300, 5.40), (300, 5.47), (800, 5.42), (800, 5.49), (1300, 5.44), (1300, 5.51)]
TEST_RUN = (1000, 5.455)
EQUILIBRATION_STEPS = 100
FRAMES_PER_RUN = 50
STEPS_BETWEEN_FRAMES = 6  # 2 fs steps: 12 fs between frames
TIMESTEP_FS = 2.0
VAL_PER_RUN = 5
COLD_LATTICE = np.linspace(5.38, 5.56, 7)  # Å: near-ideal cells of `cold-frames`, around every teacher's a
FD_STEP = 0.01  # Å, CHGNet's own roughness scale (training/teachers/chgnet.py)
THZ = 1e12


def chgnet_calculator():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        model = CHGNet.load(use_device="cpu", verbose=False)
        return CHGNetCalculator(model=model, use_device="cpu")


def diamond_si(a: float):
    from ase.build import bulk

    return bulk("Si", "diamond", a=a, cubic=True).repeat(2)


def trajectory(calc, temperature: float, a: float, frames: int, seed: int, group: str):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = diamond_si(a)
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng)
    dyn.run(EQUILIBRATION_STEPS)
    out = []
    for k in range(frames):
        dyn.run(STEPS_BETWEEN_FRAMES)
        frame = diamond_si(a)
        frame.positions = atoms.get_positions(wrap=True)
        frame.info.update(group=group, temperature_K=temperature, lattice_A=a, frame=k)
        out.append(frame)
    return out


def make_frames(out_dir: str) -> None:
    import ase.io

    os.makedirs(out_dir, exist_ok=True)
    calc = chgnet_calculator()
    frames, groups = [], []
    for seed, (t, a) in enumerate(TRAIN_RUNS + [TEST_RUN]):
        t0 = time.time()
        group = "test" if (t, a) == TEST_RUN else f"md-{t}K-{a:.2f}"
        run = trajectory(calc, t, a, FRAMES_PER_RUN, seed, group)
        frames += run
        groups += [group] * len(run)
        print(f"{group}: {len(run)} frames, {time.time() - t0:.0f} s", flush=True)
    ase.io.write(os.path.join(out_dir, "frames.extxyz"), frames, format="extxyz")
    # val: the last frames of each training trajectory (least correlated with the frames trained on); test: the
    # whole test trajectory
    split = {"train": [], "val": [], "test": []}
    for i, g in enumerate(groups):
        if g == "test":
            split["test"].append(i)
        elif frames[i].info["frame"] >= FRAMES_PER_RUN - VAL_PER_RUN:
            split["val"].append(i)
        else:
            split["train"].append(i)
    with open(os.path.join(out_dir, "split.json"), "w") as fh:
        json.dump({"format": "hessforge-split", "version": 1, "dataset": "frames.extxyz", "count": len(frames),
                   "group_key": "group", "note": "written by bench/science/si_chgnet.py frames",
                   "splits": split}, fh, indent=1)
    print({k: len(v) for k, v in split.items()})


def add_cold_frames(src_dir: str, out_dir: str, rattle: float = 0.01, copies: int = 2) -> None:
    """SRC_DIR's frames and split plus near-ideal cells across the lattice-constant range (COLD_LATTICE, each
    rattled by `rattle` Å, `copies` each), all in the training split: the 0 K equation of state the MD frames
    (300-1300 K) do not sample. The test and validation frames stay the same."""
    import ase.io

    frames = ase.io.read(os.path.join(src_dir, "frames.extxyz"), index=":")
    with open(os.path.join(src_dir, "split.json")) as fh:
        split = json.load(fh)
    rng = np.random.default_rng(0)
    for a in COLD_LATTICE:
        for k in range(copies):
            cold = diamond_si(a)
            cold.positions += rng.normal(scale=rattle, size=cold.positions.shape)
            cold.info.update(group=f"cold-{a:.2f}", temperature_K=0, lattice_A=a, frame=k)
            split["splits"]["train"].append(len(frames))
            frames.append(cold)
    os.makedirs(out_dir, exist_ok=True)
    ase.io.write(os.path.join(out_dir, "frames.extxyz"), frames, format="extxyz")
    split.update(count=len(frames), note=f"{split.get('note', '')}; + cold frames (si_chgnet.py cold-frames)")
    with open(os.path.join(out_dir, "split.json"), "w") as fh:
        json.dump(split, fh, indent=1)
    print({k: len(v) for k, v in split["splits"].items()})


def shear_frames(src_dir: str, out_dir: str, strain: float = 0.02, seed: int = 0) -> None:
    """SRC_DIR's frames and split, each training frame sheared (module docstring); validation and test frames
    stay as they were, so the test metrics compare with the unsheared study's."""
    import ase.io

    frames = ase.io.read(os.path.join(src_dir, "frames.extxyz"), index=":")
    with open(os.path.join(src_dir, "split.json")) as fh:
        split = json.load(fh)
    rng = np.random.default_rng(seed)
    for i in split["splits"]["train"]:
        e = rng.uniform(-strain, strain, (3, 3))
        e = 0.5 * (e + e.T)
        e -= np.trace(e) / 3 * np.eye(3)
        atoms = frames[i]
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + e), scale_atoms=True)
        atoms.info["shear_strain"] = e.ravel()
    os.makedirs(out_dir, exist_ok=True)
    ase.io.write(os.path.join(out_dir, "frames.extxyz"), frames, format="extxyz")
    split["note"] = f"{split.get('note', '')}; training frames sheared (si_chgnet.py sheared-frames, ±{strain})"
    with open(os.path.join(out_dir, "split.json"), "w") as fh:
        json.dump(split, fh, indent=1)
    print(f"{len(split['splits']['train'])} training frames sheared (components within ±{strain})")


SHEAR_LATTICE = 5.4373  # Å: SW's lattice constant at 300 K and P = 0 (materials_si_npt_cpu.md)


def shear_modulus(run_dirs, teacher: str = "chgnet", a: float = SHEAR_LATTICE, strain: float = 0.005,
                  work: str = "", frames: int = 10) -> None:
    """C11 - C12 (GPa) of the teacher and each run's student: (σ_xx - σ_yy) / (2ε) under the strain
    diag(1 + ε, 1 - ε, 1) of the ideal 64-atom cell, central in ±ε. No internal relaxation: strains along the
    cube axes leave the two fcc sublattices' relative position fixed by symmetry (unlike the shear of C44).
    With `work`, also the same derivative averaged over the first `frames` test frames of WORK (thermal
    configurations, strained with their atoms: the response where the students were trained)."""
    from ase.units import GPa

    from engine import Calculator
    from training.teachers import load_teacher

    ref = load_teacher(teacher)
    models = {teacher: lambda atoms: ref.compute(atoms).stress}
    for run in run_dirs:
        calc = Calculator(os.path.join(run, "best.pt"))

        def student_stress(atoms, calc=calc):
            atoms.calc = calc
            return atoms.get_stress(voigt=False)

        parts = os.path.normpath(run).split(os.sep)
        models["/".join(parts[-2:])] = student_stress  # work folder / run: runs of two studies share run names
    starts = {f"ideal cell, a = {a} Å": [diamond_si(a)]}
    if work:
        import ase.io

        with open(os.path.join(work, "split.json")) as fh:
            test = json.load(fh)["splits"]["test"][:frames]
        every = ase.io.read(os.path.join(work, "frames.extxyz"), index=":")
        starts[f"{len(test)} test frames of {work}"] = [every[i] for i in test]
    print("| model | " + " | ".join(f"C11 - C12 (GPa), {k}" for k in starts) + " |")
    print("|---|" + "---:|" * len(starts))
    for name, stress in models.items():
        cells = []
        for configurations in starts.values():
            values = []
            for start in configurations:
                for e in (strain, -strain):
                    atoms = start.copy()
                    atoms.set_cell(atoms.cell[:] @ np.diag([1 + e, 1 - e, 1]), scale_atoms=True)
                    sigma = stress(atoms)
                    values.append((sigma[0, 0] - sigma[1, 1]) / (2 * e) / GPa)
            cells.append(f"{np.mean(values):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def pressure_probe(run_dirs, teacher: str = "chgnet", lattice=(5.455, 5.4706, 5.4819),
                   rattles=(0.0, 0.01, 0.05, 0.1), seeds: int = 3) -> None:
    """Pressure (GPa, -trace(stress)/3) of the teacher and each run's student on the 64-atom cell at each lattice
    constant, ideal and rattled by each amplitude (mean over `seeds` rattles): where the students follow the
    teacher's stress (rattled, like the MD frames) and where they extrapolate (the ideal lattice)."""
    from ase.units import GPa

    from engine import Calculator
    from training.teachers import load_teacher

    ref = load_teacher(teacher)
    students = {os.path.basename(os.path.normpath(r)): Calculator(os.path.join(r, "best.pt")) for r in run_dirs}
    print("| a (Å) | rattle (Å) | " + " | ".join([teacher] + list(students)) + " |")
    print("|---:|---:|" + "---:|" * (1 + len(students)))
    for a in lattice:
        for rattle in rattles:
            values = np.zeros(1 + len(students))
            count = seeds if rattle else 1
            for seed in range(count):
                atoms = diamond_si(a)
                if rattle:
                    atoms.rattle(rattle, seed=seed)
                values[0] += -np.trace(ref.compute(atoms).stress) / 3 / GPa / count
                for k, calc in enumerate(students.values(), 1):
                    atoms.calc = calc
                    values[k] += -np.trace(atoms.get_stress(voigt=False)) / 3 / GPa / count
            print(f"| {a} | {rattle} | " + " | ".join(f"{v:+.3f}" for v in values) + " |")


def full_hessian(calc, atoms, h: float = FD_STEP) -> np.ndarray:
    """(3N, 3N) Hessian in eV/Å² by central differences of the forces (the project's finite-difference
    teacher around `calc`), symmetrized."""
    from training.teachers.finite_difference import FiniteDifferenceTeacher

    hess = FiniteDifferenceTeacher(calc, h=h).compute(atoms, rows=np.arange(3 * len(atoms))).hessian_rows
    return 0.5 * (hess + hess.T)


def frequencies_thz(hess: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Harmonic frequencies in THz (imaginary ones negative), sorted, from a Hessian in eV/Å²."""
    from ase import units

    m = np.repeat(masses, 3)
    eig = np.linalg.eigvalsh(hess / np.sqrt(np.outer(m, m)))  # eV / (Å² amu)
    omega = np.sign(eig) * np.sqrt(np.abs(eig)) * np.sqrt(units._e / units._amu) * 1e10  # rad/s
    return np.sort(omega / (2 * np.pi * THZ))


def equation_of_state(calc, a0: float):
    """Equilibrium lattice constant (Å) and bulk modulus (GPa) from a Birch-Murnaghan fit over +-3 % in a."""
    from ase.eos import EquationOfState
    from ase.units import GPa

    volumes, energies = [], []
    for a in a0 * np.linspace(0.97, 1.03, 9):
        atoms = diamond_si(a)
        atoms.calc = calc
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    v0, _, b = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    return (v0 / 8) ** (1 / 3), b / GPa  # 8 conventional cells in the 2x2x2 supercell


def lattice_dynamics(calc, a_ref: float) -> dict:
    a, bulk_modulus = equation_of_state(calc, a_ref)
    atoms = diamond_si(a_ref)  # the same geometry for every model: forces vanish there by symmetry
    t0 = time.time()
    hess = full_hessian(calc, atoms)
    freqs = frequencies_thz(hess, atoms.get_masses())
    return {"lattice_constant_A": a, "bulk_modulus_GPa": bulk_modulus, "frequencies_THz": freqs.tolist(),
            "hessian_seconds": time.time() - t0, "hessian": hess}


def reference_name(teacher: str) -> str:
    """File-name stem of a teacher's reference lattice dynamics: "chgnet" for CHGNet 0.3.0 (the study's
    default), else the spec made file-safe ("lammps:bench/science/si_sw.lammps" -> "lammps-si_sw")."""
    if teacher == "chgnet":
        return "chgnet"
    kind, _, arg = teacher.partition(":")
    stem = os.path.splitext(os.path.basename(arg))[0] if arg else ""
    return "-".join(x for x in (kind, stem) if x).replace(".", "_")


def teacher_reference(work: str, teacher: str = "chgnet"):
    """The teacher's lattice dynamics, computed once per work directory (NAME_phonons.json + its Hessian .npy)."""
    name = reference_name(teacher)
    path = os.path.join(work, f"{name}_phonons.json")
    if not os.path.exists(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if teacher == "chgnet":
                calc = chgnet_calculator()
            else:
                from training.teachers import load_teacher
                from training.teachers.base import teacher_calculator

                calc = teacher_calculator(load_teacher(teacher))
            a_ref, _ = equation_of_state(calc, 5.47)
            ref = lattice_dynamics(calc, a_ref)
        np.save(os.path.join(work, f"{name}_hessian.npy"), ref.pop("hessian"))
        ref.update(geometry=f"diamond Si 2x2x2 conventional (64 atoms) at the teacher's a = {a_ref:.4f} Å",
                   reference_lattice_constant_A=a_ref, fd_step_A=FD_STEP, teacher=teacher)
        with open(path, "w") as fh:
            json.dump(ref, fh, indent=1)
        print(f"{teacher}: a = {ref['lattice_constant_A']:.4f} Å, B = {ref['bulk_modulus_GPa']:.1f} GPa, "
              f"highest frequency {max(ref['frequencies_THz']):.2f} THz")
    ref = json.load(open(path))
    return ref, np.load(os.path.join(work, f"{name}_hessian.npy"))


def compare_phonons(work: str, run_dirs, teacher: str = "chgnet") -> None:
    """RUN/phonons.json for each run that has none: its lattice dynamics against the teacher's."""
    from engine import Calculator

    ref, ref_hess = teacher_reference(work, teacher)
    ref_f = np.asarray(ref["frequencies_THz"])[3:]  # without the three zero-frequency translations
    for run in run_dirs:
        out = os.path.join(run, "phonons.json")
        if os.path.exists(out):
            continue
        calc = Calculator(os.path.join(run, "best.pt"), dtype="float64")
        got = lattice_dynamics(calc, ref["reference_lattice_constant_A"])
        f = np.asarray(got["frequencies_THz"])[3:]
        dh = got.pop("hessian") - ref_hess
        entry = dict(got, frequency_mae_THz=float(np.mean(np.abs(f - ref_f))),
                     frequency_max_error_THz=float(np.max(np.abs(f - ref_f))),
                     max_frequency_THz=float(f.max()), imaginary_modes=int(np.sum(f < -0.1)),
                     hessian_mae_eV_per_A2=float(np.mean(np.abs(dh))),
                     hessian_rel_rmse=float(np.sqrt(np.mean(dh**2) / np.mean(ref_hess**2))))
        with open(out, "w") as fh:
            json.dump(entry, fh, indent=1)
        print(f"{os.path.basename(os.path.normpath(run))}: a = {entry['lattice_constant_A']:.4f} Å, "
              f"B = {entry['bulk_modulus_GPa']:.1f} GPa, frequency MAE {entry['frequency_mae_THz']:.3f} THz "
              f"(max {entry['frequency_max_error_THz']:.2f}), Hessian MAE {entry['hessian_mae_eV_per_A2']:.4f} "
              f"eV/Å², imaginary modes {entry['imaginary_modes']}")


def method_label(method: str, teacher: str = "CHGNet") -> str:
    """ef: energies + forces only; kd: + Hessian rows at λ_KD 400; kdNNN: at λ_KD NNN; options after "-":
    "smooth", PaiNN with norm_eps 1 (else the published 1e-8); "sNNN", + the teacher's stress at λ_S NNN."""
    base, *options = method.split("-")
    painn = "PaiNN norm_eps 1" if "smooth" in options else "PaiNN norm_eps 1e-8"
    stress = [o[1:] for o in options if o.startswith("s") and o[1:].isdigit()]
    extra = f" + stress (λ_S {stress[0]})" if stress else ""
    if base == "ef":
        return f"{painn}: {teacher} energies + forces{extra}"
    return f"{painn}: + {teacher} Hessian rows (λ_KD {base[2:] or '400'}, s=1){extra}"


def _mean_std(values, fmt: str = ".3g"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} ± {np.std(values, ddof=1):{fmt}}"


def write_report(report_dir: str) -> None:
    """A markdown table (mean ± sample std over seeds) from the eval.json and phonons.json of each run
    directory copied into `report_dir` (RUN = METHOD_nLIMIT_seedSEED) and the teacher's NAME_phonons.json."""
    import glob

    found = sorted(glob.glob(os.path.join(report_dir, "*_phonons.json")))
    if len(found) != 1:
        raise SystemExit(f"{report_dir}: expected one teacher's NAME_phonons.json, found {len(found)}")
    ref = json.load(open(found[0]))
    teacher = ref.get("teacher", "chgnet")  # "lammps:bench/science/si_sw.lammps" -> "si_sw"
    who = ("CHGNet" if teacher == "chgnet"
           else os.path.splitext(os.path.basename(teacher.partition(":")[2] or teacher))[0])
    groups = {}
    for run in sorted(os.listdir(report_dir)):
        if os.path.exists(os.path.join(report_dir, run, "eval.json")):
            method, limit, _seed = run.split("_")
            groups.setdefault((int(limit[1:]), method), []).append(run)
    evals = {run: json.load(open(os.path.join(report_dir, run, "eval.json")))["student_vs_teacher"]
             for names in groups.values() for run in names}
    # a stress column where the labels hold the teacher's stress (reports made before that stay as they were)
    with_stress = any("stress_mae_gpa" in e for e in evals.values())
    lines = ["| training structures | student trained on | seeds | energy MAE (meV/atom) | force MAE (meV/Å) | "
             + ("stress MAE (GPa) | " if with_stress else "") +
             f"Hessian-row MAE (eV/Å²) | phonon frequency MAE (THz) | highest frequency (THz; {who} "
             f"{max(ref['frequencies_THz']):.2f}) | a (Å; {who} {ref['lattice_constant_A']:.4f}) | B (GPa; {who} "
             f"{ref['bulk_modulus_GPa']:.1f}) |", "|---:|---|---:|---:|---:|" + ("---:|" if with_stress else "")
             + "---:|---:|---:|---:|---:|"]
    order = {"ef": 0, "kd": 1, "ef-smooth": 2, "kd-smooth": 3}
    for (limit, method), names in sorted(groups.items(), key=lambda g: (g[0][0], order.get(g[0][1], 4), g[0][1])):
        ev = [evals[n] for n in names]
        ph = [json.load(open(p)) if os.path.exists(p) else None
              for p in (os.path.join(report_dir, n, "phonons.json") for n in names)]
        col = lambda key, src, fmt=".3g": _mean_std([e.get(key) if e else None for e in src], fmt)  # noqa: E731
        phonon_fmt = ".2f" if any(p and p["frequency_mae_THz"] >= 0.1 for p in ph) else ".3f"
        lines.append(f"| {limit} | {method_label(method, who)} | {len(names)} | "
                     f"{col('energy_mae_mev_per_atom', ev, '.2f')} | "
                     f"{col('forces_mae_mev_per_A', ev, '.1f')} | "
                     + (f"{col('stress_mae_gpa', ev, '.3f')} | " if with_stress else "") +
                     f"{col('hessian_mae_eV_per_A2', ev, '.4f')} | "
                     f"{col('frequency_mae_THz', ph, phonon_fmt)} | {col('max_frequency_THz', ph, '.1f')} | "
                     f"{col('lattice_constant_A', ph, '.4f')} | {col('bulk_modulus_GPa', ph, '.1f')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(report_dir, "table.md"), "w") as fh:
        fh.write(text)
    print(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("frames")
    p.add_argument("out_dir")
    p = sub.add_parser("cold-frames")
    p.add_argument("src_dir")
    p.add_argument("out_dir")
    p = sub.add_parser("sheared-frames")
    p.add_argument("src_dir")
    p.add_argument("out_dir")
    p.add_argument("--strain", type=float, default=0.02)
    p = sub.add_parser("shear-modulus")
    p.add_argument("runs", nargs="*")
    p.add_argument("--teacher", default="chgnet")
    p.add_argument("--work", default="", help="also average over this work folder's first test frames")
    p = sub.add_parser("phonons")
    p.add_argument("work")
    p.add_argument("runs", nargs="+")
    p.add_argument("--teacher", default="chgnet", help="the teacher spec the students were trained on")
    p = sub.add_parser("pressure")
    p.add_argument("runs", nargs="+")
    p.add_argument("--teacher", default="chgnet")
    p = sub.add_parser("report")
    p.add_argument("report_dir")
    args = parser.parse_args(argv)
    if args.command == "frames":
        make_frames(args.out_dir)
    elif args.command == "cold-frames":
        add_cold_frames(args.src_dir, args.out_dir)
    elif args.command == "sheared-frames":
        shear_frames(args.src_dir, args.out_dir, args.strain)
    elif args.command == "shear-modulus":
        shear_modulus(args.runs, args.teacher, work=args.work)
    elif args.command == "phonons":
        compare_phonons(args.work, args.runs, args.teacher)
    elif args.command == "pressure":
        pressure_probe(args.runs, args.teacher)
    else:
        write_report(args.report_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
