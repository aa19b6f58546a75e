"""Cheap systems with analytic energies, forces and Hessians, for tests that need a teacher or labels."""
import numpy as np
from ase.build import molecule

from engine.models import STUDENTS
from training.data.records import Structure
from training.data.store import write_dataset
from training.teachers.base import Teacher, TeacherOutput

# (architecture, force mode) of every student variant the engine has, from the registry: the tests
# parametrised over it cover a new architecture without being edited
STUDENT_VARIANTS = [(name, mode) for name, cls in STUDENTS.items() for mode in cls.force_modes]


def harmonic(positions, k=2.0, r0=1.2, cutoff=None):
    """E = sum_{i<j} k/2 (r_ij - r0)^2 (pairs within `cutoff` if given), with forces and the Hessian [3N, 3N]."""
    n = len(positions)
    e, g, h = 0.0, np.zeros((n, 3)), np.zeros((3 * n, 3 * n))
    for i in range(n):
        for j in range(i + 1, n):
            d = positions[j] - positions[i]
            r = np.linalg.norm(d)
            if cutoff is not None and r > cutoff:
                continue
            u = d / r
            e += 0.5 * k * (r - r0) ** 2
            g[j] += k * (r - r0) * u
            g[i] -= k * (r - r0) * u
            blk = k * np.outer(u, u) + k * (r - r0) / r * (np.eye(3) - np.outer(u, u))
            si, sj = slice(3 * i, 3 * i + 3), slice(3 * j, 3 * j + 3)
            h[si, si] += blk
            h[sj, sj] += blk
            h[si, sj] -= blk
            h[sj, si] -= blk
    return e, -g, h


class HarmonicTeacher(Teacher):
    name = "harmonic"
    elements = frozenset({1, 6, 7, 8})

    def __init__(self, k=2.0, r0=1.2):
        self.k, self.r0 = k, r0

    def compute(self, atoms, rows=None):
        e, f, h = harmonic(atoms.positions, self.k, self.r0)
        rows = np.arange(3 * len(atoms)) if rows is None else np.asarray(rows)
        return TeacherOutput(e, f, rows, h[rows])


def conformer_dataset(path, rng, per_molecule=4, names=("CH4", "H2O", "NH3", "CH3OH", "HCOOH"), k_ref=2.5):
    """Perturbed small molecules, one group per molecule, with harmonic 'reference' labels (k_ref differs
    from the teacher's k so the teacher has a finite error)."""
    structures = []
    for name in names:
        base = molecule(name)
        for c in range(per_molecule):
            pos = base.positions + rng.normal(scale=0.05, size=base.positions.shape)
            e, f, _ = harmonic(pos, k=k_ref)
            structures.append(Structure(id=f"{name}-{c}", group=name, numbers=base.numbers.copy(), positions=pos,
                                        energy=e, forces=f))
    write_dataset(str(path), structures)
    return str(path), structures


def small_mace_model(seed=0):
    """A small ScaleShiftMACE for H, C, N, O (16 channels, L=1, 2 interactions), random weights, float32
    like released model files."""
    import mace  # noqa: F401  (imported before e3nn, as mace requires)
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    return modules.ScaleShiftMACE(
        r_max=4.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2, interaction_cls=interaction,
        interaction_cls_first=interaction, num_interactions=2, num_elements=4,
        hidden_irreps=o3.Irreps("16x0e+16x1o"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.array([-13.6, -1029.8, -1485.3, -2042.6]), avg_num_neighbors=4.0,
        atomic_numbers=[1, 6, 7, 8], correlation=2, gate=torch.nn.functional.silu,
        atomic_inter_scale=1.3, atomic_inter_shift=0.1,
    ).float()


def epoch_records(run_dir):
    """The per-epoch records of a training run's log.jsonl."""
    import json
    import os

    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == "epoch"]


def write_checkpoint(path, model, **extra):
    """A minimal trainer-style checkpoint of `model` (the keys engine.checkpoint reads)."""
    import torch

    from engine.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model_hparams": dict(model.hyperparameters(), name="painn"),
                "model_state": model.state_dict(), "ema_model_state": model.state_dict(), **extra}, path)
    return str(path)
