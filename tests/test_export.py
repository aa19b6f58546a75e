"""Export to TorchScript: metadata, provenance, agreement with the Python student (float64, 1e-10), errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms

from engine.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from engine.errors import HessforgeError, UnknownElementError
from engine.export import EXPORT_VERSION, METADATA_NAME, ExportWrapper, export_model, quiet_torchscript
from engine.exported import load_exported, read_metadata
from engine.graph import graph_from_atoms
from engine.stress import energy_forces_strain_derivative
from engine.models import STUDENTS
from toy import STUDENT_VARIANTS

SPECIES = [1, 6, 8]
CUTOFF = 3.5


VARIANTS = STUDENT_VARIANTS


def tiny_painn(force_mode="gradient", seed=0, dtype=torch.float64, arch="painn"):
    torch.manual_seed(seed)
    model = STUDENTS[arch](SPECIES, cutoff=CUTOFF, hidden=16, layers=2, num_basis=8, force_mode=force_mode)
    with torch.no_grad():  # non-trivial reference energies and scale, as after training
        model.atom_ref.copy_(torch.tensor([-13.6, -1029.0, -2041.0]))
        model.energy_scale.fill_(0.7)
    return model.to(dtype).eval()


def flipped_weights_copy(path, out):
    """A copy of an exported file with 64 bytes inverted inside its largest record (a weight tensor: a bad copy
    or disk). Found through the zip directory: a fixed offset such as a third of the way in lands on a record
    header in some archives (the layout moves with the metadata), which is refused for another reason."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    data = bytearray(open(path, "rb").read())
    name_length = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2 - 32
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    open(out, "wb").write(bytes(data))
    return out


def write_checkpoint(path, model, labels_dir=None):
    """A checkpoint with the keys the trainer writes (training/trainer.py Trainer._state)."""
    hp = dict(model.hyperparameters(), name="painn")
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_hparams": hp,
        "model_state": model.state_dict(), "ema_model_state": model.state_dict(), "epoch": 3, "step": 30,
        "best_val": 0.25, "history": [{"kind": "epoch", "epoch": 3, "val_energy_mae": 0.01, "train_total": 1.5}],
        "teacher_val": {"energy_mae": 0.002},
        "config": {"data": {"path": "/data/set.lmdb", "labels": labels_dir}, "loss": {"hessian": 400.0},
                   "train": {"dtype": "float64"}},
    }
    torch.save(state, path)
    return str(path)


def structures(rng):
    """A molecule in vacuum, an orthorhombic box smaller than the cutoff in one direction, a triclinic cell, a
    wire with zero cell vectors along its non-periodic directions (as ase.build.nanotube writes it)."""
    mol = Atoms(numbers=rng.choice(SPECIES, 7), positions=rng.uniform(-1.5, 1.5, (7, 3)))
    ortho = Atoms(numbers=rng.choice(SPECIES, 5), positions=rng.uniform(0, 3, (5, 3)),
                  cell=np.diag([3.0, 4.0, 4.5]), pbc=True)
    tric = np.array([[4.2, 0.0, 0.0], [1.1, 3.9, 0.0], [-0.7, 0.8, 4.4]])
    triclinic = Atoms(numbers=rng.choice(SPECIES, 6), positions=rng.uniform(0, 4, (6, 3)) @ (tric / 4.0),
                      cell=tric, pbc=True)
    wire = Atoms(numbers=rng.choice(SPECIES, 5), positions=rng.uniform(-1.5, 1.5, (5, 3)),
                 cell=[[0, 0, 0], [0, 0, 0], [0.2, -0.1, 2.7]], pbc=[False, False, True])
    return {"molecule": mol, "small-cell": ortho, "triclinic": triclinic, "wire": wire}


