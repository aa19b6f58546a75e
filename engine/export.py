"""Export a student to one TorchScript file with its metadata: what the C++ core and the LAMMPS plugin load.

`hessforge export CHECKPOINT -o model.pt` (or `export_model(model, path)` from Python).

The file is a TorchScript archive whose `forward` evaluates one graph given explicitly:

    forward(positions [N, 3], numbers [N] (atomic numbers, int64), edge_index [2, E] (receiver i, sender j),
            shifts [E, 3] (Cartesian, Å), nlocal: int)
      -> (energy [] = sum of node_energy[:nlocal], node_energy [N], forces [N, 3], virial [3, 3])

(positions, shifts and all outputs float64 whatever the model's dtype),
with r_ij = positions[j] - positions[i] + shifts[e]. Two ways of describing a periodic system both work:
- periodic images through `shifts` (the C++ core's own cell list; LAMMPS on one rank, "fold" mode), nlocal = N;
- explicit ghost atoms (LAMMPS domain decomposition, "ghost" mode): positions of local + ghost atoms, zero
  shifts, nlocal = number of local atoms. Only local energies are summed; forces are -dE_local/d(every
  position), ghost rows included (LAMMPS reverse-communicates them with `newton on`). Ghost atoms must reach
  out to num_layers × cutoff from the local ones.

Gradient-force students: forces and virial come from one backward pass through the edge vectors,
F_i = -dE/dx_i and W = -sum_e r_e ⊗ dE/dr_e (= sum_i x_i ⊗ F_i with explicit ghosts; LAMMPS's sign and
convention: pressure·volume = W + kinetic). Direct-force students: forces are the force head's output on
local atoms (ghost rows zero); there is no energy derivative, so the virial is returned as zeros and the
metadata says `"virial": false`.

`with_atom_virial(positions, numbers, edge_index, shifts, nlocal, exact)` returns forward's outputs and per-atom
virials atom_virial [N, 3, 3] (W_ab = Σ r_a F_b, not symmetrized, summing to the virial; LAMMPS' compute
stress/atom, centroid/stress/atom and heat/flux; metadata `"atom_virial": true`):
- exact=False, the edge split: each edge's -r_e ⊗ dE/dr_e half to each of its two atoms; any graph.
- exact=True: W_j = Σ_i (x_i - x_j) ⊗ ∂U_i/∂x_j over the local atoms' energies U_i, whose Σ_j W_j v_j is the
  exact heat flux of a many-body model (the edge split's is not: bench/results/heat_flux_split_cpu.md). It
  needs every periodic image as an explicit atom (zero shifts: molecules, ghost mode) and three more
  backward passes.
Archives exported before it existed lack it.

Layer-wise halo exchange (metadata `halo_width`; the C++ core's compute_halo, LAMMPS `mode halo`): `halo_embed`,
`halo_edges`, `halo_layer` and `halo_readout` run the message passing one layer at a time on node states
[N, halo_width] (PaiNN: scalars and vectors, 4 x hidden; SchNet: hidden), so that a domain decomposition can copy
its ghost atoms' states from their owners between layers (and send the gradients back in the backward pass):
ghost atoms then reach one cutoff instead of num_layers x cutoff. Archives exported before it existed lack them.

A second method, `batched(positions, numbers, edge_index, shifts, batch [N], num_structures)` -> (energy [B],
node_energy [N], forces [N, 3], virial [B, 3, 3]), evaluates disconnected structures in one call (Python's
batched MD under a barostat); archives written before it existed lack it (engine.exported falls back to one
call per structure).

`export_model(..., compiled=True)` (`hessforge export --compiled`) also stores forward and the halo_* methods
compiled ahead of time by AOTInductor (engine/aoti.py: packages as extra records, metadata `compiled`), which the
C++ core runs instead of TorchScript where the machine can (2-2.6x on the CPU); the TorchScript methods stay in
the file, as the fallback and the reference the core checks the compiled programs against at load.

Metadata (JSON, `extra/hessforge.json` in the archive, readable without loading the module): format and
version, architecture and hyperparameters, cutoff (Å), species (atomic numbers), num_layers,
interaction_range = num_layers × cutoff, force_mode, virial, units (eV, Å; LAMMPS `units metal`), dtype,
and provenance (checkpoint, teacher, data, metrics, versions).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from engine.errors import HessforgeError
from engine.graph import edge_vector_graph
from engine.paths import EXPORTED_MODEL, artifact_kind, atomic_path, check_output_file
from engine.stress import edge_gradient_sums, split_edge_virials

EXPORT_FORMAT = "hessforge-exported"
EXPORT_VERSION = 1
METADATA_NAME = "hessforge.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextmanager
def quiet_torchscript():
    """TorchScript is deprecated from torch 2.10 on, and still what a LAMMPS pair style can load without a
    Python interpreter; silence the deprecation warnings of our own calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        yield


