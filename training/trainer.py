"""`hessforge train CONFIG.yaml`: train a student on reference energies/forces and teacher Hessian rows.

Paper recipe: AdamW (amsgrad, lr 1e-3, wd 2e-6, eps 1e-7), ReduceLROnPlateau (factor 0.8), EMA 0.999,
gradient clipping 10, λ_KD halved once the student's validation energy/force loss beats the teacher's.
Runs on one process or under torchrun (gloo/nccl data parallel). A run directory holds the config,
split.json, log.jsonl, last.pt (resumable) and best.pt (best EMA validation loss).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from ase import units
from tqdm.auto import tqdm

from engine.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint
from engine.errors import HessforgeError
from engine.models import build_student
from engine.paths import atomic_open, atomic_path, check_output_dir, write_json
from engine.stress import energy_forces_strain_derivative, stress_from_strain_derivative, voigt
from training.config import RESUMABLE_KEYS, Config, check_labels_for_loss, load_config
from training.ema import ExponentialMovingAverage
from training.losses import DistillationHeads, LossWeights, compute_loss, stress_targets_mask, student_embedding
from training.reference_energies import fit_energy_scale, fit_reference_energies, offsets_determine


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML training config")
    parser.add_argument("--restart", action="store_true", help="ignore an existing last.pt and start over")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--out", help="override train.out (run directory)")


def run(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise HessforgeError(f"--epochs must be >= 1, got {args.epochs}")
    config = load_config(args.config)
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.out:
        config.train.out = args.out
    trainer = Trainer(config, restart=args.restart)
    summary = trainer.fit()
    if trainer.rank == 0:
        state = "finished" if summary["finished"] else f"stopped ({summary['stopped']})"
        print(f"{state} after {summary['epochs']} of {max(config.train.epochs, summary['epochs'])} epochs "
              f"({summary['steps']} steps, "
              f"{summary['elapsed_s']:.0f} s); best validation E+F loss {summary['best_val_loss_ef']:.4g}; "
              f"checkpoints {trainer.out}/best.pt (best, EMA weights) and last.pt")
    _finish_distributed()
    return 0


# ----------------------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed() -> tuple:
    """(rank, world_size), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _finish_distributed() -> None:
    """After a data-parallel run: every rank waits for the others (rank 0 still writes checkpoints and the
    summary), then the process group is torn down. A rank that exits while its peer is still at work aborted in
    gloo's teardown ('terminate called without an active exception', SIGABRT: 2 of 4 two-process runs once
    a rank's validation got faster)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_reduce_sum(values: List[float]) -> List[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _broadcast_from_rank0(model: torch.nn.Module) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def _average_gradients(model: torch.nn.Module, weight: float = 1.0) -> None:
    """Data parallelism by one all-reduce of the flattened gradients after backward: the ranks' gradients
    averaged with weights (1, or 0 for a rank whose shard has run out); each rank's loss terms were scaled to
    their share of the step first (_globally_weighted), so the average is the one-process gradient of the
    whole step's batch, per term (structures for energies, atoms for forces and Hessian rows). Done by hand
    instead of DistributedDataParallel: the loss
    differentiates the forces (a double backward through autograd.grad inside forward), which DDP's
    bucketed reducer does not support."""
    if not dist.is_initialized():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    count = torch.tensor([float(weight)], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) * weight for g in grads] + [count])
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class _ShardSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded permutation of range(n) per epoch: rank r takes positions r, r + world,
    ... Every structure is seen exactly once per epoch across the ranks (DistributedSampler pads the shards
    to equal length by repeating structures); shards differ in length by at most one."""

    def __init__(self, n: int, rank: int, world: int, seed: int):
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def steps(self, batch_size: int) -> int:
        """Optimizer steps per epoch, the same on every rank: the largest shard's (rank 0's) batches."""
        return -(-len(range(0, self.n, self.world)) // batch_size)


# Loss terms a step may log; each is averaged over the ranks that have it (weight 1, 0 for a rank without a
# batch: _globally_weighted has already scaled each rank's terms to its share of the whole step).
_TERMS = ("total", "energy", "forces", "hessian", "energy_gradient", "force_distill", "n2n", "a2a", "stress")


def _globally_weighted(terms: Optional[Dict[str, torch.Tensor]], weights) -> Tuple[Optional[torch.Tensor],
                                                                                     Dict[str, float], float]:
    """Data parallelism that equals one process with the whole step's batch: each loss term is a mean over
    something (structures, atoms, atoms with Hessian rows: compute_loss's "_count_" entries); all-reducing
    those counts, each rank scales its term t by c_t R / C_t (its share c_t of the step's total C_t, times the
    R ranks with a batch), so the plain mean of the ranks' gradients is the gradient of Σ_t λ_t (Σ_r c_t,r
    term_t,r) / C_t, the one-process loss. Returns (this rank's loss to differentiate, its terms so scaled,
    averaging weight: 1, or 0 without a batch). Every rank must call it (a collective)."""
    names = _TERMS[1:]
    local = [0.0] * (len(names) + 1)
    if terms is not None:
        for k, name in enumerate(names):
            if name in terms:
                local[k] = float(terms["_count_" + name])
        local[-1] = 1.0
    total = _all_reduce_sum(list(local))
    if terms is None:
        return None, {}, 0.0
    loss, record = None, {}
    for k, name in enumerate(names):
        if total[k] <= 0:
            continue
        share = local[k] * total[-1] / total[k]
        record[name] = float(terms[name].detach()) * share if name in terms else 0.0
        if name in terms and share > 0:
            term = getattr(weights, name) * terms[name] * share
            loss = term if loss is None else loss + term
    record["total"] = sum(getattr(weights, name) * value for name, value in record.items())
    if loss is None:  # nothing to learn from on this rank this step: a zero gradient that keeps the graph
        loss = terms["total"] * 0.0
    return loss, record, 1.0


def _reduce_terms(record: Dict[str, float], weight: float) -> Dict[str, float]:
    if not dist.is_initialized():
        return record
    sums = _all_reduce_sum([v for k in _TERMS for v in ((weight * record[k], weight) if k in record else (0.0, 0.0))])
    return {k: sums[2 * i] / sums[2 * i + 1] for i, k in enumerate(_TERMS) if sums[2 * i + 1] > 0}


class _Accumulator:
    """Sums of energy/force errors over a pass, reduced across ranks."""

    def __init__(self):
        self.sums = {"e_abs": 0.0, "e_abs_per_atom": 0.0, "e_sq": 0.0, "f_abs": 0.0, "f_sq": 0.0,
                     "f_norm": 0.0, "n_struct": 0.0, "n_atoms": 0.0, "s_abs": 0.0, "s_sq": 0.0, "s_norm": 0.0,
                     "n_stress": 0.0}

    def add_stress(self, s_pred, s_ref, mask):
        """[B, 3, 3] stresses (eV/Å³) of the structures in `mask` [B]."""
        ds = (s_pred[mask] - s_ref[mask]).double()
        self.sums["s_abs"] += voigt(ds).abs().sum().item()  # the components ASE reports
        self.sums["s_sq"] += ds.square().sum().item()
        self.sums["s_norm"] += torch.linalg.matrix_norm(ds).sum().item()
        self.sums["n_stress"] += ds.shape[0]

    def add(self, e_pred, e_ref, natoms, f_pred, f_ref, e_mask=None, f_mask=None):
        """Masks: structures / atoms that have reference labels (the others are left out)."""
        if e_mask is not None:
            e_pred, e_ref, natoms = e_pred[e_mask], e_ref[e_mask], natoms[e_mask]
        if f_mask is not None:
            f_pred, f_ref = f_pred[f_mask], f_ref[f_mask]
        de = (e_pred - e_ref).double()
        df = (f_pred - f_ref).double()
        self.sums["e_abs"] += de.abs().sum().item()
        self.sums["e_abs_per_atom"] += (de.abs() / natoms.double()).sum().item()
        self.sums["e_sq"] += de.square().sum().item()
        self.sums["f_abs"] += df.abs().sum().item()
        self.sums["f_sq"] += df.square().sum().item()
        self.sums["f_norm"] += torch.linalg.vector_norm(df, dim=-1).sum().item()
        self.sums["n_struct"] += de.numel()
        self.sums["n_atoms"] += df.shape[0]

    def result(self, weights: LossWeights) -> Dict[str, float]:
        keys = list(self.sums)
        s = dict(zip(keys, _all_reduce_sum([self.sums[k] for k in keys])))
        # no reference energies / forces at all (teacher-only training): those errors are NaN and leave the
        # loss, so best.pt follows what there is
        n = s["n_struct"] if s["n_struct"] else float("nan")
        a = s["n_atoms"] if s["n_atoms"] else float("nan")
        e_mse, f_mse = s["e_sq"] / n, s["f_sq"] / (3 * a)
        m = s["n_stress"] if s["n_stress"] else float("nan")
        if weights.kind == "mse":  # the same terms as the training loss (training.losses)
            terms = (weights.energy * e_mse, weights.forces * f_mse, weights.stress * s["s_sq"] / (9 * m))
        else:
            terms = (weights.energy * s["e_abs_per_atom"] / n, weights.forces * s["f_norm"] / a,
                     weights.stress * s["s_norm"] / m)
        loss = sum(t for t in terms if t == t)  # stress only where weighted and measured (NaN: none)
        stress = {"stress_mae_gpa": s["s_abs"] / (6 * m) / units.GPa} if s["n_stress"] else {}
        return {**stress,
            "loss_ef": loss,
            "energy_mae_mev_per_atom": 1000 * s["e_abs_per_atom"] / n,
            "energy_mae_mev": 1000 * s["e_abs"] / n,
            "energy_rmse_mev": 1000 * e_mse**0.5,
            "forces_mae_mev_per_A": 1000 * s["f_abs"] / (3 * a),
            "forces_rmse_mev_per_A": 1000 * f_mse**0.5,
        }



def _note_undetermined_references(train_structures, val_structures) -> None:
    """A note when the training compositions do not pin down the per-element reference energies of the
    validation compositions (e.g. 3 molecules for 4 elements): the validation energies are then off by a
    composition-dependent constant that no amount of training removes."""
    def compositions(structures):  # one structure's numbers per distinct composition
        return list({tuple(np.bincount(s.numbers, minlength=119)): s.numbers
                     for s in structures if s.energy is not None}.values())

    fit, target = compositions(train_structures), compositions(val_structures)
    if fit and target and not offsets_determine(fit, target):
        print(f"note: the {len(fit)} distinct training composition(s) do not determine the per-element reference "
              "energies of every validation composition (fewer independent compositions than elements): "
              "validation energy errors there include an offset the training data cannot fix; training on more "
              "molecules (another data.split_seed or data.split_file) fixes it", file=sys.stderr)


def _check_resume_config(path: str, old: Optional[dict], new: dict) -> None:
    """A run resumes only under the config it was started with (apart from RESUMABLE_KEYS): resuming with,
    say, another λ_KD or learning rate would silently keep the checkpoint's, and config.yaml would lie."""
    if not old:
        return
    changed = [f"{section}.{key}: {old[section].get(key)!r} -> {value!r}"
               for section, values in new.items() for key, value in values.items()
               if (section, key) not in RESUMABLE_KEYS and old.get(section, {}).get(key) != value]
    if changed:
        raise HessforgeError(f"{path}: this run was started with another config ({'; '.join(changed)}); resume "
                             "with the original config, or start over with --restart or another train.out")


def _data_identity(dataset, labels) -> dict:
    """What a run's numbers depend on beyond its config: the dataset's structures (ids and geometries) and the
    labels' teacher and settings. Paths may change between sessions (data.path and data.labels are resumable:
    a moved directory), these may not."""
    from training.labels import COMPAT_KEYS, _ids_digest

    ids = _ids_digest(dataset.ids())
    identity = {"dataset": {"count": len(dataset), "ids_sha256": ids, "geometry_sha256": dataset.geometry_digest(),
                            "setting_sha256": dataset.setting_digest()},
                "labels": None}
    if labels is not None:
        identity["labels"] = {k: labels.metadata.get(k) for k in COMPAT_KEYS}
        # and a sample of the values: two teachers of one name (a model file replaced, a parameter changed)
        sample = sorted(labels.ids())[:16]
        values = "\n".join(f"{i} {float(labels.get(i).energy)!r}" for i in sample)
        identity["labels"]["energies_sample_sha256"] = hashlib.sha256(values.encode()).hexdigest()
    return identity


def _check_resume_data(path: str, old: Optional[dict], new: dict) -> None:
    """A run resumes only on the data it was started with: another dataset (even of the same size) or labels of
    another teacher or settings would mix two trainings, and keep the first teacher's validation loss (the
    λ_KD halving is decided against it). Checkpoints from before this was recorded are not checked."""
    from training.labels import RECORDED_LATER

    if not old:
        return
    changed = []
    old_data = old.get("dataset") or {}
    if any(old_data.get(k) != v for k, v in new["dataset"].items() if k in old_data or k != "setting_sha256"):
        changed.append(f"the dataset ({old['dataset'].get('count')} structures then, {new['dataset']['count']} now, "
                       "or other ids, geometries, cells or charges)")
    old_labels, new_labels = old.get("labels"), new["labels"]
    if (old_labels is None) != (new_labels is None):
        changed.append("teacher labels " + ("added" if old_labels is None else "removed"))
    elif old_labels is not None:
        keys = [k for k in new_labels if old_labels.get(k) != new_labels.get(k)
                and not (k in RECORDED_LATER and None in (old_labels.get(k), new_labels.get(k)))]
        if keys:
            changed.append("the teacher labels (" + ", ".join(f"{k}: {old_labels.get(k)!r} -> {new_labels.get(k)!r}"
                                                                for k in keys) + ")")
    if changed:
        raise HessforgeError(f"{path}: this run was started on other data: {'; '.join(changed)}; resume with the "
                             "original data, or start over with --restart or another train.out")


def _truncate_log(path: str, step: int, epoch: int) -> None:
    """Drop log records after `step` (written by a run killed after its last checkpoint), so the log of a
    resumed run has each step once; records without a step (events logged before events had one) by `epoch`."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = fh.readlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if (record["step"] <= step) if "step" in record else (record.get("epoch", 0) <= epoch):
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        with atomic_open(path) as fh:
            fh.writelines(keep)


class _RunLock:
    """An exclusive lock on a run directory for the life of a trainer: a second `hessforge train` on the same
    train.out fails at once instead of interleaving logs and racing on checkpoints."""

    def __init__(self, directory: str):
        import fcntl

        self._fh = open(os.path.join(directory, ".lock"), "w")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise HessforgeError(f"{directory}: another hessforge train is using this run directory") from None

    def release(self) -> None:
        self._fh.close()  # closing the file drops the lock


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, config: Config, restart: bool = False):
        from training.data import Dataset
        from training.data.batch import make_loader
        from training.data.subsets import load_split, split_by_group, split_digest

        self.config = config
        self.rank, self.world = _distributed()
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        _seed_everything(tc.seed)
        self.dtype = getattr(torch, tc.dtype)
        self.out = tc.out
        check_output_dir(self.out, "train.out")  # the directory itself is made once every check has passed
        self.dataset = Dataset(config.data.path)
        self.labels = None
        if config.data.labels:
            from training.labels import LabelStore

            self.labels = LabelStore(config.data.labels)
            check_labels_for_loss(config, self.labels.metadata, config.data.labels)  # fail before any work

        last = os.path.join(self.out, "last.pt")
        resume_state = read_checkpoint(last) if os.path.exists(last) and not restart else None
        finished = os.path.join(self.out, "summary.json")  # written by runs that ended (not by a crash or kill)
        if resume_state is None and not restart and os.path.exists(os.path.join(self.out, "best.pt")) \
                and os.path.exists(finished):
            # a finished run whose last.pt was deleted to save space: a fresh run would delete its best.pt
            raise HessforgeError(f"{self.out} holds a finished run's best.pt but no last.pt to resume from; a new run "
                                 "there would replace it: pass --restart to do so, or another train.out")
        self.data_identity = _data_identity(self.dataset, self.labels)
        if resume_state is not None:  # before config.yaml and split.json are rewritten
            _check_resume_config(last, resume_state.get("config"), config.to_dict())
            _check_resume_data(last, resume_state.get("data_identity"), self.data_identity)

        # Split by group (molecule), reproducibly; saved so evaluation sees the same test set. A resumed run
        # keeps the split.json it wrote; a fresh one (--restart, or nothing checkpointed yet) splits by the
        # config, whatever split.json an earlier run left.
        split_path = os.path.join(self.out, "split.json")
        count = len(self.dataset)
        recorded = (resume_state or {}).get("split_sha256")
        if config.data.split_file:
            given = load_split(config.data.split_file, count=count, require=("train", "val"))
            split = self._filtered_split(given, config, quiet=recorded == split_digest(given))
            if recorded is not None and recorded != split_digest(split) and recorded == split_digest(given):
                # a run started before data.elements / data.max_atoms filtered split files: it goes on as begun
                split = given
                if self.rank == 0:
                    print(f"note: {last} was trained on all of {config.data.split_file} (from before data.elements "
                          "/ data.max_atoms filtered split files); resuming on that split", file=sys.stderr)
        elif resume_state is not None and os.path.exists(split_path):
            split = load_split(split_path, count=count, require=("train", "val"))
        else:
            keep = self._selected(config)
            if not keep:
                raise HessforgeError(f"data.elements {config.data.elements} / data.max_atoms {config.data.max_atoms} "
                                     f"leave none of the {count} structures of {config.data.path}")
            split = split_by_group(self.dataset.groups(), (config.data.train, config.data.val, config.data.test),
                                   seed=config.data.split_seed, indices=keep)
        self.split, self.split_digest = split, split_digest(split)
        if recorded is not None and recorded != self.split_digest:
            raise HessforgeError(f"{last}: this run was trained on another split than "
                                 f"{config.data.split_file or split_path} holds now; resume with the run's split, or "
                                 "start over with --restart or another train.out")
        self.train_idx = list(split["train"])
        if config.data.train_limit and config.data.train_limit < len(self.train_idx):
            # a random subset (seeded), not the first indices: those are whole molecules in dataset order
            pick = np.random.default_rng(config.data.split_seed).permutation(len(self.train_idx))
            self.train_idx = sorted(self.train_idx[k] for k in pick[: config.data.train_limit])
        self.val_idx = list(split["val"])
        if not self.train_idx or not self.val_idx:
            raise HessforgeError(f"{config.data.path}: the split left no training or no validation structures "
                                 "(validation picks best.pt, the learning-rate schedule and λ_KD halving; the test "
                                 "split is never used for that)")
        # validation against the reference labels; with none in the validation set (teacher-only training,
        # ingest --allow-missing-labels), against the teacher's
        labelled = any(self.dataset[i].energy is not None or self.dataset[i].forces is not None
                       for i in self.val_idx)
        self.val_against_teacher = not labelled
        if self.val_against_teacher and self.labels is None:
            raise HessforgeError(f"{config.data.path}: the validation structures have no reference energies or "
                                 "forces, and there are no teacher labels (data.labels) to validate against")
        if self.labels is not None:
            from training.labels import check_labels_match

            ids = self.dataset.ids()
            check_labels_match(self.labels, self.dataset, [ids[i] for i in self.train_idx + self.val_idx])

        structures = [self.dataset[i] for i in self.train_idx]
        species = sorted({int(z) for s in structures for z in s.numbers})
        mc = config.model
        self.model_hparams = dict(name=mc.name, species=species, cutoff=mc.cutoff, hidden=mc.hidden,
                                  layers=mc.layers, num_basis=mc.num_basis, force_mode=mc.force_mode)
        if mc.norm_eps is not None:  # only when set: checkpoints of runs without it stay as they were
            self.model_hparams["norm_eps"] = float(mc.norm_eps)
        hp = dict(self.model_hparams)
        self.model = build_student(hp.pop("name"), **hp)
        if mc.name == "painn" and mc.norm_eps is None and self.rank == 0 and any(s.pbc.all() for s in structures):
            print("note: periodic training data with PaiNN's published norm_eps (1e-8): its energy is cone-shaped "
                  "where vector features vanish by symmetry (every atom of an ideal crystal), so Hessians and "
                  "phonons there are ill-defined; model.norm_eps: 1.0 is smooth at the same force accuracy "
                  "(bench/results/materials_si_chgnet_cpu.md)", file=sys.stderr)
        if config.loss.stress > 0:
            self._check_stress_targets(structures)
        val_structures = [self.dataset[i] for i in self.val_idx]
        self._check_validation_elements(val_structures, species)
        # compositions of the training structures whose energy the teacher fills; the structures with their own
        fill_numbers = [s.numbers for s in structures if s.energy is None]
        with_energy = [s for s in structures + val_structures if s.energy is not None]
        if self.labels is not None and all(s.energy is None for s in structures):  # teacher-only training:
            # the teacher's energies and forces set the reference energies and the energy scale, as they are
            # the targets (collate's teacher_fills_missing)
            teacher = [self.labels.get(s.id) for s in structures]
            structures = [dataclasses.replace(s, energy=t.energy, forces=t.forces) for s, t in zip(structures, teacher)]
        refs = fit_reference_energies(structures, species)
        if self.rank == 0 and not self.val_against_teacher:
            _note_undetermined_references(structures, val_structures)
        self.model.atom_ref.copy_(torch.as_tensor(refs))
        self.model.energy_scale.fill_(fit_energy_scale(structures))
        self.model.to(self.dtype)
        # n2n/a2a projections: trained with the student, checkpointed beside it, never exported.
        self.heads = self._build_heads(species).to(self.dtype)

        oc = config.optim
        params = list(self.model.parameters()) + list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay,
                                           eps=oc.eps, amsgrad=oc.amsgrad)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=oc.plateau_factor, patience=oc.plateau_patience, min_lr=oc.min_lr)
        self.ema = ExponentialMovingAverage(self.model.parameters(), oc.ema_decay)
        lc = config.loss
        self.weights = LossWeights(energy=lc.energy, forces=lc.forces, hessian=lc.hessian,
                                   energy_gradient=lc.energy_gradient, force_distill=lc.force_distill,
                                   n2n=lc.n2n, a2a=lc.a2a, stress=lc.stress, kind=lc.kind)
        self.epoch = 0
        self.step = 0
        self.best_val = float("inf")
        self.kd_halved = False
        self.elapsed = 0.0
        self.history: List[dict] = []
        self.teacher_val: Optional[Dict[str, float]] = None

        if resume_state is not None:
            self._load(last, resume_state)

        sampler = None
        if self.world > 1:
            _broadcast_from_rank0(self.model)
            _broadcast_from_rank0(self.heads)
            if len(self.train_idx) < self.world:
                raise HessforgeError(f"{len(self.train_idx)} training structure(s) for {self.world} ranks: "
                                     "every rank needs at least one")
            sampler = _ShardSampler(len(self.train_idx), self.rank, self.world, tc.seed)
        self.sampler = sampler
        s = lc.hessian_rows if (lc.hessian > 0 or lc.force_distill > 0) else 0
        # A teacher with relative energies (SO3LR), or at another level of theory than the reference energies
        # (another per-element zero), is put on the reference energies' scale by per-element offsets fitted on
        # the validation split, where its loss is measured (λ_KD halving): fitted on the compared structures,
        # the result does not depend on the teacher's offsets even when those structures' compositions cannot
        # pin down every element's offset.
        from training.labels import ENERGY_SCALE_MISMATCH_EV_PER_ATOM, teacher_energy_offsets

        self.teacher_energy_offsets = teacher_energy_offsets(self.labels, val_structures)
        # the energies the teacher fills in (structures without their own) need offsets that fix their
        # compositions: the validation split's may not (an element only in training): then fitted on every
        # structure with both energies
        fill_offsets = self.teacher_energy_offsets
        if fill_offsets is not None and fill_numbers and not offsets_determine(
                [s.numbers for s in val_structures if s.energy is not None], fill_numbers):
            fill_offsets = teacher_energy_offsets(self.labels, with_energy)
            if self.rank == 0 and (fill_offsets is None
                                   or not offsets_determine([s.numbers for s in with_energy], fill_numbers)):
                print("note: the structures with reference energies do not determine the teacher's per-element "
                      "offsets for every structure whose energy the teacher fills in (an element or composition "
                      "only there): those energies are off by a constant per composition", file=sys.stderr)
        if self.teacher_energy_offsets and not self.labels.relative_energies and self.rank == 0:
            print("note: the teacher's energies are on another per-element scale than the reference energies (mean "
                  f"difference above {ENERGY_SCALE_MISMATCH_EV_PER_ATOM * 1000:g} meV/atom on the validation split: "
                  "another level of theory?); it is compared "
                  "and fills missing energies after per-element offsets fitted there (teacher_energy_offsets_eV in "
                  "summary.json)", file=sys.stderr)
        self.train_loader = make_loader(self.dataset, self.train_idx, self.labels, mc.cutoff, tc.batch_size,
                                        shuffle=sampler is None, seed=tc.seed, dtype=self.dtype, s=s,
                                        num_workers=tc.num_workers, sampler=sampler,
                                        teacher_energy_offsets=fill_offsets,
                                        teacher_fills_missing=True)  # teacher-only structures: its E/F as targets
        val_shard = self.val_idx[self.rank :: self.world]  # may be empty on some ranks: they add zeros
        self.val_loader = make_loader(self.dataset, val_shard, self.labels, mc.cutoff, tc.val_batch_size,
                                      shuffle=False, seed=tc.seed, dtype=self.dtype, s=0,
                                      teacher_energy_offsets=self.teacher_energy_offsets) if val_shard else []
        self.log_path = os.path.join(self.out, "log.jsonl")
        if self.rank == 0:  # only now that every check has passed: a run refused above changes nothing
            # a run already past train.epochs trains nothing: its config.yaml keeps the epochs it was trained for
            done = resume_state is not None and int(resume_state["epoch"]) >= tc.epochs
            self._write_run_files(fresh=resume_state is None, keep_config=done)

    def _selected(self, config) -> List[int]:
        """Indices of the structures data.elements and data.max_atoms keep."""
        from training.data.subsets import select

        return select(self.dataset, only_elements=config.data.elements, natoms=(None, config.data.max_atoms))

    def _filtered_split(self, split: Dict[str, List[int]], config, quiet: bool = False) -> Dict[str, List[int]]:
        """A given split file with data.elements / data.max_atoms applied to each of its splits (they filter the
        fraction-made splits too); a note says how many structures they left out of which split."""
        if config.data.elements is None and config.data.max_atoms is None:
            return split
        keep = set(self._selected(config))
        filtered = {name: [i for i in idx if i in keep] for name, idx in split.items()}
        dropped = {name: len(idx) - len(filtered[name]) for name, idx in split.items()
                   if len(idx) != len(filtered[name])}
        if dropped and self.rank == 0 and not quiet:
            print(f"note: data.elements {config.data.elements} / data.max_atoms {config.data.max_atoms} leave out "
                  + ", ".join(f"{n} of the {len(split[name])} {name}" for name, n in dropped.items())
                  + f" structures of {config.data.split_file}", file=sys.stderr)
        return filtered

    def _write_run_files(self, fresh: bool, keep_config: bool = False) -> None:
        """split.json and config.yaml (unless `keep_config`); a fresh run first removes what an earlier run in
        this directory left (--restart, or a run stopped before its first checkpoint): its log would mix with
        this run's, and its best.pt would be evaluated on this run's split."""
        from training.data.subsets import save_split

        os.makedirs(self.out, exist_ok=True)
        lock = _RunLock(self.out)  # never under a trainer still running in this directory (fit() locks it too)
        try:
            if fresh:
                for name in ("log.jsonl", "summary.json", "best.pt", "last.pt"):
                    path = os.path.join(self.out, name)
                    if os.path.exists(path):
                        os.remove(path)
            config = self.config
            save_split(os.path.join(self.out, "split.json"), self.split, seed=config.data.split_seed,
                       count=len(self.dataset), dataset=os.path.abspath(config.data.path))
            if not keep_config:
                with atomic_open(os.path.join(self.out, "config.yaml")) as fh:
                    yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
        finally:
            lock.release()

    def _check_validation_elements(self, val_structures, species: List[int]) -> None:
        """The validation split may hold an element the training split lacks (groups are split whole): the
        student would have no embedding for it."""
        from ase.data import chemical_symbols

        known = set(species)
        for s in val_structures:
            missing = sorted({int(z) for z in s.numbers} - known)
            if missing:
                names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
                raise HessforgeError(
                    f"{self.config.data.path}: validation structure {s.id!r} holds {names}, which no training "
                    "structure has (the split assigns whole molecules): the student cannot learn an element it "
                    "never trains on. Choose another data.split_seed, give the split yourself (data.split_file), "
                    "or leave the element out (data.elements)")

    def _check_stress_targets(self, structures) -> None:
        """loss.stress > 0 needs bulk training structures with a stress: the dataset's or the teacher's."""
        bulk = [s for s in structures if s.pbc.all()]
        have = sum(1 for s in bulk if s.stress is not None
                   or (self.labels is not None and self.labels.get(s.id).stress is not None))
        if not have:
            raise HessforgeError(
                f"{self.config.data.path}: loss.stress > 0, but none of the {len(structures)} training structures has "
                f"a stress target ({len(bulk)} are periodic in 3 directions; stress comes from the dataset, which "
                "`hessforge ingest` reads from a 'stress' or 'virial' key, or from teacher labels made by a teacher "
                "that gives stress: chgnet, lammps:, mace:, ani1x; labels made before hessforge stored stress have "
                "none: label again into another directory)")
        if self.rank == 0 and have < len(bulk):
            print(f"note: {len(bulk) - have} of {len(bulk)} bulk training structures have no stress target; the "
                  "stress term uses the others", file=sys.stderr)

    def _build_heads(self, species: List[int]) -> DistillationHeads:
        """The learned projections of the n2n / a2a baselines (no parameters when neither is on)."""
        lc, where = self.config.loss, self.config.data.labels
        if lc.n2n <= 0 and lc.a2a <= 0:
            return DistillationHeads()
        if self.labels is None:
            raise HessforgeError("loss.n2n / loss.a2a > 0 need teacher labels: set data.labels")
        check_labels_for_loss(self.config, self.labels.metadata, where)
        node_features = teacher_features = embedding_features = table = None
        if lc.n2n > 0:
            node_features = getattr(self.model, "hidden", None)
            if not node_features:
                raise HessforgeError(f"student {type(self.model).__name__} does not say its node feature size "
                                     "(attribute 'hidden'): the n2n baseline needs it")
            teacher_features = self.labels.feature_dim
        if lc.a2a > 0:
            embedding_features = student_embedding(self.model).embedding_dim
            table = self.labels.element_embeddings()
            missing = sorted(set(species) - set(table))
            if missing:
                raise HessforgeError(f"{where}: the teacher has no element embedding for Z={missing} (it has "
                                     f"{sorted(table)}), which the training set holds: a2a cannot be used")
        return DistillationHeads(node_features, teacher_features, embedding_features, table)

    # ------------------------------------------------------------------------------------------ state
    def _state(self) -> dict:
        with self.ema.average_parameters():
            ema_model_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model_hparams": self.model_hparams, "model_state": self.model.state_dict(),
            "ema_model_state": ema_model_state, "ema": self.ema.state_dict(),
            "heads_state": self.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "step": self.step, "best_val": self.best_val, "kd_halved": self.kd_halved,
            "lambda_kd": self.weights.hessian, "elapsed": self.elapsed, "history": self.history,
            "teacher_val": self.teacher_val, "config": self.config.to_dict(), "data_identity": self.data_identity,
            "split_sha256": self.split_digest,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save(self, name: str = "last.pt", state: Optional[dict] = None) -> None:
        if self.rank != 0:
            return
        path = os.path.join(self.out, name)
        with atomic_path(path) as tmp:  # an interrupted save never leaves a broken checkpoint
            torch.save(state or self._state(), tmp)

    def _load(self, path: str, state: dict) -> None:
        if state["model_hparams"] != self.model_hparams:
            raise HessforgeError(f"{path}: checkpoint was made with a different model ({state['model_hparams']}); "
                                 "use --restart or another train.out")
        self.model.load_state_dict(state["model_state"])
        self.model.to(self.dtype)
        heads_state = state.get("heads_state") or {}
        if set(heads_state) != set(self.heads.state_dict()):
            raise HessforgeError(f"{path}: checkpoint was made with other n2n/a2a settings (distillation heads "
                                 f"{sorted(heads_state)} vs {sorted(self.heads.state_dict())}); use --restart or "
                                 "another train.out")
        try:
            self.heads.load_state_dict(heads_state)
        except RuntimeError as err:
            raise HessforgeError(f"{path}: distillation heads do not fit this config ({err}); use --restart or "
                                 "another train.out") from None
        self.heads.to(self.dtype)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_val, self.kd_halved = state["best_val"], state["kd_halved"]
        self.weights.hessian = state["lambda_kd"]
        self.elapsed = state.get("elapsed", 0.0)
        self.history = state.get("history", [])
        self.teacher_val = state.get("teacher_val")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.rank == 0:
            print(f"resuming from {path} at epoch {self.epoch} (step {self.step})")
            _truncate_log(os.path.join(self.out, "log.jsonl"), self.step, self.epoch)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------ passes
    def validate(self) -> Dict[str, float]:
        """Energy/force (and, with loss.stress, stress) errors of the EMA weights on the validation set."""
        acc = _Accumulator()
        self.model.eval()
        with self.ema.average_parameters():
            for batch in self.val_loader:
                if self.weights.stress > 0:
                    out = energy_forces_strain_derivative(self.model, batch.graph)
                    stress = stress_from_strain_derivative(out["dE_deps"], batch.graph.cell).detach()
                    if self.val_against_teacher:
                        acc.add_stress(stress, batch.teacher_stress,
                                       batch.teacher_stress_mask & batch.graph.pbc.all(dim=1))
                    else:
                        acc.add_stress(stress, batch.stress, stress_targets_mask(batch))
                else:
                    out = self.model(batch.graph, compute_forces=True, create_graph=False)
                if self.val_against_teacher:
                    acc.add(out["energy"].detach(), batch.teacher_energy, batch.natoms, out["forces"].detach(),
                            batch.teacher_forces)
                else:
                    acc.add(out["energy"].detach(), batch.energy, batch.natoms, out["forces"].detach(),
                            batch.forces, batch.energy_mask, batch.forces_mask)
        self.model.train()
        return acc.result(self.weights)

    def teacher_validation(self) -> Optional[Dict[str, float]]:
        """The teacher's own energy/force loss against the reference labels on the validation set."""
        if self.labels is None or self.val_against_teacher:
            return None
        acc = _Accumulator()
        unlabelled = 0
        for batch in self.val_loader:
            if batch.teacher_energy is None:
                unlabelled += 1
                continue
            acc.add(batch.teacher_energy, batch.energy, batch.natoms, batch.teacher_forces, batch.forces,
                    batch.energy_mask, batch.forces_mask)
            if self.weights.stress > 0:
                acc.add_stress(batch.teacher_stress, batch.stress,
                               stress_targets_mask(batch) & batch.teacher_stress_mask)
        result = acc.result(self.weights)  # collective: every rank takes part, whatever its shard held
        return None if _all_reduce_sum([float(unlabelled)])[0] > 0 else result

    def train_epoch(self, bar) -> Dict[str, float]:
        self.model.train()
        # Shuffling and Hessian-row sampling depend only on (seed, epoch), so a resumed run continues exactly
        # as an uninterrupted one would.
        seed = self.config.train.seed
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        else:
            self.train_loader.generator.manual_seed(seed + self.epoch)
        self.train_loader.collate_fn.seed = seed + 7919 * (self.epoch + 1)
        sums: Dict[str, float] = {}
        count = 0
        batches = iter(self.train_loader)
        # every rank takes the same number of steps: a rank whose shard has run out (shards differ by at
        # most one structure) takes part in the gradient average with weight 0
        steps = self.sampler.steps(self.config.train.batch_size) if self.sampler is not None else len(self.train_loader)
        for _ in range(steps):
            batch = next(batches, None)
            self.optimizer.zero_grad(set_to_none=True)
            terms = None if batch is None else compute_loss(self.model, batch, self.weights, training=True,
                                                              heads=self.heads)
            if dist.is_initialized():  # every rank, with or without a batch: the counts are all-reduced
                loss, record, weight = _globally_weighted(terms, self.weights)
            else:
                loss, weight = terms["total"], 1.0
                record = {k: float(v.detach()) for k, v in terms.items() if not k.startswith("_")}
            if loss is not None:
                loss.backward()
            _average_gradients(self.model, weight)
            _average_gradients(self.heads, weight)
            record = _reduce_terms(record, weight)  # the step's losses over all ranks' structures
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.heads.parameters()),
                                                       self.config.optim.grad_clip)
            if not math.isfinite(record["total"]):
                raise HessforgeError(f"loss became {record['total']} at step {self.step}: lower optim.lr or check the data")
            self.optimizer.step()
            self.ema.update()
            self.step += 1
            count += 1
            for k, v in record.items():
                sums[k] = sums.get(k, 0.0) + v
            record.update(kind="step", epoch=self.epoch, step=self.step, grad_norm=float(grad_norm),
                          lr=self.optimizer.param_groups[0]["lr"])
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['total']:.4g}")
        return {f"train_{k}": v / max(count, 1) for k, v in sums.items()}

    def fit(self) -> Dict[str, float]:
        tc = self.config.train
        if self.teacher_val is None:
            self.teacher_val = self.teacher_validation()
        interrupted = {"flag": False}

        def on_term(signum, frame):  # SIGTERM (a batch scheduler; torchrun passes it to every rank): finish
            interrupted["flag"] = True  # the epoch, checkpoint, exit

        lock = _RunLock(self.out) if self.rank == 0 else None  # one trainer per run directory at a time
        previous = signal.signal(signal.SIGTERM, on_term)
        start = time.time() - self.elapsed
        total_steps = max(tc.epochs - self.epoch, 0) * len(self.train_loader)
        if self.epoch >= tc.epochs and self.rank == 0:
            print(f"{self.out}: already trained {self.epoch} epochs (train.epochs {tc.epochs}); nothing to do "
                  "(raise --epochs to train on)")
        # a progress bar only on a terminal: in a log file it is thousands of redrawn lines
        bar = tqdm(total=total_steps, disable=self.rank != 0 or not sys.stderr.isatty(), desc="train",
                   dynamic_ncols=True)
        stopped = None
        at_epoch_end = True  # last.pt holds epoch-end states only: a resumed run then continues exactly
        saved_epoch = self.epoch  # the epoch last.pt holds (or will hold: resumed from it, or nothing yet)
        finished = None  # the last finished epoch's state between checkpoints, for an interrupt mid-epoch
        try:
            while self.epoch < tc.epochs:
                at_epoch_end = False
                train_metrics = self.train_epoch(bar)
                self.epoch += 1
                val = self.validate()
                self.scheduler.step(val["loss_ef"])
                trained_kd = self.weights.hessian  # the epoch record says what this epoch trained with
                self._maybe_halve_kd(val)
                self.elapsed = time.time() - start
                record = {"kind": "epoch", "epoch": self.epoch, "step": self.step, "elapsed_s": self.elapsed,
                          "lr": self.optimizer.param_groups[0]["lr"], "lambda_kd": trained_kd,
                          **train_metrics, **{f"val_{k}": v for k, v in val.items()}}
                self.history.append(record)
                self._log(record)
                state = None
                if val["loss_ef"] < self.best_val:
                    self.best_val = val["loss_ef"]
                    state = self._state()
                    self.save("best.pt", state)
                if self.epoch % tc.checkpoint_every == 0:
                    self.save("last.pt", state)
                    saved_epoch, finished = self.epoch, None
                elif self.rank == 0:
                    finished = copy.deepcopy(state or self._state())
                at_epoch_end = True
                # the ranks stop together: a SIGTERM that reached any rank, or any rank's clock past the limit
                term, late = _all_reduce_sum([float(interrupted["flag"]),
                                              float(tc.max_time_s is not None and self.elapsed > tc.max_time_s)])
                if term > 0:
                    interrupted["flag"] = True
                    break
                if late > 0:
                    if self.rank == 0:
                        print(f"stopping after {self.elapsed:.0f} s (train.max_time_s)")
                    stopped = "max_time_s"
                    break
        except KeyboardInterrupt:  # Ctrl-C: keep the last finished epoch (not the last checkpoint) and say so
            if not at_epoch_end and finished is not None:
                self.save("last.pt", finished)
                saved_epoch = finished["epoch"]
            elif at_epoch_end:
                saved_epoch = self.epoch  # saved below
            raise KeyboardInterrupt(
                f"after epoch {saved_epoch} of {tc.epochs}: saved in {self.out}/last.pt; rerun the same command "
                "to resume" if saved_epoch else "in the first epoch: nothing saved; rerun to start again") from None
        finally:
            bar.close()
            self.elapsed = time.time() - start
            if at_epoch_end:  # mid-epoch (Ctrl-C, an error): keep the last epoch-end checkpoint
                self.save("last.pt")
            signal.signal(signal.SIGTERM, previous)
            if lock is not None:
                lock.release()
        if interrupted["flag"] and self.epoch < tc.epochs:
            # not finished: no summary.json (which says a run is done); a rerun resumes from last.pt
            raise KeyboardInterrupt(f"SIGTERM after epoch {self.epoch} of {tc.epochs}; checkpointed in "
                                    f"{self.out}/last.pt, rerun the same command to resume")
        summary = {"epochs": self.epoch, "steps": self.step, "best_val_loss_ef": self.best_val,
                   **self._best_epoch_metrics(),
                   "elapsed_s": self.elapsed, "lambda_kd": self.weights.hessian, "kd_halved": self.kd_halved,
                   "teacher_val": self.teacher_val, "teacher_energy_offsets_eV": self.teacher_energy_offsets,
                   "finished": self.epoch >= tc.epochs,
                   "stopped": stopped}
        if self.rank == 0:
            write_json(os.path.join(self.out, "summary.json"), summary, indent=2)
        return summary

    def _best_epoch_metrics(self) -> dict:
        """The epoch of best.pt and its unweighted validation errors: what runs with different loss weights
        (whose weighted losses do not compare) are compared by."""
        best = [r for r in self.history if r.get("kind") == "epoch" and r.get("val_loss_ef") == self.best_val]
        if not best:
            return {}
        keys = ("energy_mae_mev_per_atom", "forces_mae_mev_per_A", "stress_mae_gpa")
        return {"best_epoch": best[-1]["epoch"],
                "best_val": {k: best[-1][f"val_{k}"] for k in keys if f"val_{k}" in best[-1]}}

    def _maybe_halve_kd(self, val: Dict[str, float]) -> None:
        lc = self.config.loss
        if (lc.halve_kd_when_better_than_teacher and not self.kd_halved and self.teacher_val is not None
                and self.weights.hessian > 0 and val["loss_ef"] < self.teacher_val["loss_ef"]):
            self.weights.hessian /= 2
            self.kd_halved = True
            self._log({"kind": "event", "epoch": self.epoch, "step": self.step, "event": "lambda_kd_halved",
                       "lambda_kd": self.weights.hessian})
