"""`hessforge report RUN_DIR... -o OUT_DIR`: the paper-style table and plots from run directories.

Each RUN_DIR is a training run (trainer output) that may hold, beside best.pt / config.yaml / summary.json:
  RUN/eval.json   `hessforge evaluate RUN/best.pt DATA --labels LABELS --json RUN/eval.json`
                  (student_vs_reference: force and energy MAE; teacher_vs_reference: the teacher's row)
  RUN/bench.json  `hessforge bench RUN/best.pt DATA --compare TEACHER --sweep --json RUN/bench.json`
                  (ns/day at batch 64 and at the best batch size; the teacher's ns/day for the speedup)
  RUN/md.json     `hessforge md-eval RUN DATA --reference TEACHER` (NVT stability, NVE drift, FIRE)
A missing file or number is shown as '-'. The method name is the directory name unless --names is given.

Writes OUT_DIR/report.md (tables), OUT_DIR/report.json (the collected numbers) and three PNG plots:
mae_per_method.png, md_stability.png (fraction of NVT trajectories stable vs time), speed_vs_accuracy.png
(force MAE against ns/day at batch 64, log x; hollow markers: the best batch size).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, Optional, Sequence

from engine.errors import HessforgeError
from engine.paths import atomic_open, check_output_dir, write_json
from training.md_eval import DEFAULTS as MD_DEFAULTS

EVAL, BENCH, MD = "eval.json", "bench.json", "md.json"
PAPER_BATCH = 64


def _load(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise HessforgeError(f"{path}: not readable JSON ({err})") from None


def _throughput(entry: Dict, key: str) -> Optional[float]:
    """A bench entry's `key` (ns_per_day, atom_steps_per_s): neighbor list included where measured."""
    t = entry.get("model_nl") or entry.get("model")
    return t.get(key) if t else None


def _ns_per_day(entry: Dict) -> Optional[float]:
    return _throughput(entry, "ns_per_day")


def _atom_steps(entry: Dict) -> Optional[float]:
    return _throughput(entry, "atom_steps_per_s")


def _key(entry: Dict) -> tuple:
    return entry.get("name"), entry.get("mode")


