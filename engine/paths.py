"""The files a command writes. Checks made before it does any work: a long run should not end in a
traceback because its output path is a directory, and an output path must never be one of the inputs (the
input would be overwritten: a dataset, a trained checkpoint). And atomic writes: every file the project
writes in one piece goes through atomic_path / atomic_open, so a kill or a full disk never leaves half a file
where a complete one was."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import socket
import tempfile
from typing import IO, Any, Dict, Iterable, Iterator, Optional

from engine.errors import HessforgeError


LMDB_DATASET, TORCH_FILE, EXPORTED_MODEL = "an LMDB dataset", "a PyTorch file (a checkpoint?)", "an exported model"
ARTIFACT_KINDS = (LMDB_DATASET, TORCH_FILE, EXPORTED_MODEL)


def artifact_kind(path: str) -> Optional[str]:
    """Which of the files that cost hours to make `path` holds (one of ARTIFACT_KINDS), from its first bytes;
    None for anything else (JSON, extxyz, text) or an unreadable file."""
    import zipfile

    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
        if head[16:20] in (b"\xde\xc0\xef\xbe", b"\xbe\xef\xc0\xde"):  # LMDB meta magic 0xBEEFC0DE after the page header
            return LMDB_DATASET
        if head[:4] == b"PK\x03\x04" and zipfile.is_zipfile(path):  # torch.save / torch.jit.save archives
            with zipfile.ZipFile(path) as archive:
                if any(n.endswith("/extra/hessforge.json") for n in archive.namelist()):
                    return EXPORTED_MODEL
                if any(n.endswith("/data.pkl") or n.endswith("/constants.pkl") for n in archive.namelist()):
                    return TORCH_FILE
    except (OSError, zipfile.BadZipFile):
        return None
    return None


def check_output_file(path: str, what: str, inputs: Iterable[Optional[str]] = (), create_parent: bool = False,
                      may_replace: Iterable[str] = ()) -> None:
    """Raise HessforgeError, naming `what` (e.g. "--json"), if `path` is a directory, its folder is missing
    (unless `create_parent`: the writer makes it), it is the same file as one of `inputs` (paths that do
    not exist, None and non-path specs such as 'quickstart' are ignored), or it holds a dataset, checkpoint or
    exported model (artifact_kind) other than the kinds in `may_replace` (what this output writes): a typo in
    an output name must not destroy hours of work."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise HessforgeError(f"{what} {path}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not create_parent and not os.path.isdir(parent):
        raise HessforgeError(f"{what} {path}: folder {parent} does not exist")
    if os.path.isdir(parent):  # found now, not after the work (read-only folders, /proc, a full quota)
        try:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".hessforge-write-test-")
            os.close(fd)
            os.remove(probe)
        except OSError as err:
            raise HessforgeError(f"{what} {path}: cannot write in {parent} ({err.strerror})") from None
    if not os.path.exists(path):
        return
    for source in inputs:
        if source and os.path.exists(source) and os.path.samefile(path, source):
            raise HessforgeError(f"{what} {path} is the input {source}: writing it would destroy the input; "
                                 "give another file name")
    kind = artifact_kind(path)
    if kind is not None and kind not in tuple(may_replace):
        raise HessforgeError(f"{what} {path}: that file is {kind}; writing it would destroy it. Give another "
                             "file name (or move the file away first)")


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
def atomic_path(path: str, same_name: bool = False) -> Iterator[str]:
    """Yield a temporary file name beside `path` for a writer that takes a path (torch.save, ase.io.write);
    when the block ends normally the temporary file replaces `path` in one step, so readers (and a later
    resume) see the old file or the complete new one, never half of one. If the block raises (a full disk,
    Ctrl-C), the temporary file is removed and `path` is untouched. The name is per process and host: two
    writers do not share a temporary file. same_name: the temporary file has `path`'s own name, in a hidden
    temporary folder beside it (torch.jit.save names the archive's inner folder after the file)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    # per process and host: ranks on different nodes of a shared filesystem often have the same pid; ending in
    # the name itself, so a writer that picks its format or compression by extension (ase.io.write to .xyz.gz)
    # writes what `path` names
    unique = f".tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    if same_name:
        os.mkdir(os.path.join(folder, unique))
        tmp = os.path.join(folder, unique, name)
    else:
        tmp = os.path.join(folder, f"{unique}.{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if same_name:
            os.rmdir(os.path.join(folder, unique))


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """open() for writing through atomic_path: the file appears complete when the block ends, or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def _finite_or_null(value: Any) -> Any:
    """`value` with every NaN / ±inf float replaced by None (JSON null), through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_json(path: str, payload: Any, **dump_kwargs) -> None:
    """json.dump to `path` through atomic_open (indent 1 unless given). Strict JSON: a metric without data
    (NaN) or a loss never computed (inf) is written as null, which every JSON reader accepts (NaN is not JSON)."""
    dump_kwargs.setdefault("indent", 1)
    default = dump_kwargs.pop("default", None)
    if default is not None:  # objects the caller converts (dataclasses...) first, then the non-finite floats
        payload = json.loads(json.dumps(payload, default=default))
    with atomic_open(path) as fh:
        json.dump(_finite_or_null(payload), fh, allow_nan=False, **dump_kwargs)


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
