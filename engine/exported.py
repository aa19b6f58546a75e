"""Load exported models (engine.export) back into Python, and reach the C++ core and the LAMMPS plugin.

- `read_metadata(path)`: the JSON metadata, read from the archive without loading the TorchScript module.
- `load_exported(path)`: the TorchScript module behind the student interface (a file exported with --compiled:
  single structures and forces-only batches through its compiled forward in the C++ core, where it runs) (forward(graph) -> energy [B],
  node_energy [N], forces [N, 3]; `energy_forces_strain_derivative(graph)` adds each structure's dE/dε, so
  batched MD runs exported models under a barostat; `virial(graph)` for one structure).
- `load_core(path)`: the C++ core (pybind11 module engine._core, built by `make build`): its own O(N) cell
  list, energy, forces, virial and per-atom energies for one structure given as numpy arrays.
- `lammps_plugin_path()`: the built `hessforgeplugin.so` for LAMMPS `plugin load` / LAMMPS_PLUGIN_PATH.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from engine.autograd_mode import autograd_on, normal
from engine.errors import HessforgeError, UnknownElementError
from engine.export import EXPORT_FORMAT, EXPORT_VERSION, METADATA_NAME, quiet_torchscript
from engine.graph import AtomicGraph
from engine.neighbors import lattice_cells

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_NAME = "hessforgeplugin.so"


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise HessforgeError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise HessforgeError(f"model path is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise HessforgeError(f"model file is not readable (permission denied): {path}")


def check_metadata(metadata: Dict[str, Any], path: str) -> Dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise HessforgeError(f"{path}: not a hessforge exported model (metadata format is not {EXPORT_FORMAT!r})")
    version = metadata.get("format_version")
    if not _is_int(version):
        raise HessforgeError(f"{path}: exported model metadata has no integer format_version")
    if version > EXPORT_VERSION:
        raise HessforgeError(f"{path}: exported model format version {version} is newer than this hessforge "
                             f"supports ({EXPORT_VERSION}); upgrade hessforge")
    for key in ("cutoff", "species", "num_layers", "force_mode", "dtype"):
        if key not in metadata:
            raise HessforgeError(f"{path}: exported model metadata lacks '{key}'")
    species = metadata["species"]
    if not (isinstance(species, list) and species and all(_is_int(z) and 0 < z <= 118 for z in species)
            and len(set(species)) == len(species)):
        raise HessforgeError(f"{path}: exported model metadata 'species' is not a list of distinct atomic numbers: "
                             f"{species!r}")
    if metadata["dtype"] not in ("float32", "float64"):
        raise HessforgeError(f"{path}: exported model metadata 'dtype' is {metadata['dtype']!r}, not float32 or float64")
    if metadata["force_mode"] not in ("gradient", "direct"):
        raise HessforgeError(f"{path}: exported model metadata 'force_mode' is {metadata['force_mode']!r}")
    cutoff = metadata["cutoff"]
    if not (_is_number(cutoff) and 0 < cutoff < math.inf):
        raise HessforgeError(f"{path}: exported model metadata 'cutoff' is {cutoff!r}, not a positive finite number")
    if not (_is_int(metadata["num_layers"]) and metadata["num_layers"] >= 1):
        raise HessforgeError(f"{path}: exported model metadata 'num_layers' is {metadata['num_layers']!r}, not an "
                             "integer >= 1")
    refs = metadata.get("reference_energies")  # optional (older files lack it); what the core accepts
    if refs is not None and not (isinstance(refs, list) and len(refs) == len(species)
                                 and all(_is_number(e) and math.isfinite(e) for e in refs)):
        raise HessforgeError(f"{path}: exported model metadata 'reference_energies' is not one number per species")
    reach = metadata.get("interaction_range", metadata["num_layers"] * cutoff)  # the C++ core's default too
    if not (_is_number(reach) and cutoff <= reach < math.inf):
        raise HessforgeError(f"{path}: exported model metadata 'interaction_range' is {reach!r}, not a finite number "
                             "of Å at least the cutoff")
    return metadata


def _is_int(value) -> bool:
    """An integer-valued JSON number: 2 or 2.0 (JSON does not tell them apart for the C++ core either)."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def module_species(module) -> Optional[List[int]]:
    """The atomic numbers a loaded student module embeds (its z_to_index buffer), None if it has none."""
    for name, buffer in module.named_buffers():
        if name == "z_to_index" or name.endswith(".z_to_index"):
            return torch.nonzero(buffer >= 0).flatten().tolist()
    return None


