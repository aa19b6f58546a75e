"""SO3LR (Kabylda et al., JACS 2025) as a teacher: a pretrained organic/biomolecular foundation model whose
weights ship inside the `so3krates-torch` wheel, so it works offline. Float64, autograd Hessian rows; stress of
bulk cells by autograd under strain.

SO3LR = a SO3krates message-passing network (4.5 Å) + universal pair terms: ZBL repulsion, electrostatics
of predicted partial charges and MBD-style dispersion, within a long-range cutoff. Following the authors:
molecules in vacuum use a long-range cutoff of 1000 Å (every pair), periodic cells 12 Å; the dispersion
switches off over the last 2 Å before the cutoff.

Its absolute energies carry no per-element reference (the authors: "not trained on energies, only relative
energies are meaningful"), so `relative_energies = True`: its energies are compared with others only after
removing a per-element offset (training.evaluate), and students fit their own per-element references anyway.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from engine.errors import HessforgeError
from training.teachers.base import (Teacher, TeacherOutput, autograd_energy_forces_rows, check_finite_positions,
                                    check_periodic_cell, default_dtype, load_pickled_model, strain_stress,
                                    strained_batch)

# The elements of SPICE, the largest of SO3LR's training sets (H, Li, C, N, O, F, Na, Mg, P, S, Cl, K, Ca, Br,
# I). The network embeds all 118 elements, so nothing in the file says which ones it has seen: outside this
# set a structure is refused instead of labelled with an untrained embedding.
SO3LR_ELEMENTS = frozenset({1, 3, 6, 7, 8, 9, 11, 12, 15, 16, 17, 19, 20, 35, 53})
VACUUM_LR_CUTOFF = 1000.0  # Å, molecules: every pair (the authors' gas-phase setting)
PERIODIC_LR_CUTOFF = 12.0  # Å, as the model was trained
DISPERSION_DAMPING = 2.0  # Å: width of the dispersion's switching function below the cutoff


def bundled_so3lr_path() -> str:
    """The SO3LR weights inside the installed so3krates-torch wheel."""
    try:
        import importlib.resources as resources

        path = str(resources.files("so3krates_torch") / "pretrained" / "so3lr" / "so3lr.model")
    except ModuleNotFoundError:
        raise HessforgeError("teacher 'so3lr' needs the so3krates-torch package: "
                             "pip install 'hessforge[so3lr]' (so3krates-torch==0.2.1)") from None
    if not os.path.isfile(path):
        raise HessforgeError(f"SO3LR weights not found at {path} (a so3krates-torch install without pretrained/?)")
    return path


def load_so3lr_model(path: str):
    """A pickled so3krates-torch SO3LR model, float64, eval mode, frozen."""
    import so3krates_torch.modules.models  # noqa: F401  (the classes the pickle names)

    return load_pickled_model(path, "so3krates-torch SO3LR", ("r_max", "use_lr"))


def so3lr_batch(model, atoms_list, dtype=None, where: str = "SO3LR") -> dict:
    """so3krates-torch's input dict for a batch of structures, built the way its own calculator does
    (config_from_atoms -> AtomicData -> Batch; neighbour lists on the CPU), in float64 unless `dtype`.
    Sets the model's long-range cutoff for the batch: 1000 Å for molecules, 12 Å for periodic cells, so a
    batch holds one kind only. Total charges from atoms.info["charge"] (default 0)."""
    import torch
    from so3krates_torch.data.atomic_data import AtomicData
    from so3krates_torch.data.utils import KeySpecification, config_from_atoms
    from so3krates_torch.tools import torch_geometric, utils

    periodic = {bool(np.any(a.get_pbc())) for a in atoms_list}
    if len(periodic) != 1:
        raise HessforgeError(f"{where}: a batch mixes molecules and periodic cells (different long-range cutoffs)")
    cutoff_lr = None
    if getattr(model, "use_lr", False):
        model.r_max_lr = cutoff_lr = PERIODIC_LR_CUTOFF if periodic.pop() else VACUUM_LR_CUTOFF
        model.dispersion_energy_cutoff_lr_damping = DISPERSION_DAMPING
    spec = KeySpecification(info_keys={"total_charge": "charge"}, arrays_keys={})
    z_table = utils.AtomicNumberTable(list(range(1, 119)))
    graphs = []
    with default_dtype(torch.float64):  # geometry built in float64, not rounded to float32
        for atoms in atoms_list:
            charge = atoms.info.get("charge", 0.0)
            if not (isinstance(charge, (int, float, np.integer, np.floating)) and np.isfinite(charge)
                    and float(charge) == round(float(charge))):
                raise HessforgeError(f"{where}: total charge must be an integer, got {charge!r} (atoms.info['charge'])")
            atoms = atoms.copy()  # config_from_atoms would read labels from an attached calculator
            atoms.calc = None
            graphs.append(AtomicData.from_config(config_from_atoms(atoms, key_specification=spec), z_table=z_table,
                                                 cutoff=float(model.r_max), cutoff_lr=cutoff_lr))
        batch = torch_geometric.batch.Batch.from_data_list(graphs).to_dict()
    if dtype is not None:
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    return batch


class SO3LRTeacher(Teacher):
    relative_energies = True
    takes_charge = True  # atoms.info["charge"] (so3lr_batch)

    def __init__(self, path: Optional[str] = None, elements=SO3LR_ELEMENTS):
        self.path = path or bundled_so3lr_path()
        self.name = "so3lr" if path is None else f"so3lr:{path}"
        self.model = load_so3lr_model(self.path)
        self.elements = None if elements is None else frozenset(int(z) for z in elements)

    def gives_stress(self, atoms=None) -> bool:
        return atoms is None or bool(np.all(atoms.get_pbc()))

    def _batch(self, atoms) -> dict:
        return so3lr_batch(self.model, [atoms], where=f"teacher {self.name}")

    def _check(self, atoms):
        self.check_elements(atoms.numbers, f"teacher {self.name}")
        check_finite_positions(atoms, f"teacher {self.name}")
        return check_periodic_cell(atoms, f"teacher {self.name}")

    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        atoms = self._check(atoms)
        batch = self._batch(atoms)

        def energy_fn(pos):
            # The neighbour lists (short and long range) stay fixed at the input geometry; positions move.
            return self.model(dict(batch, positions=pos), compute_force=False, training=False)["energy"].sum()

        e, f, rows, h = autograd_energy_forces_rows(energy_fn, atoms.get_positions(), rows)
        stress = None
        if np.all(atoms.get_pbc()):
            def strained_energy(pos, cell):
                # The images move with the cell, in both neighbour lists: the short-range network's and the
                # long-range (electrostatics, dispersion) one, each from its integer shifts.
                data = strained_batch(batch, pos, cell, (("shifts", "unit_shifts"), ("shifts_lr", "unit_shifts_lr")))
                return self.model(data, compute_force=False, training=False)["energy"].sum()

            stress = strain_stress(strained_energy, batch["positions"], batch["cell"].reshape(3, 3))
        return TeacherOutput(energy=e, forces=f, rows=rows, hessian_rows=h, stress=stress)

    # ------------------------------------------------------------------ feature-distillation baselines
    def atomic_features(self, atoms) -> np.ndarray:
        """SO3LR's final invariant per-atom features (the input of its energy head), [N, 128] float64."""
        import torch

        atoms = self._check(atoms)
        batch = self._batch(atoms)
        with torch.enable_grad():  # its forward differentiates internally even when forces are not asked for
            out = self.model(batch, compute_force=False, training=False, return_descriptors=True)
        return out["inv_features"].detach().cpu().numpy().astype(np.float64)

    def element_embeddings(self):
        """{Z: [D]}: SO3LR's learned element embedding (the bias-free linear map of the one-hot element)."""
        weight = self.model.inv_feature_embedding.embedding.weight.detach()  # [D, 118], column Z-1
        zs = sorted(self.elements) if self.elements is not None else range(1, weight.shape[1] + 1)
        return {int(z): weight[:, int(z) - 1].cpu().numpy().astype(np.float64) for z in zs}
