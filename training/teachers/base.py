"""The teacher protocol: energy, forces and Hessian rows of a structure, in eV and Å.

Hessian rows are rows of H = d²E/dr dr (eV/Å²) of the flattened coordinates: row index j = 3*atom + axis,
each row has 3N entries in the same order. Rows are returned for the requested indices only; a full
Hessian is the request of all 3N rows.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np

from engine.errors import HessforgeError, UnknownElementError


@dataclass
class TeacherOutput:
    energy: float  # eV
    forces: np.ndarray  # [N, 3] eV/Å, float64
    rows: Optional[np.ndarray] = None  # [k] int64 indices into the 3N flattened coordinates
    hessian_rows: Optional[np.ndarray] = None  # [k, 3N] eV/Å², float64
    # [3, 3] eV/Å³, ASE's sign ((1/V) dE/dε): for structures periodic in all 3 directions, from teachers that
    # give stress (CHGNet, LAMMPS, MACE, ANI, SO3LR, ASE calculators with stress); None otherwise
    stress: Optional[np.ndarray] = None


class Teacher(ABC):
    """A reference force field. Subclasses set `name` and `elements` (atomic numbers it supports)."""

    name: str = "teacher"
    elements: Optional[frozenset] = None  # None: any element
    # Whether the teacher reads a structure's total charge (atoms.info["charge"]). One that does not models
    # neutral structures only, and labelling a charged one with it would give a neutral molecule's energy.
    takes_charge: bool = False
    # Optional, for the feature-distillation baselines (training.losses, `hessforge label --features /
    # --embeddings`). A teacher that has them overrides these with methods:
    #   atomic_features(atoms) -> np.ndarray [N, D]: the teacher's final per-atom features (n2n);
    #   element_embeddings() -> {Z: np.ndarray [D_e]}: its learned per-element embedding (a2a).
    # None means the teacher has no such thing; asking for it is then a clear error.
    atomic_features: Optional[Callable[..., np.ndarray]] = None
    element_embeddings: Optional[Callable[[], Dict[int, np.ndarray]]] = None

    def gives_stress(self, atoms=None) -> bool:
        """Whether compute() returns a stress for `atoms` (for any bulk structure when None). Teachers that
        give stress override this."""
        return False

    def check_charge(self, atoms, where: str = "") -> None:
        """One clear error for a charged structure given to a teacher that cannot take a charge."""
        charge = atoms.info.get("charge", 0)
        if self.takes_charge or charge is None:
            return
        try:
            neutral = float(charge) == 0.0
        except (TypeError, ValueError):
            neutral = False
        if not neutral:
            raise HessforgeError(f"{where or 'structure'}: total charge {charge!r} (info 'charge'), but teacher "
                                 f"{self.name} models neutral structures only; use a charge-aware teacher "
                                 "(so3lr) or leave charged structures out")

    def check_elements(self, numbers: Iterable[int], where: str = "") -> None:
        if self.elements is None:
            return
        unknown = set(int(z) for z in numbers) - set(self.elements)
        if unknown:
            raise UnknownElementError(unknown, self.elements, where or f"teacher {self.name}")

    @abstractmethod
    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        """Energy and forces of one `ase.Atoms`; Hessian rows for `rows` if given (all 3N: full Hessian)."""

    def compute_batch(self, atoms_list, rows_list=None) -> list:
        rows_list = rows_list if rows_list is not None else [None] * len(atoms_list)
        return [self.compute(a, r) for a, r in zip(atoms_list, rows_list)]


def load_pickled_model(path: str, kind: str, required: Sequence[str]):
    """torch.load a whole pickled nn.Module (weights_only=False: these files pickle classes), checked to have
    the `required` attributes, cast to float64, eval mode, parameters frozen (teachers differentiate w.r.t.
    positions only). kind names the format in errors ("mace-torch", ...). The caller imports the package
    whose classes the pickle names first."""
    import os

    import torch

    if not os.path.isfile(path):
        raise HessforgeError(f"{kind} model file not found: {path}")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt file, a state_dict, a TorchScript archive, another package's pickle...
        raise HessforgeError(f"{path}: cannot load as a {kind} model ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, torch.nn.Module) or not all(hasattr(model, a) for a in required):
        raise HessforgeError(f"{path}: not a {kind} model (expected a pickled nn.Module with "
                             f"{', '.join(required)})")
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextmanager
def default_dtype(dtype):
    """torch's global default dtype set for a block and restored even when the block raises (mace's and
    so3krates' own context managers restore it only on success: a teacher error, e.g. a non-integer charge,
    left the caller's process in float64)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def validate_rows(rows, n_atoms: int) -> Optional[np.ndarray]:
    if rows is None:
        return None
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= 3 * n_atoms):
        raise HessforgeError(f"Hessian row index out of range [0, {3 * n_atoms}) for {n_atoms} atoms: {rows}")
    return rows


def check_finite_positions(atoms, where: str = "") -> None:
    pos = np.asarray(atoms.get_positions())
    if not np.all(np.isfinite(pos)):
        raise HessforgeError(f"{where or 'structure'}: positions contain NaN or Inf")


