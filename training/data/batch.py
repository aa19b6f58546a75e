"""Batches for training: structures (+ teacher labels) -> one AtomicGraph and its targets.

Hessian rows are packed for batched vector-Jacobian products. For sample t, structure b contributes the
teacher row of coordinate hessian_index[t, b] (a GLOBAL flattened index 3*atom + axis into the batch). As
atoms of different structures never interact, one backward pass of forces with grad_outputs that are one-hot
at all B indices of sample t returns every structure's row at once, each on its own atoms: hessian_target[t]
is that [N, 3] result, built from the stored rows (see `hessian_grad_outputs`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from engine.errors import HessforgeError
from engine.graph import AtomicGraph, build_graph, graph_to
from training.reference_energies import offset_energy


@dataclass
class Batch:
    graph: AtomicGraph
    ids: List[str]  # structure ids, in batch order
    natoms: torch.Tensor  # [B] long
    # Energies stay float64 whatever the working dtype: absolute molecular energies reach 1e4 eV, where
    # float32 would round off ~1 meV. Cast after subtracting references if you need float32.
    energy: torch.Tensor  # [B] float64 eV, reference labels (0 where missing; collate(teacher_fills_missing): the teacher's)
    energy_mask: torch.Tensor  # [B] bool, True where the structure has an energy target
    forces: torch.Tensor  # [N, 3] eV/Å, reference labels (0 where missing; as energy)
    forces_mask: torch.Tensor  # [N] bool, True on atoms of structures with force targets
    teacher_energy: Optional[torch.Tensor] = None  # [B] float64 eV
    teacher_forces: Optional[torch.Tensor] = None  # [N, 3] eV/Å
    hessian_index: Optional[torch.Tensor] = None  # [s, B] long, global coordinate index of each sampled row
    hessian_target: Optional[torch.Tensor] = None  # [s, N, 3] eV/Å², row t of structure b on b's atoms
    hessian_mask: Optional[torch.Tensor] = None  # [s, B] bool, False where b had fewer than s stored rows
    teacher_features: Optional[torch.Tensor] = None  # [N, D] teacher per-atom features (labels with --features)
    # stress targets of bulk structures (eV/Å³, [B, 3, 3], 0 where missing): the reference's, else (training
    # batches, teacher_fills_missing) the teacher's
    stress: Optional[torch.Tensor] = None
    stress_mask: Optional[torch.Tensor] = None  # [B] bool, True where the structure has a stress target
    teacher_stress: Optional[torch.Tensor] = None  # [B, 3, 3] eV/Å³, 0 where the teacher gave none
    teacher_stress_mask: Optional[torch.Tensor] = None  # [B] bool

    @property
    def num_structures(self) -> int:
        return len(self.ids)


def batch_to(batch: Batch, device, non_blocking: bool = False) -> Batch:
    """The same batch with every tensor (and the graph) on `device`."""
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, AtomicGraph):
            v = graph_to(v, device=device)
        elif isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=non_blocking)
        out[f.name] = v
    return Batch(**out)


def hessian_grad_outputs(batch: Batch) -> torch.Tensor:
    """[s, 3N] grad_outputs for the batched VJP: one-hot at hessian_index, zero where hessian_mask is False
    (so a padded sample contributes nothing; its target is zero too). The same selectors the loss uses."""
    from training.losses import onehot_rows

    n = batch.graph.positions.shape[0]
    return onehot_rows(batch.hessian_index, n, batch.graph.positions.dtype, batch.hessian_mask).reshape(-1, 3 * n)


def _stress_targets(stresses: Sequence[Optional[np.ndarray]], dtype: torch.dtype):
    """[B, 3, 3] stresses (zeros where None) and the [B] mask of those given."""
    out = torch.zeros(len(stresses), 3, 3, dtype=dtype)
    mask = torch.zeros(len(stresses), dtype=torch.bool)
    for b, value in enumerate(stresses):
        if value is not None:
            out[b] = torch.as_tensor(np.asarray(value, dtype=np.float64).reshape(3, 3), dtype=dtype)
            mask[b] = True
    return out, mask


def _label_for(labels, structure, k: int):
    if isinstance(labels, (list, tuple)):
        rec = labels[k]
    else:
        rec = labels.get(structure.id)
    if rec is None:
        raise HessforgeError(f"structure {structure.id!r} has no teacher labels")
    if rec.forces.shape[0] != structure.natoms:
        raise HessforgeError(f"structure {structure.id!r}: teacher labels are for {rec.forces.shape[0]} atoms, the "
                             f"structure has {structure.natoms} (labels made for another dataset?)")
    return rec


def collate(structures: Sequence, labels=None, cutoff: float = 5.0, dtype: torch.dtype = torch.float32,
            hessian_rows_per_structure: int = 0, generator: Optional[torch.Generator] = None,
            teacher_energy_offsets: Optional[Dict[int, float]] = None, teacher_fills_missing: bool = False) -> Batch:
    """Batch `structures` (training.data.records.Structure). `labels`: None, a LabelStore (looked up by id) or
    a list of LabelRecord aligned with `structures`. With labels and s = hessian_rows_per_structure > 0, s of
    each structure's stored rows are drawn uniformly without replacement using `generator`.
    `teacher_energy_offsets` {Z: eV}: subtracted per atom from the teacher's energies, for teachers whose
    energies are relative (training.labels.teacher_energy_offsets). `teacher_fills_missing` (training batches):
    a structure without a reference energy or forces (ingest --allow-missing-labels) gets the teacher's as its
    energy/force targets, masks set: teacher-only training fits the teacher's energies and forces, not only its
    Hessian rows."""
    structures = list(structures)
    ids = [s.id for s in structures]
    graph = build_graph([s.numbers for s in structures], [s.positions for s in structures],
                        [s.cell for s in structures], [s.pbc for s in structures], cutoff, dtype, where=ids)
    natoms = torch.tensor([s.natoms for s in structures], dtype=torch.long)
    n_total = int(natoms.sum())
    offsets = np.concatenate([[0], np.cumsum(natoms.numpy())[:-1]]).astype(np.int64)

    energy = torch.tensor([0.0 if s.energy is None else s.energy for s in structures], dtype=torch.float64)
    energy_mask = torch.tensor([s.energy is not None for s in structures])
    forces = torch.zeros(n_total, 3, dtype=dtype)
    forces_mask = torch.zeros(n_total, dtype=torch.bool)
    for s, off in zip(structures, offsets):
        if s.forces is not None:
            forces[off:off + s.natoms] = torch.from_numpy(s.forces)
            forces_mask[off:off + s.natoms] = True
    batch = Batch(graph, ids, natoms, energy, energy_mask, forces, forces_mask)
    batch.stress, batch.stress_mask = _stress_targets([s.stress for s in structures], dtype)
    if labels is None:
        return batch

    recs = [_label_for(labels, s, k) for k, s in enumerate(structures)]
    energy_offsets = teacher_energy_offsets or {}
    batch.teacher_energy = torch.tensor([r.energy - offset_energy(s.numbers, energy_offsets)
                                         for r, s in zip(recs, structures)], dtype=torch.float64)
    batch.teacher_forces = torch.from_numpy(np.concatenate([r.forces for r in recs])).to(dtype)
    batch.teacher_stress, batch.teacher_stress_mask = _stress_targets([getattr(r, "stress", None) for r in recs],
                                                                      dtype)
    if teacher_fills_missing:
        batch.energy = torch.where(energy_mask, energy, batch.teacher_energy)
        batch.forces = torch.where(forces_mask[:, None], forces, batch.teacher_forces)
        batch.energy_mask = torch.ones_like(energy_mask)
        batch.forces_mask = torch.ones_like(forces_mask)
        batch.stress = torch.where(batch.stress_mask[:, None, None], batch.stress, batch.teacher_stress)
        batch.stress_mask = batch.stress_mask | batch.teacher_stress_mask
    have = [getattr(r, "features", None) is not None for r in recs]
    if any(have):
        if not all(have) or len({r.features.shape[1] for r in recs}) != 1:
            raise HessforgeError(f"structures {ids}: teacher features are stored for some records only, or with "
                                 "different sizes (labels directories mixed?)")
        batch.teacher_features = torch.from_numpy(np.concatenate([r.features for r in recs])).to(dtype)
    s_rows = int(hessian_rows_per_structure)
    if s_rows <= 0:
        return batch
    B = len(structures)
    index = torch.zeros(s_rows, B, dtype=torch.long)
    mask = torch.zeros(s_rows, B, dtype=torch.bool)
    target = torch.zeros(s_rows, n_total, 3, dtype=dtype)
    for b, (rec, off) in enumerate(zip(recs, offsets)):
        n, k = rec.forces.shape[0], rec.rows.shape[0]
        m = min(s_rows, k)
        pick = torch.randperm(k, generator=generator)[:m].numpy()
        index[:m, b] = torch.from_numpy(3 * off + rec.rows[pick])
        index[m:, b] = 3 * off  # padding: any coordinate of b; its grad_output weight is 0 (mask False)
        mask[:m, b] = True
        target[:m, off:off + n] = torch.from_numpy(np.asarray(rec.hessian_rows[pick], dtype=np.float64)
                                                   .reshape(m, n, 3)).to(dtype)
    batch.hessian_index, batch.hessian_target, batch.hessian_mask = index, target, mask
    return batch


class Collater:
    """collate() with fixed settings, as a DataLoader collate_fn. Row sampling is reproducible: the generator
    is seeded from `seed` (and, in a DataLoader worker, the worker id, so workers never draw identical rows)
    and re-seeded whenever `seed` changes. Workers get a fresh copy of this object each epoch (make_loader does
    not keep workers alive), so setting `loader.collate_fn.seed` per epoch gives per-epoch rows that depend on
    (seed, epoch) only, with or without workers; left unchanged, rows in the main process keep advancing while
    each worker replays its stream (on differently shuffled structures)."""

    def __init__(self, labels, cutoff: float, dtype: torch.dtype, hessian_rows_per_structure: int, seed: int,
                 teacher_energy_offsets: Optional[Dict[int, float]] = None, teacher_fills_missing: bool = False):
        self.labels, self.cutoff, self.dtype = labels, cutoff, dtype
        self.teacher_energy_offsets = teacher_energy_offsets
        self.teacher_fills_missing = teacher_fills_missing
        self.s, self.seed = hessian_rows_per_structure, seed
        self._gen, self._gen_key = None, None

    def _generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        key = (int(self.seed), None if info is None else info.id)
        if self._gen is None or self._gen_key != key:
            if info is None:
                seed = key[0] % (2**63)
            else:
                seed = int(np.random.SeedSequence([key[0] % (2**63), info.id + 1]).generate_state(1, np.uint64)[0])
                seed %= 2**63
            self._gen, self._gen_key = torch.Generator().manual_seed(seed), key
        return self._gen

    def __call__(self, structures) -> Batch:
        return collate(structures, self.labels, self.cutoff, self.dtype, self.s, self._generator(),
                       self.teacher_energy_offsets, self.teacher_fills_missing)


def make_loader(dataset, indices: Optional[Sequence[int]], labels, cutoff: float, batch_size: int,
                shuffle: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32, s: int = 0,
                num_workers: int = 0, sampler=None, drop_last: bool = False,
                teacher_energy_offsets: Optional[Dict[int, float]] = None,
                teacher_fills_missing: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of Batch over dataset[indices] (all when None). A `sampler` (e.g. DistributedSampler)
    yields positions into `indices`: build it over range(len(indices)); `shuffle` is then the sampler's job.
    `teacher_energy_offsets`, `teacher_fills_missing`: as in collate."""
    from torch.utils.data import DataLoader, Subset

    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not indices:
        raise HessforgeError("no structures to load (empty index list)")
    gen = torch.Generator().manual_seed(int(seed))  # shuffling order and worker seeds
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=num_workers, generator=gen, drop_last=drop_last,
                      collate_fn=Collater(labels, cutoff, dtype, s, seed, teacher_energy_offsets,
                                         teacher_fills_missing),
                      persistent_workers=False)
