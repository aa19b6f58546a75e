"""`hessforge md MODEL DATA`: batched MD of B systems at once with a student (engine.md.BatchedMD), batched
model calls (--max-atoms-per-call); constant volume, or with --pressure a barostat (bulk systems: Berendsen, or stochastic cell
rescaling for the NPT ensemble's volume fluctuations). MODEL: a checkpoint,
an exported file, or painn[:k=v,...] / schnet[:k=v,...] (random weights, for timing); DATA as for
`hessforge bench` (file, LMDB dataset, quickstart, s22[:MIN_ATOMS]): its first --batch-size structures,
repeated in turn when there are fewer. Initial velocities, per structure: DATA's momenta where it has them
(so a previous run's -o file continues that run, its frames' md_step numbering on; a --trajectory file
continues from its last complete step's frames, unless --all-frames), else drawn at
--temperature (--init-temperature forces a draw for all).
Writes the final frames (-o) and frame 0 plus every --interval steps (--trajectory) as extxyz (8 decimals) or,
named .traj, as an ASE trajectory (full float64: a Verlet run continues as if uninterrupted; Langevin with a
new random stream), each frame with info md_step, md_system,
md_potential_energy (eV) (and md_pressure_GPa, md_pressure_tensor_GPa and the cell under --pressure) and, in
extxyz, arrays md_forces (eV/Å); prints ns/day. Ctrl-C or SIGTERM end the run after the
step under way, and -o is written all the same (a second one stops at once); so does a blow-up (a system over
--max-temperature or an atom moving > 1 Å in a step), with an error naming the system. Atoms ASE's FixAtoms
holds (a slab's frozen layers; extxyz keeps the constraint) stay in place."""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch
from ase import units

from engine.errors import HessforgeError
from engine.md import BAROSTAT_COUPLINGS, BAROSTAT_METHODS, INTEGRATORS, BatchedMD
from engine.paths import atomic_path, check_distinct_outputs, check_output_file
from engine.runner import STUDENT_MODES, fill_batch, ns_per_day, resolve_device, student_for_mode
from training.bench import DTYPES, load_structures, make_targets, set_threads
from training.arg_types import seed_option


def last_snapshot(structures: list, source: str):
    """A hessforge md --trajectory file given as DATA (every frame with integer md_step and md_system, more than
    one md_step): the frames of its last complete step, one per system in md_system order, so that the run
    continues from there (the first --batch-size frames would be step 0's). Anything else: None."""
    def whole(value):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not all(whole(a.info.get("md_step")) and whole(a.info.get("md_system")) for a in structures):
        return None
    by_step: dict = {}
    for a in structures:
        by_step.setdefault(int(a.info["md_step"]), {})[int(a.info["md_system"])] = a
    if len(by_step) < 2:
        return None
    systems = max(len(frames) for frames in by_step.values())
    complete = [step for step, frames in by_step.items() if len(frames) == systems]
    last = max(complete)
    if last != max(by_step):  # a run stopped while writing its last report
        print(f"note: {source}: step {max(by_step)} has {len(by_step[max(by_step)])} of {systems} systems; "
              f"continuing from step {last}", file=sys.stderr)
    print(f"note: {source} is a hessforge md trajectory (steps {min(by_step)} to {max(by_step)}): continuing from "
          f"its {systems} frames of step {last} (--all-frames: its frames as starting structures)", file=sys.stderr)
    return [by_step[last][k] for k in sorted(by_step[last])]