def bench_numbers(bench: Dict, batch: int = PAPER_BATCH) -> Dict:
    """Student and teacher ns/day at `batch` and at their best batch from a `hessforge bench --json` file:
    at `batch` the fixed-batch run's measurement (the sweep's at that size where there is none; the faster of
    two noisy timings would flatter both); the best batch by atom-steps/s, and the best-vs-best speedup as the
    ratio of atom-steps/s (the two best batches may hold structures of different mean size). The teacher is the bench reference when it was given with --compare (files from before the
    "compare" field: the reference); the student is the first other entry (eager first)."""
    entries = list(bench.get("fixed", [])) + [r for s in bench.get("sweeps", []) for r in s.get("results", [])]
    reference = tuple(bench.get("reference") or ())
    if bench.get("compare") == []:  # no teacher: the reference is the first MODEL, a student
        reference = ()
    others = [e for e in entries if _key(e) != reference]
    if not others:  # a bench of the student alone
        others, reference = entries, ()
    if not others:
        return {}
    modes = [e.get("mode") for e in others]
    student_key = _key(next((e for e in others if e.get("mode") == "eager"), others[0])) if "eager" in modes \
        else _key(others[0])

    n_fixed = len(bench.get("fixed", []))

    def at(key, b):
        vals = [_ns_per_day(e) for e in entries if _key(e) == key and e.get("batch_size") == b]
        fixed = [_ns_per_day(e) for e in entries[:n_fixed] if _key(e) == key and e.get("batch_size") == b]
        vals = [v for v in (fixed or vals) if v is not None]
        return vals[0] if vals else None

    def best(key):  # from the sweeps only: without one a fixed batch is not a "best batch"
        score = lambda e: _atom_steps(e) if _atom_steps(e) is not None else _ns_per_day(e)  # noqa: E731
        cands = [e for e in entries[n_fixed:] if _key(e) == key and score(e) is not None]
        if not cands:
            return None, None, None
        e = max(cands, key=score)
        return _ns_per_day(e), e.get("batch_size"), _atom_steps(e)

    out = {"student": f"{student_key[0]} [{student_key[1]}]", "ns_day_64": at(student_key, batch)}
    out["ns_day_best"], out["best_batch"], out["atom_steps_best"] = best(student_key)
    if reference:
        out["teacher"] = reference[0]
        out["teacher_ns_day_64"] = at(reference, batch)
        out["teacher_ns_day_best"], out["teacher_best_batch"], out["teacher_atom_steps_best"] = best(reference)
    out["machine"] = bench.get("machine", {})
    return out


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def collect(run_dirs: Sequence[str], names: Optional[Sequence[str]] = None, batch: int = PAPER_BATCH) -> Dict:
    """{"methods": [row...], "teacher": row or None}: one row of numbers per run directory."""
    if names is not None and len(names) != len(run_dirs):
        raise HessforgeError(f"--names gives {len(names)} names for {len(run_dirs)} run directories")
    rows, teacher = [], None
    accuracy_of, speed_of = {}, {}  # teacher name -> runs whose eval.json labels / bench.json reference it is
    for k, run in enumerate(run_dirs):
        if not os.path.isdir(run):
            raise HessforgeError(f"run directory not found: {run}")
        name = names[k] if names else os.path.basename(os.path.normpath(run))
        try:
            row, teacher = _collect_run(run, name, batch, teacher)
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as err:  # e.g. a hand-edited JSON
            raise HessforgeError(f"{run}: unexpected content in {EVAL}, {BENCH} or {MD} "
                                 f"({type(err).__name__}: {err}); regenerate it") from None
        rows.append(row)
        for key, seen in (("labels_teacher", accuracy_of), ("bench_teacher", speed_of)):
            if row.get(key):
                seen.setdefault(row[key], []).append(name)
    notes = []
    if teacher is not None:
        teacher["sources"] = {}
        acc, speed = teacher.get("accuracy_name"), teacher.get("speed_name")
        if acc and speed and acc != speed:
            teacher["method"] = f"teacher ({acc}; ns/day: {speed})"
            notes.append(f"The teacher row's MAE is {acc}'s (the labels the runs were evaluated with); its ns/day "
                         f"is {speed}'s (the `hessforge bench --compare` model), another model.")
        else:
            teacher["method"] = f"teacher ({acc or speed})" if (acc or speed) else "teacher"
    for what, seen, key in (("MAE", accuracy_of, "accuracy_name"), ("ns/day", speed_of, "speed_name")):
        if len(seen) > 1:
            notes.append(f"The runs were measured against different teachers ({what}: " +
                         "; ".join(f"{t}: {', '.join(runs)}" for t, runs in seen.items()) +
                         f"); the teacher row shows {teacher.get(key)}, each run's speedup is over its own.")
    return {"methods": rows, "teacher": teacher, "batch": batch, "notes": notes}


def _collect_run(run: str, name: str, batch: int, teacher: Optional[Dict]):
    """(the run's row, the teacher row so far) from the JSON files of one run directory."""
    ev, be, md = (_load(os.path.join(run, f)) for f in (EVAL, BENCH, MD))
    row: Dict = {"method": name, "run_dir": os.path.abspath(run),
                 "sources": {f: os.path.exists(os.path.join(run, f)) for f in (EVAL, BENCH, MD)}}
    if ev:
        ref = ev.get("student_vs_reference", {})
        row["force_mae"] = ref.get("forces_mae_mev_per_A")
        row["energy_mae"] = ref.get("energy_mae_mev_per_atom")
        row["n_test"] = ev.get("n_structures")
        row["eval_split"] = ev.get("split")
        row["labels_teacher"] = ev.get("teacher")  # recorded by evaluate since labels name their teacher
        if teacher is None and "teacher_vs_reference" in ev:
            t = ev["teacher_vs_reference"]
            teacher = {"method": "teacher", "force_mae": t.get("forces_mae_mev_per_A"),
                       "energy_mae": t.get("energy_mae_mev_per_atom"), "accuracy_name": ev.get("teacher")}
    if be:
        b = bench_numbers(be, batch)
        row.update({k2: b.get(k2) for k2 in ("ns_day_64", "ns_day_best", "best_batch")})
        row["speedup_64"] = _ratio(b.get("ns_day_64"), b.get("teacher_ns_day_64"))
        row["speedup_best"] = (_ratio(b.get("atom_steps_best"), b.get("teacher_atom_steps_best"))
                               if b.get("atom_steps_best") and b.get("teacher_atom_steps_best")
                               else _ratio(b.get("ns_day_best"), b.get("teacher_ns_day_best")))
        row["bench_machine"] = b.get("machine", {}).get("cpu")
        row["bench_teacher"] = b.get("teacher")
        if b.get("teacher"):
            teacher = teacher or {"method": "teacher"}
            if teacher.get("ns_day_64") is None:
                teacher.update({"speed_name": b["teacher"], "ns_day_64": b.get("teacher_ns_day_64"),
                                "ns_day_best": b.get("teacher_ns_day_best"),
                                "best_batch": b.get("teacher_best_batch"), "speedup_64": 1.0,
                                "speedup_best": 1.0})
    if md:
        nvt, nve, opt = md.get("nvt"), md.get("nve"), md.get("opt")
        if nvt:
            row["md_fraction_stable"] = nvt.get("fraction_survived")
            row["md_n"] = len(nvt.get("trajectories", []))
            row["md_ps"] = nvt.get("simulated_ps_per_trajectory")
            row["md_mean_ttf_ps"] = nvt.get("mean_time_to_failure_ps_censored")
            row["md_curve"] = {"time_ps": nvt.get("time_ps", []), "fraction_stable": nvt.get("fraction_stable", [])}
        if nve and "skipped" not in nve:
            for stat in ("mean", "median"):
                d = nve.get(f"{stat}_abs_drift_eV_per_atom_per_ps")
                row[f"nve_drift_{stat}"] = 1000 * d if d is not None else None  # meV/atom/ps
            row["nve_completed"] = nve.get("n_completed")
            row["nve_runs"] = nve.get("n_runs")
        if opt:
            row["opt_converged"] = opt.get("fraction_converged")
            for stat in ("mean", "median"):
                row[f"opt_ref_fmax_{stat}"] = opt.get(f"{stat}_reference_fmax_eV_per_A")
                e = opt.get(f"{stat}_energy_above_reference_minimum_eV")
                row[f"opt_above_ref_min_mev_{stat}"] = 1000 * e if e is not None else None
        row["md_reference"] = md.get("reference")
        row["md_settings"] = md.get("settings")
    return row, teacher


