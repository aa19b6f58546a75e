"""ANI-1x (HCNO, ωB97x/6-31G(d)) built offline from the parameter files shipped inside the torchani wheel.

`torchani.models.ANI1x()` reads an `.info` file that is empty in the wheel and then downloads from GitHub,
which fails offline; the same NeuroChem files are all in `resources/ani-1x_8x`, so we assemble the model
from them (the same steps torchani's `_from_neurochem_resources` takes).
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from engine.errors import HessforgeError
from training.teachers.base import (Teacher, TeacherOutput, autograd_energy_forces_rows, check_finite_positions,
                                    strain_stress, teacher_calculator)

ANI1X_ELEMENTS = frozenset({1, 6, 7, 8})
ANI1X_SIZE = 8
_CONSTS = "rHCNO-5.2R_16-3.5A_a4-8.params"


def _import_torchani():
    with warnings.catch_warnings():  # cuaev / pkg_resources warnings are noise on CPU
        warnings.simplefilter("ignore")
        import torchani  # noqa: F401
        from torchani import neurochem  # noqa: F401
    return torchani


def ani1x_resource_dir() -> str:
    torchani = _import_torchani()
    d = os.path.join(os.path.dirname(torchani.__file__), "resources", "ani-1x_8x")
    if not os.path.isfile(os.path.join(d, _CONSTS)):
        raise HessforgeError(f"ANI-1x parameter files not found in {d} (torchani wheel without resources?)")
    return d


@lru_cache(maxsize=None)
def _load_parts(model_index: Optional[int]):
    """(aev_computer, networks, energy_shifter, species) in float64; networks: ensemble or one ANIModel."""
    torchani = _import_torchani()
    from torchani import neurochem

    d = ani1x_resource_dir()
    consts = neurochem.Constants(os.path.join(d, _CONSTS))
    aev = torchani.AEVComputer(**consts)
    shifter = neurochem.load_sae(os.path.join(d, "sae_linfit.dat"))
    if model_index is None:
        nets = neurochem.load_model_ensemble(consts.species, os.path.join(d, "train"), ANI1X_SIZE)
    else:
        nets = neurochem.load_model(consts.species, os.path.join(d, f"train{model_index}", "networks"))
    for m in (aev, nets, shifter):
        m.double().eval()
        for p in m.parameters():
            p.requires_grad_(False)  # we differentiate w.r.t. positions only
    return aev, nets, shifter, list(consts.species)


class ANI1xTeacher(Teacher):
    """ANI-1x: the 8-model ensemble mean (model_index=None) or one member. Energies in eV (model: Hartree)."""

    elements = ANI1X_ELEMENTS

    def __init__(self, model_index: Optional[int] = None):
        if model_index is not None and not 0 <= int(model_index) < ANI1X_SIZE:
            raise HessforgeError(f"ANI-1x has {ANI1X_SIZE} models (0..{ANI1X_SIZE - 1}); got model {model_index}")
        self.model_index = None if model_index is None else int(model_index)
        self.name = "ani1x" if model_index is None else f"ani1x:{model_index}"
        torchani = _import_torchani()
        self.aev, self.nets, self.shifter, self.species = _load_parts(self.model_index)
        self.model = torchani.nn.Sequential(self.aev, self.nets, self.shifter)
        self.converter = torchani.SpeciesConverter(self.species)

    def gives_stress(self, atoms=None) -> bool:
        return atoms is None or bool(np.all(atoms.get_pbc()))

    def _species(self, atoms):
        import torch

        self.check_elements(atoms.numbers, f"teacher {self.name}")
        check_finite_positions(atoms, f"teacher {self.name}")
        return self.converter((torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long)[None], None)).species

    @staticmethod
    def _periodicity(atoms):
        """(cell, pbc, offset) for torchani's periodic AEVs, or Nones for a molecule. torchani wants atoms
        inside the cell: `offset` [N, 3] (a constant: lattice vectors) wraps them; the energy and its
        derivatives do not change. Zero vectors along non-periodic directions (ASE's slabs) are completed."""
        import torch

        from engine.neighbors import check_cell, lattice_cells, wrap_into_cells

        pbc = torch.as_tensor(np.asarray(atoms.pbc, dtype=bool))
        if not bool(pbc.any()):
            return None, None, None
        pos = torch.as_tensor(atoms.get_positions(), dtype=torch.float64)
        given = torch.as_tensor(atoms.cell[:], dtype=torch.float64)
        # a skewed basis of an ordinary lattice: its reduced basis (the same lattice, energy and stress)
        cell = lattice_cells(given[None], pbc[None])[0][0]
        check_cell(cell, pbc, f"teacher ani1x: {atoms.get_chemical_formula()}", given=given)
        wrapped = wrap_into_cells(pos, cell[None], pbc[None], torch.zeros(len(pos), dtype=torch.long))[0]
        return cell, pbc, wrapped - pos

    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        from ase.units import Hartree

        species = self._species(atoms)
        cell, pbc, offset = self._periodicity(atoms)

        def energy_fn(pos):
            if cell is None:
                return self.model((species, pos[None])).energies.sum() * Hartree
            return self.model((species, (pos + offset)[None]), cell=cell, pbc=pbc).energies.sum() * Hartree

        e, f, rows, h = autograd_energy_forces_rows(energy_fn, atoms.get_positions(), rows)
        stress = None
        if cell is not None and bool(pbc.all()):
            def strained_energy(pos, box):  # pos: the wrapped positions, strained with the cell
                return self.model((species, pos[None]), cell=box, pbc=pbc).energies.sum() * Hartree

            wrapped = atoms.get_positions() + offset.numpy()
            stress = strain_stress(strained_energy, wrapped, cell.numpy())
        return TeacherOutput(energy=e, forces=f, rows=rows, hessian_rows=h, stress=stress)

    def atomic_features(self, atoms, member: Optional[int] = None) -> np.ndarray:
        """Per-atom activations of the last hidden layer of the atomic networks, [N, 96] float64.

        For the ensemble, `member` picks one network (default: all 8 concatenated, [N, 8*96]).
        """
        import torch

        species = self._species(atoms)
        pos = torch.as_tensor(atoms.get_positions(), dtype=torch.float64)[None]
        cell, pbc, offset = self._periodicity(atoms)
        members = [self.nets] if self.model_index is not None else (
            list(self.nets) if member is None else [self.nets[member]])
        with torch.no_grad():
            sp, aev = self.aev((species, pos)) if cell is None else self.aev((species, pos + offset), cell=cell,
                                                                             pbc=pbc)
            sp, aev = sp[0], aev[0]
            feats = []
            for ani_model in members:
                out = None
                for i, net in enumerate(ani_model.values()):
                    mask = sp == i
                    if mask.any():
                        hidden = net[:-1](aev[mask])  # all layers but the final Linear -> energy
                        if out is None:
                            out = aev.new_zeros(len(sp), hidden.shape[1])
                        out[mask] = hidden
                feats.append(out)
        return torch.cat(feats, dim=1).numpy()


def ani1x_calculator(model_index: Optional[int] = None):
    """ASE Calculator (energy eV, forces eV/Å) on ANI-1x, e.g. for Langevin MD sampling."""
    return teacher_calculator(ANI1xTeacher(model_index))
