"""`hessforge sweep BASE.yaml -o DIR [--run]`: the paper's baselines beside Hessian KD, one config each.

From one base config (the student, data, split, optimizer and loss weights λ_U / λ_F), writes into DIR one
training config per run, differing from the base only in the distillation terms:

    undistilled      λ_KD = 0, no other teacher term
    force_distill    teacher forces as extra targets (weight: --force-distill-weight, default λ_F)
    n2n              teacher per-atom features through a learned projection (labels made with --features)
    a2a              teacher per-element embeddings through a learned projection (labels made with
                     --embeddings; teachers that have them, e.g. MACE; ANI-1x has none)
    kd_s1            Hessian KD, s = 1 sampled row per structure and step, λ_KD halving on
    kd_s4            the same with s = 4
    kd_s1_nohalve    s = 1 without the λ_KD halving
    kd_lambda{λ}     s = 1, halving on, λ_KD in --lambdas (default 10, 100, 400, 1000)
    undistilled_u{w}, kd_s1_u{w}
                     with --energy-weights w1,w2,...: undistilled and kd_s1 at energy weight λ_U = w (the
                     right λ_U depends on the data: bench/results/quickstart_cpu.md). Compare these runs by
                     their unweighted validation errors (summary.json best_val, printed at the end of --run),
                     not by their weighted losses.

λ_KD of the kd_* runs is the base's loss.hessian (400 when the base is undistilled). A λ-sweep entry equal to
kd_s1 is not trained twice: DIR/sweep.json lists it as an alias. Baselines the labels cannot support (n2n
without stored features, a2a without embeddings, s = 4 with fewer than 4 stored rows) are skipped, with the
reason, in sweep.json. All runs share the split (same data, split seed and fractions) and seed.

The n2n/a2a weights are not tuned here: pass several (--n2n-weight 10,100,1000) to compare. The default,
100, is set from a measurement, not a search: ANI-1x last-hidden-layer features have per-atom norms ~0.5 and
spread ~0.2 about their element's mean (MACE invariant features: ~1.1 and ~0.15 on the toy set), so with the
l2mae norm a weight of 100 makes the n2n term, at the level of a good fit, comparable to λ_F = 100 times a
force error of ~0.1-0.3 eV/Å; a weight of 1 would make it negligible. (Kelvinius et al. used 10 with an MSE
over components of PaiNN-sized features on OC20.) a2a is weak by construction: a linear Q from F ≥ #elements
dimensions can map the few student embeddings onto any teacher embeddings exactly, so its term can reach zero
while constraining little; it is kept because the paper compares against it.

With --run the runs are trained one after the other in this process; a run whose DIR/NAME/summary.json exists
is skipped, and an interrupted run resumes from its last.pt, so rerunning the same command continues a
sweep. A failing run is reported and the sweep goes on with the next.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from engine.errors import HessforgeError
from engine.paths import atomic_open, check_output_dir, write_json
from training.config import Config, config_from_dict, load_config, without_resumable

DEFAULT_LAMBDAS = (10.0, 100.0, 400.0, 1000.0)
DEFAULT_KD_LAMBDA = 400.0
INDEX = "sweep.json"


def _fmt(x: float) -> str:
    return f"{float(x):g}"


def _with(base: Config, out: str, **loss) -> Config:
    """A copy of `base` with every teacher term off except those in `loss`, writing to `out`."""
    cfg = copy.deepcopy(base)
    for key, value in {**dict(hessian=0.0, force_distill=0.0, n2n=0.0, a2a=0.0), **loss}.items():
        setattr(cfg.loss, key, value)
    cfg.train.out = out
    return cfg


def _weights(name: str, values) -> List[float]:
    if values is None:
        return []
    if isinstance(values, (int, float)):
        values = [values]
    out = [float(v) for v in values]
    if not out or any(not v > 0 for v in out):
        raise HessforgeError(f"{name} must be positive numbers, got {values!r}")
    return out


def baseline_configs(base: Config, out_dir: str, labels_metadata: Optional[dict] = None,
                     lambdas: Sequence[float] = DEFAULT_LAMBDAS, force_distill_weight: Optional[float] = None,
                     n2n_weights=(100.0,), a2a_weights=(100.0,), energy_weights: Sequence[float] = ()
                     ) -> Tuple[List[dict], List[dict], Dict[str, str]]:
    """(runs, skipped, aliases): runs are {name, description, config (a Config)}; skipped {name, reason};
    aliases {λ-sweep name: the run it equals}. `labels_metadata` (LabelStore.metadata of base.data.labels)
    decides which baselines the labels support; None: read it from base.data.labels."""
    if not base.data.labels:
        raise HessforgeError("the baseline sweep needs teacher labels: set data.labels in the base config "
                             "(hessforge label; --features for n2n, --embeddings for a2a)")
    if labels_metadata is None:
        from training.labels import LabelStore

        labels_metadata = LabelStore(base.data.labels).metadata
    out_dir = os.path.abspath(out_dir)
    lambdas = _weights("λ_KD values (--lambdas)", list(lambdas))
    energy_weights = _weights("--energy-weights", list(energy_weights)) if len(energy_weights) else []
    lam = float(base.loss.hessian) if base.loss.hessian > 0 else DEFAULT_KD_LAMBDA
    fd = float(base.loss.forces) if force_distill_weight is None else _weights("--force-distill-weight",
                                                                             force_distill_weight)[0]
    n2n = _weights("--n2n-weight", n2n_weights)
    a2a = _weights("--a2a-weight", a2a_weights)
    where = base.data.labels
    runs: List[dict] = []
    skipped: List[dict] = []
    aliases: Dict[str, str] = {}

    def add(name, description, **loss):
        runs.append({"name": name, "description": description,
                     "config": _with(base, os.path.join(out_dir, name), **loss)})

    add("undistilled", "no teacher term (λ_KD = 0)")
    add("force_distill", f"teacher forces as extra targets, weight {_fmt(fd)}", force_distill=fd)
    for kind, weights, meta_key, flag in (("n2n", n2n, "features", "--features"),
                                          ("a2a", a2a, "element_embeddings", "--embeddings")):
        what = "per-atom features" if kind == "n2n" else "per-element embeddings"
        for w in weights:
            name = kind if len(weights) == 1 else f"{kind}_w{_fmt(w)}"
            if not labels_metadata.get(meta_key):
                skipped.append({"name": name, "reason": f"{where}: labels hold no teacher {what} "
                                f"(hessforge label {flag}" + (""
                                if kind == "n2n" else "; the teacher must have them: MACE does, ANI-1x does not")
                                + ")"})
                continue
            add(name, f"teacher {what} through a learned projection, weight {_fmt(w)}", **{kind: w})
    halve = dict(hessian=lam, halve_kd_when_better_than_teacher=True)
    add("kd_s1", f"Hessian KD, s = 1, λ_KD = {_fmt(lam)}, halving on", hessian_rows=1, **halve)
    k = labels_metadata.get("k")
    if k is not None and int(k) < 4:
        skipped.append({"name": "kd_s4", "reason": f"{where}: labels store k = {k} Hessian rows per structure, "
                                                   "fewer than s = 4"})
    else:
        add("kd_s4", f"Hessian KD, s = 4, λ_KD = {_fmt(lam)}, halving on", hessian_rows=4, **halve)
    add("kd_s1_nohalve", f"Hessian KD, s = 1, λ_KD = {_fmt(lam)}, no halving", hessian=lam, hessian_rows=1,
        halve_kd_when_better_than_teacher=False)
    for value in lambdas:
        name = f"kd_lambda{_fmt(value)}"
        if value == lam:
            aliases[name] = "kd_s1"
            continue
        add(name, f"Hessian KD, s = 1, λ_KD = {_fmt(value)}, halving on", hessian=value, hessian_rows=1,
            halve_kd_when_better_than_teacher=True)
    for w in energy_weights:
        if w == float(base.loss.energy):
            aliases[f"undistilled_u{_fmt(w)}"], aliases[f"kd_s1_u{_fmt(w)}"] = "undistilled", "kd_s1"
            continue
        add(f"undistilled_u{_fmt(w)}", f"no teacher term, λ_U = {_fmt(w)}", energy=w)
        add(f"kd_s1_u{_fmt(w)}", f"Hessian KD, s = 1, λ_KD = {_fmt(lam)}, halving on, λ_U = {_fmt(w)}",
            energy=w, hessian_rows=1, **halve)
    return runs, skipped, aliases


def _resumable_as(path: str, values: dict) -> bool:
    """The run configured in `path` may resume under `values` (they differ at most in RESUMABLE_KEYS, such
    as more epochs)."""
    try:
        with open(path) as fh:
            old = yaml.safe_load(fh)
        return isinstance(old, dict) and without_resumable(old) == without_resumable(values)
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def _wanted(names: Sequence[str], aliases: Dict[str, str], only: Optional[Sequence[str]],
            skipped: Sequence[dict] = ()) -> set:
    """The run names --only asks for (aliases resolved); every name must exist (a skipped one: its reason)."""
    if not only:
        return set(names)
    reasons = {s["name"]: s["reason"] for s in skipped}
    for name in only:
        if name in reasons and name not in names:
            raise HessforgeError(f"--only: run {name} is skipped in this sweep: {reasons[name]}")
    unknown = sorted(set(only) - set(names) - set(aliases))
    if unknown:
        raise HessforgeError(f"--only: no run named {unknown} in this sweep; runs: {', '.join(names)}")
    return {aliases.get(n, n) for n in only}


def write_sweep(base_path: str, out_dir: str, only: Optional[Sequence[str]] = None, **options) -> dict:
    """Write DIR/NAME.yaml for every run and DIR/sweep.json (the index); returns the index. A config that
    already exists with other content is an error once its run has started (it would resume under changed
    settings, apart from RESUMABLE_KEYS); otherwise it is rewritten. `only`: run names that will be trained,
    checked here. The labels are checked against the base's dataset once, not in every run."""
    check_output_dir(out_dir, "sweep -o")
    base = load_config(base_path)
    if base.data.labels:
        from training.data import Dataset
        from training.labels import LabelStore, check_labels_match

        check_labels_match(LabelStore(base.data.labels), Dataset(base.data.path))
    runs, skipped, aliases = baseline_configs(base, out_dir, **options)
    out_dir = os.path.abspath(out_dir)
    planned = []
    for run in runs:  # every check before the first write: a refused sweep changes nothing
        values = run["config"].to_dict()
        config_from_dict(values, where=run["name"])  # every written config passes the strict checks
        path = os.path.join(out_dir, f"{run['name']}.yaml")
        started = os.path.exists(os.path.join(values["train"]["out"], "last.pt"))
        if os.path.exists(path) and started and not _resumable_as(path, values):
            raise HessforgeError(f"{path} exists with other settings and its run has started "
                                 f"({values['train']['out']}); use another -o directory or delete that run "
                                 "(more epochs, time and threads may change)")
        planned.append((run, values, path))
    _wanted([r["name"] for r in runs], aliases, only, skipped)  # an unknown --only name before anything is written
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for run, values, path in planned:
        with atomic_open(path) as fh:
            fh.write(f"# hessforge sweep: {run['name']}: {run['description']}\n# base: {os.path.abspath(base_path)}\n")
            yaml.safe_dump(values, fh, sort_keys=False, allow_unicode=True)
        entries.append({"name": run["name"], "description": run["description"], "config": path,
                        "out": values["train"]["out"]})
    index = {"base": os.path.abspath(base_path), "runs": entries, "skipped": skipped, "aliases": aliases}
    write_json(os.path.join(out_dir, INDEX), index, ensure_ascii=False)
    return index


