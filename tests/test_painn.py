"""PaiNN student: forces, symmetries, species checks and TorchScript, in float64 against references."""
import numpy as np
import pytest
import torch
from ase import Atoms
from scipy.spatial.transform import Rotation

from engine.errors import UnknownElementError
from engine.graph import graph_from_atoms
from engine.models import PaiNN

SPECIES = [1, 6, 7, 8]


def _molecule(rng, n=6):
    return Atoms(numbers=rng.choice(SPECIES, size=n), positions=rng.uniform(-1.6, 1.6, size=(n, 3)))


def _model(force_mode, seed=0):
    torch.manual_seed(seed)
    return PaiNN(SPECIES, cutoff=4.0, hidden=16, layers=2, num_basis=8, force_mode=force_mode).double()


def _periodic(rng):
    cell = np.diag(rng.uniform(3.0, 4.0, 3))
    cell[1, 0] = 0.7
    return Atoms(numbers=rng.choice(SPECIES, 4), positions=rng.uniform(0, 3, (4, 3)), cell=cell, pbc=True)


@pytest.mark.parametrize("periodic", [False, True])
def test_gradient_forces_match_finite_differences(rng, periodic):
    atoms = _periodic(rng) if periodic else _molecule(rng)
    model = _model("gradient", int(rng.integers(1000)))
    forces = model(graph_from_atoms([atoms], 4.0, torch.float64))["forces"].detach().numpy()
    h = 1e-5
    fd = np.zeros_like(forces)
    for a in range(len(atoms)):
        for x in range(3):
            e = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[a, x] += sign * h
                e.append(model(graph_from_atoms([moved], 4.0, torch.float64), compute_forces=False)["energy"].item())
            fd[a, x] = -(e[0] - e[1]) / (2 * h)
    np.testing.assert_allclose(forces, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("force_mode", ["gradient", "direct"])
def test_rotation_translation_permutation(rng, force_mode):
    atoms = _molecule(rng)
    model = _model(force_mode, int(rng.integers(1000)))
    out = model(graph_from_atoms([atoms], 4.0, torch.float64))
    R = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ R.T + rng.normal(size=3)
    perm = rng.permutation(len(atoms))
    moved = moved[perm]
    out2 = model(graph_from_atoms([moved], 4.0, torch.float64))
    np.testing.assert_allclose(out2["energy"].item(), out["energy"].item(), rtol=1e-10)
    f_expected = out["forces"].detach().numpy() @ R.T
    np.testing.assert_allclose(out2["forces"].detach().numpy(), f_expected[perm], atol=1e-10)
    assert out["forces"].abs().max() > 1e-6  # the check above is not vacuous


def test_batch_equals_separate_structures(rng):
    model = _model("gradient", int(rng.integers(1000)))
    structures = [_molecule(rng, 5), _periodic(rng), _molecule(rng, 3)]
    batched = model(graph_from_atoms(structures, 4.0, torch.float64))
    forces, energies = [], []
    for s in structures:
        o = model(graph_from_atoms([s], 4.0, torch.float64))
        energies.append(o["energy"].item())
        forces.append(o["forces"].detach())
    np.testing.assert_allclose(batched["energy"].detach().numpy(), energies, rtol=1e-12)
    np.testing.assert_allclose(batched["forces"].detach().numpy(), torch.cat(forces).numpy(), atol=1e-12)


def test_torchscript_matches_eager(rng):
    atoms = [_molecule(rng), _periodic(rng)]
    for mode in ("gradient", "direct"):
        model = _model(mode)
        graph = graph_from_atoms(atoms, 4.0, torch.float64)
        scripted = torch.jit.script(model)
        a, b = model(graph), scripted(graph)
        torch.testing.assert_close(a["energy"], b["energy"], rtol=1e-12, atol=0)
        torch.testing.assert_close(a["forces"], b["forces"], rtol=1e-12, atol=1e-14)


def test_unknown_element_is_named():
    model = _model("gradient")
    with pytest.raises(UnknownElementError, match=r"S \(Z=16\)"):
        model.check_species([1, 6, 16])
