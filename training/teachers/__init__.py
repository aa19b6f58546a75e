"""Teacher adapters. Each one implements `training.teachers.base.Teacher`.

`load_teacher(spec)` builds one from a short string: "ani1x" (8-model ensemble), "ani1x:3" (one member),
"mace:/path/file.model" (optionally "mace:/path/file.model@HEAD"), "so3lr" (the SO3LR weights bundled in
so3krates-torch; "so3lr:/path/file.model" for another so3krates-torch SO3LR file), "chgnet" (CHGNet 0.3.0,
bundled in chgnet; "chgnet:0.2.0" for the older weights), "lammps:/path/potential.in" (any LAMMPS interaction,
training.teachers.lammps). Heavy packages (torchani, mace, so3krates-torch,
chgnet) are imported only when their teacher is requested.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

from engine.errors import HessforgeError
from training.teachers.base import Teacher, TeacherOutput

# name -> factory(argument after the first ":" or None) -> Teacher
TEACHERS: Dict[str, Callable[[Optional[str]], Teacher]] = {}


def register_teacher(name: str, factory: Callable[[Optional[str]], Teacher]) -> None:
    TEACHERS[name.lower()] = factory


def _ani1x(arg: Optional[str]) -> Teacher:
    from training.teachers.ani import ANI1xTeacher

    if arg in (None, ""):
        return ANI1xTeacher()
    try:
        return ANI1xTeacher(int(arg))
    except ValueError:
        raise HessforgeError(f"teacher 'ani1x:{arg}': the model index must be an integer 0..7") from None


def _mace(arg: Optional[str]) -> Teacher:
    from training.teachers.mace import MACETeacher

    if not arg:
        raise HessforgeError("teacher 'mace' needs a model file: mace:/path/to/file.model")
    head = None
    if not os.path.exists(arg) and "@" in arg:  # "file.model@head" unless '@' is part of the file name
        arg, head = arg.rsplit("@", 1)
    return MACETeacher(arg, head=head)


def _so3lr(arg: Optional[str]) -> Teacher:
    from training.teachers.so3lr import SO3LRTeacher

    return SO3LRTeacher(arg or None)


def _chgnet(arg: Optional[str]) -> Teacher:
    from training.teachers.chgnet import CHGNetTeacher

    return CHGNetTeacher(arg or None)


def _lammps(arg: Optional[str]) -> Teacher:
    from training.teachers.lammps import LAMMPSTeacher

    if not arg:
        raise HessforgeError("teacher 'lammps' needs a file of LAMMPS commands: lammps:/path/to/potential.in")
    return LAMMPSTeacher(arg)


register_teacher("ani1x", _ani1x)
register_teacher("mace", _mace)
register_teacher("so3lr", _so3lr)
register_teacher("chgnet", _chgnet)
register_teacher("lammps", _lammps)


def load_teacher(spec: str) -> Teacher:
    """Teacher from a spec string "name" or "name:argument" (see the module docstring)."""
    name, _, arg = str(spec).strip().partition(":")
    factory = TEACHERS.get(name.lower())
    if factory is None:
        raise HessforgeError(f"unknown teacher {spec!r}; known: {', '.join(sorted(TEACHERS))} "
                             "(e.g. 'ani1x', 'ani1x:0', 'mace:/path/file.model', 'so3lr', 'chgnet', 'lammps:potential.in')")
    return factory(arg or None)


__all__ = ["Teacher", "TeacherOutput", "TEACHERS", "register_teacher", "load_teacher"]
