"""Gradient-force models need autograd even when the caller turned it off.

Inference scripts wrap their loops in `torch.no_grad()` or `torch.inference_mode()`; a gradient-force student
(or an exported gradient model) takes its forces, virials and stresses from autograd, which those modes
disable (forces failed with "element 0 of tensors does not require grad"). The entry points that need
derivatives switch it back on for their own call; tensors the caller made under inference_mode are copied,
since autograd cannot save them for backward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def autograd_is_off() -> bool:
    return not torch.is_grad_enabled() or torch.is_inference_mode_enabled()


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal(t):
    """A tensor made under inference_mode cannot be saved for backward: a normal copy (others as they are)."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def normal_graph(graph):
    """An AtomicGraph (a NamedTuple of tensors) with normal tensors throughout."""
    return type(graph)(*(normal(t) for t in graph))
