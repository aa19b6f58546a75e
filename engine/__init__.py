"""hessforge inference engine: batched graphs, neighbor lists, student models, export and runners.

Imports nothing from `training`. `engine.Calculator` (the ASE calculator, engine/calculator.py) is imported
on first use, so `import engine` stays light.
"""
from engine.errors import HessforgeError, UnknownElementError

__all__ = ["Calculator", "HessforgeError", "UnknownElementError"]


def __getattr__(name):
    if name == "Calculator":
        from engine.calculator import Calculator

        return Calculator
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
