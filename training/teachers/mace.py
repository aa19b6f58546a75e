"""Any user-supplied mace-torch `.model` file as a teacher (MACE-OFF, MACE-MP, fine-tunes...), in float64.

Weights cannot be downloaded here, so nothing is fetched: the user brings the file. The input graph is built
the way mace's own `MACECalculator._atoms_to_batch` does (config_from_atoms -> AtomicData -> Batch).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from engine.errors import HessforgeError
from training.teachers.base import (Teacher, TeacherOutput, autograd_energy_forces_rows, check_finite_positions,
                                    default_dtype, load_pickled_model, strain_stress, strained_batch)


def load_mace_model(path: str):
    """A whole pickled MACE model, float64, eval mode, frozen."""
    import mace  # noqa: F401  (must come before e3nn: registers safe globals / constants)

    return load_pickled_model(path, "mace-torch", ("atomic_numbers", "r_max"))


class MACETeacher(Teacher):
    def __init__(self, path: str, head: Optional[str] = None):
        from mace.tools import utils

        self.path = path
        self.name = f"mace:{path}"
        self.model = load_mace_model(path)
        z = [int(x) for x in self.model.atomic_numbers]
        self.elements = frozenset(z)
        self.z_table = utils.AtomicNumberTable(z)
        self.r_max = float(self.model.r_max)
        self.heads = list(getattr(self.model, "heads", None) or ["Default"])
        if head is None:  # mace's calculator rule: the only head, else the one called "default"
            default = [h for h in self.heads if h.lower() == "default"]
            head = self.heads[0] if len(self.heads) == 1 else (default[0] if default else None)
            if head is None:
                raise HessforgeError(f"{path}: model has several heads {self.heads}; name one (mace:{path}@HEAD)")
        if head not in self.heads:
            raise HessforgeError(f"{path}: head {head!r} not in {self.heads}")
        self.head = head

    def gives_stress(self, atoms=None) -> bool:
        return atoms is None or bool(np.all(atoms.get_pbc()))

    def _batch(self, atoms) -> dict:
        import torch
        from mace import data as mdata
        from mace.tools import torch_geometric

        atoms = atoms.copy()  # config_from_atoms would read labels from an attached calculator
        atoms.calc = None
        with default_dtype(torch.float64):
            config = mdata.config_from_atoms(atoms, key_specification=mdata.KeySpecification(), head_name=self.head)
            graph = mdata.AtomicData.from_config(config, z_table=self.z_table, cutoff=self.r_max, heads=self.heads)
        return torch_geometric.Batch.from_data_list([graph]).to_dict()

    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        self.check_elements(atoms.numbers, f"teacher {self.name}")
        check_finite_positions(atoms, f"teacher {self.name}")
        batch = self._batch(atoms)

        def energy_fn(pos):
            # The neighbour list (edge_index, shifts) stays fixed at the input geometry; only positions move.
            data = dict(batch, positions=pos)
            return self.model(data, compute_force=False, training=False)["energy"].sum()

        e, f, rows, h = autograd_energy_forces_rows(energy_fn, atoms.get_positions(), rows)
        stress = None
        if np.all(atoms.get_pbc()):
            def strained_energy(pos, cell):  # the images move with the cell: shifts from the integer ones
                data = strained_batch(batch, pos, cell)
                return self.model(data, compute_force=False, training=False)["energy"].sum()

            stress = strain_stress(strained_energy, batch["positions"], batch["cell"].reshape(3, 3))
        return TeacherOutput(energy=e, forces=f, rows=rows, hessian_rows=h, stress=stress)

    # ------------------------------------------------------------------ feature-distillation baselines
    def _invariant_columns(self, width: int):
        """Columns of mace's `node_feats` output (the concatenated outputs of every product block) that hold
        invariant (0e) channels. The student's scalar features cannot match l > 0 components, which rotate
        with the molecule, through a linear map, so n2n distills the invariant channels only."""
        irreps = [p.linear.irreps_out for p in getattr(self.model, "products", [])]
        cols, offset = [], 0
        for ir in irreps:
            for mul, (l, parity) in ((m, (i.l, i.p)) for m, i in ir):
                dim = mul * (2 * l + 1)
                if l == 0 and parity == 1:
                    cols.extend(range(offset, offset + dim))
                offset += dim
        if offset != width or not cols:
            raise HessforgeError(f"{self.path}: cannot find the invariant channels of this model's node features "
                                 f"(irreps {[str(i) for i in irreps]} vs {width} columns)")
        return cols

    def atomic_features(self, atoms) -> np.ndarray:
        """Invariant (0e) channels of MACE's node features (`node_feats`, all layers), [N, D] float64."""
        import torch

        self.check_elements(atoms.numbers, f"teacher {self.name}")
        check_finite_positions(atoms, f"teacher {self.name}")
        batch = self._batch(atoms)
        with torch.no_grad():
            feats = self.model(batch, compute_force=False, training=False).get("node_feats")
        if feats is None:
            raise HessforgeError(f"{self.path}: this mace model returns no node_feats")
        cols = self._invariant_columns(feats.shape[1])
        return feats[:, cols].detach().cpu().numpy().astype(np.float64)

    def element_embeddings(self):
        """{Z: [D_e]}: MACE's learned per-element embedding (node_embedding applied to each element's one-hot:
        the initial node features before any interaction)."""
        import torch

        z = [int(x) for x in self.model.atomic_numbers]
        with torch.no_grad():
            emb = self.model.node_embedding(torch.eye(len(z), dtype=torch.float64))
        return {zi: emb[i].cpu().numpy().astype(np.float64) for i, zi in enumerate(z)}