def run_sweep(index: dict, only: Optional[Sequence[str]] = None, log=print) -> List[dict]:
    """Train the runs of a sweep index one after the other; skip those with a summary.json. Returns one
    {name, status (done|skipped|failed), summary or error} per run."""
    from training.trainer import Trainer

    wanted = _wanted([r["name"] for r in index["runs"]], index.get("aliases", {}), only, index.get("skipped", []))
    results = []
    for run in index["runs"]:
        if run["name"] not in wanted:
            continue
        summary_path = os.path.join(run["out"], "summary.json")
        config = load_config(run["config"])
        summary = None
        if os.path.exists(summary_path):
            with open(summary_path) as fh:
                summary = json.load(fh)
            if summary.get("finished", True) and summary.get("epochs", 0) < config.train.epochs:
                summary = None  # finished its epochs, and the sweep now asks for more: train on
        if summary is not None:
            results.append({"name": run["name"], "status": "skipped", "summary": summary})
            early = "" if summary.get("finished", True) else (f"; stopped early by train.{summary.get('stopped')} "
                                                               f"after {summary.get('epochs')} epochs")
            log(f"{run['name']}: already done ({summary_path}{early})")
            continue
        log(f"{run['name']}: training ({run['description']}) -> {run['out']}")
        try:
            summary = Trainer(config).fit()
        except HessforgeError as err:
            log(f"{run['name']}: failed: {err}")
            results.append({"name": run["name"], "status": "failed", "error": str(err)})
            continue
        results.append({"name": run["name"], "status": "done", "summary": summary})
    return results