def continued_seed(seed: int, step: int) -> int:
    """The random stream of a run that continues another's -o at `step` with --seed `seed`: reusing the seed
    itself would give the thermostat the first segment's noise again, step for step."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0] >> 2)


def _atoms_per_call(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto, 0 (one call) or a number of atoms, got {text!r}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("model", help="checkpoint, exported file, painn[:k=v,...] or schnet[:k=v,...]")
    parser.add_argument("data", help="file, LMDB dataset, quickstart or s22[:MIN_ATOMS]")
    parser.add_argument("--batch-size", type=int, default=64, help="systems integrated together (default 64)")
    parser.add_argument("--all-frames", action="store_true",
                        help="DATA is a hessforge md trajectory whose frames are to be starting structures (the first "
                             "--batch-size of them), not the run to continue from its last step (the default)")
    parser.add_argument("--steps", type=int, default=1000, help="default 1000")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    parser.add_argument("--integrator", choices=INTEGRATORS, default="langevin",
                        help="default langevin (NVT at --temperature; engine.md.BatchedMD's own default is verlet)")
    parser.add_argument("--temperature", type=float, default=300.0,
                        help="K: Langevin target; initial velocities too where DATA carries no momenta "
                             "(default 300)")
    parser.add_argument("--init-temperature", type=float, default=None,
                        help="K: draw initial velocities at this temperature even where DATA carries momenta "
                             "(default: continue from DATA's momenta, e.g. a previous -o file)")
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    parser.add_argument("--pressure", type=pressure_targets, default=None,
                        metavar="P | PX,PY,PZ | PXX,PYY,PZZ,PYZ,PXZ,PXY",
                        help="GPa: barostat (--barostat-method) to this pressure, or with "
                             "--barostat-coupling aniso or tri one per axis (uniaxial stress: 0,0,5), or with tri a "
                             "pressure tensor in Voigt order (P = -stress; shear stress 1 GPa in xy: 0,0,0,0,0,-1); "
                             "bulk systems, "
                             "gradient-force students in any --mode but cudagraphs (default: constant volume)")
    parser.add_argument("--barostat-time", type=float, default=1000.0,
                        help="fs: the barostat's coupling time τ_P (default 1000)")
    parser.add_argument("--barostat-coupling", choices=BAROSTAT_COUPLINGS, default="iso",
                        help="iso: scale the volume, keeping the cell's shape (default); aniso: scale x, y and z "
                             "independently, each to the target pressure; tri: the full cell, shear included "
                             "(solids)")
    parser.add_argument("--barostat-method", choices=BAROSTAT_METHODS, default="berendsen",
                        help="berendsen: LAMMPS' fix press/berendsen, the right mean pressure (default); c-rescale: "
                             "stochastic cell rescaling (Bernetti & Bussi 2020, GROMACS' C-rescale), the NPT "
                             "ensemble's volume fluctuations too (needs --integrator langevin)")
    parser.add_argument("--bulk-modulus", type=float, default=100.0,
                        help="GPa: the bulk modulus the barostat assumes; above the real one it only relaxes "
                             "slower (default 100, safe for liquids and most solids)")
    parser.add_argument("--max-atoms-per-call", type=_atoms_per_call, default="auto",
                        help="atoms per model call: auto (default: every system at once on a GPU, groups of whole "
                             "systems of at most 1024 atoms on a CPU), 0 "
                             "(one call) or N")
    parser.add_argument("--skin", type=float, default=0.0,
                        help="Verlet-list skin in Å (default 0: neighbor list rebuilt every step)")
    parser.add_argument("--mode", choices=STUDENT_MODES, default="eager", help="student mode (default eager; exported models run eager only)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                        help="the model's dtype (default float64; the MD state is float64 either way)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=seed_option, default=None, help="random stream (default: a fresh one; a run continuing an -o file at step k uses (seed, k))")
    parser.add_argument("--max-temperature", type=float, default=None,
                        help="K: stop the run as blown up when a system's temperature passes this (default: 10x "
                             "the highest of --temperature and the initial temperatures, at least 20000 K); atoms "
                             "moving more than 1 Å per step stop it too")
    parser.add_argument("--interval", type=int, default=100,
                        help="report (and trajectory) interval in steps (default 100)")
    parser.add_argument("--trajectory", default=None,
                        help="extxyz file (.xyz, .extxyz, optionally .gz) or ASE trajectory (.traj) for frames "
                             "every --interval steps")
    parser.add_argument("-o", "--output", default=None,
                        help="extxyz file (.xyz, .extxyz, optionally .gz; 8 decimals) or ASE trajectory (.traj; "
                             "full float64: a Verlet run continues as if uninterrupted) for the final frames (a "
                             "restart point; "
                             "also written when the run is interrupted by Ctrl-C or SIGTERM)")


def pressure_targets(text: str):
    """--pressure: one number (GPa), three (x, y, z: [[px, py, pz]] for engine.md.BatchedMD) or six (a tensor
    in Voigt order xx, yy, zz, yz, xz, xy: [[[pxx, pxy, pxz], [pxy, pyy, pyz], [pxz, pyz, pzz]]])."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        return values[0]
    if len(values) == 3:
        return [values]
    if len(values) == 6:  # ASE's Voigt order, as ingest reads stresses
        from ase.stress import voigt_6_to_full_3x3_stress

        return [voigt_6_to_full_3x3_stress(values).tolist()]
    raise argparse.ArgumentTypeError(f"expected one pressure, three (PX,PY,PZ) or six (PXX,PYY,PZZ,PYZ,PXZ,PXY) "
                                     f"in GPa, got {text!r}")