def check_periodic_cell(atoms, where: str = ""):
    """A periodic structure's cell must span a volume, by the engine's criterion (engine.neighbors: wires
    and slabs may have zero vectors along their non-periodic directions). Returns the structure to compute:
    `atoms`, or, for a cell thinner than any crystal that is a skewed basis of an ordinary lattice, a copy in
    the reduced basis of the same lattice (engine.neighbors.reduce_thin_cells; positions unchanged: the same
    energy, forces, Hessian and stress, and no teacher has to search hundreds of images or refuse the tilt)."""
    import torch

    from engine.neighbors import check_cell, lattice_cells

    pbc = torch.as_tensor(np.asarray(atoms.get_pbc(), dtype=bool))
    if not bool(pbc.any()):
        return atoms
    given = torch.as_tensor(np.asarray(atoms.get_cell()), dtype=torch.float64)
    reduced, ops = lattice_cells(given[None], pbc[None])
    check_cell(reduced[0], pbc, where or "structure", given=given)
    if bool((ops[0] == torch.eye(3, dtype=ops.dtype)).all()):
        return atoms
    out = atoms.copy()
    out.set_cell(reduced[0].numpy(), scale_atoms=False)
    return out


def strain_stress(energy_fn, positions: np.ndarray, cell: np.ndarray, dtype=None) -> np.ndarray:
    """Stress (eV/Å³, [3, 3]) of a differentiable `energy_fn(positions [N, 3], cell [3, 3]) -> scalar` whose
    energy depends on the cell through its periodic images: (1/V) dE/dε under x -> x (1 + ε), cell -> cell (1 + ε)
    (the convention of engine.stress and ASE)."""
    import torch

    dtype = dtype or torch.float64
    pos = torch.as_tensor(np.asarray(positions), dtype=dtype)
    box = torch.as_tensor(np.asarray(cell), dtype=dtype)
    eps = torch.zeros(3, 3, dtype=dtype, requires_grad=True)
    sym = 0.5 * (eps + eps.T)
    energy = energy_fn(pos + pos @ sym, box + box @ sym)
    (grad,) = torch.autograd.grad(energy, eps)
    return grad.detach().cpu().numpy().astype(np.float64) / abs(float(np.linalg.det(np.asarray(cell))))


def strained_batch(batch: dict, positions, cell, shift_keys=(("shifts", "unit_shifts"),)) -> dict:
    """A copy of a mace-style input `batch` at strained `positions` and `cell`: every Cartesian image shift
    (`shifts` ...) is rebuilt from its integer counterpart (`unit_shifts` ...) so the periodic images move with
    the cell. Pairs whose integer key is absent from the batch are skipped."""
    data = dict(batch, positions=positions, cell=cell)
    for shift, unit in shift_keys:
        if unit in batch:
            data[shift] = batch[unit] @ cell
    return data


def one_hot_rows(rows: np.ndarray, n_coords: int, dtype=None):
    """[k, n_coords] one-hot torch matrix: the grad_outputs that pick Hessian rows `rows` in one backward."""
    import torch

    eye = torch.zeros(len(rows), n_coords, dtype=dtype or torch.float64)
    eye[torch.arange(len(rows)), torch.as_tensor(rows, dtype=torch.long)] = 1.0
    return eye


def autograd_energy_forces_rows(energy_fn, positions: np.ndarray, rows=None, dtype=None):
    """Energy (eV), forces (eV/Å) and Hessian rows (eV/Å²) of a differentiable `energy_fn(pos[N,3]) -> scalar`.

    The rows are taken in ONE batched backward pass (vmap over one-hot grad_outputs): k separate backward
    calls would each replay the whole double-backward graph. Returns (energy, forces, rows, hessian_rows).
    """
    import torch

    dtype = dtype or torch.float64
    n = len(positions)
    rows = validate_rows(rows, n)
    want_h = rows is not None and rows.size > 0
    pos = torch.tensor(np.asarray(positions), dtype=dtype, requires_grad=True)
    energy = energy_fn(pos)
    (grad,) = torch.autograd.grad(energy, pos, create_graph=want_h, allow_unused=True)
    grad = torch.zeros_like(pos) if grad is None else grad  # energy independent of positions (one atom)
    h = None
    if rows is not None:
        h = np.zeros((rows.size, 3 * n))
        if want_h and grad.requires_grad:
            v = one_hot_rows(rows, 3 * n, dtype)
            try:
                (hr,) = torch.autograd.grad(grad.reshape(-1), pos, grad_outputs=v, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)  # graph kept for fallback
            except RuntimeError:
                # Some ops lack vmap batching rules; a loop over rows is slower but always works.
                hr = torch.stack([_grad_or_zeros(grad.reshape(-1), pos, vi) for vi in v])
            if hr is not None:
                h = hr.detach().reshape(rows.size, 3 * n).cpu().numpy().astype(np.float64)
    return float(energy.detach()), -grad.detach().cpu().numpy().astype(np.float64), rows, h


def _grad_or_zeros(out, inp, v):
    import torch

    (g,) = torch.autograd.grad(out, inp, grad_outputs=v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def teacher_calculator(teacher: "Teacher"):
    """An ASE Calculator (energy, forces; stress of bulk structures when the teacher gives stress) backed by a
    Teacher: lets any teacher drive ASE MD/optimisers, and cell relaxations where it has stress."""
    from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

    from engine.stress import voigt

    with_stress = teacher.gives_stress()

    class _TeacherCalculator(Calculator):
        implemented_properties = ["energy", "free_energy", "forces"] + (["stress"] if with_stress else [])

        def __init__(self, **kw):
            super().__init__(**kw)
            self.teacher = teacher

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            self.teacher.check_charge(self.atoms, f"teacher {self.teacher.name}")
            out = self.teacher.compute(self.atoms)
            self.results = {"energy": out.energy, "free_energy": out.energy, "forces": out.forces}
            if out.stress is not None:
                self.results["stress"] = voigt(np.asarray(out.stress, dtype=np.float64))
            elif "stress" in properties:
                raise PropertyNotImplementedError(f"teacher {self.teacher.name}: no stress for this structure "
                                                  "(stress needs a cell periodic in all 3 directions)")

    return _TeacherCalculator()