def _describe_md(s: Dict) -> str:
    """The md-eval settings a run used (its md.json "settings"), as the report's footnote states them."""
    g = lambda key: s.get(key, MD_DEFAULTS.get(key))  # noqa: E731 (files from before a setting existed)
    bonds = f"a bond deviates > {g('bond_tolerance_A'):g} Å from its starting length"
    rdf = (f"its radial distribution function changes by > {g('rdf_tolerance'):g} (relative) from its thermalized "
           f"start, over {g('rdf_window_fs'):g} fs windows")
    crit = g("criterion")
    rule = bonds if crit == "bonds" else rdf if crit == "rdf" else f"{bonds} (molecules) or {rdf} (bulk)"
    return (f"NVT: Langevin {g('temperature_K'):g} K, {g('timestep_fs'):g} fs, {g('steps')} steps, friction "
            f"{g('friction_per_fs'):g}/fs from held-out structures, unstable when {rule} (censored mean: a survivor "
            f"counts as the full length). NVE: |slope| of a line fit to the total energy per atom vs time, "
            f"{g('nve_steps')} steps of {g('nve_timestep_fs'):g} fs from the same structures at "
            f"{g('temperature_K'):g} K. FIRE to {g('fmax'):g} eV/Å (the reference's own minimum: "
            + (f"BFGS to {s['reference_fmax']:g} eV/Å" if "reference_fmax" in s else f"FIRE to {g('fmax'):g} eV/Å")
            + ")")


def md_note(report: Dict) -> str:
    """The footnote's MD part: the settings the runs used (one text when they agree, per run when not)."""
    runs = [(r["method"], r["md_settings"]) for r in report["methods"] if r.get("md_settings")]
    texts = {}
    for name, settings in runs:
        texts.setdefault(_describe_md(settings), []).append(name)
    if not texts:
        return _describe_md({})
    if len(texts) == 1:
        return next(iter(texts))
    return "MD settings differ between runs: " + " | ".join(f"{', '.join(names)}: {text}" for text, names in texts.items())


def split_note(report: Dict) -> str:
    splits = sorted({str(r.get("eval_split")) for r in report["methods"] if r.get("eval_split")})
    if not splits:
        return "the evaluated split"
    return f"the {splits[0]} split" if len(splits) == 1 else f"the runs' own splits ({', '.join(splits)})"


