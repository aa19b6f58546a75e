"""Batched inference timing: how many MD steps per second a model gives when it evaluates B structures per call.

Speed units (bench/README.md): one call on a batch of B structures taking t seconds advances B independent
replicas by one step each, so steps/s = B / t and, at a 1 fs step,

    ns/day = (B / t) x 86400 x 1e-6          atoms·steps/s = (atoms in the batch) / t

Every call computes energies and forces (an MD step's work). Two timings are reported per batch size:

- "model":     the model call on a graph whose neighbor list was built beforehand, outside the timed region;
- "model+NL":  the neighbor list rebuilt from the positions, then the model call: what an MD step without a
               skin costs. The neighbor list is `engine.kernels.neighbor_list` (Triton on CUDA, its vectorised
               torch path elsewhere) when importable, else the reference `engine.neighbors`. Models that build
               their own neighbor list inside the call (the fused students below, ANI) report the same time in
               both columns, marked as such.

Each timing is the median of `repeats` timed calls after `warmup` untimed ones (the first untimed call's time
is kept: it includes compilation for compiled models). On CUDA the device is synchronised around every call.

Peak memory, per batch size, over the calls of both timings after the first call (whose one-time costs,
compilation, caches, library code paged in by the first model a process runs, are not a call's working memory):
- CUDA: `torch.cuda.max_memory_allocated` minus what was allocated before (the inputs stay resident);
- CPU: the peak resident set size minus the RSS before, with the kernel's high-water mark reset
  (/proc/self/clear_refs) and glibc's free heap returned to the OS (malloc_trim) first. This is the real
  peak working set of the calls, but memory freed by earlier calls and kept by the allocator can make it an
  underestimate; where /proc is unavailable the process-lifetime `ru_maxrss` delta is used (cruder).
  `memory_method` in every result says which was used.

Sweeps double the batch size until throughput stops improving, on every device: at out-of-memory (caught,
recorded as the stop reason), a plateau (no size in `patience` consecutive sizes beats the best by more than
`plateau`: on a GPU the throughput saturates well before memory runs out, and a device hour is dear), a call
taking longer than `max_call_s`, or on CPU a memory cap (the projected peak at the next size would exceed
it). Throughput is compared in atom-steps/s, and each batch smaller than the data holds the data's mix of
structure sizes (`sample_batch`), so the best batch is not the one that happened to hold small molecules.

Any model can be timed through the `BenchTarget` protocol (prepare / model / model_with_neighbors);
`StudentTarget` covers engine students (PaiNN, CompiledStudent, exported models) in the modes eager,
compiled, fused (neighbor list + radial basis from the fused `engine.kernels.radial_edges` op: Triton on
CUDA), compiled+fused, compiled+triton and cudagraphs (CUDA graphs of the compiled fused student on padded
edges); teachers live in training/bench.py.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from engine.allocator import freed_memory_kept, malloc_trim
from engine.autograd_mode import autograd_is_off, autograd_on, normal_graph
from engine.compiled import call_compiled, compile_events, compile_stats, keep_compilation_metrics, own_code
from engine.errors import HessforgeError
from engine import paths
from engine.graph import AtomicGraph, graph_from_atoms, graph_to, resolve_device  # noqa: F401 (re-exported)
from engine.models import for_inference
from engine.models.base import NORM_EPS

NS_PER_DAY_PER_STEP_PER_S = 86400 * 1e-6  # ns/day at 1 fs per step, per step/s
STUDENT_MODES = ("eager", "compiled", "fused", "compiled+fused", "compiled+triton", "cudagraphs")


def ns_per_day(structures_per_s: float) -> float:
    return structures_per_s * NS_PER_DAY_PER_STEP_PER_S


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_batch(structures: Sequence, batch_size: int) -> list:
    """The structures a benchmark times at `batch_size`: all of them, replicated cyclically, when the batch is
    at least as large as the data; else `batch_size` of them spread evenly over the data sorted by size, so a
    small batch holds the data's mix of sizes (not its first few, often conformers of one small molecule,
    which made small batches look faster per structure)."""
    if len(structures) == 0 or not 1 <= batch_size < len(structures):  # fill_batch also names bad input
        return fill_batch(structures, batch_size)
    by_size = sorted(range(len(structures)), key=lambda i: (len(structures[i]), i))
    n = len(structures)
    return [structures[by_size[int((k + 0.5) * n / batch_size)]] for k in range(batch_size)]


def fill_batch(structures: Sequence, batch_size: int, offset: int = 0) -> list:
    """`batch_size` structures taken cyclically from `structures` (replicated to fill the batch)."""
    if len(structures) == 0:
        raise HessforgeError("empty batch: no structures to evaluate")
    if batch_size < 1:
        raise HessforgeError(f"batch size must be >= 1, got {batch_size}")
    n = len(structures)
    return [structures[(offset + k) % n] for k in range(batch_size)]


# ------------------------------------------------------------------------------------------ neighbor lists
def _kernels():
    try:
        import engine.kernels as kernels

        return kernels
    except Exception:  # the kernels package is optional (another engineer's work in progress)
        return None


def kernels_available() -> bool:
    return _kernels() is not None


def neighbor_backend_name(device: torch.device) -> str:
    k = _kernels()
    if k is None:
        return "reference (engine.neighbors)"
    return "engine.kernels[triton]" if k.use_triton("auto", device) else "engine.kernels[torch]"


def rebuild_neighbors(graph: AtomicGraph, cutoff: float, backend: str = "auto") -> AtomicGraph:
    """The graph with its neighbor list rebuilt from its current positions (what an MD step without a skin
    does). backend: auto (engine.kernels when importable, else the reference) | reference | torch | triton."""
    k = _kernels() if backend != "reference" else None
    if k is None:
        if backend in ("torch", "triton"):
            raise HessforgeError(f"neighbor backend {backend!r} needs engine.kernels, which cannot be imported")
        from engine.neighbors import batched_neighbor_list

        edge_index, shifts = batched_neighbor_list(graph.positions.detach(), graph.cell.detach(), graph.pbc,
                                                   graph.batch, cutoff)
    else:
        out = k.neighbor_list(graph.positions.detach(), graph.cell.detach(), graph.pbc, graph.batch, cutoff,
                              complete=False,  # build_graph's cells are complete
                              backend=backend)
        edge_index, shifts = out.edge_index, out.shifts
    return graph._replace(edge_index=edge_index, shifts=shifts.to(graph.positions.dtype))


# ------------------------------------------------------------------------------------------ fused students
class FusedStudent(nn.Module):
    """A student (PaiNN, SchNet) evaluated on the fused neighbor-list + radial-basis op (`engine.kernels.radial_edges`):
    one pass over candidate pairs gives the edges, unit vectors, sinc basis and cosine envelope, with a
    first-derivative backward to positions, so forces need no second pass over the edge geometry. The graph's
    own edges are ignored: the neighbor list is built inside the call. Forces only (no Hessians: the fused op
    has no double backward). backend: auto (Triton on CUDA, vectorised torch elsewhere) | torch | triton.

    capacity: None, the exact number of edges (data-dependent shapes, one device->host sync inside the op);
    or a number of edge slots, padded with inert edges (static shapes and no sync inside the call, what CUDA
    graphs need), 0 to size it at the first call from an exact count. After each padded call the true edge
    count is read (one sync, outside the model): if it exceeded the slots, the capacity is resized
    (`edge_slots`) and the call redone, so no edge is ever dropped; if it fell below half the slots, the
    capacity is resized for the next call, so padding never more than doubles the edge work."""

    fuses_neighbors = True  # callers (runner, engine.md) skip their own neighbor list

    def __init__(self, model: nn.Module, backend: str = "auto", capacity: Optional[int] = None):
        super().__init__()
        k = _kernels()
        if k is None:
            raise HessforgeError("the fused student needs engine.kernels, which cannot be imported")
        if not hasattr(model, "energies_from_edges"):
            raise HessforgeError(f"the fused path runs engine students (PaiNN, SchNet); {type(model).__name__} "
                                 "has no energies_from_edges")
        if capacity is not None and capacity < 0:
            raise HessforgeError(f"edge capacity must be >= 0 (0: sized at the first call), got {capacity}")
        self.model = model
        self.backend = backend
        self.capacity = capacity
        self.cutoff = float(model.cutoff)
        self.species = list(model.species)
        self.direct_forces = bool(getattr(model, "direct_forces", False))
        self._kernels = k

    def check_species(self, numbers, where: str = "") -> None:
        self.model.check_species(numbers, where)

    def core(self, positions, numbers, cell, pbc, batch, capacity: int):
        """energy [B], node_energy [N], forces for direct-force students (else energy again) and a status
        [2]: the true number of edges, and 1 if the positions are finite; autograd-free (compilable).
        capacity < 0: exact edges, else that many padded slots (the op called directly: checking the status
        is the caller's, outside compiled code; the padded op reads nothing back, so it cannot check)."""
        m = self.model
        # eps: the students' safe_norm, so r, unit and rbf match their graph path
        edges = self._kernels.RadialEdges(*torch.ops.hessforge.radial_edges(
            positions, cell, pbc, batch, self.cutoff, int(m.num_basis), capacity, NORM_EPS, self.backend))
        energy, node_energy, s, v = m.energies_from_edges(numbers, batch, cell.shape[0], edges.edge_index,
                                                          edges.rbf, edges.fcut, edges.unit)
        forces = m.direct_force_head(s, v) if self.direct_forces else energy
        status = torch.stack([edges.num_edges, torch.isfinite(positions).all().to(edges.num_edges.dtype)])
        return energy, node_energy, forces, status

    def forward(self, graph: AtomicGraph, compute_forces: bool = True, create_graph: bool = False
                ) -> Dict[str, torch.Tensor]:
        return fused_forward(self.core, self, graph, compute_forces, create_graph)


def fused_forward(core: Callable, fused: FusedStudent, graph: AtomicGraph, compute_forces: bool,
                  create_graph: bool, before_call: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """Run a fused core (FusedStudent.core, compiled or not) with `fused`'s capacity policy, then take forces.
    before_call: run before each core call (CUDA graphs: mark the start of a step)."""
    if compute_forces and not fused.direct_forces and autograd_is_off():  # a caller under no_grad
        with autograd_on():
            return fused_forward(core, fused, normal_graph(graph), compute_forces, create_graph, before_call)
    positions = graph.positions
    if compute_forces and not fused.direct_forces and not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    if fused.capacity == 0:  # size the padded slots from an exact count (no geometry, not differentiated)
        nl = fused._kernels.neighbor_list(graph.positions.detach(), graph.cell.detach(), graph.pbc, graph.batch,
                                          fused.cutoff, backend=fused.backend, complete=False)
        fused.capacity = edge_slots(int(nl.num_edges))
    while True:
        capacity = -1 if fused.capacity is None else fused.capacity
        if before_call is not None:
            before_call()
        energy, node_energy, third, status = call_compiled(core, positions, graph.numbers, graph.cell, graph.pbc,
                                                           graph.batch, capacity)
        if capacity < 0:
            break
        needed, finite = status.tolist()  # the padded call's one sync
        if not finite:
            raise HessforgeError("positions contain NaN or Inf")
        if needed <= capacity:
            if 2 * needed < capacity:  # mostly padding: fewer slots from the next call on
                fused.capacity = edge_slots(needed)
            break
        fused.capacity = edge_slots(needed)  # overflow: resize and redo, never drop edges
    out = {"energy": energy, "node_energy": node_energy}
    if compute_forces:
        if fused.direct_forces:
            out["forces"] = third
        else:
            (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph, allow_unused=True)
            out["forces"] = -(torch.zeros_like(positions) if grad is None else grad)
    return out


def edge_slots(edges: int) -> int:
    """Padded edge slots for `edges` edges: 1/8 headroom (an MD step moves the count by a few percent, so
    resizing, which costs a new CUDA graph, is rare), rounded up to a multiple of 256."""
    return max(256, -(-(edges + edges // 8) // 256) * 256)


class CompiledFusedStudent(nn.Module):
    """FusedStudent with its core under torch.compile (fullgraph, dynamic sizes); forces taken outside.

    mode="reduce-overhead" (the cudagraphs student mode) replays CUDA graphs of the compiled forward and
    backward: it needs a padded FusedStudent (static edge count, no sync inside the core). Replays reuse
    their output memory, so the outputs are cloned before they are returned."""

    fuses_neighbors = True

    def __init__(self, fused: FusedStudent, dynamic: bool = True, mode: str = "default"):
        super().__init__()
        if mode == "reduce-overhead" and fused.capacity is None:
            raise HessforgeError("CUDA graphs (mode='reduce-overhead') need a padded FusedStudent (capacity=0 or N)")
        self.fused = fused
        self.cutoff, self.species, self.direct_forces = fused.cutoff, fused.species, fused.direct_forces
        self.dynamic = dynamic
        self.graphs = mode == "reduce-overhead"
        keep_compilation_metrics()
        self._core = torch.compile(own_code(fused.core), fullgraph=True, dynamic=dynamic, mode=mode)

    def check_species(self, numbers, where: str = "") -> None:
        self.fused.check_species(numbers, where)

    def forward(self, graph: AtomicGraph, compute_forces: bool = True, create_graph: bool = False):
        if self.dynamic:
            for t in (graph.positions, graph.numbers, graph.batch, graph.cell, graph.pbc):
                torch._dynamo.mark_dynamic(t, 0)
        if not self.graphs:
            return fused_forward(self._core, self.fused, graph, compute_forces, create_graph)
        out = fused_forward(self._core, self.fused, graph, compute_forces, create_graph,
                            before_call=torch.compiler.cudagraph_mark_step_begin)
        return {key: value.clone() for key, value in out.items()}


def student_for_mode(model: nn.Module, mode: str, device: torch.device) -> Tuple[nn.Module, str]:
    """(callable student, label) for a mode of STUDENT_MODES. compiled+triton and cudagraphs (compiled+triton
    on padded edges, replayed as CUDA graphs: CompiledFusedStudent with mode="reduce-overhead") require the
    Triton backend (CUDA); fused and compiled+fused use Triton where it runs (CUDA) and the fused op's
    vectorised torch path elsewhere. Raises HessforgeError (with the reason) where a mode cannot run."""
    if mode not in STUDENT_MODES:
        raise HessforgeError(f"unknown student mode {mode!r}; choose from {', '.join(STUDENT_MODES)}")
    if mode == "eager":
        return model, "eager"
    from engine.exported import ExportedModel

    if isinstance(model, ExportedModel):
        raise HessforgeError(f"{model.path}: an exported (TorchScript) model runs in mode eager only; give the "
                             f"checkpoint it was exported from for mode {mode}")
    if mode == "compiled":
        from engine.compiled import CompiledStudent

        if not hasattr(model, "energies"):
            raise HessforgeError(f"{type(model).__name__} cannot be compiled here (no energies() core)")
        return CompiledStudent(model), "compiled"
    k = _kernels()
    if k is None:
        raise HessforgeError("engine.kernels (the fused neighbor-list/radial-basis op) is not available")
    if mode in ("compiled+triton", "cudagraphs"):
        if device.type != "cuda" or not k.triton_available():
            raise HessforgeError(f"{mode} needs CUDA and triton (the CPU Triton interpreter is for tests only); "
                                 "the fused op's torch path is measured as compiled+fused")
        backend = "triton"
    else:
        backend = "triton" if k.use_triton("auto", device) else "torch"
    if mode == "cudagraphs":
        return (CompiledFusedStudent(FusedStudent(model, backend=backend, capacity=0), mode="reduce-overhead"),
                f"compiled+triton+cudagraphs[{backend}]")
    fused = FusedStudent(model, backend=backend)
    if mode == "fused":
        return fused, f"fused[{backend}]"
    return CompiledFusedStudent(fused), f"compiled+{'triton' if mode == 'compiled+triton' else 'fused'}[{backend}]"


# ------------------------------------------------------------------------------------------ targets
class BenchTarget:
    """What the runner times. `prepare` (untimed) turns a list of ase.Atoms into device inputs with the
    neighbor list built; `model` computes energies and forces from them; `model_with_neighbors` first
    rebuilds the neighbor list from the positions. Subclasses set name, mode, device, dtype."""

    name: str = "model"
    mode: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    report_dtype: Optional[torch.dtype] = None  # what the model computes in, where not `dtype` (exported files)
    fuses_neighbors: bool = False  # the model builds its own neighbor list: both timings are the same call
    note: str = ""

    @property
    def min_warmup(self) -> int:
        """Untimed calls before a call is representative, whatever warm-up the caller asks for: CUDA graphs
        (the cudagraphs mode) are recorded on the second call and replayed from the third; TorchScript's
        profiling executor optimises an exported model on its second call (an audit measured 235 ms for each
        of the first two calls, 9.5 ms from the third)."""
        if "cudagraphs" in self.mode:
            return 2
        return 3 if "torchscript" in self.mode else 1

    def prepare(self, atoms_list: Sequence) -> Any:
        raise NotImplementedError

    def check_data(self, structures: Sequence, where: str = "") -> None:
        """Raise HessforgeError if this target cannot run some of `structures` (checked once, up front, so a
        sweep does not fail halfway; `prepare` still checks each batch)."""

    def after_out_of_memory(self) -> None:
        """Drop state sized for the batch that ran out of memory (before smaller batches run again)."""

    def model(self, inputs: Any) -> Any:
        raise NotImplementedError

    def model_with_neighbors(self, inputs: Any) -> Any:
        return self.model(inputs)

    @staticmethod
    def count(inputs: Any) -> Tuple[int, int]:
        """(atoms, edges) in prepared inputs; edges -1 where unknown."""
        if isinstance(inputs, AtomicGraph):
            return int(inputs.positions.shape[0]), int(inputs.edge_index.shape[1])
        return -1, -1


class StudentTarget(BenchTarget):
    """An engine student (anything with the forward(graph, compute_forces) interface: PaiNN, CompiledStudent,
    FusedStudent, ExportedModel) in one of STUDENT_MODES."""

    def __init__(self, model, mode: str = "eager", device=None, dtype: Optional[torch.dtype] = None,
                 name: Optional[str] = None, neighbor_backend: str = "auto"):
        self.device = resolve_device(device)
        if isinstance(model, nn.Module):
            params = list(model.parameters())
            self.dtype = dtype or (params[0].dtype if params else torch.float32)
            model = for_inference(model, self.device, self.dtype)
            self.student, self.mode = student_for_mode(model, mode, self.device)
        else:  # an exported TorchScript student (engine.exported.ExportedModel): eager, CPU, its own dtype
            if mode != "eager":
                raise HessforgeError(f"exported models run eager only (asked for {mode!r})")
            if self.device.type != "cpu":
                raise HessforgeError("exported models are loaded on CPU by engine.exported")
            self.dtype = torch.float64  # its inputs and outputs (it computes in its own metadata dtype)
            self.report_dtype = getattr(model, "dtype", None)
            runs = "aoti" if getattr(model, "core", None) is not None else "torchscript"  # export --compiled
            self.student, self.mode = model, f"eager[{runs} {str(getattr(model, 'dtype', '')).replace('torch.', '')}]"
        self.fuses_neighbors = bool(getattr(self.student, "fuses_neighbors", False))
        self.cutoff = float(model.cutoff)
        self.species = list(model.species)
        self.name = name or type(model).__name__
        self.neighbor_backend = neighbor_backend
        self.note = ("neighbor list fused into the model call" if self.fuses_neighbors
                     else f"NL: {neighbor_backend_name(self.device) if neighbor_backend == 'auto' else neighbor_backend}")

    def check_data(self, structures: Sequence, where: str = "") -> None:
        self.student.check_species(sorted(set(int(z) for a in structures for z in a.numbers)),
                                   f"{self.name}: {where}" if where else self.name)

    def after_out_of_memory(self) -> None:
        # padded edge slots grown for the failed batch: sized again from an exact count at the next call
        fused = getattr(self.student, "fused", self.student)
        if getattr(fused, "capacity", None):
            fused.capacity = 0

    def prepare(self, atoms_list: Sequence) -> AtomicGraph:
        for a in atoms_list:  # fail early, with the structure's name
            self.student.check_species(a.numbers, a.get_chemical_formula())
        graph = graph_from_atoms(list(atoms_list), self.cutoff, dtype=torch.float64)
        return graph_to(graph, self.device, self.dtype)

    def model(self, graph: AtomicGraph):
        out = self.student(graph, compute_forces=True)
        return out["forces"]

    def model_with_neighbors(self, graph: AtomicGraph):
        if self.fuses_neighbors:
            return self.model(graph)
        return self.model(rebuild_neighbors(graph, self.cutoff, self.neighbor_backend))


class FunctionTarget(BenchTarget):
    """Any callable: prepare(atoms_list) -> inputs, run(inputs) -> outputs (neighbor list inside or none)."""

    def __init__(self, name: str, prepare: Callable, run: Callable, device=None, dtype=torch.float32,
                 mode: str = "", note: str = "neighbor list (if any) inside the call"):
        self.name, self.mode, self.note = name, mode, note
        self.device = resolve_device(device)
        self.dtype = dtype
        self._prepare, self._run = prepare, run
        self.fuses_neighbors = True

    def prepare(self, atoms_list):
        return self._prepare(atoms_list)

    def model(self, inputs):
        return self._run(inputs)


# ------------------------------------------------------------------------------------------ memory
def _proc_kb(key: str, path: str = "/proc/self/status") -> Optional[int]:
    """A "key: value kB" line of a /proc file (status, meminfo), in kB; None where unavailable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of the calls made between start() and peak_bytes(); `method` names how it was measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated - allocated before"
        elif _proc_kb("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
            self.method = "cpu peak RSS - RSS before (VmHWM reset via /proc/self/clear_refs, heap trimmed)"
        else:
            self.method = "cpu ru_maxrss delta (process-lifetime peak; 0 if below an earlier peak)"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("cpu peak RSS"):
            malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.base = (_proc_kb("VmRSS") or 0) * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.method.startswith("cpu peak RSS"):
            return max(0, (_proc_kb("VmHWM") or 0) * 1024 - self.base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)


# ------------------------------------------------------------------------------------------ results
@dataclass
class Timing:
    median_s: float
    times_s: List[float]
    first_call_s: float
    structures_per_s: float
    atom_steps_per_s: float
    ns_per_day: float

    @classmethod
    def from_times(cls, times: List[float], first: float, batch_size: int, atoms: int) -> "Timing":
        ordered = sorted(times)  # times_s keeps the call order: drift over the repeats stays visible
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        sps = batch_size / median if median > 0 else math.inf
        return cls(median, list(times), first, sps, atoms / median if median > 0 else math.inf, ns_per_day(sps))


@dataclass
class BenchResult:
    name: str
    mode: str
    device: str
    dtype: str
    threads: int
    batch_size: int
    atoms: int  # atoms in one batch
    edges: int  # directed edges in one batch (-1: unknown)
    model: Timing  # model call on a prebuilt neighbor list
    model_nl: Optional[Timing]  # neighbor list rebuilt + model call (None: not measured)
    peak_memory_bytes: int
    memory_method: str
    note: str = ""
    compile_events: Dict[str, int] = field(default_factory=dict)  # compile_stats() counted during this run

    @property
    def atoms_per_structure(self) -> float:
        return self.atoms / self.batch_size

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["atoms_per_structure"] = self.atoms_per_structure
        return d


@dataclass
class Sweep:
    results: List[BenchResult] = field(default_factory=list)
    stop_reason: str = ""

    def best(self, key: str = "model_nl") -> Optional[BenchResult]:
        """The result with the highest throughput in `key` ("model" or "model_nl", falling back to model), in
        atom-steps/s: batches of different sizes may hold structures of different mean size."""
        def score(r: BenchResult) -> float:
            t = getattr(r, key) or r.model
            return t.atom_steps_per_s

        return max(self.results, key=score) if self.results else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 5,
               timer: Callable[[], float] = time.perf_counter, after_first: Optional[Callable[[], None]] = None
               ) -> Tuple[float, List[float]]:
    """(time of the first call, [times of `repeats` calls after `warmup` calls]); device synchronised.
    after_first: run (untimed) once the first call is done."""
    if repeats < 1:
        raise HessforgeError(f"repeats must be >= 1, got {repeats}")
    first = None
    for _ in range(max(warmup, 1)):
        synchronize(device)
        t0 = timer()
        fn()
        synchronize(device)
        if first is None:
            first = timer() - t0
            if after_first is not None:
                after_first()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = timer()
        fn()
        synchronize(device)
        times.append(timer() - t0)
    return first, times


def benchmark(target: BenchTarget, structures: Sequence, batch_size: int = 64, warmup: int = 2, repeats: int = 5,
              with_neighbors: bool = True, timer: Callable[[], float] = time.perf_counter,
              memory_probe: Optional[MemoryProbe] = None) -> BenchResult:
    """Time energy+force calls of `target` on `batch_size` structures (sample_batch: the data's mix of sizes):
    model only and, if `with_neighbors`, neighbor list + model."""
    atoms_list = sample_batch(structures, batch_size)
    warmup = max(warmup, target.min_warmup)
    inputs = target.prepare(atoms_list)
    atoms, edges = target.count(inputs)
    if atoms < 0:
        atoms = sum(len(a) for a in atoms_list)
    probe = memory_probe or MemoryProbe(target.device)
    compiled_before = compile_stats()
    # the probe starts after the first call: one-time costs (compilation, library code paged in, caches of
    # the first model measured in a process) are not the working memory of a call
    first, times = time_calls(lambda: target.model(inputs), target.device, warmup, repeats, timer,
                              after_first=probe.start)
    model_t = Timing.from_times(times, first, batch_size, atoms)
    nl_t = None
    if with_neighbors:
        if target.fuses_neighbors:
            nl_t = model_t
        else:
            first, times = time_calls(lambda: target.model_with_neighbors(inputs), target.device, warmup,
                                      repeats, timer)
            nl_t = Timing.from_times(times, first, batch_size, atoms)
    peak = probe.peak_bytes()
    events = compile_events(compiled_before, compile_stats())
    del inputs
    return BenchResult(
        name=target.name, mode=target.mode, device=str(target.device),
        dtype=dtype_name(target.report_dtype or target.dtype),
        threads=torch.get_num_threads(), batch_size=batch_size, atoms=atoms, edges=edges, model=model_t,
        model_nl=nl_t, peak_memory_bytes=peak, memory_method=probe.method,
        note=_join_notes(target.note, cuda_graphs_note(target.mode, events)), compile_events=events,
    )


def cuda_graphs_note(mode: str, events: Dict[str, int]) -> str:
    """A warning for a result labelled cudagraphs whose graphs inductor did not capture (it then runs the
    compiled code without CUDA graphs, and the label would claim more than was measured)."""
    skips = events.get("cudagraph_skips", 0)
    if "cudagraphs" not in mode or not skips:
        return ""
    return f"CUDA graphs NOT used: {skips} graph(s) skipped (TORCH_LOGS=cudagraphs gives the reason)"


def _join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def default_memory_cap(ceiling: Optional[int] = 16 << 30) -> int:
    """CPU memory cap: half the available memory, at most `ceiling` (the sweep's 16 GiB, a limit for its growth;
    None for a batch asked for) bytes; 4 GiB where the available memory is unknown."""
    avail = _proc_kb("MemAvailable", "/proc/meminfo")
    if not avail:
        return 4 << 30
    half = (avail * 1024) // 2
    return int(half if ceiling is None else min(ceiling, half))


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure on any device: torch's OutOfMemoryError (CUDA), the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), Python's MemoryError."""
    text = str(err).lower()
    return (isinstance(err, (MemoryError, torch.OutOfMemoryError))
            or isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def release_memory(device: torch.device) -> None:
    """After an out-of-memory error: drop what the failed call held."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep(target: BenchTarget, structures: Sequence, batch_sizes: Optional[Sequence[int]] = None,
          max_batch: int = 4096, warmup: int = 2, repeats: int = 5, with_neighbors: bool = True,
          memory_cap_bytes: Optional[int] = None, plateau: float = 0.05, patience: int = 2,
          max_call_s: float = 30.0, key: str = "model_nl", timer: Callable[[], float] = time.perf_counter,
          memory_probe: Optional[Callable[[], MemoryProbe]] = None,
          progress: Optional[Callable[[BenchResult], None]] = None) -> Sweep:
    """Batch sizes 1, 2, 4, ... (or `batch_sizes`) until the throughput maximum is passed; see module doc.
    `key` picks the timing the plateau test and `Sweep.best` use."""
    if max_batch < 1 or (batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1)):
        raise HessforgeError(f"sweep batch sizes must be >= 1 (max_batch {max_batch}, batch_sizes {batch_sizes})")
    sizes = list(batch_sizes) if batch_sizes else [2 ** k for k in range(int(math.log2(max_batch)) + 1)]
    cap = memory_cap_bytes if memory_cap_bytes is not None else (
        None if target.device.type == "cuda" else default_memory_cap())
    out = Sweep()
    best, stale = 0.0, 0
    for k, b in enumerate(sizes):
        try:
            r = benchmark(target, structures, b, warmup, repeats, with_neighbors, timer,
                          memory_probe() if memory_probe else None)
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            target.after_out_of_memory()
            release_memory(target.device)
            out.stop_reason = f"out of memory at batch {b}"
            return out
        out.results.append(r)
        if progress:
            progress(r)
        t = getattr(r, key) or r.model
        if t.atom_steps_per_s > best * (1 + plateau):
            stale = 0
        else:
            stale += 1
        best = max(best, t.atom_steps_per_s)
        if stale >= patience:
            out.stop_reason = f"throughput plateau (no gain > {plateau:.0%} in the last {patience} batch sizes)"
            return out
        nxt = sizes[k + 1] if k + 1 < len(sizes) else None
        if nxt is None:
            out.stop_reason = f"largest batch size tried ({b})"
            return out
        if cap is not None and r.peak_memory_bytes * nxt / b > cap:
            out.stop_reason = (f"memory cap {cap / 2**30:.3g} GiB (batch {nxt} projected at "
                               f"{r.peak_memory_bytes * nxt / b / 2**30:.3g} GiB)")
            return out
        if t.median_s > max_call_s:
            out.stop_reason = f"call time {t.median_s:.3g} s > {max_call_s:g} s at batch {b}"
            return out
    return out


# ------------------------------------------------------------------------------------------ reports
def machine_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            # large CPU tensors reused from the heap (engine/allocator.py): 2-3x a ~1000-atom force call
            "cpu_allocator": "glibc, large blocks kept in the heap" if freed_memory_kept() else "default"}
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0 or abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"


def format_table(results: Sequence[BenchResult], reference: Optional[Callable[[BenchResult], Optional[BenchResult]]] = None,
                 markdown: bool = False) -> str:
    """A table, one row per result. `reference(r)` gives the result to compute speedups against (by ns/day,
    model+NL where both have it, else model). "spread": (slowest - fastest) / median of the timed calls behind
    the throughput columns (model+NL where timed), so a difference smaller than it is noise."""
    head = ["model", "mode", "batch", "atoms/str", "ms/call model", "ms/call +NL", "spread", "structures/s",
            "atom-steps/s", "ns/day model", "ns/day +NL", "peak MiB"]
    if reference:
        head.append("speedup")
    rows = []
    for r in results:
        nl = r.model_nl
        main = nl or r.model
        row = [r.name, r.mode, str(r.batch_size), f"{r.atoms_per_structure:.1f}", _fmt(r.model.median_s * 1e3),
               _fmt(nl.median_s * 1e3) if nl else "-", spread(main), _fmt(main.structures_per_s),
               _fmt(main.atom_steps_per_s),
               _fmt(r.model.ns_per_day), _fmt(nl.ns_per_day) if nl else "-", _fmt(r.peak_memory_bytes / 2**20)]
        if reference:
            ref = reference(r)
            row.append(f"{speedup(r, ref):.2f}x" if ref is not None else "-")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in rows])


def spread(timing: "Timing") -> str:
    """(max - min) / median of the timed calls, in %; "-" for a single call."""
    if len(timing.times_s) < 2 or timing.median_s <= 0:
        return "-"
    return f"{100 * (max(timing.times_s) - min(timing.times_s)) / timing.median_s:.0f}%"


def speedup(result: BenchResult, reference: BenchResult) -> float:
    """Throughput of `result` over that of `reference` in atom-steps/s (model+NL where both have it, else
    model): the ns/day ratio when both timed the same structures (one batch size), and still the fair ratio
    between two best batches that hold structures of different mean size."""
    if result.model_nl is not None and reference.model_nl is not None:
        return result.model_nl.atom_steps_per_s / reference.model_nl.atom_steps_per_s
    return result.model.atom_steps_per_s / reference.model.atom_steps_per_s


def write_json(path: str, payload: Dict[str, Any]) -> None:
    def conv(o):
        if isinstance(o, (BenchResult, Timing)):
            return asdict(o)
        raise TypeError(type(o))

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    paths.write_json(path, payload, default=conv)
