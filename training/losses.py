"""Training losses: energy/force matching, Hessian-row distillation, energy-gradient and force distillation.

Hessian rows of the student are never formed as a full Hessian. For a batch, sample t picks one coordinate
row j_bt in every structure b; since atoms of different structures do not interact, one vector-Jacobian
product with the one-hot sum over b of e_{j_bt} returns all B rows at once:
    d(Σ_b F[j_bt]) / dr  =  -Σ_b H_student[j_bt, :]   (rows of different structures do not overlap).
The s samples are s such products, batched in one backward call with is_grads_batched (vmap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from engine.graph import AtomicGraph


@dataclass
class LossWeights:
    energy: float = 5.0  # λ_U
    forces: float = 100.0  # λ_F
    hessian: float = 400.0  # λ_KD
    energy_gradient: float = 0.0  # direct-force students: ‖F_ref + ∇E‖²
    force_distill: float = 0.0  # baseline: teacher forces as extra targets


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
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rows of the student's Hessian -dF/dr for the sampled indices, packed like the targets: [s, N, 3].

    `forces` must have been computed from `positions` with a graph (create_graph=True for gradient-force
    students, positions.requires_grad for direct-force students).
    """
    selectors = onehot_rows(hessian_index, positions.shape[0], forces.dtype, mask)
    (rows,) = torch.autograd.grad(
        forces, positions, grad_outputs=selectors, create_graph=create_graph, is_grads_batched=True
    )
    return -rows


def _mse(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error over the entries selected by `mask` (a leading-dimension mask), all if None."""
    if mask is None:
        return (a - b).square().mean()
    err = (a - b).square().reshape(mask.shape[0], -1) * mask.reshape(-1, 1)
    return err.sum() / (mask.sum().clamp(min=1) * err.shape[1])


def compute_loss(model, batch, weights: LossWeights, training: bool = True) -> Dict[str, torch.Tensor]:
    """All loss terms for one batch, weighted and summed into 'total'. Unweighted terms are returned too.

    `batch` is a training.data.batch.Batch: graph, energy, forces and, when labelled by a teacher,
    teacher_energy, teacher_forces, hessian_index [s, B], hessian_target [s, N, 3].
    """
    graph: AtomicGraph = batch.graph
    use_kd = weights.hessian > 0 and batch.hessian_index is not None
    use_egrad = weights.energy_gradient > 0 and model_direct(model)
    need_pos_grad = use_kd or use_egrad
    positions = graph.positions.detach().requires_grad_(need_pos_grad or not model_direct(model))
    graph = graph._replace(positions=positions)
    # Gradient-force students need the force graph kept whenever the loss is differentiated again
    # (training: parameters; KD: positions).
    out = model(graph, compute_forces=True, create_graph=training or use_kd)
    terms: Dict[str, torch.Tensor] = {}
    energy_mask = getattr(batch, "energy_mask", None)
    forces_mask = getattr(batch, "forces_mask", None)
    terms["energy"] = _mse(out["energy"], batch.energy, energy_mask)
    terms["forces"] = _mse(out["forces"], batch.forces, forces_mask)
    total = weights.energy * terms["energy"] + weights.forces * terms["forces"]
    if use_kd:
        hessian_mask = getattr(batch, "hessian_mask", None)
        rows = student_hessian_rows(out["forces"], positions, batch.hessian_index, create_graph=training,
                                    mask=hessian_mask)
        if hessian_mask is None or bool(hessian_mask.all()):
            terms["hessian"] = _mse(rows, batch.hessian_target)
        else:  # a structure with fewer stored rows than s: its padded samples do not count
            atom_mask = hessian_mask[:, batch.graph.batch]  # [s, N]
            err = (rows - batch.hessian_target).square().sum(-1) * atom_mask
            terms["hessian"] = err.sum() / (3 * atom_mask.sum().clamp(min=1))
        total = total + weights.hessian * terms["hessian"]
    if use_egrad:
        (grad_e,) = torch.autograd.grad(out["energy"].sum(), positions, create_graph=training)
        terms["energy_gradient"] = _mse(-grad_e, batch.forces, forces_mask)
        total = total + weights.energy_gradient * terms["energy_gradient"]
    if weights.force_distill > 0 and batch.teacher_forces is not None:
        terms["force_distill"] = _mse(out["forces"], batch.teacher_forces)
        total = total + weights.force_distill * terms["force_distill"]
    terms["total"] = total
    terms["_energy_pred"] = out["energy"].detach()
    terms["_forces_pred"] = out["forces"].detach()
    return terms


def model_direct(model) -> bool:
    """Whether a (possibly DDP-wrapped) model predicts forces directly."""
    return bool(getattr(getattr(model, "module", model), "direct_forces", False))