def _f(x, fmt="{:.2f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def _speed(x) -> str:
    """3 significant digits like the bench tables (10.0, 291, 1827)."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0 or abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.{max(0, 2 - int(math.floor(math.log10(abs(x)))))}f}"


def markdown(report: Dict) -> str:
    batch = report.get("batch", PAPER_BATCH)
    rows = ([report["teacher"]] if report.get("teacher") else []) + report["methods"]
    lines = [f"| Method | Force MAE (meV/Å) | Energy MAE (meV/atom) | ns/day (batch {batch}) | ns/day (best batch) "
             f"| Speedup (batch {batch}) | Speedup (best) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = _speed(r.get("ns_day_best"))
        if best != "-" and r.get("best_batch"):
            best += f" (batch {r['best_batch']})"
        lines.append(f"| {r['method']} | {_f(r.get('force_mae'))} | {_f(r.get('energy_mae'))} | "
                     f"{_speed(r.get('ns_day_64'))} | {best} | {_f(r.get('speedup_64'), '{:.1f}x')} | "
                     f"{_f(r.get('speedup_best'), '{:.1f}x')} |")
    lines += ["", "| Method | NVT stable (fraction, of n, for t ps) | mean time to failure (ps, censored) | "
              "NVE \\|drift\\| mean / median (meV/atom/ps) | NVE runs without a broken bond | FIRE converged | "
              "reference fmax at student minima, mean / median (eV/Å) | E_ref above reference minima, mean / median "
              "(meV) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def pair(a, b, fmt):
        return "-" if a is None and b is None else f"{_f(a, fmt)} / {_f(b, fmt)}"

    for r in report["methods"]:
        stable = "-"
        if r.get("md_fraction_stable") is not None:
            stable = f"{r['md_fraction_stable']:.2f} of {r.get('md_n')}, {_f(r.get('md_ps'), '{:.3g}')} ps"
        done = f"{r['nve_completed']} of {r['nve_runs']}" if r.get("nve_runs") is not None else "-"
        lines.append(f"| {r['method']} | {stable} | {_f(r.get('md_mean_ttf_ps'), '{:.3f}')} | "
                     f"{pair(r.get('nve_drift_mean'), r.get('nve_drift_median'), '{:.3g}')} | {done} | "
                     f"{_f(r.get('opt_converged'))} | "
                     f"{pair(r.get('opt_ref_fmax_mean'), r.get('opt_ref_fmax_median'), '{:.3f}')} | "
                     f"{pair(r.get('opt_above_ref_min_mev_mean'), r.get('opt_above_ref_min_mev_median'), '{:.1f}')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(report: Dict, row: Dict) -> str:
    """Gray for the teacher, C0, C1... for the methods in order (the same in every plot)."""
    if row is report.get("teacher"):
        return "0.5"
    return f"C{next(i for i, r in enumerate(report['methods']) if r is row) % 10}"


def plot_mae(report: Dict, path: str) -> None:
    plt = _plt()
    rows = ([report["teacher"]] if report.get("teacher") else []) + report["methods"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(rows) + 3), 3.6))
    for ax, key, title in ((axes[0], "force_mae", "Force MAE (meV/Å)"), (axes[1], "energy_mae", "Energy MAE (meV/atom)")):
        vals = [r.get(key) for r in rows]
        x = range(len(rows))
        ax.bar(x, [v if v is not None else 0 for v in vals],
               color=[_color(report, r) for r in rows])
        top = max([v for v in vals if v is not None] or [1.0])
        ax.set_ylim(0, 1.15 * top)
        for i, v in enumerate(vals):
            ax.text(i, v if v is not None else 0, _f(v, "{:.1f}") if v is not None else "n/a", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_stability(report: Dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = 0
    for i, r in enumerate(report["methods"]):
        curve = r.get("md_curve")
        if curve and curve.get("time_ps"):
            ax.step(curve["time_ps"], curve["fraction_stable"], where="post", label=f"{r['method']} (n={r.get('md_n')})",
                    color=_color(report, r), lw=2 - 0.3 * (drawn % 3), alpha=0.85)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no md.json in any run directory", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("fraction of NVT trajectories stable")
    ax.set_ylim(-0.05, 1.05)
    if drawn:
        ax.legend(fontsize=8, loc="lower left")
    tolerances = {(r["md_settings"].get("criterion"), r["md_settings"].get("bond_tolerance_A"))
                  for r in report["methods"] if r.get("md_settings")}
    crit, tol = next(iter(tolerances)) if len(tolerances) == 1 else (None, None)
    ax.set_title("MD stability" + (f" (bond deviation ≤ {tol:g} Å)" if crit == "bonds" and tol else
                                   " (criteria: report.md)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speed_accuracy(report: Dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rows = ([report["teacher"]] if report.get("teacher") else []) + report["methods"]
    drawn, xs = 0, []
    for i, r in enumerate(rows):
        y = r.get("force_mae")
        color = _color(report, r)
        if y is None:
            continue
        xs += [x for x in (r.get("ns_day_64"), r.get("ns_day_best")) if x is not None and x > 0]
        if r.get("ns_day_64") is not None:
            ax.scatter([r["ns_day_64"]], [y], color=color, s=40, label=r["method"], zorder=3)
            ax.annotate(r["method"], (r["ns_day_64"], y), textcoords="offset points", xytext=(5, 4), fontsize=7)
            drawn += 1
        if r.get("ns_day_best") is not None:
            ax.scatter([r["ns_day_best"]], [y], facecolors="none", edgecolors=color, s=40, zorder=3)
            drawn += 1
    if drawn and xs:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        lo, hi = min(xs) / 2, max(xs) * 6  # room for the labels right of the points; at least a decade shown
        if hi / lo < 10:
            mid = math.sqrt(lo * hi)
            lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
        ax.set_xlim(lo, hi)
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.text(0.5, 0.5, "needs eval.json and bench.json", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"ns/day (filled: batch {report.get('batch', PAPER_BATCH)}, hollow: best batch)")
    ax.set_ylabel("force MAE (meV/Å)")
    ax.set_title("speed vs accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PLOTS = {"mae_per_method.png": plot_mae, "md_stability.png": plot_stability,
         "speed_vs_accuracy.png": plot_speed_accuracy}


def write_report(run_dirs: Sequence[str], out_dir: str, names: Optional[Sequence[str]] = None,
                 title: str = "hessforge report", notes: Sequence[str] = (), batch: int = PAPER_BATCH) -> Dict:
    report = collect(run_dirs, names, batch)
    check_output_dir(out_dir, "report -o")
    os.makedirs(out_dir, exist_ok=True)
    for fname, fn in PLOTS.items():
        fn(report, os.path.join(out_dir, fname))
    machines = sorted({r.get("bench_machine") for r in report["methods"] if r.get("bench_machine")})
    refs = sorted({str(r.get("md_reference")) for r in report["methods"] if r.get("md_reference")})
    text = [f"# {title}", "", markdown(report), "",
            f"Force and energy MAE: {split_note(report)} against the dataset's reference labels (`eval.json`); the teacher "
            "row is the teacher against the same labels. ns/day counts one 1 fs step per structure of a batch "
            "(1 fs per step, bench/README.md), neighbor list included, bench's fixed-batch measurement at that batch "
            "size; best = the sweep's batch with the most atom-steps/s; speedup = the student's throughput over the "
            "teacher's from the same `bench.json` (same machine; at the best batches in atom-steps/s)." + (f" Bench machine: {', '.join(machines)}." if machines else ""),
            "", md_note(report) + ", then the final structures under the reference" + (f" ({', '.join(refs)})" if refs else "") + ". "
            "'-' = not measured (file missing from the run directory).", "",
            "![MAE per method](mae_per_method.png)", "", "![MD stability](md_stability.png)", "",
            "![speed vs accuracy](speed_vs_accuracy.png)", "", "Sources:", ""]
    for r in report["methods"]:
        have = ", ".join(f"{f} {'yes' if ok else 'missing'}" for f, ok in r["sources"].items())
        text.append(f"- {r['method']}: `{os.path.relpath(r['run_dir'], os.path.abspath(out_dir))}` ({have})")
    notes = list(report["notes"]) + list(notes)
    if notes:
        text += [""] + notes
    with atomic_open(os.path.join(out_dir, "report.md")) as fh:
        fh.write("\n".join(text) + "\n")
    write_json(os.path.join(out_dir, "report.json"), report)
    return report


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories")
    parser.add_argument("-o", "--out", required=True, help="output directory (report.md, report.json, PNGs)")
    parser.add_argument("--names", help="comma-separated method names, one per RUN_DIR (default: directory names)")
    parser.add_argument("--title", default="hessforge report")
    parser.add_argument("--batch", type=int, default=PAPER_BATCH, help="the fixed batch size column (default 64)")
    parser.add_argument("--note", action="append", default=[], help="a paragraph appended to report.md")


def run(args) -> int:
    if args.batch < 1:
        raise HessforgeError(f"--batch must be >= 1, got {args.batch}")
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    report = write_report(args.runs, args.out, names, args.title, args.note, args.batch)
    for row in report["methods"]:
        if not any(row["sources"].values()):
            print(f"warning: {row['run_dir']} has none of {', '.join(row['sources'])}: its row is empty (run "
                  "`hessforge evaluate ... --json RUN/eval.json`, bench --json RUN/bench.json and md-eval in "
                  "the run directory first)", file=sys.stderr)
    print(markdown(report))
    print(f"wrote {os.path.join(args.out, 'report.md')} and {len(PLOTS)} plots", file=sys.stderr)
    return 0