def strain_virial(model, graph):
    """Reference virial W = -dE/d(strain) of the Python student (LAMMPS sign: P V = W + kinetic)."""
    eye = torch.eye(3, dtype=torch.float64)
    eps = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    strained = graph._replace(positions=graph.positions @ (eye + eps), cell=graph.cell @ (eye + eps))
    energy = model(strained, compute_forces=False)["energy"].sum()
    return -torch.autograd.grad(energy, eps)[0]


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("arch,force_mode", VARIANTS)
def test_exported_matches_python_student(tmp_path, rng, arch, force_mode):
    model = tiny_painn(force_mode, seed=int(rng.integers(1000)), arch=arch)
    path = str(tmp_path / "model.pt")
    meta = export_model(model, path)
    exported = load_exported(path)
    assert exported.metadata == meta
    systems = structures(rng)
    for name, atoms in systems.items():
        graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
        ref = model(graph)
        out = exported(graph)
        assert rel(out["energy"], ref["energy"].detach()) < 1e-10, name
        assert rel(out["node_energy"], ref["node_energy"].detach()) < 1e-10, name
        assert rel(out["forces"], ref["forces"].detach()) < 1e-10, name
        if force_mode == "gradient" and atoms.pbc.any():
            assert rel(exported.virial(graph), strain_virial(model, graph)) < 1e-10, name
    # a batch of all of them at once
    graph = graph_from_atoms(list(systems.values()), CUTOFF, torch.float64)
    ref, out = model(graph), exported(graph)
    assert rel(out["energy"], ref["energy"].detach()) < 1e-10
    assert rel(out["forces"], ref["forces"].detach()) < 1e-10
    if force_mode == "gradient":  # each structure's strain derivative from the one batched call
        ref = energy_forces_strain_derivative(model, graph)
        out = energy_forces_strain_derivative(exported, graph)
        for key in ("energy", "forces", "dE_deps"):
            assert rel(out[key], ref[key].detach()) < 1e-10, key
        for b in range(graph.cell.shape[0]):
            assert rel(out["dE_deps"][b], ref["dE_deps"][b].detach()) < 1e-10, b
        legacy = load_exported(path)
        legacy.module = WithoutBatched(legacy.module)  # an archive from before the batched method
        old = energy_forces_strain_derivative(legacy, graph)
        for key in ("energy", "node_energy", "forces", "dE_deps"):
            assert rel(old[key], out[key]) < 1e-12, key
        with pytest.raises(HessforgeError, match="not their derivatives"):
            energy_forces_strain_derivative(exported, graph, create_graph=True)
    else:
        with pytest.raises(HessforgeError, match="has no virial"):
            energy_forces_strain_derivative(exported, graph)


class WithoutBatched:
    """An exported module seen as one written before `batched` existed: forward only."""

    def __init__(self, module):
        self.forward = module.forward

    def __call__(self, *args):
        return self.forward(*args)


def test_barostat_md_with_exported_model_follows_the_python_student(tmp_path):
    """hessforge md under a barostat with the exported file: the same trajectory as with the Python student."""
    from ase.build import bulk

    from engine.md import BatchedMD

    model = tiny_painn(seed=3)
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    rng = np.random.default_rng(5)
    systems = []
    for k in range(3):
        atoms = bulk("C", "diamond", a=3.6, cubic=True)
        atoms.numbers = rng.choice(SPECIES, len(atoms))
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.set_cell(atoms.cell @ (np.eye(3) + rng.normal(0, 0.02, (3, 3))), scale_atoms=True)
        systems.append(atoms)
    runs = []
    for student in (model, load_exported(path)):
        md = BatchedMD(student, systems, 0.5, integrator="langevin", temperature_K=300, seed=11, pressure_GPa=2.0,
                       barostat_time_fs=50, bulk_modulus_GPa=50, barostat_coupling="tri", barostat_method="c-rescale",
                       dtype=torch.float64)
        md.step(15)
        runs.append((md.positions.clone(), md.cell(), md.pressure_tensor().clone()))
    for a, b in zip(*runs):
        assert rel(a, b) < 1e-9
    assert rel(runs[0][1], torch.tensor(np.array([s.cell[:] for s in systems]))) > 1e-4  # the cells moved


def test_local_energy_and_ghost_forces():
    """With nlocal < N the energy sums local atoms only and forces are -dE_local/dx for every atom."""
    model = tiny_painn()
    rng = np.random.default_rng(1)
    pos = torch.tensor(rng.uniform(0, 3, (8, 3)))
    numbers = torch.tensor(rng.choice(SPECIES, 8))
    atoms = Atoms(numbers=numbers.numpy(), positions=pos.numpy())
    graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
    with quiet_torchscript():
        wrapper = torch.jit.script(ExportWrapper(model))
    shifts = torch.zeros(graph.edge_index.shape[1], 3, dtype=torch.float64)
    energy, node_energy, forces, _ = wrapper(graph.positions, graph.numbers, graph.edge_index, shifts, 5)
    x = graph.positions.clone().requires_grad_(True)
    e_local = model(graph._replace(positions=x), compute_forces=False)["node_energy"][:5].sum()
    (grad,) = torch.autograd.grad(e_local, x)
    assert rel(energy, e_local.detach()) < 1e-12
    assert rel(forces, -grad) < 1e-10
    assert forces[5:].abs().max() > 0  # the ghost rows carry the reaction forces


