"""hessforge inference engine: batched graphs, neighbor lists, student models, export and runners.

Imports nothing from `training`.
"""
from engine.errors import HessforgeError, UnknownElementError

__all__ = ["HessforgeError", "UnknownElementError"]
