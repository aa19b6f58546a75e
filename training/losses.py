"""Training losses: energy/force matching, Hessian-row distillation, energy-gradient and force distillation,
stress matching for bulk structures (gradient-force students: (1/V) dE/dε from engine.stress, whose backward
pass gives the forces too; the strain is zero, so the forces and Hessian rows are those without it).

Hessian rows of the student are never formed as a full Hessian. For a batch, sample t picks one coordinate
row j_bt in every structure b; since atoms of different structures do not interact, one vector-Jacobian
product with the one-hot sum over b of e_{j_bt} returns all B rows at once:
    d(Σ_b F[j_bt]) / dr  =  -Σ_b H_student[j_bt, :]   (rows of different structures do not overlap).
The s samples are s such products, batched in one backward call with is_grads_batched (vmap).

Feature-distillation baselines (Kelvinius et al. 2023, the paper's n2n and a2a), through learned linear
projections that live in `DistillationHeads` (owned by the trainer: optimized with the student, saved in its
checkpoints, never exported with the student):
- n2n: λ_n2n · mean over atoms of ‖P(s_i) − f_i‖ with s_i the student's final scalar features [F]
  (PaiNN's `node_features`), f_i the teacher's final per-atom features [D] stored with the labels
  (`hessforge label --features`; ANI-1x: last hidden layer of its atomic networks, MACE: invariant channels of
  its node features), P: Linear(F → D).
- a2a: λ_a2a · mean over atoms of ‖Q(x(z_i)) − e(z_i)‖ with x(z) the student's initial per-element embedding
  (PaiNN.embedding, [F]) and e(z) the teacher's learned per-element embedding [D_e] stored in the labels
  metadata (`hessforge label --embeddings`; MACE: node_embedding of the element's one-hot; ANI-1x has none),
  Q: Linear(F → D_e). Only the embedding table (and Q) receive gradients from this term: it pulls the
  student's element embeddings toward a linear image of the teacher's, weighted by how often each element
  occurs in the batch.
With kind "mse" the norms become mean squared components, as for forces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

from engine.errors import HessforgeError
from engine.graph import AtomicGraph
from engine.stress import energy_forces_strain_derivative, stress_from_strain_derivative


@dataclass
class LossWeights:
    energy: float = 5.0  # λ_U
    forces: float = 100.0  # λ_F
    hessian: float = 400.0  # λ_KD
    energy_gradient: float = 0.0  # direct-force students: ‖F_ref + ∇E‖²
    force_distill: float = 0.0  # baseline: teacher forces as extra targets
    n2n: float = 0.0  # baseline: teacher per-atom features through a learned projection (DistillationHeads)
    a2a: float = 0.0  # baseline: teacher per-element embeddings through a learned projection
    stress: float = 0.0  # λ_S: stress (eV/Å³) of bulk structures, gradient-force students
    # "l2mae": norms, not squares, as in the paper's code (fairchem per_atom_mae / l2mae and block norms of
    # Hessian rows); with λ = 5/100/400 the squared form let the Hessian term swamp energies and forces
    # (quickstart: force MAE 590 vs 174 meV/Å undistilled). "mse": squared errors.
    kind: str = "l2mae"


def onehot_rows(hessian_index: torch.Tensor, num_atoms: int, dtype: torch.dtype,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[s, B] global flattened coordinate indices -> [s, N, 3] one-hot sums (one 1 per structure; none where
    `mask` [s, B] is False)."""
    s = hessian_index.shape[0]
    flat = torch.zeros(s, num_atoms * 3, dtype=dtype, device=hessian_index.device)
    ones = torch.ones(hessian_index.shape, dtype=dtype, device=hessian_index.device)
    if mask is not None:
        ones = ones * mask.to(dtype)
    flat.scatter_(1, hessian_index, ones)
    return flat.view(s, num_atoms, 3)


