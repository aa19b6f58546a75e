"""`hessforge evaluate`: a student's energy/force errors against the reference labels and the teacher, its
Hessian-row error against the teacher's stored rows, and the teacher's own errors. JSON plus a table."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from ase import units

from engine.checkpoint import load_student, read_checkpoint
from engine.errors import HessforgeError
from engine.graph import build_graph
from engine.paths import check_output_file, write_json
from engine.stress import energy_forces_strain_derivative, stress_from_strain_derivative, voigt
from training.labels import teacher_energy_offsets
from training.losses import student_hessian_rows
from training.reference_energies import offset_energy, offsets_determine


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="student checkpoint (best.pt / last.pt of a run)")
    parser.add_argument("data", help="LMDB dataset")
    parser.add_argument("--labels", help="teacher labels directory (adds teacher and Hessian-row errors)")
    parser.add_argument("--split-file", help="split.json (default: the run's own, beside the checkpoint)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--json", dest="json_out", help="write the metrics here")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")


def _stress_errors(s_pred, s_ref) -> Dict[str, float]:
    """Stress MAE (GPa) over the Voigt components of the structures where both are given; {} when none is."""
    pairs = [(p, r) for p, r in zip(s_pred, s_ref) if p is not None and r is not None]
    if not pairs:
        return {}
    d = voigt(np.stack([np.asarray(p) - np.asarray(r) for p, r in pairs]))
    return {"stress_mae_gpa": float(np.mean(np.abs(d))) / units.GPa, "n_stress": len(pairs)}


def _errors(e_pred, e_ref, natoms, f_pred, f_ref, s_pred=(), s_ref=()) -> Dict[str, float]:
    """MAEs over the structures that have a reference (None: no label, ingest --allow-missing-labels); NaN
    where none has. Stresses ([3, 3] or None each): their MAE where both are given."""
    has_e = [k for k, e in enumerate(e_ref) if e is not None]
    has_f = [k for k, f in enumerate(f_ref) if f is not None]
    de = np.abs(np.asarray([e_pred[k] for k in has_e], dtype=np.float64) - np.asarray([e_ref[k] for k in has_e],
                                                                                        dtype=np.float64))
    df = (np.abs(np.concatenate([f_pred[k] for k in has_f]) - np.concatenate([f_ref[k] for k in has_f]))
          if has_f else np.zeros(0))
    mean = lambda x: float(np.mean(x)) if x.size else float("nan")  # noqa: E731
    return {
        "energy_mae_mev_per_atom": 1000 * mean(de / np.asarray([natoms[k] for k in has_e], dtype=np.float64)),
        "energy_mae_mev": 1000 * mean(de),
        "forces_mae_mev_per_A": 1000 * mean(df),
        "forces_rmse_mev_per_A": 1000 * mean(df**2) ** 0.5,
        "n_energy": len(has_e), "n_forces": len(has_f), **_stress_errors(s_pred, s_ref),
    }


def student_predictions(model, structures: Sequence, batch_size: int = 16, hessian_rows: Optional[List] = None,
                        stress: bool = False):
    """Energies, forces, (optionally) the requested Hessian rows [k, 3N] of each structure, float64, and with
    `stress` the [3, 3] stress (eV/Å³) of each bulk structure (None for the others and without `stress`)."""
    energies, forces, rows_out, stresses = [], [], [], []
    dtype = next(model.parameters()).dtype
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        graph = build_graph([s.numbers for s in chunk], [s.positions for s in chunk], [s.cell for s in chunk],
                            [s.pbc for s in chunk], model.cutoff, dtype, where=[s.id for s in chunk])
        if stress:
            out = energy_forces_strain_derivative(model, graph)
            sigma = stress_from_strain_derivative(out["dE_deps"], graph.cell).detach().double().numpy()
            stresses.extend(sigma[k] if s.pbc.all() else None for k, s in enumerate(chunk))
        else:
            out = model(graph, compute_forces=True, create_graph=False)
            stresses.extend([None] * len(chunk))
        energies.extend(out["energy"].detach().double().tolist())
        counts = torch.bincount(graph.batch, minlength=len(chunk)).tolist()
        forces.extend(f.detach().double().numpy() for f in out["forces"].split(counts))
    if hessian_rows is not None:
        for s, rows in zip(structures, hessian_rows):
            rows_out.append(_student_rows(model, s, rows, dtype))
    return energies, forces, rows_out, stresses


def _student_rows(model, structure, rows: np.ndarray, dtype) -> np.ndarray:
    graph = build_graph([structure.numbers], [structure.positions], [structure.cell], [structure.pbc],
                        model.cutoff, dtype, where=[structure.id])
    pos = graph.positions.detach().requires_grad_(True)
    out = model(graph._replace(positions=pos), compute_forces=True, create_graph=True)
    index = torch.as_tensor(np.asarray(rows), dtype=torch.long).reshape(-1, 1)
    h = student_hessian_rows(out["forces"], pos, index, create_graph=False)
    return h.reshape(index.shape[0], -1).detach().double().numpy()


def evaluate(model, structures: Sequence, labels=None, batch_size: int = 16,
             offset_structures: Optional[Sequence] = None, offset_source: str = "other structures"
             ) -> Dict[str, Dict[str, float]]:
    """Metrics of a student (and of the teacher, when labels are given) on `structures`. A teacher with relative
    energies (SO3LR) or on another energy scale (training.labels.teacher_energy_offsets) is put on the reference's scale by per-element offsets fitted on `offset_structures` (other
    structures, e.g. the validation split, so the fit does not flatter the teacher on the evaluated ones;
    default: the evaluated structures themselves); `offset_source` names them in the result."""
    if not structures:
        raise HessforgeError("nothing to evaluate: the selected split is empty")
    for s in structures:
        model.check_species(s.numbers, where=f"structure {s.id}")
    # LabelStore.get names a structure without labels in its error
    teacher = [labels.get(s.id) for s in structures] if labels is not None else None
    rows = [t.rows for t in teacher] if teacher is not None else None
    s_ref = [s.stress if s.pbc.all() else None for s in structures]
    s_teacher = [getattr(t, "stress", None) for t in teacher] if teacher is not None else []
    # stress where there is one to compare with, and the student has an energy derivative to give it
    want_stress = not getattr(model, "direct_forces", False) and any(
        x is not None for x in s_ref + [t if s.pbc.all() else None for t, s in zip(s_teacher, structures)])
    e, f, h, s_pred = student_predictions(model, structures, batch_size, rows, stress=want_stress)
    natoms = [len(s.numbers) for s in structures]
    e_ref = [s.energy for s in structures]
    f_ref = [None if s.forces is None else np.asarray(s.forces) for s in structures]
    result = {"student_vs_reference": _errors(e, e_ref, natoms, f, f_ref, s_pred, s_ref),
              "n_structures": len(structures)}
    if teacher is not None:
        # a teacher with relative energies (SO3LR), or at another energy scale (training.labels.
        # teacher_energy_offsets), is compared after per-element offsets, fitted on reference energies, put it
        # on the reference's scale (energy differences survive it)
        offsets = (teacher_energy_offsets(labels, offset_structures) if offset_structures
                   else teacher_energy_offsets(labels, structures, teacher))
        if offsets is not None and offset_structures and not offsets_determine(
                [s.numbers for s in offset_structures if s.energy is not None], [s.numbers for s in structures]):
            # an element the fit did not see, or compositions it cannot tell apart (one molecule's conformers
            # fit, another's evaluated): offsets from the evaluated structures themselves, said in the result
            print(f"note: the {offset_source}'s compositions do not determine the teacher's per-element offsets for "
                  f"these structures; fitting them on the {len(structures)} evaluated structures instead",
                  file=sys.stderr)
            offsets = teacher_energy_offsets(labels, structures, teacher)
            offset_structures = None
        te = [t.energy - offset_energy(s.numbers, offsets or {}) for t, s in zip(teacher, structures)]
        if offsets is not None:
            result["teacher_energy_offsets_eV"] = {str(z): o for z, o in offsets.items()}
            result["teacher_energy_offsets_fitted_on"] = (
                f"{len(offset_structures)} structures of {offset_source}" if offset_structures
                else f"the {len(structures)} evaluated structures")
        tf = [np.asarray(t.forces) for t in teacher]
        result["student_vs_teacher"] = _errors(e, te, natoms, f, tf, s_pred, s_teacher)
        result["teacher_vs_reference"] = _errors(te, e_ref, natoms, tf, f_ref, s_teacher, s_ref)
        dh = np.concatenate([(hs - np.asarray(t.hessian_rows, dtype=np.float64)).reshape(-1) for hs, t in zip(h, teacher)])
        ref = np.concatenate([np.asarray(t.hessian_rows, dtype=np.float64).reshape(-1) for t in teacher])
        result["student_vs_teacher"]["hessian_mae_eV_per_A2"] = float(np.mean(np.abs(dh)))
        result["student_vs_teacher"]["hessian_rel_rmse"] = float(np.sqrt(np.mean(dh**2) / np.mean(ref**2)))
    return result


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    """rows: name -> metrics (student_vs_reference etc. flattened). One line per model."""
    header = f"{'model':<28} {'E MAE (meV/atom)':>17} {'F MAE (meV/Å)':>14} {'F MAE vs teacher':>17} {'Hess MAE (eV/Å²)':>17}"
    lines = [header, "-" * len(header)]

    def fmt(x):
        return f"{x:.2f}" if x is not None else "-"

    for name, m in rows.items():
        ref = m.get("vs_reference", {})
        tea = m.get("vs_teacher", {})
        lines.append(
            f"{name:<28} {fmt(ref.get('energy_mae_mev_per_atom')):>17} {fmt(ref.get('forces_mae_mev_per_A')):>14} "
            f"{fmt(tea.get('forces_mae_mev_per_A')):>17} {fmt(tea.get('hessian_mae_eV_per_A2')):>17}"
        )
    return "\n".join(lines)


def format_teacher_only_table(result: Dict, name: str = "student") -> str:
    """The table for structures without reference labels (ingest --allow-missing-labels): the student against
    the teacher, whose labels are the only reference there is."""
    tea = result["student_vs_teacher"]
    header = (f"{'model':<28} {'E MAE vs teacher (meV/atom)':>28} {'F MAE vs teacher (meV/Å)':>25} "
              f"{'Hess MAE (eV/Å²)':>17}")
    return "\n".join([header, "-" * len(header),
                      f"{name:<28} {tea['energy_mae_mev_per_atom']:>28.2f} {tea['forces_mae_mev_per_A']:>25.2f} "
                      f"{tea['hessian_mae_eV_per_A2']:>17.2f}"])


def table_rows(result: Dict, name: str = "student") -> Dict[str, Dict]:
    rows = {name: {"vs_reference": result["student_vs_reference"], "vs_teacher": result.get("student_vs_teacher", {})}}
    if "teacher_vs_reference" in result:
        rows["teacher"] = {"vs_reference": result["teacher_vs_reference"], "vs_teacher": {}}
    return rows


def dataset_splits(dataset, split_file: str, split: str, trained_on: Optional[str] = None) -> Dict[str, List[int]]:
    """{split: indices} of `split_file` for `dataset`, which must hold `split` (a split of another size: clear
    error; one made for another path of the same size: a note). `trained_on`: the split digest a checkpoint
    records, which a run's own split.json must match."""
    from training.data.subsets import load_split, split_digest

    splits = load_split(split_file, count=len(dataset))
    if trained_on is not None and split_digest(splits) != trained_on:
        raise HessforgeError(f"{split_file} is not the split the model was trained on (rewritten since, by hand or "
                             "by another run in that directory): its held-out structures may be training data. "
                             "Pass the model's split with --split-file, or --split all")
    if split not in splits:
        others = [name for name in splits if name != split]
        raise HessforgeError(f"{split_file} has no {split!r} split (it has: {', '.join(others) or 'none'}); "
                             f"pass --split {'|'.join(others + ['all'])}")
    with open(split_file) as fh:
        made_for = json.load(fh).get("dataset")
    if made_for and os.path.abspath(made_for) != os.path.abspath(dataset.path):
        print(f"note: {split_file} was made for {made_for}; applying it to {dataset.path} (same size)",
              file=sys.stderr)
    return splits