def check_species_match(metadata: Dict[str, Any], module, path: str) -> None:
    """The metadata's species must be the ones the weights embed: an element only in the metadata would be
    looked up at index -1 (another element's weights, silently); one only in the weights would be refused."""
    embedded = module_species(module)
    if embedded is not None and sorted(metadata["species"]) != embedded:
        raise HessforgeError(f"{path}: exported model metadata lists species {sorted(metadata['species'])} but its "
                             f"weights embed {embedded} (metadata edited after export?); export the model again")


def read_metadata(path: str) -> Dict[str, Any]:
    """The metadata of an exported model, checked (format, version), without loading the module."""
    _check_readable(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + METADATA_NAME)]
            if not names:
                raise HessforgeError(f"{path}: not a hessforge exported model (no {METADATA_NAME} inside)")
            text = archive.read(names[0]).decode("utf-8")
    except zipfile.BadZipFile:
        raise HessforgeError(f"{path}: not a hessforge exported model (not a TorchScript archive)") from None
    try:
        metadata = json.loads(text)
    except ValueError as err:
        raise HessforgeError(f"{path}: exported model metadata is not valid JSON ({err})") from None
    return check_metadata(metadata, path)


def check_archive(path: str) -> None:
    """Every record of the archive against its stored CRC-32 (torch.jit.load does not check them: a flipped
    byte in a weight record would load and give wrong energies); the C++ core checks the same (csrc/archive.cpp)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise HessforgeError(f"{path}: damaged model file ({err})") from None
    if bad is not None:
        raise HessforgeError(f"{path}: damaged model file (record {bad} fails its CRC-32 check: the file changed "
                             "after export, e.g. a bad copy or disk; export it again)")


class ExportedModel:
    """An exported TorchScript student with the engine's student interface (outputs in float64; a float32
    model computes in float32 from edge vectors formed in float64)."""

    def __init__(self, path: str):
        self.path = path
        self.metadata = read_metadata(path)
        check_archive(path)
        try:
            with quiet_torchscript(), torch.inference_mode(False):  # weights autograd can use, wherever loaded
                self.module = torch.jit.load(path, map_location="cpu")
        except Exception as err:
            raise HessforgeError(f"{path}: cannot load the TorchScript module ({type(err).__name__})") from None
        self.module.eval()
        check_species_match(self.metadata, self.module, path)
        self.cutoff: float = float(self.metadata["cutoff"])
        self.species = [int(z) for z in self.metadata["species"]]
        self.num_layers: int = int(self.metadata["num_layers"])
        self.force_mode: str = self.metadata["force_mode"]
        self.direct_forces: bool = self.force_mode == "direct"
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[self.metadata["dtype"]]
        # a file exported with --compiled: its AOTInductor forward through the C++ core (the core decides whether
        # this machine can run it, as in LAMMPS), for single structures and batches without virials
        self.core: Optional[CoreModel] = None
        self.compiled_note = "TorchScript forward (exported without --compiled)"
        if self.metadata.get("compiled"):
            if core_available():
                core = CoreModel(path)
                self.core = core if core.compiled else None
                self.compiled_note = core.compiled_note
            else:
                self.compiled_note = "TorchScript forward: the compiled one runs through the C++ core (make build)"

    def __reduce__(self):
        """Pickled by path (a TorchScript module cannot be pickled): a calculator sent to multiprocessing
        workers (spawn) loads the file again there."""
        return (ExportedModel, (self.path,))

    def check_species(self, numbers, where: str = "") -> None:
        unknown = set(int(z) for z in torch.as_tensor(numbers).unique().tolist()) - set(self.species)
        if unknown:
            raise UnknownElementError(unknown, self.species, where or self.path)

    def evaluate(self, positions, numbers, edge_index, shifts, nlocal: Optional[int] = None):
        """The raw module call, float64 in and out: (energy, node_energy, forces, virial); the compiled forward
        where the file has one this machine runs."""
        n = torch.as_tensor(positions).shape[0]
        if nlocal is not None and not 0 <= int(nlocal) <= n:
            raise HessforgeError(f"nlocal must be 0..{n} (the atoms whose energies count), got {nlocal}")
        # the core takes TorchScript's forward itself for graphs too small for it; NaN positions go to TorchScript,
        # whose NaN outputs let the callers name the structure (the core refuses the whole call)
        if self.core is not None and bool(torch.isfinite(torch.as_tensor(positions)).all()):
            self.check_species(numbers)
            out = self.core.compute_graph(*(torch.as_tensor(t).detach().cpu().numpy()
                                            for t in (positions, numbers, edge_index, shifts)),
                                          n if nlocal is None else int(nlocal))
            return (torch.tensor(out["energy"], dtype=torch.float64), torch.from_numpy(out["node_energy"]),
                    torch.from_numpy(out["forces"]), torch.from_numpy(np.asarray(out["virial"]).reshape(3, 3)))
        with autograd_on():
            args = [normal(torch.as_tensor(positions).to(torch.float64)),
                    normal(torch.as_tensor(numbers, dtype=torch.long)), normal(torch.as_tensor(edge_index)),
                    normal(torch.as_tensor(shifts).to(torch.float64))]
            return self.module(*args, n if nlocal is None else int(nlocal))

    def _edge_shifts(self, graph: AtomicGraph) -> torch.Tensor:
        i = graph.edge_index[0]
        return torch.einsum("ea,eab->eb", graph.shifts.double(), graph.cell.double()[graph.batch[i]])

    def evaluate_batch(self, graph: AtomicGraph, virials: bool = True
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """energy [B], node_energy [N], forces [N, 3], virial [B, 3, 3] (float64) of a batched graph: one module
        call; for archives exported before the batched method existed, one per structure when `virials` are
        wanted (else one call and no virials: None)."""
        self.check_species(graph.numbers)
        nstruct = graph.cell.shape[0]
        shifts = self._edge_shifts(graph)
        if self.core is not None and (nstruct == 1 or not virials):  # the compiled forward: one call
            energy, node_energy, forces, virial = self.evaluate(graph.positions, graph.numbers, graph.edge_index,
                                                                shifts)
            if nstruct == 1:
                return energy.reshape(1), node_energy, forces, virial.unsqueeze(0)
            energy = torch.zeros(nstruct, dtype=torch.float64).index_add(0, graph.batch, node_energy)
            return energy, node_energy, forces, None
        if hasattr(self.module, "batched"):
            with autograd_on():
                args = [normal(t) for t in (graph.positions.double(), graph.numbers, graph.edge_index, shifts,
                                             graph.batch)]
                return self.module.batched(*args, nstruct)
        n = graph.positions.shape[0]
        if not virials:  # the whole batch in one forward call: its per-atom outputs are per structure already
            _, node_energy, forces, _ = self.evaluate(graph.positions, graph.numbers, graph.edge_index, shifts)
            energy = torch.zeros(nstruct, dtype=torch.float64).index_add(0, graph.batch, node_energy)
            return energy, node_energy, forces, None
        energy = torch.zeros(nstruct, dtype=torch.float64)
        node_energy = torch.zeros(n, dtype=torch.float64)
        forces = torch.zeros(n, 3, dtype=torch.float64)
        virial = torch.zeros(nstruct, 3, 3, dtype=torch.float64)
        local = torch.full((n,), -1, dtype=torch.long)  # global atom index -> index within its structure
        for b in range(nstruct):
            atoms = (graph.batch == b).nonzero().flatten()
            edges = (graph.batch[graph.edge_index[0]] == b).nonzero().flatten()
            local[atoms] = torch.arange(atoms.numel())
            energy[b], node_energy[atoms], forces[atoms], virial[b] = self.evaluate(
                graph.positions[atoms], graph.numbers[atoms], local[graph.edge_index[:, edges]], shifts[edges])
        return energy, node_energy, forces, virial

    def forward(self, graph: AtomicGraph, compute_forces: bool = True) -> Dict[str, torch.Tensor]:
        """energy [B], node_energy [N], forces [N, 3] for a batch (structures are disconnected in the graph)."""
        energy, node_energy, forces, _ = self.evaluate_batch(graph, virials=False)
        out = {"energy": energy, "node_energy": node_energy}
        if compute_forces:
            out["forces"] = forces
        return out  # float64

    __call__ = forward

    def energy_forces_strain_derivative(self, graph: AtomicGraph) -> Dict[str, torch.Tensor]:
        """engine.stress.energy_forces_strain_derivative's outputs (energy, node_energy, forces, dE_deps [B, 3, 3]
        = -virial), from the exported module's own backward pass (float64, detached)."""
        if not self.metadata.get("virial", False):
            raise HessforgeError(f"{self.path}: a {self.force_mode}-force model has no virial (stress)")
        energy, node_energy, forces, virial = self.evaluate_batch(graph)
        return {"energy": energy, "node_energy": node_energy, "forces": forces, "dE_deps": -virial}

    def atom_virials(self, graph: AtomicGraph) -> torch.Tensor:
        """Per-atom virials [N, 3, 3] (float64; engine.stress.atom_virials) from the module's with_atom_virial."""
        if not self.metadata.get("virial", False):
            raise HessforgeError(f"{self.path}: a {self.force_mode}-force model has no virial, per atom or total")
        if not hasattr(self.module, "with_atom_virial"):
            raise HessforgeError(f"{self.path} was exported before per-atom virials existed; export the "
                                 "checkpoint again")
        self.check_species(graph.numbers)
        with autograd_on():  # disconnected structures in one call: each edge's dE/dr is its structure's
            args = [normal(t) for t in (graph.positions.double(), graph.numbers, graph.edge_index,
                                         self._edge_shifts(graph))]
            return self.module.with_atom_virial(*args, graph.positions.shape[0], False)[4]

    def virial(self, graph: AtomicGraph) -> torch.Tensor:
        """W [3, 3] (eV) of a single-structure graph: -dE/d(strain); stress = -W / volume."""
        if graph.cell.shape[0] != 1:
            raise HessforgeError("virial: pass a graph holding one structure")
        return -self.energy_forces_strain_derivative(graph)["dE_deps"][0]


