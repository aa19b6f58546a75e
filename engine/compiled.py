"""torch.compile for students: the autograd-free energy core is compiled whole (fullgraph, no graph breaks),
and gradient forces are taken outside it, so AOTAutograd compiles the backward as well.

Varying atom/edge counts: by default every size dimension is marked dynamic, so a stream of batches of
different sizes reuses one compiled graph instead of recompiling per shape. `compile_stats()` reports how
many graphs were compiled.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from engine.graph import AtomicGraph


def _mark_dynamic(graph: AtomicGraph) -> None:
    mark = torch._dynamo.mark_dynamic
    for t in (graph.positions, graph.numbers, graph.batch, graph.shifts):
        mark(t, 0)
    mark(graph.edge_index, 1)
    mark(graph.cell, 0)
    mark(graph.pbc, 0)


class CompiledStudent(nn.Module):
    """Wraps a student (PaiNN interface: energies(graph, positions), direct_force_head(s, v)) for inference."""

    def __init__(self, model: nn.Module, dynamic: bool = True, mode: str = "default", backend: str = "inductor"):
        super().__init__()
        self.model = model
        self.dynamic = dynamic
        self.direct_forces = bool(model.direct_forces)
        self.cutoff = model.cutoff
        self.species = model.species
        self._core = torch.compile(self._core_impl, fullgraph=True, dynamic=dynamic, mode=mode, backend=backend)

    def _core_impl(self, graph: AtomicGraph, positions: torch.Tensor):
        energy, node_energy, s, v = self.model.energies(graph, positions)
        if self.direct_forces:
            return energy, node_energy, self.model.direct_force_head(s, v)
        return energy, node_energy, energy  # placeholder third output keeps one signature

    def check_species(self, numbers, where: str = "") -> None:
        self.model.check_species(numbers, where)

    def forward(self, graph: AtomicGraph, compute_forces: bool = True, create_graph: bool = False
                ) -> Dict[str, torch.Tensor]:
        if self.dynamic:
            _mark_dynamic(graph)
        positions = graph.positions
        need_grad = compute_forces and not self.direct_forces
        if need_grad and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        energy, node_energy, third = self._core(graph, positions)
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
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def compile_events(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """What compile_stats() counted between two snapshots."""
    return {key: after[key] - before.get(key, 0) for key in after}
