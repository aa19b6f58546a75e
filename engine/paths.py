"""Checks on the files a command will write, made before it does any work: a long run should not end in a
traceback because its output path is a directory, and an output path must never be one of the inputs (the
input would be overwritten: a dataset, a trained checkpoint)."""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

from engine.errors import HessforgeError


def check_output_file(path: str, what: str, inputs: Iterable[Optional[str]] = (), create_parent: bool = False
                      ) -> None:
    """Raise HessforgeError, naming `what` (e.g. "--json"), if `path` is a directory, its folder is missing
    (unless `create_parent`: the writer makes it), or it is the same file as one of `inputs` (paths that do
    not exist, None and non-path specs such as 'quickstart' are ignored)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise HessforgeError(f"{what} {path}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not create_parent and not os.path.isdir(parent):
        raise HessforgeError(f"{what} {path}: folder {parent} does not exist")
    if not os.path.exists(path):
        return
    for source in inputs:
        if source and os.path.exists(source) and os.path.samefile(path, source):
            raise HessforgeError(f"{what} {path} is the input {source}: writing it would destroy the input; "
                                 "give another file name")


def check_distinct_outputs(outputs: Dict[str, Optional[str]]) -> None:
    """Raise HessforgeError if two output options ({option: path}) name the same file (one would overwrite
    the other)."""
    seen = {}
    for option, path in outputs.items():
        if not path:
            continue
        key = os.path.abspath(path)
        if key in seen:
            raise HessforgeError(f"{seen[key]} and {option} are the same file ({path}); give different names")
        seen[key] = option
