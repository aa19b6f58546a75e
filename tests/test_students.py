"""Student architectures (PaiNN in both force modes, SchNet): forces, Hessians, symmetries, species checks and
TorchScript, in float64 against references."""
import numpy as np
import pytest
import torch
from ase import Atoms
from scipy.spatial.transform import Rotation

from engine.errors import HessforgeError, UnknownElementError
from engine.graph import graph_from_atoms
from engine.models import STUDENTS, PaiNN, SchNet
from training.config import config_from_dict
from training.losses import student_hessian_rows
from toy import STUDENT_VARIANTS

SPECIES = [1, 6, 7, 8]


def _molecule(rng, n=6):
    return Atoms(numbers=rng.choice(SPECIES, size=n), positions=rng.uniform(-1.6, 1.6, size=(n, 3)))


VARIANTS = STUDENT_VARIANTS
GRADIENT = [v for v in VARIANTS if v[1] == "gradient"]


def _model(force_mode, seed=0, arch="painn"):
    torch.manual_seed(seed)
    model = STUDENTS[arch](SPECIES, cutoff=4.0, hidden=16, layers=2, num_basis=8, force_mode=force_mode).double()
    with torch.no_grad():  # a non-trivial energy scale, as after training (reference energies would only
        model.energy_scale.fill_(0.8)  # add float64 rounding to the finite differences below)
    return model


def _periodic(rng):
    cell = np.diag(rng.uniform(3.0, 4.0, 3))
    cell[1, 0] = 0.7
    return Atoms(numbers=rng.choice(SPECIES, 4), positions=rng.uniform(0, 3, (4, 3)), cell=cell, pbc=True)


@pytest.mark.parametrize("arch", ["painn", "schnet"])
@pytest.mark.parametrize("periodic", [False, True])
def test_gradient_forces_match_finite_differences(rng, periodic, arch):
    atoms = _periodic(rng) if periodic else _molecule(rng)
    model = _model("gradient", int(rng.integers(1000)), arch)
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


@pytest.mark.parametrize("arch,force_mode", VARIANTS)
def test_rotation_translation_permutation(rng, arch, force_mode):
    atoms = _molecule(rng)
    model = _model(force_mode, int(rng.integers(1000)), arch)
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


@pytest.mark.parametrize("arch,force_mode", VARIANTS)
def test_batch_equals_separate_structures(rng, arch, force_mode):
    model = _model(force_mode, int(rng.integers(1000)), arch)
    structures = [_molecule(rng, 5), _periodic(rng), _molecule(rng, 3)]
    batched = model(graph_from_atoms(structures, 4.0, torch.float64))
    forces, energies = [], []
    for s in structures:
        o = model(graph_from_atoms([s], 4.0, torch.float64))
        energies.append(o["energy"].item())
        forces.append(o["forces"].detach())
    np.testing.assert_allclose(batched["energy"].detach().numpy(), energies, rtol=1e-12)
    np.testing.assert_allclose(batched["forces"].detach().numpy(), torch.cat(forces).numpy(), atol=1e-12)


