"""Inference scripts run under torch.no_grad() or torch.inference_mode(). Gradient-force students take forces,
virials and stresses from autograd, which those modes turn off (forces failed with "element 0 of tensors does
not require grad"): every entry point switches it back on for its own call and gives the same numbers."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from engine.calculator import Calculator
from engine.graph import graph_from_atoms
from engine.models import build_student
from engine.runner import FusedStudent
from engine.stress import energy_forces_strain_derivative

MODES = ["no_grad", "inference_mode"]


def student(force_mode="gradient"):
    torch.manual_seed(0)
    return build_student("painn", species=[1, 6, 8, 14], hidden=8, layers=2, num_basis=6, cutoff=4.0,
                         force_mode=force_mode).double()


def systems():
    rng = np.random.default_rng(0)
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.positions += rng.normal(scale=0.05, size=si.positions.shape)
    return [molecule("CH3CH2OH"), si]


@pytest.mark.parametrize("mode", MODES)
def test_student_forward_and_stress(mode):
    model = student()
    graph = graph_from_atoms(systems(), model.cutoff, torch.float64)
    ref = model(graph)
    ref_stress = energy_forces_strain_derivative(model, graph)
    with getattr(torch, mode)():
        graph = graph_from_atoms(systems(), model.cutoff, torch.float64)  # made in the mode, as a script would
        out = model(graph)
        stress = energy_forces_strain_derivative(model, graph)
    assert torch.equal(out["forces"], ref["forces"].detach()) and torch.equal(out["energy"], ref["energy"].detach())
    assert torch.equal(stress["dE_deps"], ref_stress["dE_deps"].detach())
    assert not out["forces"].requires_grad  # nothing for the caller to free


@pytest.mark.parametrize("mode", MODES)
def test_fused_student(mode):
    fused = FusedStudent(student(), backend="torch")
    graph = graph_from_atoms(systems(), fused.cutoff, torch.float64)
    ref = fused(graph)["forces"].detach()
    with getattr(torch, mode)():
        got = fused(graph_from_atoms(systems(), fused.cutoff, torch.float64))["forces"]
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_ase_calculator(mode):
    si = systems()[1]
    si.calc = Calculator(student())
    ref_f, ref_s = si.get_forces(), si.get_stress()
    si.calc.reset()
    with getattr(torch, mode)():
        f, s = si.get_forces(), si.get_stress()
    assert np.array_equal(f, ref_f) and np.array_equal(s, ref_s)


@pytest.mark.parametrize("mode", MODES)
def test_batched_md_and_exported_models(tmp_path, mode):
    """MD steps (with a barostat: stresses too) of a student and of its export, the export loaded inside the
    mode (its weights then must still serve autograd), equal the steps taken with autograd on."""
    from engine.export import export_model
    from engine.exported import ExportedModel
    from engine.md import BatchedMD

    model = student()
    path = str(tmp_path / "model.pt")
    export_model(model, path)

    def run(m, **kw):
        md = BatchedMD(m, [systems()[1]], 0.5, init_temperature_K=300, seed=1, **kw)
        md.step(3)
        return md.positions.clone()

    for make in (lambda: model, lambda: ExportedModel(path)):
        for kw in ({}, {"pressure_GPa": 0.0}):
            ref = run(make(), **kw)
            with getattr(torch, mode)():
                got = run(make(), **kw)
            assert torch.equal(got, ref), kw