def structures_in(dataset, splits: Optional[Dict[str, List[int]]], split: str) -> list:
    """The structures of `split` ({split: indices}, from dataset_splits), or all of them (splits None)."""
    return [dataset[i] for i in (range(len(dataset)) if splits is None else splits[split])]


def select_structures(dataset, split_file: Optional[str], split: str, trained_on: Optional[str] = None) -> list:
    splits = None if split == "all" or split_file is None else dataset_splits(dataset, split_file, split, trained_on)
    return structures_in(dataset, splits, split)


def run(args) -> int:
    from training.data import Dataset

    state = read_checkpoint(args.checkpoint)  # clear error for a missing or foreign file before anything else
    if args.batch_size < 1:
        raise HessforgeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json_out:
        check_output_file(args.json_out, "--json", inputs=[args.checkpoint, args.data, args.labels])
    model = load_student(args.checkpoint, use_ema=not args.no_ema)
    dataset = Dataset(args.data)
    split_file = args.split_file or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "split.json")
    if args.split != "all" and not os.path.exists(split_file):
        raise HessforgeError(f"split file not found: {split_file} (pass --split-file or --split all)")
    # the run's own split.json (no --split-file) must be the one its checkpoint was trained on
    trained_on = None if args.split_file else state.get("split_sha256")
    splits = None if args.split == "all" else dataset_splits(dataset, split_file, args.split, trained_on)
    structures = structures_in(dataset, splits, args.split)
    labels = None
    if not args.labels and structures and all(s.energy is None and s.forces is None for s in structures):
        raise HessforgeError(f"the {len(structures)} structures of {args.data} ({args.split}) have no reference "
                             "energies or forces (ingested with --allow-missing-labels): pass --labels LABELS_DIR "
                             "to evaluate against the teacher")
    if args.labels:
        from training.labels import LabelStore, check_labels_match

        labels = LabelStore(args.labels)
        check_labels_match(labels, dataset, [s.id for s in structures])
    offset_structures = None
    if labels is not None and getattr(labels, "relative_energies", False) and args.split in ("train", "test"):
        # the teacher's per-element offsets from the validation split: fitted on the test structures themselves
        # they would flatter the teacher's test energy error
        try:
            val = [s for s in structures_in(dataset, splits, "val") if s.energy is not None]
            check_labels_match(labels, dataset, [s.id for s in val])
            offset_structures = val or None
        except HessforgeError:  # no labelled validation structures: fitted on the evaluated ones (said below)
            offset_structures = None
    if not structures:
        raise HessforgeError(f"nothing to evaluate: the {args.split} split of {split_file if splits else args.data} "
                             "is empty; pass another --split (train, val, test or all)")
    result = evaluate(model, structures, labels, args.batch_size, offset_structures, "the validation split")
    if labels is not None:
        result["teacher"] = labels.metadata.get("teacher")  # the report names the teacher row by it
    result["checkpoint"] = os.path.abspath(args.checkpoint)
    result["split"] = args.split
    ref = result["student_vs_reference"]
    if "student_vs_teacher" in result and ref["n_energy"] == 0 and ref["n_forces"] == 0:
        print(format_teacher_only_table(result))
        print(f"(no reference energies or forces in these {len(structures)} structures: errors against the teacher "
              f"{result.get('teacher')})")
    else:
        print(format_table(table_rows(result)))
    stress = [f"{name} {result[key]['stress_mae_gpa']:.4f}" for key, name in (
        ("student_vs_reference", "student vs reference"), ("student_vs_teacher", "student vs teacher"),
        ("teacher_vs_reference", "teacher vs reference")) if "stress_mae_gpa" in result.get(key, {})]
    if stress:
        print("stress MAE (GPa, Voigt components of the bulk structures): " + ", ".join(stress))
    if "teacher_energy_offsets_eV" in result:
        why = ("relative energies" if labels is not None and labels.relative_energies
               else "energies on another per-element scale than the reference's")
        print(f"(teacher {result.get('teacher')}: {why}, compared after per-element offsets fitted on "
              f"{result['teacher_energy_offsets_fitted_on']}; teacher_energy_offsets_eV in the JSON)")
    if args.json_out:
        write_json(args.json_out, result, indent=2)
    return 0