def output_format(path: str, option: str) -> str:
    """The format a frame file is written in, from its name: extended XYZ (momenta, cell, constraints and the
    md_* results ride along, 8 decimals) or an ASE trajectory (.traj: positions and momenta in full float64, a
    bit-exact restart point; info and constraints kept, the md_forces array not). Under another extension ASE
    would read the file back as that format, and fail (a restart from -o)."""
    name = path.lower()
    if name.endswith(".traj"):
        return "traj"
    for compression in (".gz", ".bz2", ".xz"):
        name = name[: -len(compression)] if name.endswith(compression) else name
    if not name.endswith((".xyz", ".extxyz")):
        raise HessforgeError(f"{option} {path}: hessforge md writes extended XYZ or ASE trajectories; name the file "
                             ".xyz, .extxyz or .traj (ASE reads a file by its extension, so a restart from it would "
                             "fail)")
    return "extxyz"


def write_frames(path: str, frames, option: str, append: bool = False, name: Optional[str] = None) -> None:
    """Frames to `path` in the format its name (or `name`, for a temporary file) gives; .traj through ASE's
    Trajectory, since ase.io.write(..., append=True) replaces a .traj file instead of appending."""
    import ase.io

    if output_format(name or path, option) == "traj":
        from ase.io.trajectory import Trajectory

        with Trajectory(path, "a" if append else "w") as trajectory:
            for frame in frames:
                trajectory.write(frame)
    else:
        ase.io.write(path, frames, format="extxyz", append=append)