def test_export_cli_from_checkpoint(tmp_path):
    model = tiny_painn()
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "labels.json").write_text(json.dumps({"teacher": "ani1x", "teacher_spec": "ani1x", "mode": "rows",
                                                    "k": 4, "dtype": "float64"}))
    ckpt = write_checkpoint(tmp_path / "best.pt", model, str(labels))
    out = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-m", "training.cli", "export", ckpt, "-o", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "LAMMPS ghost atoms to 3.5 Å in halo mode, 7 Å in ghost mode" in proc.stdout
    meta = read_metadata(str(out))
    assert meta["format_version"] == EXPORT_VERSION
    import zipfile  # the archive's inner folder is named after the file, not the temporary name it was written as

    assert {name.split("/")[0] for name in zipfile.ZipFile(out).namelist()} == {"model"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert meta["species"] == SPECIES and meta["species_symbols"] == ["H", "C", "O"]
    assert meta["cutoff"] == CUTOFF and meta["num_layers"] == 2 and meta["interaction_range"] == 2 * CUTOFF
    assert meta["force_mode"] == "gradient" and meta["virial"] is True and meta["dtype"] == "float64"
    assert meta["units"] == {"energy": "eV", "length": "Angstrom", "lammps": "metal"}
    prov = meta["provenance"]
    assert prov["teacher"]["teacher"] == "ani1x" and prov["data"]["path"] == "/data/set.lmdb"
    assert prov["metrics"]["epoch"] == 3 and prov["metrics"]["last_epoch"]["val_energy_mae"] == 0.01
    assert prov["metrics"]["teacher_val"] == {"energy_mae": 0.002} and len(prov["checkpoint_sha256"]) == 64
    # float32 export of the same checkpoint: same numbers to float32 precision
    proc = subprocess.run([sys.executable, "-m", "training.cli", "export", ckpt, "-o", str(tmp_path / "m32.pt"),
                           "--dtype", "float32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    exported32 = load_exported(str(tmp_path / "m32.pt"))
    assert exported32.dtype == torch.float32
    atoms = structures(np.random.default_rng(0))["triclinic"]
    ref = model(graph_from_atoms([atoms], CUTOFF, torch.float64))
    out32 = exported32(graph_from_atoms([atoms], CUTOFF, torch.float32))
    assert rel(out32["energy"].double(), ref["energy"].detach()) < 1e-5
    assert rel(out32["forces"].double(), ref["forces"].detach()) < 1e-3


def test_export_errors(tmp_path):
    model = tiny_painn()
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    with pytest.raises(HessforgeError, match="model file not found"):
        load_exported(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(HessforgeError, match="not a hessforge exported model"):
        load_exported(str(garbage))
    meta = read_metadata(path)
    newer = str(tmp_path / "newer.pt")
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), newer,
                       _extra_files={METADATA_NAME: json.dumps(dict(meta, format_version=EXPORT_VERSION + 1))})
    with pytest.raises(HessforgeError, match=f"format version {EXPORT_VERSION + 1} is newer"):
        load_exported(newer)
    exported = load_exported(path)
    atoms = Atoms("NH3", positions=np.random.default_rng(0).uniform(0, 2, (4, 3)))
    with pytest.raises(UnknownElementError, match="N \\(Z=7\\)"):
        exported(graph_from_atoms([atoms], CUTOFF, torch.float64))
    proc = subprocess.run([sys.executable, "-m", "training.cli", "export", str(tmp_path / "nope.pt"), "-o", path],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr


def test_a_student_with_interact_only_exports_without_halo_methods(tmp_path):
    """engine.models.base says a new architecture implements `interact`; the layer-by-layer halo methods are
    optional: such a student exports (halo_width null) and runs everywhere but LAMMPS mode halo."""
    from engine.models.base import Student

    class TwoBody(Student):
        force_modes = ("gradient",)

        def __init__(self):
            super().__init__(SPECIES, CUTOFF, 8, 1, 4, "gradient")
            self.mix = torch.nn.Linear(4, 8)
            self.readout = torch.nn.Sequential(torch.nn.Linear(8, 1))
            self.force_head = None

        def interact(self, species, edge_index, rbf, fcut, unit):
            s = self.embedding(species).index_add(0, edge_index[0], self.mix(rbf) * fcut.unsqueeze(-1))
            return s, s.new_zeros(s.shape[0], 3, 0)

    model = TwoBody().double().eval()
    path = str(tmp_path / "twobody.pt")
    meta = export_model(model, path)
    assert meta["halo_width"] is None
    atoms = structures(np.random.default_rng(2))["triclinic"]
    graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
    ref = model(graph)
    assert rel(load_exported(path)(graph)["forces"], ref["forces"].detach()) < 1e-10
    from engine.exported import core_available, load_core

    if core_available():
        core = load_core(path)
        assert not core.model.has_halo
        assert rel(core.compute_atoms(atoms)["forces"], ref["forces"].detach().numpy()) < 1e-10
