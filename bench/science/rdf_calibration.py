"""Calibration of md-eval's RDF stability criterion (training/md_eval.py, RdfCriterion): Langevin runs of
crystals that stay crystalline and of ones that melt or restructure, with the relative RDF change h(t) traced
(never stopped) and the mean-squared displacement as an independent sign of a structure change.
Results: bench/results/md_stability_rdf_cpu.md.

Usage, from the repository root with the venv active:
    python bench/science/rdf_calibration.py [--student RUN/best.pt] [--chgnet] [--json OUT]
EMT copper and a Lennard-Jones diamond always; --student adds a PaiNN trained on CHGNet's Si (the materials
study, bench/science/materials.sh) from the study's ideal lattice and test frames; --chgnet adds CHGNet itself.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from training.md_eval import DEFAULTS, nvt_stability  # noqa: E402


def trace(atoms, calc, temperature: float, steps: int, seed: int = 0) -> dict:
    """md-eval's NVT run (1 fs, friction 0.01/fs, checks every 10 steps) with the RDF criterion never stopping
    it (tolerance inf; only its hard checks do): h(t) at every check, the first check where it exceeds the
    default tolerance, and the MSD at the end."""
    r = nvt_stability(atoms, calc, steps=steps, temperature_K=temperature, seed=seed, criterion="rdf",
                      rdf_tolerance=math.inf, trace=True)
    hs = np.asarray(r["trace"])
    over = np.flatnonzero(hs > DEFAULTS["rdf_tolerance"])
    return {"max_change": float(hs.max()) if len(hs) else None, "final_change": float(hs[-1]) if len(hs) else None,
            "first_over_tolerance_ps": float((over[0] + 1) * 0.01) if len(over) else None,
            "hard_failure": r["reason"], "msd_end_A2": r["msd_end_A2"], "simulated_ps": r["simulated_ps"],
            "wall_s": r["wall_s"], "trace_every_100fs": [round(float(h), 3) for h in hs[9::10]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="a Si student checkpoint (runs/si_chgnet/RUN/best.pt)")
    parser.add_argument("--work", default="runs/si_chgnet", help="the materials study's work directory")
    parser.add_argument("--chgnet", action="store_true", help="also CHGNet (slow: ~0.1-0.3 s per step)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import torch
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.lj import LennardJones

    torch.set_num_threads(1)
    cu = lambda a, n=2: bulk("Cu", "fcc", a=a, cubic=True).repeat(n)  # noqa: E731
    cases = [("EMT Cu fcc, 32 atoms", "crystal", cu(3.61), EMT, 300, 3000),
             ("EMT Cu fcc, 32 atoms", "crystal", cu(3.61), EMT, 1000, 3000),
             ("EMT Cu fcc, 108 atoms", "crystal", cu(3.61, 3), EMT, 1000, 3000),
             ("EMT Cu fcc, 32 atoms, superheated at fixed volume", "crystal", cu(3.61), EMT, 3000, 3000),
             ("EMT Cu fcc, 32 atoms, expanded 8 % (a = 3.9 Å)", "melts", cu(3.9), EMT, 2000, 3000),
             ("Lennard-Jones diamond (not a stable structure for LJ)", "restructures",
              bulk("Si", "diamond", a=5.43, cubic=True).repeat(2),
              lambda: LennardJones(sigma=2.35 / 2 ** (1 / 6), epsilon=0.2, rc=5.0, smooth=True), 300, 3000)]
    models = []
    if args.student:
        from engine import Calculator
        models.append((f"PaiNN student ({os.path.basename(os.path.dirname(args.student))})",
                       lambda: Calculator(args.student, dtype="float64")))
    if args.chgnet:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from si_chgnet import chgnet_calculator
        models.append(("CHGNet", chgnet_calculator))
    if models:
        from training.data import Dataset
        split = json.load(open(os.path.join(args.work, "split.json")))["splits"]
        hot = Dataset(os.path.join(args.work, "data.lmdb"))[split["test"][0]].to_atoms()  # CHGNet, 1000 K
        ideal = bulk("Si", "diamond", a=5.4706, cubic=True).repeat(2)
        for name, make in models:
            cases += [(f"{name}, Si ideal lattice", "crystal", ideal, make, 300, 1000),
                      (f"{name}, Si ideal lattice", "crystal", ideal, make, 1000, 1000),
                      (f"{name}, Si 1000 K test frame", "crystal", hot, make, 1000, 1000),
                      (f"{name}, Si 1000 K test frame", "melts (Tm 1687 K)", hot, make, 2500, 3000)]
    results = []
    print("| system | expected | T (K) | ps | max h | final h | first h > 0.25 (ps) | hard failure | MSD end (Å²) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for name, expected, atoms, make, temperature, steps in cases:
        r = dict(trace(atoms, make(), temperature, steps), system=name, expected=expected,
                 temperature_K=temperature, steps=steps)
        results.append(r)
        fmt = lambda v, f=".2f": "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {name} | {expected} | {temperature} | {r['simulated_ps']:.1f} | {fmt(r['max_change'])} | "
              f"{fmt(r['final_change'])} | {fmt(r['first_over_tolerance_ps'])} | {r['hard_failure'] or '-'} | "
              f"{r['msd_end_A2']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