def load_exported(path: str) -> ExportedModel:
    return ExportedModel(path)


# --------------------------------------------------------------------------------------------- C++ core
def _core_module():
    try:
        from engine import _core  # built by `make build` (CMakeLists.txt)
    except ImportError as err:
        raise HessforgeError(f"the hessforge C++ core is not built ({err}); run `make build`") from None
    return _core


def core_available() -> bool:
    try:
        _core_module()
        return True
    except HessforgeError:
        return False


class CoreModel:
    """The C++ core on one exported model. compute() builds its own cell list (periodic, triclinic, cells
    smaller than the cutoff) and returns energy, forces, virial and per-atom energies (float64 numpy)."""

    def __init__(self, path: str, num_threads: int = 0):
        self._core = _core_module()
        self.path = path
        self.model = self._core.Model(path, num_threads)
        self.metadata = json.loads(self.model.metadata_json)

    @property
    def compiled(self) -> bool:
        """Does compute/compute_graph run the file's AOTInductor-compiled forward (export --compiled)?"""
        return self.model.compiled

    @property
    def compiled_note(self) -> str:
        """Which forward runs, or why the compiled one does not (one line)."""
        return self.model.compiled_note

    def compute(self, positions, numbers, cell=None, pbc=(False, False, False),
                atom_virial: Optional[str] = None) -> Dict[str, Any]:
        """energy, forces, node_energy, virial, num_edges; with atom_virial ("split", or "exact" without periodic
        directions: engine/export.py with_atom_virial) also atom_virial [N, 3, 3]."""
        positions = np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3)
        numbers = np.ascontiguousarray(numbers, dtype=np.int64).reshape(-1)
        cell, pbc, _ = _core_cell(cell, pbc)  # the same lattice: the same results
        return self.model.compute(positions, numbers, cell, pbc, atom_virial or "")

    def compute_atoms(self, atoms, atom_virial: Optional[str] = None) -> Dict[str, Any]:
        return self.compute(atoms.positions, atoms.numbers, np.asarray(atoms.cell), atoms.pbc, atom_virial)

    def compute_graph(self, positions, numbers, edge_index, shifts, nlocal: int = -1,
                      atom_virial: Optional[str] = None) -> Dict[str, Any]:
        return self.model.compute_graph(np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3),
                                        np.ascontiguousarray(numbers, dtype=np.int64).reshape(-1),
                                        np.ascontiguousarray(edge_index, dtype=np.int64),
                                        np.ascontiguousarray(shifts, dtype=np.float64).reshape(-1, 3), nlocal,
                                        atom_virial or "")

    def compute_halo(self, positions, numbers, nlocal: int, edge_index, owner,
                     atom_virial: Optional[str] = None) -> Dict[str, Any]:
        """Layer-wise halo exchange on one process (the C++ core's compute_halo with atom nlocal + g a copy of
        local atom owner[g]): what LAMMPS mode halo runs, for tests and for checking a model file. atom_virial:
        "split" or "exact" (rows of ghost atoms belong to their owners, as their forces do)."""
        return self.model.compute_halo(np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3),
                                       np.ascontiguousarray(numbers, dtype=np.int64).reshape(-1), int(nlocal),
                                       np.ascontiguousarray(edge_index, dtype=np.int64),
                                       np.ascontiguousarray(owner, dtype=np.int64).reshape(-1), atom_virial or "")


