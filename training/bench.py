"""`hessforge bench MODEL [MODEL ...] DATA`: batched energy+force inference speed, teachers and students side by
side (engine.runner does the timing; speed units as in bench/README.md: ns/day = structures/s x 0.0864).

MODEL is one of
  PATH                  a trainer checkpoint or an exported TorchScript student (`hessforge export`)
  painn[:k=v,...]       a PaiNN student with random weights (speed does not depend on weights); default
                        hidden=128, layers=4, num_basis=128, cutoff=5 (the paper-size student), species of DATA
  schnet[:k=v,...]      a SchNet student with random weights; default hidden=128, layers=3, num_basis=32, cutoff=5
  ani1x | ani1x:K       the ANI-1x teacher (8-model ensemble, or member K)
  so3lr                 the SO3LR foundation model (weights bundled in so3krates-torch), batched through its own
                        data pipeline; its neighbour lists (4.5 Å and the long-range ones) are built on the CPU
  chgnet[:MODEL]        CHGNet (weights bundled in the chgnet package; crystals only), batched through its own
                        crystal graphs, which are built on the CPU
  mace:FILE[@HEAD]      a mace-torch .model file
  mace-off-l-arch       the MACE-OFF23-Large architecture built in code with random weights (see
                        `mace_off_large`): timing a teacher of that size without its weights
DATA is an extxyz (or any ASE-readable) file, a hessforge LMDB dataset, `quickstart` (the bundled HCNO set),
or `s22[:MIN_ATOMS]` (ase.collections.s22 molecular complexes, e.g. s22:24 for the ten with 24-30 atoms).
A batch larger than the data replicates it cyclically; a smaller one takes structures spread evenly over the
data sorted by size (the data's mix of sizes).

Students run in every mode of --modes (eager, compiled, fused, compiled+fused, compiled+triton, cudagraphs:
compiled+triton with padded edges, replayed as CUDA graphs); a mode that cannot run here (no CUDA for Triton,
no engine.kernels) is skipped with the reason printed. Teachers run eager.
Speedups are throughput (atom-steps/s) over the reference's: the first --compare teacher, else the first MODEL;
at the fixed batch size (where it is the ns/day ratio), and with --sweep also best batch vs best batch (atom-steps,
since the two best batches may hold molecules of different mean size). Every mode's energies and forces on the
fixed batch are compared with the first mode's of the same model (max |dE|, |dF| in the table's notes and JSON).
On a CPU, a fixed batch whose memory, projected from a small batch, would pass the memory cap
(--memory-cap-gb, default half the available memory) is skipped with a note instead of being run into the
kernel's out-of-memory killer.
"""
from __future__ import annotations

import copy
import os
import shlex
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.errors import HessforgeError, UnknownElementError
from engine.graph import AtomicGraph, graph_from_atoms, graph_to
from engine.paths import LMDB_DATASET, artifact_kind, check_output_file
from engine.runner import (STUDENT_MODES, BenchResult, BenchTarget, StudentTarget, benchmark, cuda_graphs_note,
                           default_memory_cap, dtype_name, format_table, is_out_of_memory, machine_info,
                           rebuild_neighbors, release_memory, resolve_device, sample_batch, speedup, sweep,
                           write_json)
from training.teachers.base import check_finite_positions

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PAINN_DEFAULTS = dict(hidden=128, layers=4, num_basis=128, cutoff=5.0, force_mode="gradient")
SCHNET_DEFAULTS = dict(hidden=128, layers=3, num_basis=32, cutoff=5.0, force_mode="gradient")
STUDENT_SPECS = {"painn": PAINN_DEFAULTS, "schnet": SCHNET_DEFAULTS}  # random-weight students by name

# MACE-OFF23 (Kovács et al. 2023): elements of the released models and the Large model's hyperparameters
MACE_OFF23_ELEMENTS = (1, 6, 7, 8, 9, 15, 16, 17, 35, 53)  # H C N O F P S Cl Br I
MACE_OFF_LARGE = dict(r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3, num_interactions=2,
                      num_channels=192, max_L=2, correlation=3, MLP_irreps="16x0e", radial_MLP=[64, 64, 64],
                      interaction="RealAgnosticResidualInteractionBlock")


