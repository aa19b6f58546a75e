"""The files a command writes. Checks made before it does any work: a long run should not end in a
traceback because its output path is a directory, and an output path must never be one of the inputs (the
input would be overwritten: a dataset, a trained checkpoint). And atomic writes: every file the project
writes in one piece goes through atomic_path / atomic_open, so a kill or a full disk never leaves half a file
where a complete one was."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import IO, Any, Dict, Iterable, Iterator, Optional

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


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary file name beside `path` for a writer that takes a path (torch.save, ase.io.write);
    when the block ends normally the temporary file replaces `path` in one step, so readers (and a later
    resume) see the old file or the complete new one, never half of one. If the block raises (a full disk,
    Ctrl-C), the temporary file is removed and `path` is untouched. The name is per process: two writers do
    not share a temporary file."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """open() for writing through atomic_path: the file appears complete when the block ends, or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_json(path: str, payload: Any, **dump_kwargs) -> None:
    """json.dump to `path` through atomic_open (indent 1 unless given)."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_open(path) as fh:
        json.dump(payload, fh, **dump_kwargs)


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes: a later run tells an edited or replaced file (an ingested source, a teacher
    model) from the one it used."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(path: str, what: str) -> None:
    """Raise HessforgeError, naming `what` (e.g. "-o"), if `path` exists and is not a directory (makedirs
    would fail with a bare 'File exists')."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise HessforgeError(f"{what} {path}: is a file; give a directory")