def load_core(path: str, num_threads: int = 0) -> CoreModel:
    return CoreModel(path, num_threads)


def neighbor_list(positions, cell, pbc, cutoff: float):
    """The C++ core's cell list: edge_index [2, E] (int64), integer shifts [E, 3] (int64), the convention of
    engine.neighbors (r_ij = x_j - x_i + S @ cell, strict cutoff, both directions)."""
    core = _core_module()
    cell, pbc, ops = _core_cell(cell, pbc)
    edge_index, shifts = core.neighbor_list(np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3),
                                            cell, pbc, float(cutoff))
    return edge_index, np.ascontiguousarray(shifts @ ops.astype(np.int64))  # in the caller's basis


def _core_cell(cell, pbc) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell, pbc, ops) as the core takes them: wires' and slabs' zero non-periodic vectors completed
    (engine.neighbors.complete_cells; the core itself, like LAMMPS, expects a cell with a volume), a thin skewed
    basis reduced (engine.neighbors.reduce_thin_cells: core cell = ops @ the caller's, same lattice)."""
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.ascontiguousarray(np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)))
    ops = np.eye(3)
    if pbc.any() and np.all(np.isfinite(cell)):
        reduced, op = lattice_cells(torch.tensor(cell)[None], torch.tensor(pbc)[None])
        cell, ops = reduced[0].numpy(), op[0].numpy()
    return np.ascontiguousarray(cell), pbc, ops


def lammps_plugin_path(build_dir: Optional[str] = None) -> str:
    """Path of the built LAMMPS plugin (HESSFORGE_BUILD_DIR or <repo>/build)."""
    build_dir = build_dir or os.environ.get("HESSFORGE_BUILD_DIR") or os.path.join(REPO_ROOT, "build")
    path = os.path.join(build_dir, PLUGIN_NAME)
    if not os.path.isfile(path):
        raise HessforgeError(f"LAMMPS plugin not built: {path} is missing; run `make build`")
    return path