class ExportWrapper(nn.Module):
    """A student behind the explicit-graph interface above. The student's own forward is used unchanged on
    engine.graph.edge_vector_graph (edge vectors as the shifts of zero positions in the identity cell), so any
    student with the common AtomicGraph interface exports without a second implementation of its physics."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.direct_forces: bool = str(getattr(model, "force_mode", "gradient")) == "direct"
        dtype = next(model.parameters()).dtype
        self.register_buffer("identity_cell", torch.eye(3, dtype=dtype).unsqueeze(0))  # carries the model dtype

    def forward(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
        nlocal: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        energy, node_energy, forces, virial, _ = self._outputs(positions, numbers, edge_index, shifts, batch, 1,
                                                               nlocal, 0)
        return energy[0], node_energy, forces, virial[0]

    @torch.jit.export
    def with_atom_virial(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
        nlocal: int,
        exact: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward's outputs and per-atom virials atom_virial [N, 3, 3] (eV, W_ab = sum r_a F_b, not symmetrized,
        summing to the virial). exact=False: each edge's -r_e ⊗ dE/dr_e split half to each of its atoms (any
        graph). exact=True: W_j = sum_i (x_i - x_j) ⊗ dU_i/dx_j over the local atoms' energies U_i, whose
        W_j v_j sum to the exact heat flux of a many-body model; needs every image as an explicit atom (zero
        shifts: molecules, ghost atoms) and three more backward passes. Gradient-force models only."""
        if self.direct_forces:
            raise RuntimeError("a direct-force model has no virial, per atom or total")
        if exact and bool((shifts != 0).any()):
            raise RuntimeError("exact per-atom virials need periodic images as explicit (ghost) atoms, not shifts")
        batch = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        energy, node_energy, forces, virial, atom_virial = self._outputs(
            positions, numbers, edge_index, shifts, batch, 1, nlocal, 2 if exact else 1)
        return energy[0], node_energy, forces, virial[0], atom_virial

    @torch.jit.export
    def batched(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
        batch: torch.Tensor,
        num_structures: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Disconnected structures in one graph (batch [N]: each atom's structure): energy [B], node_energy [N],
        forces [N, 3], virial [B, 3, 3]; no ghost atoms."""
        energy, node_energy, forces, virial, _ = self._outputs(positions, numbers, edge_index, shifts, batch,
                                                               num_structures, positions.shape[0], 0)
        return energy, node_energy, forces, virial

    # Layer-wise halo exchange (the C++ core's compute_halo, LAMMPS mode halo; metadata "halo_width"): the caller
    # runs the layers one at a time and copies ghost atoms' node states from their owners between them, so
    # ghost atoms need reach only one cutoff. Model dtype in and out, but for the readout's float64 energies.
    @torch.jit.export
    def halo_embed(self, numbers: torch.Tensor) -> torch.Tensor:
        """Node states [N, halo_width] before the first layer."""
        return self.model.halo_initial(self.model.z_to_index[numbers])

    @torch.jit.export
    def halo_edges(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edge features (unit vectors [E, 3], radial basis [E, K], envelope [E]) of edge vectors r_ij [E, 3]."""
        return self.model.features_of_vectors(vectors)

    @torch.jit.export
    def halo_layer(self, k: int, state: torch.Tensor, edge_index: torch.Tensor, unit: torch.Tensor,
                   rbf: torch.Tensor, fcut: torch.Tensor, nlocal: int) -> torch.Tensor:
        """Layer k (0-based) on node states [N, W] whose ghost rows (>= nlocal) are up to date, with edges whose
        receivers are local (< nlocal): the local atoms' new states [nlocal, W]."""
        return self.model.halo_layer(k, state, edge_index, rbf, fcut, unit, nlocal)

    @torch.jit.export
    def halo_readout(self, numbers: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies [n] (float64) of final node states [n, W]; a direct-force model's forces [n, 3]
        (float64; [0, 3] for gradient models)."""
        species = self.model.z_to_index[numbers]
        s, v = self.model.halo_features(state)
        node_energy = self.model.node_energies(species, s)
        forces = torch.zeros(0, 3, dtype=torch.float64, device=state.device)
        if self.direct_forces:
            forces = self.model.direct_force_head(s, v).to(torch.float64)
        return node_energy, forces

    def _outputs(
        self,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
        batch: torch.Tensor,
        num_structures: int,
        nlocal: int,
        atom_virials: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """atom_virials: 0 none, 1 edge split, 2 exact (with_atom_virial)."""
        # Inputs and outputs are float64 whatever the model's dtype: edge vectors are formed in float64 (so a
        # float32 model does not lose precision to large coordinates) and only then cast to the model dtype.
        n = positions.shape[0]
        dtype = self.identity_cell.dtype
        i, j = edge_index[0], edge_index[1]
        vec = (positions[j] - positions[i] + shifts).to(dtype).detach()
        if not self.direct_forces:
            vec.requires_grad_(True)
        out = self.model(edge_vector_graph(numbers, edge_index, vec), self.direct_forces, False)
        # float64 whatever the model's dtype: students add their ~1e3 eV per-element references in float64
        node_energy = out["node_energy"].to(positions.dtype)
        # local atoms by a mask rather than a slice, so the compiled forward (engine.aoti) may take nlocal as a
        # tensor: adding a ghost's 0.0 leaves each sum's bits unchanged
        local = torch.arange(n, device=positions.device) < nlocal
        local_energy = torch.where(local, node_energy, 0.0)
        if num_structures == 1:  # a sum, not a scatter: Inductor's dynamic-thread scatter into [1] fails to build
            energy = local_energy.sum().unsqueeze(0)
        else:
            energy = torch.zeros(num_structures, dtype=positions.dtype, device=positions.device).index_add(
                0, batch, local_energy)
        virial = torch.zeros(num_structures, 3, 3, dtype=positions.dtype, device=positions.device)
        atom_virial = torch.zeros(0, 3, 3, dtype=positions.dtype, device=positions.device)
        if self.direct_forces:
            forces = torch.where(local.unsqueeze(1), out["forces"].to(positions.dtype), 0.0)
        else:
            g = self._edge_gradient(energy.sum(), vec, positions.dtype, atom_virials == 2)
            forces, virial, edge_virials = edge_gradient_sums(vec.detach().to(positions.dtype), g, edge_index, batch,
                                                              n, num_structures)
            if atom_virials == 2:
                atom_virial = self._exact_atom_virials(positions, node_energy, vec, edge_index, forces, nlocal)
            if atom_virials == 1:
                atom_virial = split_edge_virials(edge_virials, edge_index, n)
        return energy.detach(), node_energy.detach(), forces.detach(), virial.detach(), atom_virial.detach()

    def _edge_gradient(self, output: torch.Tensor, vec: torch.Tensor, dtype: torch.dtype,
                       retain_graph: bool) -> torch.Tensor:
        """d output / d r_e per edge, in `dtype`; zeros where output does not depend on the edges (none)."""
        grads = torch.autograd.grad([output], [vec], allow_unused=True, retain_graph=retain_graph)
        g = grads[0]
        if g is None:  # no edges: the energy does not depend on positions
            g = torch.zeros_like(vec)
        return g.to(dtype)

    def _exact_atom_virials(self, positions: torch.Tensor, node_energy: torch.Tensor, vec: torch.Tensor,
                            edge_index: torch.Tensor, forces: torch.Tensor, nlocal: int) -> torch.Tensor:
        """W_j = sum_i (x_i - x_j) ⊗ dU_i/dx_j (i local) = dE_a/dx_j - x_j ⊗ dU/dx_j per Cartesian a, with
        E_a = sum_i x_ia U_i (x constant): one backward pass per a. Positions relative to the local atoms'
        centroid: the result does not depend on the origin, but the two terms cancel to it, so a float32 model
        loses digits with the system's extent (relative 1e-5 at 80 Å; float64 exports do not)."""
        i, j = edge_index[0], edge_index[1]
        if positions.shape[0] == 0 or nlocal == 0:
            return torch.zeros(positions.shape[0], 3, 3, dtype=positions.dtype, device=positions.device)
        x = (positions - positions[:nlocal].mean(dim=0)).detach()
        rows: List[torch.Tensor] = []
        for a in range(3):
            g = self._edge_gradient((node_energy[:nlocal] * x[:nlocal, a]).sum(), vec, positions.dtype, a < 2)
            # d E_a / d x_j through the edge vectors r_e = x_j - x_i (+ 0)
            rows.append(torch.zeros_like(positions).index_add(0, j, g).index_add(0, i, -g))
        d_weighted = torch.stack(rows, dim=1)  # [N, a, b]
        return d_weighted + x.unsqueeze(2) * forces.unsqueeze(1)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """Drop what JSON cannot hold (tensors, arrays), keep numbers, strings, lists and dicts."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def checkpoint_provenance(path: str, state: Dict[str, Any], use_ema: bool) -> Dict[str, Any]:
    """Where a checkpoint's student came from: teacher, data, metrics (from the trainer's state)."""
    config = state.get("config") or {}
    data = config.get("data") or {}
    teacher = None
    labels_dir = data.get("labels")
    if labels_dir and os.path.isfile(os.path.join(labels_dir, "labels.json")):
        try:
            with open(os.path.join(labels_dir, "labels.json")) as fh:
                info = json.load(fh)
            teacher = {k: info.get(k) for k in ("teacher", "teacher_spec", "mode", "k", "dtype") if k in info}
        except (OSError, ValueError):
            teacher = None
    history = state.get("history") or []
    last_epoch = history[-1] if history else {}
    metrics = {
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "best_val_loss_ef": state.get("best_val"),
        "last_epoch": {k: v for k, v in last_epoch.items() if k.startswith("val_") or k.startswith("train_")},
        "teacher_val": state.get("teacher_val"),
    }
    return _jsonable({
        "checkpoint": os.path.abspath(path),
        "checkpoint_sha256": _sha256(path),
        "weights": "ema" if use_ema and state.get("ema_model_state") is not None else "raw",
        "teacher": teacher,
        "data": {k: data.get(k) for k in ("path", "labels", "elements") if k in data},
        "loss": config.get("loss"),
        "train_dtype": (config.get("train") or {}).get("dtype"),
        "metrics": metrics,
    })


def halo_width(model: nn.Module) -> Optional[int]:
    """Node state width of a student that runs layer by layer (halo_initial/halo_layer/halo_features of
    engine.models.base.Student implemented); None for one that implements only `interact` (LAMMPS then uses
    ghost mode on several ranks)."""
    from engine.models.base import Student

    if not all(getattr(type(model), name, None) is not getattr(Student, name)
               for name in ("halo_initial", "halo_layer", "halo_features")):
        return None
    return int(model.halo_initial(torch.zeros(1, dtype=torch.long, device=model.z_to_index.device)).shape[1])


def build_metadata(model: nn.Module, dtype: torch.dtype, provenance: Optional[Dict[str, Any]] = None) -> Dict:
    hp = dict(model.hyperparameters()) if hasattr(model, "hyperparameters") else {}
    species = [int(z) for z in model.species]
    cutoff = float(model.cutoff)
    layers = int(model.num_layers)
    force_mode = str(getattr(model, "force_mode", "gradient"))
    try:
        from importlib.metadata import version

        hessforge_version = version("hessforge")
    except Exception:  # not installed (source tree on the path)
        hessforge_version = "unknown"
    from ase.data import chemical_symbols

    return _jsonable({
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "architecture": type(model).__name__.lower(),
        "hyperparameters": hp,
        "cutoff": cutoff,
        "species": species,
        "species_symbols": [chemical_symbols[z] for z in species],
        "num_layers": layers,
        "interaction_range": layers * cutoff,
        # node state width of the halo_* methods (ghost atoms to one cutoff, states exchanged between layers)
        "halo_width": halo_width(model),
        "force_mode": force_mode,
        "virial": force_mode == "gradient",
        "atom_virial": force_mode == "gradient",
        # per-element constants inside every atom energy (eV, in the order of species): LAMMPS' reference_energies
        # off leaves them out of pe and pe/atom (a heat flux's convective term would be all of them)
        "reference_energies": ([float(e) for e in model.atom_ref] if hasattr(model, "atom_ref") else None),
        "units": {"energy": "eV", "length": "Angstrom", "lammps": "metal"},
        "dtype": {torch.float32: "float32", torch.float64: "float64"}[dtype],
        "interface": "forward(positions[N,3] f64, numbers[N] i64, edge_index[2,E] i64, shifts[E,3] f64, nlocal) "
                     "-> (energy, node_energy[N], forces[N,3], virial[3,3]) f64; batched(positions, numbers, "
                     "edge_index, shifts, batch[N] i64, num_structures) -> (energy[B], node_energy[N], forces[N,3], "
                     "virial[B,3,3]); with_atom_virial(positions, numbers, edge_index, shifts, nlocal, exact: bool) -> "
                     "forward's outputs + atom_virial[N,3,3]; halo_embed, halo_edges, halo_layer, halo_readout: "
                     "message passing one layer at a time (engine/export.py)",
        "compiled": None,  # engine.aoti's entry when exported with compiled=True
        "provenance": dict(provenance or {}, created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           hessforge_version=hessforge_version, torch_version=torch.__version__),
    })


def export_model(model: nn.Module, path: str, dtype: torch.dtype = torch.float64,
                 provenance: Optional[Dict[str, Any]] = None, compiled: bool = False) -> Dict[str, Any]:
    """Script `model` (a copy in `dtype`, eval mode, on the CPU) behind ExportWrapper and save it with its
    metadata to `path`. compiled: also an AOTInductor build of forward inside the file (engine.aoti; metadata
    "compiled", null without). Returns the metadata."""
    import copy

    if dtype not in DTYPES.values():
        raise HessforgeError(f"export dtype must be float32 or float64, got {dtype}")
    for attr in ("species", "cutoff", "num_layers"):
        if not hasattr(model, attr):
            raise HessforgeError(f"cannot export {type(model).__name__}: it has no '{attr}' attribute")
    model = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    metadata = build_metadata(model, dtype, provenance)
    try:
        with quiet_torchscript():
            scripted = torch.jit.script(ExportWrapper(model))
    except Exception as err:
        raise HessforgeError(f"cannot export {type(model).__name__}: TorchScript failed ({err})") from None
    check_output_file(path, "export output", may_replace=[EXPORTED_MODEL])  # before minutes of compiling
    if os.path.isfile(path) and os.path.getsize(path) > 0 and artifact_kind(path) != EXPORTED_MODEL:
        # an export replaces an older export only: any other file there (a structure file, a script, a log)
        # is more likely a mistyped -o than something to destroy
        raise HessforgeError(f"export output {path}: that file exists and is not an exported model; writing it "
                             "would destroy it. Give another file name (or move the file away first)")
    extra_files: Dict[str, Any] = {}
    if compiled:
        from engine.aoti import compile_forward

        extra_files, metadata["compiled"] = compile_forward(ExportWrapper(model))
    try:
        with atomic_path(path, same_name=True) as tmp, quiet_torchscript():  # the archive named after the file
            torch.jit.save(scripted, tmp, _extra_files={METADATA_NAME: json.dumps(metadata, indent=1),
                                                        **extra_files})
    except (OSError, RuntimeError) as err:  # torch reports an unwritable file as a RuntimeError
        reason = str(err).splitlines()[0].split("strerror: ")[-1] if str(err) else type(err).__name__
        raise HessforgeError(f"cannot write the export output {path}: {reason}") from None
    return metadata


def export_checkpoint(checkpoint: str, path: str, dtype: Optional[torch.dtype] = None,
                      use_ema: bool = True, compiled: bool = False) -> Dict[str, Any]:
    """Export a trainer checkpoint (best.pt / last.pt)."""
    from engine.checkpoint import load_student, read_checkpoint

    check_output_file(path, "export output", inputs=[checkpoint], may_replace=[EXPORTED_MODEL])
    state = read_checkpoint(checkpoint)
    if dtype is None:
        dtype = torch.float64
    model = load_student(checkpoint, use_ema=use_ema, dtype=dtype)
    return export_model(model, path, dtype, checkpoint_provenance(checkpoint, state, use_ema), compiled=compiled)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="trainer checkpoint (RUN/best.pt or RUN/last.pt)")
    parser.add_argument("-o", "--output", required=True, help="exported TorchScript file to write (model.pt)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                        help="precision of the exported model (default float64)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    parser.add_argument("--compiled", action="store_true",
                        help="also compile the model ahead of time (AOTInductor, for this CPU's x86-64 level): the "
                             "C++ core and LAMMPS run it instead of TorchScript (2-2.6x on the CPU); 1-3 min")


def run(args) -> int:
    meta = export_checkpoint(args.checkpoint, args.output, DTYPES[args.dtype], use_ema=not args.no_ema,
                             compiled=args.compiled)
    print(f"wrote {args.output}: {meta['architecture']} {meta['force_mode']}-force, "
          f"species {' '.join(meta['species_symbols'])}, cutoff {meta['cutoff']:g} Å, {meta['num_layers']} "
          f"message-passing layer{'s' if meta['num_layers'] != 1 else ''} "
          f"(LAMMPS ghost atoms to {meta['cutoff']:g} Å in halo mode, {meta['interaction_range']:g} Å in ghost "
          f"mode), {meta['dtype']}" + (f", compiled for {meta['compiled']['march']}" if meta["compiled"] else ""))
    return 0