def add_arguments(parser) -> None:
    parser.add_argument("base", help="base training config (YAML): student, data, labels and loss weights")
    parser.add_argument("-o", "--output", required=True, help="directory for the configs and the runs")
    parser.add_argument("--run", action="store_true",
                        help="also train the runs, one after the other (skips runs with a summary.json)")
    parser.add_argument("--only", help="comma-separated run names to train (with --run)")
    parser.add_argument("--lambdas", default=",".join(_fmt(x) for x in DEFAULT_LAMBDAS),
                        help="λ_KD values of the sweep (default 10,100,400,1000)")
    parser.add_argument("--force-distill-weight", type=float, default=None,
                        help="weight of the teacher-force targets (default: the base's loss.forces)")
    parser.add_argument("--energy-weights", default="",
                        help="λ_U values: also undistilled and kd_s1 at each (comma-separated; default none)")
    parser.add_argument("--n2n-weight", default="100", help="n2n weight(s), comma-separated (default 100)")
    parser.add_argument("--a2a-weight", default="100", help="a2a weight(s), comma-separated (default 100)")


def _floats(text: str, option: str) -> List[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise HessforgeError(f"{option} must be comma-separated numbers, got {text!r}") from None


def run(args) -> int:
    if args.only and not args.run:
        raise HessforgeError("--only picks the runs to train: add --run")
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    index = write_sweep(args.base, args.output, only=only, lambdas=_floats(args.lambdas, "--lambdas"),
                        force_distill_weight=args.force_distill_weight,
                        n2n_weights=_floats(args.n2n_weight, "--n2n-weight"),
                        a2a_weights=_floats(args.a2a_weight, "--a2a-weight"),
                        energy_weights=_floats(args.energy_weights, "--energy-weights"))
    for r in index["runs"]:
        print(f"{r['name']:<16} {r['config']}")
    for s in index["skipped"]:
        print(f"{s['name']:<16} skipped: {s['reason']}")
    for a, b in index["aliases"].items():
        print(f"{a:<16} = {b}")
    print(f"wrote {len(index['runs'])} configs and {os.path.join(os.path.abspath(args.output), INDEX)}")
    if not args.run:
        return 0
    results = run_sweep(index, only=only, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    failed = [r for r in results if r["status"] == "failed"]
    for r in results:
        summary = r.get("summary", {})
        best, errors = summary.get("best_val_loss_ef"), summary.get("best_val") or {}
        if best is None:
            print(f"{r['name']:<16} {r['status']:<8} {r.get('error', '')}")
            continue
        stress = f", stress {errors['stress_mae_gpa']:.3f} GPa" if "stress_mae_gpa" in errors else ""
        unweighted = (f"; val E {errors['energy_mae_mev_per_atom']:.2f} meV/atom, F "
                      f"{errors['forces_mae_mev_per_A']:.1f} meV/Å{stress} (epoch {summary['best_epoch']})"
                      if {"energy_mae_mev_per_atom", "forces_mae_mev_per_A"} <= set(errors) else "")
        print(f"{r['name']:<16} {r['status']:<8} best val loss_ef {best:.6g}{unweighted}")
    return 1 if failed else 0
