"""ASE calculator for hessforge students: `engine.Calculator(model)`.

`model` is a trained checkpoint (trainer output), an exported TorchScript file (`hessforge export`), or a
student object with the engine interface (forward(graph, compute_forces) -> energy, node_energy, forces).
Properties: energy / free_energy (eV), energies (per atom, eV), forces (eV/Å) and, for periodic cells,
stress (eV/Å³, ASE's sign and Voigt order xx, yy, zz, yz, xz, xy) and stresses (per atom, [N, 6], summing to
stress: -sym(W_i) / V with W_i the per-atom virials of engine.stress.atom_virials).

The neighbor list is rebuilt on every call (engine.graph). Stress is the strain derivative of the energy,
stress = (1/V) dE/dε: a symmetric displacement gradient ε (zero) is applied to the positions and the cell,
x -> x (1 + ε), cell -> cell (1 + ε), so every edge vector r -> r (1 + ε), and one backward pass gives the
forces (-dE/dx) and dE/dε together (engine.stress). Exported models return the same quantity as their virial W = -dE/dε.
Direct-force students have no energy whose derivative matches their forces: asking them for stress raises.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator as _ASECalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes

from engine.allocator import keep_freed_memory
from engine.autograd_mode import autograd_is_off, autograd_on, normal_graph
from engine.errors import HessforgeError
from engine.graph import (atoms_per_call, build_graph, graph_to, recentred, resolve_device,
                          structure_chunks)
from engine.models import for_inference, parse_dtype, working_dtype
from engine.paths import EXPORTED_MODEL, artifact_kind
from engine.stress import atom_virials, energy_forces_strain_derivative, energy_forces_virials, voigt


def is_exported_file(path: str) -> bool:
    """True for a hessforge exported TorchScript archive (a zip holding extra/hessforge.json)."""
    return artifact_kind(path) == EXPORTED_MODEL


def load_model(path: str, dtype: Optional[torch.dtype] = torch.float64, use_ema: bool = True):
    """A student from a file: an exported TorchScript model (its own dtype, outputs float64) or a trainer
    checkpoint (cast to `dtype`, EMA weights by default). HessforgeError if it is neither."""
    if not os.path.exists(path):
        raise HessforgeError(f"model file not found: {path}")
    if is_exported_file(path):
        from engine.exported import load_exported

        return load_exported(path)
    if os.path.isfile(path) and artifact_kind(path) is None:  # both kinds are zip archives; a cut one is not
        raise HessforgeError(f"{path}: not a readable model file, neither a hessforge checkpoint nor an exported "
                             "model (damaged, truncated, or another kind of file)")
    from engine.checkpoint import load_student

    return load_student(path, use_ema=use_ema, dtype=dtype or torch.float64)


def _is_exported(model) -> bool:
    from engine.exported import ExportedModel

    return isinstance(model, ExportedModel)


class Calculator(_ASECalculator):
    """ASE calculator on a hessforge student (see the module docstring).

    model: path (checkpoint or exported file) or student object (the calculator works on its own copy).
    dtype: for checkpoints and model objects (default float64, what MD energy conservation wants; exported
    models keep their own). device: "cpu", "cuda"... (exported models: CPU only).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "stresses"]

    def __init__(self, model: Union[str, os.PathLike, torch.nn.Module], device: str = "cpu",
                 dtype: Union[str, torch.dtype, None] = torch.float64, **kwargs):
        super().__init__(**kwargs)
        keep_freed_memory()  # large tensors reused, not faulted in again every call (engine/allocator.py)
        dtype = parse_dtype(dtype)
        self.device = resolve_device(device)
        if isinstance(model, (str, os.PathLike)):
            model = load_model(os.fspath(model), dtype=dtype)
        for attr in ("cutoff", "species", "check_species"):
            if not hasattr(model, attr):
                raise HessforgeError(f"{type(model).__name__} is not a hessforge student (no {attr})")
        self.exported = _is_exported(model)
        if self.exported:
            if self.device.type != "cpu":
                raise HessforgeError("exported models run on CPU in Python (engine.exported); use device='cpu'")
            self.dtype = torch.float64  # the exported module takes and returns float64
            self.direct_forces = model.force_mode == "direct"
        else:
            self.dtype = working_dtype(dtype, model)
            model = for_inference(model, self.device, self.dtype)  # a copy: the caller's model is untouched
            self.direct_forces = bool(getattr(model, "direct_forces", False))
        self.model = model
        self.cutoff = float(model.cutoff)
        self.species = list(model.species)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        want_stress, want_stresses = "stress" in properties, "stresses" in properties
        where = atoms.get_chemical_formula() or "empty structure"
        if want_stress or want_stresses:
            self._check_stress_model()
            reason = _no_stress_reason(atoms)
            if reason:
                raise PropertyNotImplementedError(f"{where}: {reason}")
        self._check_structure(atoms, where)
        (result,) = self._evaluate_group([atoms], [where], want_stress, want_stresses)
        self.results["energy"] = self.results["free_energy"] = result["energy"]
        self.results["energies"] = result["energies"]
        self.results["forces"] = result["forces"]
        for key in ("stress", "stresses"):
            if key in result:
                self.results[key] = result[key]

    def predict(self, atoms_list: Sequence, stress: bool = False,
                max_atoms_per_call: Union[int, str, None] = "auto", stresses: bool = False) -> List[Dict[str, Any]]:
        """Results of many structures from batched model calls (screening without one ASE call per structure):
        a dict per structure with energy (eV), energies (per atom), forces (eV/Å) and, with `stress`, stress
        (eV/Å³, ASE's Voigt order; None where `calculate` refuses it: no periodic direction, or a wire/slab
        whose cell has no volume), with `stresses` the per-atom stresses [N, 6] (None there too) and the stress
        (from the same backward pass). The structures go in groups of at most `max_atoms_per_call` atoms ("auto":
        all at once on a GPU, engine.graph.CPU_ATOMS_PER_CALL on a CPU); each structure gets exactly what
        `calculate` gives it, which is this method on a group of one."""
        atoms_list = [atoms_list] if isinstance(atoms_list, Atoms) else list(atoms_list)  # one structure: a list of one
        if not atoms_list:
            raise HessforgeError("empty list: no structures to evaluate")
        for k, a in enumerate(atoms_list):
            if not isinstance(a, Atoms):
                raise HessforgeError(f"structure {k} is a {type(a).__name__}, not an ase.Atoms")
        if stress or stresses:
            self._check_stress_model()
        names = [f"structure {k} ({a.get_chemical_formula() or 'empty'})" for k, a in enumerate(atoms_list)]
        for a, name in zip(atoms_list, names):
            self._check_structure(a, name)
        limit = atoms_per_call(max_atoms_per_call, self.device)
        counts = [len(a) for a in atoms_list]
        results: List[Dict[str, Any]] = []
        for b0, b1 in structure_chunks(counts, limit or sum(counts)):
            results.extend(self._evaluate_group(atoms_list[b0:b1], names[b0:b1], stress, stresses))
        return results

    def _check_stress_model(self) -> None:
        if self.direct_forces:
            raise PropertyNotImplementedError("a direct-force student has no conservative stress")

    def _check_structure(self, atoms, where: str) -> None:
        if len(atoms) == 0:
            raise HessforgeError(f"{where}: no atoms to evaluate")
        self.model.check_species(atoms.numbers, where)

    def _evaluate_group(self, group: Sequence, names: Sequence[str], stress: bool,
                        stresses: bool = False) -> List[Dict[str, Any]]:
        """One model call on `group` (checked structures): a result dict per structure. With per-atom `stresses`
        the one backward pass goes through the edge vectors and gives the stress too."""
        # build_graph: NaN, zero-volume and overlap checks; recentred: small coordinates before a float32 cast
        # (unwrapped MD, far molecules)
        graph = recentred(build_graph([a.numbers for a in group], [a.positions for a in group],
                                      [np.asarray(a.cell) for a in group], [a.pbc for a in group], self.cutoff,
                                      torch.float64, where=list(names)))
        per_atom_virials = None
        if stresses and not self.exported:  # one pass through the edge vectors: forces, stress, per-atom
            out = energy_forces_virials(self.model, graph_to(graph, self.device, self.dtype))
            energy, node_energy, forces, dE_deps = out["energy"], out["node_energy"], out["forces"], out["dE_deps"]
            per_atom_virials = out["atom_virials"].detach().double().cpu()
            stress = True
        elif self.exported:  # float64 in, its own dtype inside
            out = (self.model.energy_forces_strain_derivative(graph) if stress
                   else self.model(graph, compute_forces=True))
            energy, node_energy, forces, dE_deps = (out["energy"], out["node_energy"], out["forces"],
                                                    out.get("dE_deps"))
        else:
            energy, node_energy, forces, dE_deps = self._evaluate(graph_to(graph, self.device, self.dtype), stress)
        if stresses and per_atom_virials is None:
            per_atom_virials = self._atom_virials(graph)
        energy, node_energy = energy.detach().double().cpu(), node_energy.detach().double().cpu()
        forces = forces.detach().double().cpu()
        results: List[Dict[str, Any]] = []
        start = 0
        for k, a in enumerate(group):
            n = len(a)
            f = forces[start:start + n]
            if not (bool(torch.isfinite(energy[k])) and bool(torch.isfinite(f).all())):
                raise HessforgeError(f"{names[k]}: the model returned NaN or Inf energy/forces (damaged weights, or "
                                     "atoms far closer than any training structure)")
            result = {"energy": float(energy[k]), "energies": node_energy[start:start + n].numpy(),
                      "forces": f.numpy()}
            if stress:
                result["stress"] = (None if _no_stress_reason(a)
                                    else voigt(dE_deps[k].detach().double().cpu().numpy() / a.get_volume()))
            if stresses:
                w = per_atom_virials[start:start + n]
                result["stresses"] = (None if _no_stress_reason(a)
                                      else voigt(-0.5 * (w + w.transpose(1, 2))).numpy() / a.get_volume())
            results.append(result)
            start += n
        return results

    def _atom_virials(self, graph) -> torch.Tensor:
        """Per-atom virials [N, 3, 3] (float64, CPU) of a float64 graph."""
        if not self.exported:
            graph = graph_to(graph, self.device, self.dtype)
        return atom_virials(self.model, graph).detach().double().cpu()

    def _evaluate(self, graph, want_stress: bool):
        if self.direct_forces:
            with torch.no_grad():
                out = self.model(graph, compute_forces=True)
            return out["energy"], out["node_energy"], out["forces"], None
        if autograd_is_off():  # ASE called under no_grad / inference_mode: forces need autograd
            with autograd_on():
                return self._evaluate(normal_graph(graph), want_stress)
        if want_stress:
            out = energy_forces_strain_derivative(self.model, graph)
            return out["energy"], out["node_energy"], out["forces"], out["dE_deps"]
        positions = graph.positions.detach().requires_grad_(True)
        out = self.model(graph._replace(positions=positions), compute_forces=False)
        (grad,) = torch.autograd.grad(out["energy"].sum(), [positions], allow_unused=True)
        return out["energy"], out["node_energy"], (torch.zeros_like(positions) if grad is None else -grad), None


def _no_stress_reason(atoms) -> str:
    """Why `atoms` has no stress ("" if it has one): stress is per volume of a cell with a periodic direction.
    3D-periodic cells without volume never get here (build_graph refuses them)."""
    if not atoms.pbc.any():
        return "stress needs a periodic cell (atoms.pbc is all False)"
    if not atoms.pbc.all() and not abs(np.linalg.det(atoms.cell[:])) > 1e-8:
        return ("stress needs a cell with a volume; this wire/slab has zero vectors along its non-periodic "
                "directions (give them vacuum vectors)")
    return ""