def student_hessian_rows(
    forces: torch.Tensor, positions: torch.Tensor, hessian_index: torch.Tensor, create_graph: bool = True,
    mask: Optional[torch.Tensor] = None, retain_graph: Optional[bool] = None,
) -> torch.Tensor:
    """Rows of the student's Hessian -dF/dr for the sampled indices, packed like the targets: [s, N, 3].

    `forces` must have been computed from `positions` with a graph (create_graph=True for gradient-force
    students, positions.requires_grad for direct-force students). retain_graph (default: create_graph):
    keep the forces' graph for a later gradient through it.
    """
    selectors = onehot_rows(hessian_index, positions.shape[0], forces.dtype, mask)
    (rows,) = torch.autograd.grad(
        forces, positions, grad_outputs=selectors, create_graph=create_graph, is_grads_batched=True,
        retain_graph=create_graph if retain_graph is None else retain_graph,
    )
    return -rows


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of `values` over the leading entries where `mask` is True (all if None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def energy_error(pred, ref, natoms, mask=None, kind: str = "l2mae") -> torch.Tensor:
    """l2mae: mean |ΔE| / N_atoms (fairchem's per_atom_mae); mse: mean ΔE²."""
    diff = pred - ref
    per = diff.square() if kind == "mse" else diff.abs() / natoms.to(diff.dtype)
    return _masked_mean(per, mask)


def vector_error(pred, ref, mask=None, kind: str = "l2mae") -> torch.Tensor:
    """Per-atom 3-vectors [..., N, 3]. l2mae: mean over atoms of ‖Δ‖; mse: mean of squared components."""
    diff = pred - ref
    per = diff.square().mean(-1) if kind == "mse" else torch.linalg.vector_norm(diff, dim=-1)
    return _masked_mean(per, mask)


def stress_error(pred, ref, mask=None, kind: str = "l2mae") -> torch.Tensor:
    """[B, 3, 3] stresses (eV/Å³). l2mae: mean over structures of the Frobenius norm of the difference; mse:
    mean of squared components. `mask` [B]: the structures that have a target."""
    diff = pred - ref
    if mask is not None:  # NaN predictions (no volume) of structures without a target must not reach the sum
        diff = torch.where(mask[:, None, None], diff, torch.zeros_like(diff))
    per = diff.square().mean((-2, -1)) if kind == "mse" else torch.linalg.matrix_norm(diff)
    return _masked_mean(per, mask)


def hessian_error(rows, target, atom_mask=None, kind: str = "l2mae") -> torch.Tensor:
    """Sampled rows packed [s, N, 3]. l2mae (the released code's get_force_jac_loss): the mean over (row, atom)
    of the 3-block norms, atoms pooled over the whole batch: Σ_structures (1/s) Σ_rows Σ_atoms ‖Δ‖ divided by
    the batch's atoms, so a structure weighs by its atom count (not a mean of per-structure means); mse: the
    mean squared entry. `atom_mask` [s, N] drops padded samples (each atom averages over its valid rows)."""
    diff = rows - target
    per = diff.square().mean(-1) if kind == "mse" else torch.linalg.vector_norm(diff, dim=-1)  # [s, N]
    if atom_mask is None:
        return per.mean()
    weight = atom_mask.to(per.dtype)
    per_atom = (per * weight).sum(0) / weight.sum(0).clamp(min=1)  # mean over each atom's valid rows
    return _masked_mean(per_atom, weight.sum(0) > 0)


class DistillationHeads(nn.Module):
    """The learned projections of the n2n and a2a baselines (see the module docstring).

    n2n: Linear(node_features → teacher_features) when both sizes are given. a2a: Linear(embedding_features →
    D_e) with the teacher's embeddings as buffers `a2a_table` [119, D_e] (row Z) and `a2a_known` [119] bool.
    With neither, the module has no parameters and changes nothing.
    """

    def __init__(self, node_features: Optional[int] = None, teacher_features: Optional[int] = None,
                 embedding_features: Optional[int] = None,
                 teacher_embeddings: Optional[Mapping[int, np.ndarray]] = None):
        super().__init__()
        self.n2n = nn.Linear(node_features, teacher_features) if node_features and teacher_features else None
        self.a2a = None
        if embedding_features and teacher_embeddings:
            dims = {np.asarray(v).reshape(-1).size for v in teacher_embeddings.values()}
            if len(dims) != 1:
                raise HessforgeError(f"teacher element embeddings have different sizes {sorted(dims)}")
            dim = dims.pop()
            table = torch.zeros(119, dim, dtype=torch.float64)
            known = torch.zeros(119, dtype=torch.bool)
            for z, vec in teacher_embeddings.items():
                table[int(z)] = torch.as_tensor(np.asarray(vec, dtype=np.float64).reshape(-1))
                known[int(z)] = True
            self.register_buffer("a2a_table", table)
            self.register_buffer("a2a_known", known)
            self.a2a = nn.Linear(embedding_features, dim)

    def n2n_error(self, node_features: torch.Tensor, teacher_features: torch.Tensor, kind: str = "l2mae"):
        """mean over atoms of ‖P(s_i) − f_i‖ (l2mae) or of the squared components (mse)."""
        if self.n2n is None:
            raise HessforgeError("loss.n2n > 0 but the distillation heads have no n2n projection")
        if teacher_features.shape[-1] != self.n2n.out_features:
            raise HessforgeError(f"teacher features have {teacher_features.shape[-1]} channels, the n2n projection "
                                 f"was built for {self.n2n.out_features}")
        return vector_error(self.n2n(node_features), teacher_features, None, kind)

    def a2a_error(self, model, numbers: torch.Tensor, kind: str = "l2mae"):
        """mean over atoms of ‖Q(x(z_i)) − e(z_i)‖ (l2mae) or of the squared components (mse)."""
        if self.a2a is None:
            raise HessforgeError("loss.a2a > 0 but the distillation heads have no a2a projection")
        student_embedding(model)  # clear error for a student without one
        base = getattr(model, "module", model)
        x = base.embedding(base.z_to_index[numbers])
        return vector_error(self.a2a(x), self.a2a_table[numbers], None, kind)


def student_embedding(model) -> nn.Embedding:
    """The student's initial per-element embedding (PaiNN.embedding, indexed through z_to_index)."""
    base = getattr(model, "module", model)
    emb = getattr(base, "embedding", None)
    if not isinstance(emb, nn.Embedding) or not hasattr(base, "z_to_index"):
        raise HessforgeError(f"student {type(base).__name__} has no per-element embedding "
                             "(embedding + z_to_index): the a2a baseline needs one")
    return emb


def compute_loss(model, batch, weights: LossWeights, training: bool = True,
                 heads: Optional[DistillationHeads] = None) -> Dict[str, torch.Tensor]:
    """All loss terms for one batch, weighted and summed into 'total'. Unweighted terms are returned too.

    `batch` is a training.data.batch.Batch: graph, energy, forces and, when labelled by a teacher,
    teacher_energy, teacher_forces, hessian_index [s, B], hessian_target [s, N, 3], teacher_features [N, D].
    `heads`: the DistillationHeads holding the n2n/a2a projections (needed when weights.n2n / weights.a2a > 0).
    """
    graph: AtomicGraph = batch.graph
    kind = weights.kind
    use_kd = weights.hessian > 0 and batch.hessian_index is not None
    use_egrad = weights.energy_gradient > 0 and model_direct(model)
    stress_mask = stress_targets_mask(batch) if weights.stress > 0 else None
    use_stress = stress_mask is not None and bool(stress_mask.any())
    if use_stress and model_direct(model):
        raise HessforgeError("loss.stress > 0 needs a gradient-force student (model.force_mode: gradient): a "
                             "direct-force student has no energy derivative to give a stress")
    need_pos_grad = use_kd or use_egrad
    # Gradient-force students need the force graph kept whenever the loss is differentiated again
    # (training: parameters; KD: positions).
    if use_stress:  # forces and dE/dε from one backward pass under a zero strain (engine.stress)
        out = energy_forces_strain_derivative(model, graph, create_graph=training or use_kd)
        positions = out["positions"]
        graph = graph._replace(positions=positions)
    else:
        positions = graph.positions.detach().requires_grad_(need_pos_grad or not model_direct(model))
        graph = graph._replace(positions=positions)
        out = model(graph, compute_forces=True, create_graph=training or use_kd)
    natoms = torch.bincount(graph.batch, minlength=graph.cell.shape[0])
    energy_mask = getattr(batch, "energy_mask", None)
    forces_mask = getattr(batch, "forces_mask", None)
    terms: Dict[str, torch.Tensor] = {}
    # what each term averages over ("_count_" + name): data-parallel training weighs the ranks' terms by these
    # so that a step over several ranks equals one over the whole batch (training.trainer)
    n_atoms = float(graph.positions.shape[0])
    count = lambda mask, full: float(mask.sum()) if mask is not None else full  # noqa: E731
    counts = {"energy": count(energy_mask, float(natoms.shape[0])), "forces": count(forces_mask, n_atoms),
              "energy_gradient": count(forces_mask, n_atoms), "force_distill": n_atoms, "n2n": n_atoms,
              "a2a": n_atoms}
    terms["energy"] = energy_error(out["energy"], batch.energy, natoms, energy_mask, kind)
    terms["forces"] = vector_error(out["forces"], batch.forces, forces_mask, kind)
    total = weights.energy * terms["energy"] + weights.forces * terms["forces"]
    if use_stress:
        stress = stress_from_strain_derivative(out["dE_deps"], graph.cell)
        terms["stress"] = stress_error(stress, batch.stress.to(stress.dtype), stress_mask, kind)
        counts["stress"] = float(stress_mask.sum())
        total = total + weights.stress * terms["stress"]
        terms["_stress_pred"] = stress.detach()
    if use_kd:
        hessian_mask = getattr(batch, "hessian_mask", None)
        # the energy-gradient term below differentiates the same graph again: keep it (also when evaluating)
        rows = student_hessian_rows(out["forces"], positions, batch.hessian_index, create_graph=training,
                                    mask=hessian_mask, retain_graph=training or use_egrad)
        atom_mask = None if hessian_mask is None or bool(hessian_mask.all()) else hessian_mask[:, graph.batch]
        terms["hessian"] = hessian_error(rows, batch.hessian_target, atom_mask, kind)
        counts["hessian"] = n_atoms if atom_mask is None else float((atom_mask.sum(0) > 0).sum())
        total = total + weights.hessian * terms["hessian"]
    if use_egrad:
        (grad_e,) = torch.autograd.grad(out["energy"].sum(), positions, create_graph=training)
        terms["energy_gradient"] = vector_error(-grad_e, batch.forces, forces_mask, kind)
        total = total + weights.energy_gradient * terms["energy_gradient"]
    if weights.force_distill > 0 and batch.teacher_forces is not None:
        terms["force_distill"] = vector_error(out["forces"], batch.teacher_forces, None, kind)
        total = total + weights.force_distill * terms["force_distill"]
    if weights.n2n > 0:
        if heads is None:
            raise HessforgeError("loss.n2n > 0 needs the distillation heads (DistillationHeads)")
        if getattr(batch, "teacher_features", None) is None:
            raise HessforgeError("loss.n2n > 0 but the batch has no teacher features: label with "
                                 "`hessforge label --features`")
        if "node_features" not in out:
            raise HessforgeError(f"student {type(getattr(model, 'module', model)).__name__} returns no "
                                 "node_features: the n2n baseline needs them")
        terms["n2n"] = heads.n2n_error(out["node_features"], batch.teacher_features, kind)
        total = total + weights.n2n * terms["n2n"]
    if weights.a2a > 0:
        if heads is None:
            raise HessforgeError("loss.a2a > 0 needs the distillation heads (DistillationHeads)")
        terms["a2a"] = heads.a2a_error(model, graph.numbers, kind)
        total = total + weights.a2a * terms["a2a"]
    terms["total"] = total
    for name in list(terms):
        if name in counts:
            terms["_count_" + name] = torch.tensor(counts[name])
    terms["_energy_pred"] = out["energy"].detach()
    terms["_forces_pred"] = out["forces"].detach()
    return terms


def stress_targets_mask(batch) -> Optional[torch.Tensor]:
    """[B] bool: structures with a stress target that are periodic in all 3 directions (None: no targets)."""
    mask = getattr(batch, "stress_mask", None)
    if mask is None or getattr(batch, "stress", None) is None:
        return None
    return mask & batch.graph.pbc.all(dim=1)


def model_direct(model) -> bool:
    """Whether a (possibly DDP-wrapped) model predicts forces directly."""
    return bool(getattr(getattr(model, "module", model), "direct_forces", False))