# ---------------------------------------------------------------------------------------------- data
def load_structures(spec: str, min_atoms: int = 0) -> list:
    """ase.Atoms list for a DATA argument (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if spec == "quickstart":
        from training.quickstart.run import bundled_data

        structures = _read_file(bundled_data())
    elif name == "s22" and not os.path.exists(spec):
        from ase.collections import s22

        structures = [a.copy() for a in s22]
        if arg:
            try:
                min_atoms = max(min_atoms, int(arg))
            except ValueError:
                raise HessforgeError(f"data {spec!r}: expected s22 or s22:MIN_ATOMS") from None
    elif not os.path.exists(spec):
        raise HessforgeError(f"data not found: {spec} (a file, 'quickstart' or 's22[:MIN_ATOMS]')")
    elif os.path.isdir(spec):
        raise HessforgeError(f"data {spec}: is a directory; give a structure file or a hessforge LMDB dataset")
    elif artifact_kind(spec) == LMDB_DATASET:
        from training.data import Dataset

        dataset = Dataset(spec)
        ingested = dataset.metadata.get("ingest") or {}
        group_key, id_key = ingested.get("group_key") or "group", ingested.get("id_key") or "id"
        structures = []
        for s in dataset:  # the frames' info travels on (MD output re-ingested keeps its groups)
            atoms = s.to_atoms()
            atoms.info.update(s.info)
            atoms.info.update({group_key: s.group, id_key: s.id})
            structures.append(atoms)
    else:
        structures = _read_file(spec)
    empty = [k for k, a in enumerate(structures) if len(a) == 0]
    if empty:  # nothing to time or integrate: it would count as a structure per second, or divide 0 by 0
        raise HessforgeError(f"data {spec!r}: structure {empty[0]} has no atoms"
                             + (f" ({len(empty)} empty structures)" if len(empty) > 1 else ""))
    structures = [a for a in structures if len(a) >= min_atoms]
    if not structures:
        raise HessforgeError(f"data {spec!r}: no structures" + (f" with >= {min_atoms} atoms" if min_atoms else ""))
    return structures


def _read_file(path: str) -> list:
    from training.data.ingest import _iter_atoms

    out = []
    hint = "check the file; an extension ASE knows (.xyz, .extxyz, .traj) names its format"
    for a in _iter_atoms(path, None, hint=hint):
        a.calc = None
        out.append(a)
    return out


def data_summary(structures: Sequence) -> Dict:
    n = np.array([len(a) for a in structures])
    z = sorted(set(int(x) for a in structures for x in a.numbers))
    return {"structures": len(structures), "atoms_mean": float(n.mean()), "atoms_min": int(n.min()),
            "atoms_max": int(n.max()), "elements": z}


# ---------------------------------------------------------------------------------------------- teachers
def mace_off_large(elements: Sequence[int] = MACE_OFF23_ELEMENTS, dtype: torch.dtype = torch.float32):
    """ScaleShiftMACE with MACE-OFF23-Large's architecture and random weights: 2 interactions, 192 channels,
    hidden irreps 192x0e+192x1o+192x2e (max_L=2), spherical harmonics to max_ell=3, correlation 3,
    r_max 5 Å, 8 Bessel functions, polynomial envelope p=5, radial MLP [64, 64, 64], readout MLP 16x0e,
    residual interaction blocks (mace's defaults), the ten MACE-OFF23 elements by default.
    Parameter count with the ten elements: 2,446,032 (with this recipe the 89-element, 128-channel, L=1
    model has 4,688,400 parameters: exactly MACE-MP-0 medium's published count)."""
    import contextlib
    import io

    # e3nn/TorchScript construction warnings, and mace's stdout notice about cuequivariance
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return _build_mace_off_large(elements, dtype)


def _build_mace_off_large(elements, dtype):
    import mace  # noqa: F401  (before e3nn: registers torch.load safe globals)
    from e3nn import o3
    from mace import modules

    h = MACE_OFF_LARGE
    hidden = o3.Irreps(" + ".join(f"{h['num_channels']}x{l}{'e' if l % 2 == 0 else 'o'}"
                                  for l in range(h["max_L"] + 1)))
    block = modules.interaction_classes[h["interaction"]]
    model = modules.ScaleShiftMACE(
        r_max=h["r_max"], num_bessel=h["num_bessel"], num_polynomial_cutoff=h["num_polynomial_cutoff"],
        max_ell=h["max_ell"], interaction_cls=block, interaction_cls_first=block,
        num_interactions=h["num_interactions"], num_elements=len(elements), hidden_irreps=hidden,
        MLP_irreps=o3.Irreps(h["MLP_irreps"]), atomic_energies=np.zeros(len(elements)), avg_num_neighbors=12.0,
        atomic_numbers=list(elements), correlation=h["correlation"], gate=torch.nn.functional.silu,
        radial_MLP=h["radial_MLP"], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    return model.to(dtype).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MaceTarget(BenchTarget):
    """A mace-torch model on the engine's batched graph and neighbor list. mace's edge vector is
    positions[receiver] - positions[sender] + shifts with edge_index = (sender, receiver): the engine's
    (i, j) edges with r_ij = x_j - x_i + S·cell are handed over as sender i, receiver j."""

    def __init__(self, model, name: str, device=None, dtype=torch.float32, neighbor_backend: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = dtype
        self.name, self.mode = name, "eager"
        self.mace = model.to(device=self.device, dtype=dtype).eval()
        for p in self.mace.parameters():
            p.requires_grad_(False)
        self.species = [int(z) for z in self.mace.atomic_numbers]
        self.cutoff = float(self.mace.r_max)
        z_index = torch.full((119,), -1, dtype=torch.long)
        z_index[torch.tensor(self.species)] = torch.arange(len(self.species))
        self.z_index = z_index.to(self.device)
        self.neighbor_backend = neighbor_backend
        self.num_parameters = count_parameters(self.mace)
        self.note = f"{self.num_parameters / 1e6:.2f}M params"

    def check_data(self, structures, where: str = "") -> None:
        unknown = set(int(z) for a in structures for z in a.numbers) - set(self.species)
        if unknown:
            raise UnknownElementError(unknown, self.species, f"{self.name}: {where}" if where else self.name)

    def prepare(self, atoms_list) -> AtomicGraph:
        for a in atoms_list:
            self.check_data([a], a.get_chemical_formula())
        return graph_to(graph_from_atoms(list(atoms_list), self.cutoff, torch.float64), self.device, self.dtype)

    def data(self, graph: AtomicGraph) -> Dict[str, torch.Tensor]:
        i, j = graph.edge_index[0], graph.edge_index[1]
        nstruct = graph.cell.shape[0]
        counts = torch.bincount(graph.batch, minlength=nstruct)
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        node_attrs = torch.nn.functional.one_hot(self.z_index[graph.numbers], len(self.species)).to(self.dtype)
        return {
            "positions": graph.positions.detach(), "node_attrs": node_attrs,
            "edge_index": torch.stack([i, j]),
            "shifts": torch.einsum("ea,eab->eb", graph.shifts, graph.cell[graph.batch[i]]),
            "unit_shifts": graph.shifts, "cell": graph.cell.reshape(-1, 3), "batch": graph.batch, "ptr": ptr,
            "head": torch.zeros(nstruct, dtype=torch.long, device=self.device),
        }

    def model(self, graph: AtomicGraph):
        return self.mace(self.data(graph), training=False, compute_force=True)["forces"]

    def model_with_neighbors(self, graph: AtomicGraph):
        return self.model(rebuild_neighbors(graph, self.cutoff, self.neighbor_backend))


def check_each(target: BenchTarget, atoms_list) -> None:
    """A teacher target's per-structure checks before it builds a batch: what it can run (`check_data`) and
    finite positions, each error naming the structure's formula."""
    for a in atoms_list:
        target.check_data([a], a.get_chemical_formula())
        check_finite_positions(a, a.get_chemical_formula())


class AniTarget(BenchTarget):
    """ANI-1x on padded [B, max atoms] inputs; its AEV computer finds neighbors inside the call (all pairs of
    each molecule), so both timings are the same call."""

    fuses_neighbors = True

    def __init__(self, teacher, device=None, dtype=torch.float32):
        self.device = resolve_device(device)
        self.dtype = dtype
        self.name, self.mode = teacher.name, "eager"
        self.teacher = teacher
        # a copy: the teacher's networks are cached and shared (training.teachers.ani._load_parts), and casting
        # them in place left every later ANI-1x teacher of the process in this dtype
        self.ani = copy.deepcopy(teacher.model).to(device=self.device, dtype=dtype)
        self.converter = teacher.converter.to(self.device)
        self.note = "neighbor search inside the model (AEV)"

    def check_data(self, structures, where: str = "") -> None:
        self.teacher.check_elements(set(int(z) for a in structures for z in a.numbers),
                                    f"{self.name}: {where}" if where else self.name)
        periodic = sum(1 for a in structures if a.pbc.any())
        if periodic:  # torchani's batched AEV takes one cell for a whole batch: times molecules only
            raise HessforgeError(f"{self.name}: {where + ': ' if where else ''}{periodic} periodic structure(s); "
                                 "hessforge bench times ANI-1x on molecules only")

    def prepare(self, atoms_list):
        check_each(self, atoms_list)
        n = max(len(a) for a in atoms_list)
        species = torch.full((len(atoms_list), n), -1, dtype=torch.long)
        coords = torch.zeros(len(atoms_list), n, 3, dtype=torch.float64)
        for k, a in enumerate(atoms_list):
            species[k, :len(a)] = torch.as_tensor(a.numbers)
            coords[k, :len(a)] = torch.as_tensor(a.positions)
        species = self.converter((species.to(self.device), None)).species
        return species, coords.to(device=self.device, dtype=self.dtype)

    def model(self, inputs):
        species, coords = inputs
        coords = coords.detach().requires_grad_(True)
        energy = self.ani((species, coords)).energies
        (grad,) = torch.autograd.grad(energy.sum(), coords)
        return -grad


class OwnPipelineTarget(BenchTarget):
    """A foundation-model teacher timed on its own batched input, which `inputs(atoms_list)` builds from
    ase.Atoms: untimed in `prepare`, timed in `model_with_neighbors` (rebuilt from the positions the way the
    teacher's calculator does it). Subclasses set `built` (where that input is made, for the note) and
    implement `inputs` and `model`."""

    built = "on the CPU"

    def __init__(self, teacher, net: torch.nn.Module, device=None, dtype=torch.float32):
        self.device = resolve_device(device)
        self.dtype = dtype
        self.name, self.mode = teacher.name, "eager"
        self.teacher = teacher
        self.net = copy.deepcopy(net).to(device=self.device, dtype=dtype).eval()  # the teacher's stays as it is
        self.num_parameters = count_parameters(self.net)
        self.note = f"{self.num_parameters / 1e6:.2f}M params; {self.built}"

    def check_data(self, structures, where: str = "") -> None:
        self.teacher.check_elements(set(int(z) for a in structures for z in a.numbers),
                                    f"{self.name}: {where}" if where else self.name)

    def inputs(self, atoms_list):
        raise NotImplementedError

    def prepare(self, atoms_list):
        check_each(self, atoms_list)
        return list(atoms_list), self.inputs(atoms_list)

    def model_with_neighbors(self, inputs):
        atoms_list, _ = inputs
        return self.model((atoms_list, self.inputs(atoms_list)))


class So3lrTarget(OwnPipelineTarget):
    """SO3LR on so3krates-torch's own batched input (neighbour lists on the CPU, then copied to the device)."""

    built = "neighbour lists built on the CPU"

    def __init__(self, teacher, device=None, dtype=torch.float32):
        super().__init__(teacher, teacher.model, device, dtype)  # the teacher itself stays float64

    def inputs(self, atoms_list):
        from training.teachers.so3lr import so3lr_batch

        batch = so3lr_batch(self.net, atoms_list, dtype=self.dtype, where=self.name)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def model(self, inputs):
        _, batch = inputs
        return self.net(dict(batch), compute_force=True, training=False)["forces"]


class ChgnetTarget(OwnPipelineTarget):
    """CHGNet on its own batched input: crystal graphs (atom graph 6 Å, bond graph 3 Å) from pymatgen
    structures, built on the CPU and copied to the device. Crystals only, float32 only."""

    built = "graphs built on the CPU"

    def __init__(self, teacher, device=None, dtype=torch.float32):
        if dtype != torch.float32:
            raise HessforgeError(f"{teacher.name}: CHGNet runs in float32 only (asked for {dtype})")
        super().__init__(teacher, teacher.model, device, dtype)

    def check_data(self, structures, where: str = "") -> None:
        for a in structures:
            self.teacher.check_periodic(a)  # molecules and flat cells: its clear error
        super().check_data(structures, where)

    def inputs(self, atoms_list):
        from pymatgen.io.ase import AseAtomsAdaptor

        return [self.net.graph_converter(AseAtomsAdaptor.get_structure(a)).to(self.device) for a in atoms_list]

    def model(self, inputs):
        _, graphs = inputs
        return torch.cat(self.net(graphs, task="ef")["f"])


def _parse_kv(text: str) -> Dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise HessforgeError(f"expected key=value in {text!r}, got {item!r}")
        for conv in (int, float):
            try:
                out[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def file_labels(specs: Sequence[str]) -> Dict[str, str]:
    """Row labels for model files: the shortest path tails that tell them apart (runA/best.pt and
    runB/best.pt rather than best.pt twice); a file given twice gets its label twice (made unique later)."""
    paths = {spec: os.path.normpath(os.path.abspath(spec)).split(os.sep) for spec in dict.fromkeys(specs)
             if os.path.exists(spec)}
    labels = {}
    for spec, parts in paths.items():
        depth = 1
        while depth < len(parts) and any(other[-depth:] == parts[-depth:] for s2, other in paths.items()
                                         if s2 != spec):
            depth += 1
        labels[spec] = "/".join(parts[-depth:])
    return labels


def make_targets(spec: str, structures: Sequence, modes: Sequence[str], device: torch.device,
                 dtype: torch.dtype, notes: List[str], info: Dict, label: Optional[str] = None,
                 dtype_given: bool = True) -> List[BenchTarget]:
    """Bench targets for one MODEL spec: one per student mode, or one teacher. label: the row name of a
    model file (default: its file name). dtype_given: the user chose `dtype` (an exported model, which keeps
    its own, then says so)."""
    name, _, arg = spec.partition(":")
    elements = sorted(set(int(z) for a in structures for z in a.numbers))
    if os.path.exists(spec):
        from engine.calculator import load_model

        model = load_model(spec, dtype=dtype)
        return _student_targets(model, label or os.path.basename(spec), modes, device, dtype, notes, info,
                                dtype_given)
    if name in STUDENT_SPECS:
        from engine.models import student_class

        hp = dict(STUDENT_SPECS[name], **_parse_kv(arg))
        try:
            model = student_class(name)(elements, **hp)
        except (TypeError, ValueError) as err:  # an unknown key, hidden=abc, force_mode=bad
            raise HessforgeError(f"{spec}: {err}") from None
        label = name + "(" + ",".join(f"{k}={v}" for k, v in hp.items() if k != "force_mode") + ")"
        return _student_targets(model, label, modes, device, dtype, notes, info)
    if spec == "mace-off-l-arch":
        model = mace_off_large(dtype=dtype)
        n = count_parameters(model)
        print(f"mace-off-l-arch: ScaleShiftMACE {MACE_OFF_LARGE}, elements {list(MACE_OFF23_ELEMENTS)}: "
              f"{n:,} parameters", file=sys.stderr)
        info[spec] = {"parameters": n, "hyperparameters": MACE_OFF_LARGE, "elements": list(MACE_OFF23_ELEMENTS)}
        return [MaceTarget(model, spec, device, dtype)]
    if name == "mace":
        from training.teachers import load_teacher

        teacher = load_teacher(spec)
        info[spec] = {"parameters": count_parameters(teacher.model)}
        return [MaceTarget(teacher.model, spec, device, dtype)]
    if name == "ani1x":
        from training.teachers import load_teacher

        return [AniTarget(load_teacher(spec), device, dtype)]
    if name == "so3lr":
        from training.teachers import load_teacher

        target = So3lrTarget(load_teacher(spec), device, dtype)
        info[spec] = {"parameters": target.num_parameters}
        return [target]
    if name == "chgnet":
        from training.teachers import load_teacher

        target = ChgnetTarget(load_teacher(spec), device, dtype)
        info[spec] = {"parameters": target.num_parameters}
        return [target]
    raise HessforgeError(f"model {spec!r}: not a file and not one of painn[:k=v,...], schnet[:k=v,...], ani1x[:K], "
                         "so3lr, chgnet[:MODEL], mace:FILE, mace-off-l-arch")


# a fixed batch of more atoms than this is first run small on a CPU to project its memory against the cap
PROBE_ATOMS = 4096


def memory_probe(target: BenchTarget, structures: Sequence, batch_size: int
                 ) -> Tuple[Optional[float], Optional[BenchResult]]:
    """(peak memory in bytes `batch_size` structures would take on a CPU, projected from a batch of ~1000 atoms
    (one untimed call after one warm-up), that probe's result: its first call (compilation) and compile events
    belong to the fixed batch's report); (None, None) for batches of at most PROBE_ATOMS atoms (not worth the
    probe) or where the probe would be the batch itself (large structures)."""
    atoms = sum(len(a) for a in sample_batch(structures, batch_size))
    small = max(1, batch_size * 1024 // max(atoms, 1))
    if target.device.type != "cpu" or atoms <= PROBE_ATOMS or small >= batch_size:
        return None, None
    probe = benchmark(target, structures, small, warmup=1, repeats=1, with_neighbors=False)
    return probe.peak_memory_bytes * atoms / max(probe.atoms, 1), probe


def mode_agreement(groups: Sequence[Sequence[BenchTarget]], structures: Sequence, batch_size: int) -> Dict[str, Dict]:
    """Each student mode's energies and forces on the fixed batch against the first mode of the same model (a
    group: the targets of one MODEL argument): {"name [mode]": {"against": first mode, "max_abs_dE_eV": ..,
    "max_abs_dF_eV_per_A": ..}} (a broken compiled or fused mode would otherwise show up as a speedup)."""
    out: Dict[str, Dict] = {}
    batch = sample_batch(structures, batch_size)
    for group in groups:
        first = None
        for t in group:
            if not isinstance(t, StudentTarget):
                continue
            result = t.student(t.prepare(batch), compute_forces=True)
            energy = result["energy"].detach().double().cpu()
            forces = result["forces"].detach().double().cpu()
            if first is None:
                first = (t.mode, energy, forces)
                continue
            mode, e0, f0 = first
            out[f"{t.name} [{t.mode}]"] = {"against": mode, "max_abs_dE_eV": float((energy - e0).abs().max()),
                                           "max_abs_dF_eV_per_A": float((forces - f0).abs().max())}
    return out


def check_replaces_a_report(path: str) -> None:
    """--json replaces an earlier `hessforge bench` report only: any other file there (a structure file, a
    config, another tool's JSON) is more likely a mistyped path than something to destroy."""
    import json

    if not (os.path.isfile(path) and os.path.getsize(path) > 0):
        return
    try:
        with open(path) as fh:
            old = json.load(fh)
        ours = isinstance(old, dict) and str(old.get("command", "")).startswith("hessforge bench") and "machine" in old
    except (OSError, ValueError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise HessforgeError(f"--json {path}: that file exists and is not a hessforge bench report; writing it would "
                             "destroy it. Give another file name (or move the file away first)")


def bench_provenance(specs: Sequence[str], data: str) -> Dict:
    """hessforge version and commit, working directory, and the absolute paths of model and data files."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("hessforge")
    except PackageNotFoundError:
        own = "unknown"
    from engine.exported import REPO_ROOT

    commit, dirty = None, None
    if os.path.isdir(os.path.join(REPO_ROOT, ".git")):  # a source checkout (an installed copy has no commit)
        try:
            def git(*argv):
                return subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                                      timeout=10).stdout.strip()

            commit = git("rev-parse", "HEAD") or None
            dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    files = {}
    for spec in list(specs) + [data]:
        path = spec.split(":", 1)[1].split("@")[0] if spec.startswith(("mace:", "chgnet:")) else spec
        if os.path.exists(path):
            files[spec] = os.path.abspath(path)
    return {"hessforge_version": own, "git_commit": commit, "uncommitted_changes": dirty, "cwd": os.getcwd(),
            "files": files}


def _student_targets(model, label, modes, device, dtype, notes, info, dtype_given: bool = True
                     ) -> List[BenchTarget]:
    if isinstance(model, torch.nn.Module):
        info[label] = {"parameters": count_parameters(model),
                       "hyperparameters": getattr(model, "hyperparameters", dict)()}
    else:  # exported TorchScript model
        if any(m != "eager" for m in modes):
            skipped = ", ".join(m for m in modes if m != "eager")
            notes.append(f"{label}: an exported TorchScript model runs eager only; skipped {skipped}")
            print(f"note: {notes[-1]}", file=sys.stderr)
        modes = ["eager"]
        info[label] = {"exported": True, "metadata_dtype": dtype_name(model.dtype),
                       "forward": getattr(model, "compiled_note", "TorchScript forward")}
        notes.append(f"{label}: {info[label]['forward']}")
        if dtype_given and dtype is not None and dtype != model.dtype:
            notes.append(f"{label}: an exported model computes in its own dtype ({dtype_name(model.dtype)}), not "
                         f"--dtype {dtype_name(dtype)}")
            print(f"note: {notes[-1]}", file=sys.stderr)
    targets = []
    for mode in modes:
        try:
            targets.append(StudentTarget(model, mode, device, dtype, name=label))
        except HessforgeError as err:
            notes.append(f"{label} {mode}: skipped ({err})")
            print(f"note: {label} {mode}: skipped ({err})", file=sys.stderr)
    return targets


# ---------------------------------------------------------------------------------------------- CLI
def set_threads(threads: Optional[int]) -> None:
    """--threads: None keeps torch's default; otherwise at least 1."""
    if threads is None:
        return
    if threads < 1:
        raise HessforgeError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def parse_batch_sizes(text: str, max_batch: Optional[int] = None) -> List[int]:
    """--batch-sizes: positive integers, returned sorted and without repeats (the sweep's plateau rule
    compares each size with the smaller ones); none above `max_batch`."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HessforgeError(f"--batch-sizes {text!r}: expected positive integers separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise HessforgeError(f"--batch-sizes {text!r}: expected positive integers separated by commas")
    if max_batch is not None and max(sizes) > max_batch:
        raise HessforgeError(f"--batch-sizes {text!r} goes above --max-batch {max_batch}: raise --max-batch or "
                             "leave those sizes out")
    return sorted(set(sizes))


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    parser.add_argument("args", nargs="+", metavar="MODEL [MODEL ...] DATA",
                        help="models (checkpoint/exported file, painn[:k=v], schnet[:k=v], ani1x, so3lr, chgnet, mace:FILE, mace-off-l-arch) "
                             "then the data (file, quickstart, s22[:MIN_ATOMS])")
    parser.add_argument("--compare", action="append", default=[], metavar="TEACHER",
                        help="reference model(s) for the speedup column (repeatable); the first is the reference")
    parser.add_argument("--modes", default="eager",
                        help=f"student modes, comma-separated or 'all' ({', '.join(STUDENT_MODES)}); default eager")
    parser.add_argument("--batch-size", type=int, default=64, help="fixed batch size (default 64)")
    parser.add_argument("--sweep", action="store_true", help="also sweep batch sizes 1, 2, 4, ... to the maximum")
    parser.add_argument("--batch-sizes", default=None, help="explicit sweep sizes, comma-separated")
    parser.add_argument("--max-batch", type=int, default=4096, help="largest sweep batch size (default 4096)")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="CPU memory cap: a sweep stops before passing it (default: half the available memory, "
                             "at most 16 GiB), a fixed batch projected past it is skipped (default: half the "
                             "available memory)")
    parser.add_argument("--max-call-s", type=float, default=30.0,
                        help="stop a sweep once a batch size's median call takes longer than this (default 30 s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls before timing (default 2; at least 1, 3 for exported TorchScript models "
                             "and 2 for cudagraphs, whatever is given)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported (default 5)")
    parser.add_argument("--no-neighbors", action="store_true", help="time the model call only")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default float32 (exported models compute in their own)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--min-atoms", type=int, default=0, help="use only structures with at least N atoms")
    parser.add_argument("--json", default=None, help="write all results and the machine description here")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")


def run(args) -> int:
    if len(args.args) < 2 and not args.compare:
        raise HessforgeError("give at least one MODEL and the DATA (hessforge bench MODEL DATA)")
    *model_specs, data = args.args
    if args.json:
        check_output_file(args.json, "--json", inputs=[data, *model_specs, *args.compare], create_parent=True)
        check_replaces_a_report(args.json)
    set_threads(args.threads)
    device = resolve_device(args.device)
    dtype_given = args.dtype is not None
    args.dtype = args.dtype or "float32"
    dtype = DTYPES[args.dtype]
    modes = list(STUDENT_MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise HessforgeError(f"--modes {args.modes!r}: no mode given; choose from {', '.join(STUDENT_MODES)} or all")
    for m in modes:
        if m not in STUDENT_MODES:
            raise HessforgeError(f"unknown mode {m!r}; choose from {', '.join(STUDENT_MODES)} or all")
    if args.batch_size < 1:
        raise HessforgeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.warmup < 0 or args.repeats < 1:
        raise HessforgeError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    structures = load_structures(data, args.min_atoms)
    summary = data_summary(structures)
    print(f"data {data}: {summary['structures']} structures, {summary['atoms_mean']:.1f} atoms on average "
          f"({summary['atoms_min']}-{summary['atoms_max']}); device {device}, {args.dtype}, "
          f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
    notes: List[str] = []
    info: Dict = {}
    labels = file_labels(args.compare + model_specs)
    references = [t for spec in args.compare for t in make_targets(spec, structures, ["eager"], device, dtype,
                                                                    notes, info, labels.get(spec), dtype_given)]
    groups = [make_targets(spec, structures, modes, device, dtype, notes, info, labels.get(spec), dtype_given)
              for spec in model_specs]
    targets = references + [t for group in groups for t in group]
    if not targets:
        raise HessforgeError("nothing to run: every requested mode was skipped")
    for t in targets:  # every structure may be used (batches cycle through the data): check them all now
        t.check_data(structures, f"data {data}")
    seen: Dict = {}
    for t in targets:  # one row (and one sweep) per target, also for a model given twice
        n = seen[(t.name, t.mode)] = seen.get((t.name, t.mode), 0) + 1
        if n > 1:
            t.name = f"{t.name} ({n})"
    reference = targets[0]
    if args.max_batch < 1:
        raise HessforgeError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.batch_sizes and not args.sweep:
        raise HessforgeError("--batch-sizes lists the sweep's batch sizes: add --sweep")
    sizes = parse_batch_sizes(args.batch_sizes, args.max_batch) if args.batch_sizes else None
    if not args.max_call_s > 0:
        raise HessforgeError(f"--max-call-s must be > 0, got {args.max_call_s}")
    if args.memory_cap_gb is not None and not args.memory_cap_gb > 0:
        raise HessforgeError(f"--memory-cap-gb must be > 0, got {args.memory_cap_gb}")
    cap = int(args.memory_cap_gb * 2**30) if args.memory_cap_gb is not None else None

    def progress(r: BenchResult) -> None:
        t = r.model_nl or r.model
        print(f"  {r.name} {r.mode} batch {r.batch_size}: {t.median_s * 1e3:.1f} ms/call, "
              f"{t.ns_per_day:.3g} ns/day", file=sys.stderr)

    fixed: List[BenchResult] = []
    sweeps = {}
    ref_fixed = None
    fixed_cap = cap if cap is not None else default_memory_cap(ceiling=None)
    for t in targets:
        print(f"{t.name} [{t.mode}] batch {args.batch_size}...", file=sys.stderr)
        r = None
        try:
            # on a CPU the kernel's out-of-memory killer ends the process (every result lost) before torch could
            # raise: a large batch is projected from a small one first
            projected, probe = memory_probe(t, structures, args.batch_size)
            if projected is not None and projected > fixed_cap:
                notes.append(f"{t.name} [{t.mode}]: batch {args.batch_size} skipped: projected at "
                             f"{projected / 2**30:.3g} GiB, over the memory cap {fixed_cap / 2**30:.3g} GiB "
                             "(--memory-cap-gb; or a smaller --batch-size)")
                print(f"  {notes[-1]}", file=sys.stderr)
            else:
                r = benchmark(t, structures, args.batch_size, args.warmup, args.repeats, not args.no_neighbors)
                if probe is not None:  # compiled at the probe: say so, with its compile events
                    r.compile_events = {k: probe.compile_events.get(k, 0) + r.compile_events.get(k, 0)
                                        for k in set(probe.compile_events) | set(r.compile_events)}
                    r.note = "; ".join(n for n in (r.note, f"first call at the memory probe's batch {probe.batch_size}"
                                                   f": {probe.model.first_call_s:.3g} s") if n)
        except (RuntimeError, MemoryError) as err:  # the other models' results are kept
            if not is_out_of_memory(err):
                raise
            release_memory(t.device)
            notes.append(f"{t.name} [{t.mode}]: out of memory at batch {args.batch_size} (try a smaller "
                         "--batch-size)")
            print(f"  {notes[-1]}", file=sys.stderr)
            r = None
        if r is not None:
            progress(r)
            fixed.append(r)
            if t is reference:
                ref_fixed = r
        if args.sweep:
            print(f"{t.name} [{t.mode}] sweep...", file=sys.stderr)
            s = sweep(t, structures, sizes, args.max_batch, args.warmup, args.repeats, not args.no_neighbors,
                      memory_cap_bytes=cap, max_call_s=args.max_call_s, progress=progress)
            print(f"  stop: {s.stop_reason}", file=sys.stderr)
            sweeps[(t.name, t.mode)] = s
    measured = {(r.name, r.mode) for r in fixed}
    try:  # a check of the results: its failure (memory after the sweeps) must not lose them
        agreement = mode_agreement([[t for t in g if (t.name, t.mode) in measured] for g in groups], structures,
                                   args.batch_size)
    except (RuntimeError, MemoryError, HessforgeError) as err:
        agreement = {}
        notes.append(f"modes not compared with each other: {type(err).__name__}: {str(err).splitlines()[0]}")
    for key, a in agreement.items():
        notes.append(f"{key} vs [{a['against']}]: max |dE| {a['max_abs_dE_eV']:.2g} eV, max |dF| "
                     f"{a['max_abs_dF_eV_per_A']:.2g} eV/Å on the fixed batch")
    for r in fixed + [r for s in sweeps.values() for r in s.results]:
        warning = cuda_graphs_note(r.mode, r.compile_events)
        if warning and f"{r.name} [{r.mode}]: {warning}" not in notes:
            notes.append(f"{r.name} [{r.mode}]: {warning}")
    print(f"\nbatch {args.batch_size} (speedup: throughput over {reference.name} [{reference.mode}])")
    print(format_table(fixed, reference=lambda r: ref_fixed, markdown=args.markdown))
    best, ref_best = [], None
    if args.sweep:
        key = "model" if args.no_neighbors else "model_nl"
        best = [s.best(key) for s in sweeps.values() if s.results]
        ref_best = sweeps[(reference.name, reference.mode)].best(key) if (reference.name, reference.mode) in sweeps \
            else None
        print("\nbest batch size of each (speedup: best over the reference's best)")
        print(format_table(best, reference=lambda r: ref_best, markdown=args.markdown))
        for (name, mode), s in sweeps.items():
            print(f"  {name} [{mode}]: sweep {[r.batch_size for r in s.results]}, stop: {s.stop_reason}")
    for n in notes:
        print(f"note: {n}")
    if fixed:
        print(f"memory: {fixed[0].memory_method}")
    if args.json:
        write_json(args.json, {
            "command": "hessforge bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
            "machine": machine_info(device), "data": dict(summary, spec=data), "models": info,
            "reference": [reference.name, reference.mode], "batch_size": args.batch_size,
            "compare": [[t.name, t.mode] for t in references],  # the teachers (--compare); [] = none
            "fixed": [r.to_dict() for r in fixed],
            "sweeps": [{"name": n, "mode": m, "stop_reason": s.stop_reason,
                        "results": [r.to_dict() for r in s.results]} for (n, m), s in sweeps.items()],
            "best": [r.to_dict() for r in best],
            "speedups": {"fixed": ({f"{r.name} [{r.mode}]": speedup(r, ref_fixed) for r in fixed} if ref_fixed else {}),
                         "best": ({f"{r.name} [{r.mode}]": speedup(r, ref_best) for r in best} if ref_best else {})},
            "mode_agreement": agreement,
            "settings": {"warmup": args.warmup, "repeats": args.repeats, "sweep": bool(args.sweep),
                         "max_batch": args.max_batch, "batch_sizes": sizes, "max_call_s": args.max_call_s,
                         "memory_cap_bytes": cap if cap is not None else fixed_cap,
                         "neighbors": not args.no_neighbors},
            "provenance": bench_provenance(model_specs + list(args.compare), data),
            "notes": notes,
        })
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
