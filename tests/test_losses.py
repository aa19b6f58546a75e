"""Hessian-row distillation: sampled rows equal brute-force Hessian rows; losses backpropagate."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase import Atoms

from engine.graph import graph_from_atoms
from engine.models import PaiNN
from training.losses import LossWeights, compute_loss, student_hessian_rows

SPECIES = [1, 6, 8]


def _structures(rng):
    out = []
    for n in (4, 3, 5):
        out.append(Atoms(numbers=rng.choice(SPECIES, n), positions=rng.uniform(-1.4, 1.4, (n, 3))))
    cell = np.diag(rng.uniform(3.0, 3.5, 3))
    out.append(Atoms(numbers=rng.choice(SPECIES, 3), positions=rng.uniform(0, 3, (3, 3)), cell=cell, pbc=True))
    return out


def _model(mode, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    return PaiNN(SPECIES, cutoff=3.5, hidden=16, layers=2, num_basis=8, force_mode=mode).double()


def _full_hessian(model, graph):
    """Brute force: the whole -dF/dr (= d²E/dr² for gradient students), one structure at a time not needed."""

    def neg_forces(pos):
        return -model(graph._replace(positions=pos), create_graph=True)["forces"].reshape(-1)

    pos = graph.positions.detach().clone().requires_grad_(True)
    return torch.autograd.functional.jacobian(neg_forces, pos).reshape(pos.numel(), pos.numel())


def _random_rows(rng, graph, s):
    counts = torch.bincount(graph.batch).tolist()
    starts = np.cumsum([0] + counts[:-1])
    return torch.tensor([[3 * st + rng.integers(3 * c) for st, c in zip(starts, counts)] for _ in range(s)])


@pytest.mark.parametrize("mode", ["gradient", "direct"])
def test_sampled_rows_equal_full_hessian_rows(rng, mode):
    model = _model(mode, rng)
    graph = graph_from_atoms(_structures(rng), 3.5, torch.float64)
    H = _full_hessian(model, graph)
    if mode == "gradient":
        torch.testing.assert_close(H, H.T, rtol=1e-8, atol=1e-10)  # a true second derivative
    index = _random_rows(rng, graph, s=3)
    pos = graph.positions.detach().requires_grad_(True)
    forces = model(graph._replace(positions=pos), create_graph=True)["forces"]
    rows = student_hessian_rows(forces, pos, index)  # [s, N, 3]
    for t in range(index.shape[0]):
        expected = torch.zeros(pos.numel(), dtype=torch.float64)
        for b, j in enumerate(index[t].tolist()):
            mine = (graph.batch == b).repeat_interleave(3)
            expected[mine] = H[j][mine]  # structure b's row, restricted to its own atoms
            # and nothing leaks across structures
            assert H[j][~mine].abs().max() == 0
        torch.testing.assert_close(rows[t].reshape(-1), expected, rtol=1e-9, atol=1e-12)
    assert rows.abs().max() > 1e-4


def _batch(graph, rng, model, s=2, with_kd=True):
    n = graph.positions.shape[0]
    B = graph.cell.shape[0]
    index = _random_rows(rng, graph, s)
    return SimpleNamespace(
        graph=graph,
        energy=torch.tensor(rng.normal(size=B)),
        forces=torch.tensor(rng.normal(size=(n, 3))),
        teacher_energy=torch.tensor(rng.normal(size=B)),
        teacher_forces=torch.tensor(rng.normal(size=(n, 3))),
        hessian_index=index if with_kd else None,
        hessian_target=torch.tensor(rng.normal(size=(s, n, 3))) if with_kd else None,
    )


@pytest.mark.parametrize("mode", ["gradient", "direct"])
def test_kd_loss_backpropagates_and_matches_definition(rng, mode):
    model = _model(mode, rng)
    graph = graph_from_atoms(_structures(rng), 3.5, torch.float64)
    batch = _batch(graph, rng, model)
    weights = LossWeights(energy=5, forces=100, hessian=400, energy_gradient=1.0, force_distill=2.0, kind="mse")
    terms = compute_loss(model, batch, weights)
    terms["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # double backward really reaches the parameters through the Hessian term
    model.zero_grad()
    compute_loss(model, batch, LossWeights(energy=0, forces=0, hessian=1.0))["total"].backward()  # l2mae
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
    # the KD term is the mean squared difference between sampled student rows and the targets
    H = _full_hessian(model, graph)
    expected = []
    for t in range(batch.hessian_index.shape[0]):
        row = torch.zeros(H.shape[0], dtype=torch.float64)
        for b, j in enumerate(batch.hessian_index[t].tolist()):
            mine = (graph.batch == b).repeat_interleave(3)
            row[mine] = H[j][mine]
        expected.append(row)
    expected = torch.stack(expected).reshape(batch.hessian_target.shape)
    diff = expected - batch.hessian_target
    torch.testing.assert_close(terms["hessian"], diff.square().mean(), rtol=1e-9, atol=0)
    # the paper's form: mean over (sampled row, atom) of the norm of the row's 3-block on that atom
    l2 = compute_loss(model, batch, LossWeights(kind="l2mae"), training=False)
    torch.testing.assert_close(l2["hessian"], diff.norm(dim=-1).mean(), rtol=1e-9, atol=0)
    natoms = torch.bincount(graph.batch).double()
    e_pred = model(graph, compute_forces=False)["energy"]
    torch.testing.assert_close(l2["energy"], ((e_pred - batch.energy).abs() / natoms).mean(), rtol=1e-9, atol=0)
    if mode == "direct":
        assert "energy_gradient" in terms
    assert "force_distill" in terms
    # evaluating (training=False) gives the training values, all terms together (KD and energy gradient
    # differentiate the same force graph)
    evaluated = compute_loss(model, batch, weights, training=False)
    for key in ("total", "hessian", "energy", "forces"):
        torch.testing.assert_close(evaluated[key], terms[key].detach(), rtol=1e-12, atol=0)


def test_loss_without_labels_has_no_kd_term(rng):
    model = _model("gradient", rng)
    graph = graph_from_atoms(_structures(rng), 3.5, torch.float64)
    terms = compute_loss(model, _batch(graph, rng, model, with_kd=False), LossWeights())
    assert "hessian" not in terms and torch.isfinite(terms["total"])


def test_offsets_determine_only_compositions_in_the_span_of_the_fit():
    """Offsets fitted on conformers of one molecule fix only that molecule's offset energy: another molecule's
    (or an unseen element's) is arbitrary, and evaluation then fits on the evaluated structures instead."""
    from training.reference_energies import offsets_determine

    ethanol, water, methane = [6, 6, 8] + [1] * 6, [8, 1, 1], [6] + [1] * 4
    assert offsets_determine([ethanol, ethanol], [ethanol])
    assert not offsets_determine([ethanol, ethanol], [water])
    assert offsets_determine([ethanol, water, methane], [water, [6, 6, 8, 8] + [1] * 12])  # full rank in C, O, H
    assert not offsets_determine([water, methane], [[7, 1, 1, 1]])  # N never seen
    assert offsets_determine([water, methane, [8, 8, 1, 1]], [[6, 8] + [1] * 4])


def test_reference_energies_recover_per_element_energies(rng):
    """Energies that are exactly Σ_z n_z e_z over random H/C/O compositions give back e_z (the fit feeds
    every student's atomic reference energies; the trainer absorbs a wrong fit silently)."""
    from types import SimpleNamespace

    from training.reference_energies import fit_reference_energies

    e = {1: -13.6, 6: -1030.0, 8: -2040.0}
    structures = []
    for _ in range(20):
        numbers = rng.choice([1, 6, 8], size=int(rng.integers(1, 21)))
        structures.append(SimpleNamespace(numbers=numbers, energy=sum(e[int(z)] for z in numbers)))
    np.testing.assert_allclose(fit_reference_energies(structures, [1, 6, 8]), [e[1], e[6], e[8]], atol=1e-5)


def test_ema_follows_its_warmed_up_decay():
    """One update moves the shadow by 1 - decay towards the weights, with decay = min(d, (1 + n)/(10 + n)):
    the averaged weights best.pt holds are this average, not the reverse blend."""
    from training.ema import ExponentialMovingAverage

    p = torch.zeros(3, requires_grad=True)
    ema = ExponentialMovingAverage([p], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # n = 1: decay = min(0.5, 2/11)
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 1.0 - 2.0 / 11.0), rtol=1e-12, atol=0.0)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update()  # n = 2: decay = min(0.5, 3/12) = 0.25
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.25 * (1.0 - 2.0 / 11.0) + 0.75 * 3.0),
                               rtol=1e-12, atol=0.0)
    with ema.average_parameters():
        assert float(p[0]) == pytest.approx(0.25 * (1.0 - 2.0 / 11.0) + 0.75 * 3.0)
    assert float(p[0]) == 3.0  # the training weights come back