def run(args) -> int:
    set_threads(args.threads)
    if args.steps < 0 or args.interval < 1 or args.batch_size < 1:
        raise HessforgeError("--steps must be >= 0, --interval and --batch-size >= 1")
    for option, value in (("--temperature", args.temperature), ("--init-temperature", args.init_temperature)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise HessforgeError(f"{option} must be a finite number of K >= 0, got {value}")
    check_max_temperature(args.max_temperature)
    for option, path in (("--trajectory", args.trajectory), ("-o", args.output)):
        if path:  # before the run: it must not end in a traceback, or overwrite its own inputs
            check_output_file(path, option, inputs=(args.data, args.model))
            output_format(path, option)
    check_distinct_outputs({"--trajectory": args.trajectory, "-o": args.output})
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    structures = load_structures(args.data)
    snapshot = None if args.all_frames else last_snapshot(structures, args.data)
    structures = snapshot or structures
    atoms = fill_batch(structures, args.batch_size)
    if len(structures) != args.batch_size:
        print(f"note: {args.data}" + (" (its last step)" if snapshot else "") + f" has {len(structures)} "
              "structure(s); integrating "
              + (f"the first {args.batch_size} (--batch-size)" if len(structures) > args.batch_size
                 else f"{args.batch_size} systems, the structures repeated in turn"), file=sys.stderr)
    moving = sum(1 for a in atoms if a.get_momenta().any())
    if args.init_temperature is not None:
        start_from = f"drawn at {args.init_temperature:g} K"
    elif moving == len(atoms):
        start_from = f"the momenta in {args.data}"
    elif moving == 0:
        start_from = f"drawn at {args.temperature:g} K"
    else:
        start_from = (f"the momenta in {args.data} for the {moving} systems that have them, drawn at "
                      f"{args.temperature:g} K for the other {len(atoms) - moving}")
    print(f"initial velocities: {start_from}", file=sys.stderr)
    (target,) = make_targets(args.model, structures, ["eager"], device, dtype, [], {})
    if not hasattr(target, "student"):
        raise HessforgeError(f"{args.model}: hessforge md runs students (checkpoint, exported file, painn, schnet)")
    model = target.student
    if args.mode != "eager":
        if args.pressure is not None and args.mode == "cudagraphs":
            raise HessforgeError("--pressure needs the student's stress, which --mode cudagraphs does not give: "
                                 "use --mode eager, compiled or a fused mode")
        model, _ = student_for_mode(model, args.mode, device)
    md = BatchedMD(model, atoms, args.timestep, integrator=args.integrator, temperature_K=args.temperature,
                   friction_per_fs=args.friction, skin=args.skin, init_temperature_K=args.init_temperature,
                   device=device, dtype=dtype, seed=args.seed, pressure_GPa=args.pressure,
                   barostat_time_fs=args.barostat_time, bulk_modulus_GPa=args.bulk_modulus,
                   barostat_coupling=args.barostat_coupling, barostat_method=args.barostat_method,
                   max_atoms_per_call=args.max_atoms_per_call)
    earlier = {a.info.get("md_step") for a in atoms}
    if args.init_temperature is None and moving == len(atoms) and len(earlier) == 1:
        (step,) = earlier  # every system continues a previous run's -o: its frames number on from there
        if isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step > 0:
            md.step_offset = int(step)
            if args.seed is not None:  # the run it continues may have had this seed: do not replay its noise
                md.generator.manual_seed(continued_seed(args.seed, int(step)))
    if args.trajectory:  # frame 0 first, then every --interval steps
        write_frames(args.trajectory, md.to_atoms(atoms), "--trajectory")
    start = time.perf_counter()
    reporting = [0.0]  # seconds spent in these reports and trajectory writes: not MD, left out of ns/day

    def report(s: BatchedMD) -> None:
        entered = time.perf_counter()
        elapsed = entered - start - reporting[0]
        t = s.temperature()
        e = s.total_energy()
        npt = ""
        if s.barostat:
            p, v = s.pressure() / units.GPa, s.volume() / s.natoms
            npt = (f"P mean {float(p.mean()):.3f} GPa (min {float(p.min()):.3f}, max {float(p.max()):.3f}), "
                   f"V mean {float(v.mean()):.3f} Å³/atom, ")
        print(f"step {s.nsteps}: T mean {float(t.mean()):.1f} K (min {float(t.min()):.1f}, max {float(t.max()):.1f}), "
              f"{npt}E_tot mean {float(e.mean()):.4f} eV, {ns_per_day(s.nsteps * s.nsystems / elapsed):.3g} ns/day "
              f"at 1 fs ({s.nsystems} systems), {s.neighbor_builds} neighbor-list builds", file=sys.stderr)
        if args.trajectory:
            write_frames(args.trajectory, s.to_atoms(atoms), "--trajectory", append=True)
        reporting[0] += time.perf_counter() - entered

    limit = blow_up_temperature(args, md)
    failure = None
    with _StopRequest() as stop:  # Ctrl-C / SIGTERM end the run at a whole step, and -o is still written
        while md.nsteps < args.steps and stop.signal is None:
            md.step(1, callback=report, interval=args.interval)  # its own errors leave a half-made step: no -o
            try:
                check_not_blown_up(md, limit, atoms)
            except HessforgeError as err:  # after a whole step: that step's state still goes to -o
                failure = err
                break
    elapsed = time.perf_counter() - start - reporting[0]
    if md.nsteps:
        rate = md.nsteps * md.nsystems / elapsed
        print(f"{md.nsteps} steps x {md.nsystems} systems in {elapsed:.1f} s of MD (+ {reporting[0]:.1f} s of "
              f"reports and trajectory): {ns_per_day(rate):.3g} ns/day "
              f"counted at 1 fs per step, {ns_per_day(rate) * args.timestep:.3g} ns/day simulated "
              f"at the {args.timestep} fs step; {md.neighbor_builds} neighbor-list builds")
    if args.output:
        with atomic_path(args.output) as tmp:  # -o may be a restart file: never half-written
            write_frames(tmp, md.to_atoms(atoms), "-o", name=args.output)
        print(f"wrote {args.output}" + (f" (the state at step {md.nsteps + md.step_offset}, where the run stopped)"
                                        if failure is not None else ""), file=sys.stderr)
    if failure is not None:
        raise failure
    if stop.signal is not None:
        raise KeyboardInterrupt(f"{stop.signal} after step {md.nsteps} of {args.steps}; "
                                + (f"that step's state is in {args.output} (continue from it as DATA)" if args.output
                                   else "nothing saved (no -o)"))
    return 0


# a default --max-temperature never below this: quenches and 0 K targets, and systems of few atoms, whose
# temperature is a few degrees of freedom's (a stretched diatomic's 0.7 eV is 5600 K under Verlet)
BLOW_UP_FLOOR_K = 20000.0
MAX_STEP_DISPLACEMENT = 1.0  # Å per step (|v| dt): ~10x what an H atom at 3000 K moves in 2 fs


def check_max_temperature(value: Optional[float]) -> None:
    if value is not None and not value > 0:
        raise HessforgeError(f"--max-temperature must be > 0 K, got {value}")


def blow_up_temperature(args, md) -> float:
    """--max-temperature, or 10x the highest of the target and the initial temperatures, at least 20000 K."""
    if args.max_temperature is not None:
        return float(args.max_temperature)
    start = float(md.temperature().max()) if md.nsystems else 0.0
    return max(BLOW_UP_FLOOR_K, 10.0 * max(args.temperature or 0.0, start))


def check_not_blown_up(md, limit_K: float, atoms) -> None:
    """A run that blew up stays finite once atoms fly apart beyond the cutoff (no forces act on them), so
    non-finite numbers alone never stop it: a system hotter than `limit_K`, or an atom whose velocity carries it
    more than MAX_STEP_DISPLACEMENT in one step (velocities, not position differences: a barostat's rescaling
    moves far atoms), ends the run naming the system and the step."""
    step = md.nsteps + md.step_offset
    hot = md.temperature()
    if bool((hot > limit_K).any()):
        k = int(torch.argmax(hot))
        raise HessforgeError(f"the dynamics blew up at step {step}: system {k} ({atoms[k].get_chemical_formula()}) "
                             f"is at {float(hot[k]):.4g} K, over the {limit_K:.4g} K limit (--max-temperature); a "
                             "shorter --timestep, or a model that is stable for these structures")
    per_step = md.velocities.norm(dim=1) * md.dt
    if bool((per_step > MAX_STEP_DISPLACEMENT).any()):
        k = int(md.batch[int(torch.argmax(per_step))])
        raise HessforgeError(f"the dynamics blew up at step {step}: an atom of system {k} "
                             f"({atoms[k].get_chemical_formula()}) moves {float(per_step.max()):.3g} Å per step "
                             f"(more than {MAX_STEP_DISPLACEMENT:g}); a shorter --timestep")


class _StopRequest:
    """SIGINT / SIGTERM during the run set `signal` (its name), so the loop stops between two steps, where
    positions, momenta and forces belong together; a second one stops at once."""

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped mid-step, nothing saved")
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