@pytest.mark.parametrize("arch", ["painn", "schnet"])
def test_torchscript_matches_eager(rng, arch):
    atoms = [_molecule(rng), _periodic(rng)]
    for mode in STUDENTS[arch].force_modes:
        model = _model(mode, arch=arch)
        graph = graph_from_atoms(atoms, 4.0, torch.float64)
        scripted = torch.jit.script(model)
        a, b = model(graph), scripted(graph)
        torch.testing.assert_close(a["energy"], b["energy"], rtol=1e-12, atol=0)
        torch.testing.assert_close(a["forces"], b["forces"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", ["painn", "schnet"])
def test_unknown_element_is_named(arch):
    model = _model("gradient", arch=arch)
    with pytest.raises(UnknownElementError, match=r"S \(Z=16\)"):
        model.check_species([1, 6, 16])


@pytest.mark.parametrize("arch,force_mode", GRADIENT)
def test_hessian_rows_match_finite_differences_of_forces(rng, arch, force_mode):
    """The training loss's Hessian rows (one vector-Jacobian product per row) against central differences of
    the student's own forces: H[k] = -dF/dx_k."""
    atoms = _molecule(rng, 5)
    model = _model(force_mode, int(rng.integers(1000)), arch)
    graph = graph_from_atoms([atoms], 4.0, torch.float64)
    rows = [int(k) for k in rng.choice(3 * len(atoms), size=3, replace=False)]
    positions = graph.positions.detach().requires_grad_(True)
    forces = model(graph._replace(positions=positions), create_graph=True)["forces"]
    index = torch.tensor(rows).unsqueeze(1)  # [s, B = 1]
    got = student_hessian_rows(forces, positions, index).detach().reshape(len(rows), -1).numpy()
    h = 1e-5
    for r, k in enumerate(rows):
        f = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[k // 3, k % 3] += sign * h
            f.append(model(graph_from_atoms([moved], 4.0, torch.float64))["forces"].detach().numpy().reshape(-1))
        np.testing.assert_allclose(got[r], -(f[0] - f[1]) / (2 * h), rtol=1e-5, atol=1e-7)
    assert np.abs(got).max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_painn_norm_eps_gives_smooth_hessians_at_symmetric_sites(rng, seed):
    """CH4 at its tetrahedral geometry: the carbon's vector features vanish by symmetry. With the published
    epsilon (1e-8) PaiNN's energy is cone-shaped there, so second differences along a carbon coordinate depend
    on the step; with norm_eps=1 they converge to the autograd Hessian entry."""
    from ase.build import molecule

    atoms = molecule("CH4")
    carbon = int(np.flatnonzero(atoms.numbers == 6)[0])
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)

    def second_difference(model, h):
        e = []
        for step in (h, 0.0, -h):
            moved = atoms.copy()
            moved.positions[carbon] += step * axis
            e.append(float(model(graph_from_atoms([moved], 4.0, torch.float64))["energy"].sum()))
        return (e[0] - 2 * e[1] + e[2]) / h**2

    def make(**kw):
        torch.manual_seed(seed)
        return PaiNN([1, 6], cutoff=4.0, hidden=16, layers=2, num_basis=8, **kw).double()

    # the published epsilon: second differences change several-fold from a 1e-2 to a 1e-4 Å step (the cone,
    # rounded off only where |v| < 1e-4): the "Hessian" there is whatever step one picks
    cone = [second_difference(make(), h) for h in (1e-2, 1e-4)]
    assert abs(cone[1] - cone[0]) > 2 * abs(cone[0]), cone
    smooth = make(norm_eps=1.0)
    fd = [second_difference(smooth, h) for h in (1e-2, 1e-3)]
    graph = graph_from_atoms([atoms], 4.0, torch.float64)
    positions = graph.positions.detach().requires_grad_(True)
    energy = smooth(graph._replace(positions=positions), compute_forces=False)["energy"].sum()
    (grad,) = torch.autograd.grad(energy, positions, create_graph=True)
    (hess_row,) = torch.autograd.grad((grad[carbon] * torch.from_numpy(axis)).sum(), positions)
    exact = float((hess_row[carbon] * torch.from_numpy(axis)).sum())
    assert fd[1] == pytest.approx(exact, rel=1e-4, abs=1e-6) and fd[0] == pytest.approx(exact, rel=1e-2, abs=1e-4)
    with pytest.raises(ValueError, match="norm_eps must be a finite number > 0"):
        make(norm_eps=0.0)


def test_schnet_has_gradient_forces_only(tmp_path):
    with pytest.raises(ValueError, match="force_mode"):
        SchNet(SPECIES, force_mode="direct")
    with pytest.raises(HessforgeError, match="force_mode of schnet must be 'gradient'"):
        config_from_dict({"data": {"path": "x.lmdb"}, "model": {"name": "schnet", "force_mode": "direct"}})
    with pytest.raises(HessforgeError, match="model.norm_eps is a PaiNN setting; schnet has no vector features"):
        config_from_dict({"data": {"path": "x.lmdb"}, "model": {"name": "schnet", "norm_eps": 1.0}})
    with pytest.raises(HessforgeError, match="model.norm_eps must be a number > 0"):
        config_from_dict({"data": {"path": "x.lmdb"}, "model": {"name": "painn", "norm_eps": -1.0}})
    with pytest.raises(HessforgeError, match="model.name: unknown student architecture .gemnet.; available: painn, schnet"):
        config_from_dict({"data": {"path": "x.lmdb"}, "model": {"name": "gemnet"}})
    with pytest.raises(HessforgeError, match="SchNet: .*hidden must be >= 2"):
        SchNet(SPECIES, hidden=1)


@pytest.mark.parametrize("arch", sorted(STUDENTS))
def test_float32_students_keep_energies_to_float32_precision_of_the_learned_part(rng, arch):
    """The per-element reference energies (~1e3 eV each, ~2e4 eV per structure) stay float64 through .float()
    and are added in float64: a float32 student's energies then differ from float64's by the rounding of the
    learned part (measured 2e-7 eV), not of the totals (3e-3 eV before), which was noise in the energy loss."""
    import copy

    model = STUDENTS[arch]([1, 6, 7, 8], cutoff=4.0, hidden=16, layers=2, num_basis=8).double()
    with torch.no_grad():
        model.atom_ref.copy_(torch.tensor([-13.6, -1029.4, -1485.1, -2041.9]) + torch.tensor(rng.normal(0, 1e-3, 4)))
    atoms = [Atoms(numbers=rng.choice([1, 6, 7, 8], 24), positions=rng.uniform(0, 6, (24, 3))) for _ in range(4)]
    e64 = model(graph_from_atoms(atoms, 4.0, torch.float64))["energy"].detach()
    m32 = copy.deepcopy(model).float()
    assert m32.atom_ref.dtype == torch.float64 and next(m32.parameters()).dtype == torch.float32
    out = m32(graph_from_atoms(atoms, 4.0, torch.float32))
    assert out["energy"].dtype == torch.float64 and out["forces"].dtype == torch.float32
    assert float((out["energy"].detach() - e64).abs().max()) < 1e-5
    reloaded = STUDENTS[arch]([1, 6, 7, 8], cutoff=4.0, hidden=16, layers=2, num_basis=8).float()
    reloaded.load_state_dict(m32.state_dict())
    assert torch.equal(reloaded.atom_ref, model.atom_ref)  # the float64 references survive a float32 checkpoint


# ------------------------------------------------------------------------- the published equations, atom by atom
def _pairs_within(positions, cutoff):
    """[(i, j, r_ij = x_j - x_i, |r_ij|)] for every ordered pair within the cutoff (a molecule: no images); the
    students' distance is sqrt(|r|² + 1e-8) (engine.models.base.safe_norm: finite gradients at r = 0)."""
    from engine.models.base import NORM_EPS

    n = positions.shape[0]
    pairs = [(i, j, positions[j] - positions[i]) for i in range(n) for j in range(n) if i != j]
    return [(i, j, rij, torch.sqrt(rij.square().sum() + NORM_EPS)) for i, j, rij in pairs
            if float(rij.norm()) < cutoff]


def _radial(model, r):
    """The students' radial features of one distance: sin(nπr/r_c)/r (n = 1..) and the cosine envelope."""
    n = torch.arange(1, model.num_basis + 1, dtype=r.dtype)
    return torch.sin(n * np.pi * r / model.cutoff) / r, 0.5 * (torch.cos(np.pi * r / model.cutoff) + 1.0)


def _painn_reference_energy(model, numbers, positions):
    """PaiNN (Schütt, Unke & Gastegger 2021, eqs. 7-11) written atom by atom with the module's weights: message
    Δs_i = Σ_j φ_s(s_j) W_s(r_ij), Δv_i = Σ_j v_j φ_vv(s_j) W_vv(r_ij) + φ_vs(s_j) W_vs(r_ij) r_ij/|r_ij|
    (W = filter(rbf) · envelope); update Δv_i = a_vv U v_i, Δs_i = a_ss + a_sv <U v_i, V v_i>, with
    (a_vv, a_sv, a_ss) = MLP(s_i, |V v_i|); E = Σ_i readout(s_i) · scale + ref(z_i)."""
    F = model.hidden
    index = [model.species.index(int(z)) for z in numbers]
    s = [model.embedding.weight[k] for k in index]
    v = [torch.zeros(3, F, dtype=positions.dtype) for _ in index]
    pairs = _pairs_within(positions, model.cutoff)
    for message, update in zip(model.messages, model.updates):
        ds = [torch.zeros(F, dtype=positions.dtype) for _ in index]
        dv = [torch.zeros(3, F, dtype=positions.dtype) for _ in index]
        for i, j, rij, r in pairs:
            rbf, envelope = _radial(model, r)
            x = message.phi(s[j]) * message.filter(rbf) * envelope
            x_vv, x_s, x_vs = x[:F], x[F:2 * F], x[2 * F:]
            ds[i] = ds[i] + x_s
            dv[i] = dv[i] + v[j] * x_vv + (rij / r)[:, None] * x_vs[None, :]
        s = [s[i] + ds[i] for i in range(len(index))]
        v = [v[i] + dv[i] for i in range(len(index))]
        for i in range(len(index)):
            uv, vv = update.U(v[i]), update.V(v[i])  # [3, F]: linear maps across features
            norm = torch.sqrt(vv.square().sum(dim=0) + update.norm_eps)
            a = update.mlp(torch.cat([s[i], norm]))
            a_vv, a_sv, a_ss = a[:F], a[F:2 * F], a[2 * F:]
            v[i] = v[i] + a_vv[None, :] * uv
            s[i] = s[i] + a_ss + a_sv * (uv * vv).sum(dim=0)
    return sum(model.readout(s[i])[0] * model.energy_scale + model.atom_ref[index[i]] for i in range(len(index)))


def _schnet_reference_energy(model, numbers, positions):
    """SchNet (Schütt et al. 2018) atom by atom: x_i <- x_i + f2out(Σ_j in2f(x_j) ⊙ filter(rbf(r_ij)) envelope)."""
    index = [model.species.index(int(z)) for z in numbers]
    x = [model.embedding.weight[k] for k in index]
    pairs = _pairs_within(positions, model.cutoff)
    for block in model.interactions:
        total = [torch.zeros(model.hidden, dtype=positions.dtype) for _ in index]
        for i, j, rij, r in pairs:
            rbf, envelope = _radial(model, r)
            total[i] = total[i] + block.in2f(x[j]) * block.filter(rbf) * envelope
        x = [x[i] + block.f2out(total[i]) for i in range(len(index))]
    return sum(model.readout(x[i])[0] * model.energy_scale + model.atom_ref[index[i]] for i in range(len(index)))


@pytest.mark.parametrize("arch", ["painn", "schnet"])
def test_students_compute_their_published_equations(rng, arch):
    """Energies and forces equal a plain atom-by-atom implementation of the architecture's equations with the
    same weights (3 layers: PaiNN's vector features are zero in the first). Properties alone (symmetries, finite
    differences, batching, TorchScript) hold for a wrong message index or a dropped update term too."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = STUDENTS[arch](SPECIES, cutoff=4.0, hidden=8, layers=3, num_basis=6).double()
    with torch.no_grad():
        model.energy_scale.fill_(0.7)
        model.atom_ref.copy_(torch.as_tensor(rng.normal(size=len(SPECIES))))
    atoms = Atoms(numbers=rng.choice(SPECIES, size=5), positions=rng.uniform(-1.5, 1.5, size=(5, 3)))
    out = model(graph_from_atoms([atoms], model.cutoff, torch.float64), compute_forces=True)
    positions = torch.tensor(atoms.positions, dtype=torch.float64, requires_grad=True)
    reference = {"painn": _painn_reference_energy, "schnet": _schnet_reference_energy}[arch]
    energy = reference(model, atoms.numbers, positions)
    (grad,) = torch.autograd.grad(energy, positions)
    assert float(out["energy"][0]) == pytest.approx(float(energy), rel=1e-10, abs=1e-10)
    torch.testing.assert_close(out["forces"].detach(), -grad, rtol=1e-9, atol=1e-10)
    assert float(grad.abs().max()) > 1e-3  # the forces compared are not all zero
