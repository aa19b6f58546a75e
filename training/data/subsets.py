"""Subsets of a dataset (by elements, size, any predicate) and reproducible splits by group.

A split assigns whole groups (e.g. all conformers of one molecule) to train/val/test, so that no molecule
is seen in training and scored in validation. Same dataset + fractions + seed -> same split, everywhere.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from engine.errors import HessforgeError
from engine.paths import write_json

SPLIT_NAMES = ("train", "val", "test")


def _to_z(elements: Iterable) -> set:
    from ase.data import atomic_numbers

    out = set()
    for e in elements:
        if isinstance(e, str):
            if e not in atomic_numbers:
                raise HessforgeError(f"unknown element symbol {e!r}")
            out.add(atomic_numbers[e])
        else:
            out.add(int(e))
    return out


def select(dataset, indices: Optional[Sequence[int]] = None, only_elements: Optional[Iterable] = None,
           must_contain: Optional[Iterable] = None, natoms: Tuple[Optional[int], Optional[int]] = (None, None),
           predicate: Optional[Callable] = None) -> List[int]:
    """Indices (among `indices`, default all) of structures that pass every given filter:
    only_elements: all atoms are among these (symbols or Z); must_contain: every one of these is present;
    natoms: inclusive (min, max) atom count, None for open; predicate: callable(Structure) -> bool.
    Element and size filters read the dataset index only; a predicate decodes each remaining record."""
    only = _to_z(only_elements) if only_elements is not None else None
    must = _to_z(must_contain) if must_contain is not None else None
    lo, hi = natoms
    elements, counts = dataset.elements(), dataset.natoms()
    out = []
    for i in (range(len(dataset)) if indices is None else indices):
        i = int(i)
        zs = set(elements[i])
        if only is not None and not zs <= only:
            continue
        if must is not None and not must <= zs:
            continue
        if (lo is not None and counts[i] < lo) or (hi is not None and counts[i] > hi):
            continue
        if predicate is not None and not predicate(dataset[i]):
            continue
        out.append(i)
    return out


def _cuts(sizes: np.ndarray, fractions: Sequence[float]) -> List[int]:
    """Group boundaries: split j takes shuffled groups [cut[j], cut[j+1]). Cut points follow the structure
    counts (groups differ in size), then are nudged so every split with a positive fraction gets a group."""
    g, total = len(sizes), float(sizes.sum())
    cum = np.concatenate([[0.0], np.cumsum(sizes)])
    want = [f > 0 for f in fractions]
    cuts = [0]
    acc = 0.0
    for f in fractions[:-1]:
        acc += f
        cuts.append(int(np.argmin(np.abs(cum - acc * total))))
    cuts.append(g)
    m = len(fractions)
    for j in range(1, m):  # forward: at least one group for each wanted split before this cut
        cuts[j] = max(cuts[j], cuts[j - 1] + (1 if want[j - 1] else 0))
    for j in range(m - 1, 0, -1):  # backward: leave room for the wanted splits after this cut
        cuts[j] = min(cuts[j], cuts[j + 1] - (1 if want[j] else 0))
    return cuts


def split_by_group(groups: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                   indices: Optional[Sequence[int]] = None, names: Sequence[str] = SPLIT_NAMES
                   ) -> Dict[str, List[int]]:
    """Assign whole groups to splits. `groups[i]` is structure i's group (Dataset.groups()); only `indices`
    (default all) take part. Fractions are of structures, approximately (groups are indivisible), normalised
    to sum 1; a zero fraction gives an empty split. Deterministic: sorted group names shuffled by
    numpy default_rng(seed). Returns {name: sorted indices}."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(names) or any(f < 0 or not np.isfinite(f) for f in fractions) or sum(fractions) <= 0:
        raise HessforgeError(f"split fractions must be {len(names)} non-negative numbers with a positive sum, "
                             f"got {fractions}")
    fractions = [f / sum(fractions) for f in fractions]
    indices = list(range(len(groups))) if indices is None else [int(i) for i in indices]
    members: Dict[str, List[int]] = {}
    for i in indices:
        members.setdefault(str(groups[i]), []).append(i)
    order = sorted(members)
    needed = sum(f > 0 for f in fractions)
    if len(order) < needed:
        raise HessforgeError(f"cannot split {len(order)} group(s) into {needed} non-empty splits "
                             f"({dict(zip(names, fractions))}): every split needs a whole group (a molecule: "
                             "`hessforge ingest --group-key` names them; one molecule's conformers are one group). "
                             "Ingest with a --group-key that separates the frames, add structures of more groups, "
                             "give the split yourself (data.split_file), or set a fraction that may be 0 to 0")
    perm = np.random.default_rng(seed).permutation(len(order))
    shuffled = [order[p] for p in perm]
    sizes = np.array([len(members[gname]) for gname in shuffled], dtype=float)
    cuts = _cuts(sizes, fractions)
    return {name: sorted(i for gname in shuffled[cuts[j]:cuts[j + 1]] for i in members[gname])
            for j, name in enumerate(names)}


def save_split(path: str, split: Dict[str, List[int]], **info) -> None:
    """JSON: {"splits": {...}, plus info such as seed, fractions, dataset path and count}."""
    data = {"format": "hessforge-split", "version": 1, **info, "splits": {k: list(map(int, v)) for k, v in split.items()}}
    write_json(path, data, indent=None)


def split_digest(split: Dict[str, Sequence[int]]) -> str:
    """sha256 of a split's indices (each split's in its order), recorded in checkpoints: a run resumes, and is
    evaluated, on the split it was trained on, whatever split.json holds by then."""
    canonical = json.dumps({str(k): [int(i) for i in v] for k, v in sorted(split.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_split(path: str, count: Optional[int] = None, require: Sequence[str] = ()) -> Dict[str, List[int]]:
    """Splits saved by save_split (or written by hand): each split's indices distinct, no index in two splits
    (a structure in train and val would quietly bias the validation), the splits in `require` present; with
    `count` (the dataset size), indices are checked to be in range."""
    try:
        with open(path) as f:
            data = json.load(f)
        if not all(isinstance(v, list) for v in data["splits"].values()):
            raise TypeError("each split must be a list of structure indices")
        splits = {str(k): [int(i) for i in v] for k, v in data["splits"].items()}
    except FileNotFoundError:
        raise HessforgeError(f"{path}: no such split file") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HessforgeError(f"{path}: not a hessforge split file ({err})") from None
    missing = [name for name in require if name not in splits]
    if missing:
        raise HessforgeError(f"{path}: no {' or '.join(repr(m) for m in missing)} split (it has: "
                             f"{', '.join(splits) or 'none'})")
    owner: Dict[int, str] = {}
    for name, idx in splits.items():
        for i in idx:
            if i in owner:
                where = f"twice in split {name!r}" if owner[i] == name else f"in splits {owner[i]!r} and {name!r}"
                raise HessforgeError(f"{path}: structure {i} is {where}; a structure belongs to one split once")
            owner[i] = name
    if count is not None:
        if data.get("count") not in (None, count):
            raise HessforgeError(f"{path}: split made for a dataset of {data['count']} structures, this one has "
                                 f"{count}")
        for name, idx in splits.items():
            if idx and (min(idx) < 0 or max(idx) >= count):
                raise HessforgeError(f"{path}: split {name!r} has indices outside 0..{count - 1}")
    return splits
