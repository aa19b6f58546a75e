"""torch.compile for students: the autograd-free energy core is compiled whole (fullgraph, no graph breaks),
and gradient forces are taken outside it, so AOTAutograd compiles the backward as well.

Varying atom/edge counts: by default every size dimension is marked dynamic, so a stream of batches of
different sizes reuses one compiled graph instead of recompiling per shape. `compile_stats()` reports how
many graphs were compiled and how many of them were recompilations.

Each compiled student compiles its own copy of the core function (own_code): torch caches graphs per code
object and caps them per code object (torch._dynamo.config.recompile_limit, 8), so with one shared function
the ninth model configuration in a process (a bench of several models, a sweep of widths) hit the cap, a
hard error under fullgraph=True.
"""
from __future__ import annotations

import types
from typing import Callable, Dict

import torch
from torch import nn

from engine.autograd_mode import autograd_is_off, autograd_on, normal_graph
from engine.errors import HessforgeError
from engine.graph import AtomicGraph


def own_code(method: Callable) -> Callable:
    """A bound method re-bound to a fresh copy of its function's code object: what torch.compile then
    compiles has a graph cache (and recompile cap) of its own, not shared with other instances."""
    func = method.__func__
    fresh = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                               func.__closure__)
    fresh.__kwdefaults__, fresh.__qualname__ = func.__kwdefaults__, func.__qualname__
    return types.MethodType(fresh, method.__self__)


def call_compiled(core: Callable, *args):
    """core(*args), with torch's recompile cap as one clear error (the batches took more graph shapes than
    torch allows one function: eager or a fixed batch composition avoids it)."""
    try:
        return core(*args)
    except (torch._dynamo.exc.FailOnRecompileLimitHit, torch._dynamo.exc.Unsupported) as err:
        if not isinstance(err, torch._dynamo.exc.FailOnRecompileLimitHit) and "recompile limit" not in str(err):
            raise
        raise HessforgeError(
            "the compiled student needed more graphs than torch allows one function "
            f"(torch._dynamo.config.recompile_limit = {torch._dynamo.config.recompile_limit}): the batches "
            f"took too many shapes or dtypes; run eager, or raise that limit ({str(err).splitlines()[0]})") from None


def _mark_dynamic(graph: AtomicGraph) -> None:
    mark = torch._dynamo.mark_dynamic
    for t in (graph.positions, graph.numbers, graph.batch, graph.shifts):
        mark(t, 0)
    mark(graph.edge_index, 1)
    mark(graph.cell, 0)
    mark(graph.pbc, 0)


class CompiledStudent(nn.Module):
    """Wraps an engine student (energies(graph, positions), direct_force_head(s, v)) for inference."""

    def __init__(self, model: nn.Module, dynamic: bool = True, mode: str = "default", backend: str = "inductor"):
        super().__init__()
        self.model = model
        self.dynamic = dynamic
        self.direct_forces = bool(model.direct_forces)
        self.cutoff = model.cutoff
        self.species = model.species
        keep_compilation_metrics()
        self._core = torch.compile(own_code(self._core_impl), fullgraph=True, dynamic=dynamic, mode=mode,
                                   backend=backend)

    def _core_impl(self, graph: AtomicGraph, positions: torch.Tensor):
        energy, node_energy, s, v = self.model.energies(graph, positions)
        if self.direct_forces:
            return energy, node_energy, self.model.direct_force_head(s, v)
        return energy, node_energy, energy  # placeholder third output keeps one signature

    def check_species(self, numbers, where: str = "") -> None:
        self.model.check_species(numbers, where)

    def forward(self, graph: AtomicGraph, compute_forces: bool = True, create_graph: bool = False
                ) -> Dict[str, torch.Tensor]:
        if create_graph:  # the compiled backward is not differentiable again (torch: "donated buffers")
            raise HessforgeError("CompiledStudent is for inference: create_graph (training, Hessian rows) needs the "
                                 "eager student")
        if self.dynamic:
            _mark_dynamic(graph)
        if compute_forces and not self.direct_forces and autograd_is_off():  # a caller under no_grad
            with autograd_on():
                return self.forward(normal_graph(graph), compute_forces, create_graph)
        positions = graph.positions
        need_grad = compute_forces and not self.direct_forces
        if need_grad and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        energy, node_energy, third = call_compiled(self._core, graph, positions)
        out = {"energy": energy, "node_energy": node_energy}
        if compute_forces:
            if self.direct_forces:
                out["forces"] = third
            else:
                (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
                out["forces"] = -grad
        return out


def compile_stats() -> Dict[str, int]:
    """Graphs compiled, recompilations, and graphs that mode="reduce-overhead" left without CUDA graphs
    (inductor's cudagraph_skips: a CPU tensor, an input mutation, ...; TORCH_LOGS=cudagraphs says why) so far
    in this process (torch._dynamo counters)."""
    from torch._dynamo.utils import counters

    stats = counters["stats"]
    return {"unique_graphs": int(stats.get("unique_graphs", 0)),
            "calls_captured": int(stats.get("calls_captured", 0)),
            "recompiles": _recompiles(),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def _recompiles() -> int:
    """Compilations of a function that had been compiled before: dynamo's compile ids are frame/attempt,
    and attempt > 0 is a recompilation (torch keeps no counter of them)."""
    from torch._dynamo import utils

    keep_compilation_metrics()
    count = 0
    for metrics in getattr(utils, "get_compilation_metrics", list)():  # (a torch without it: none counted)
        parts = str(getattr(metrics, "compile_id", "")).lstrip("!").split("/")
        if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) > 0:
            count += 1
    return count


_metrics_kept = False


def keep_compilation_metrics() -> None:
    """Dynamo keeps the metrics of its last 64 compilations: keep all, so _recompiles counts every one.
    Called before compiling, not at import: importing torch._dynamo imports triton, which must not happen
    before TRITON_INTERPRET is set (the test suite's interpreter runs)."""
    global _metrics_kept
    if not _metrics_kept:
        try:
            torch._dynamo.utils.set_compilation_metrics_limit(1 << 20)
        except AttributeError:  # another torch: the count covers the last 64 compilations
            pass
        _metrics_kept = True


def compile_events(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """What compile_stats() counted between two snapshots."""
    return {key: after[key] - before.get(key, 0) for key in after}
