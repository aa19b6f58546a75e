"""Training configuration: YAML with strictly checked keys (a typo is an error naming the key and file)."""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

from engine.errors import HessforgeError


@dataclass
class DataConfig:
    path: str = ""  # LMDB dataset (hessforge ingest)
    labels: Optional[str] = None  # teacher labels directory (hessforge label); needed for KD
    split_file: Optional[str] = None  # JSON written by a previous run; overrides the fractions
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    split_seed: int = 0
    elements: Optional[List[int]] = None  # keep structures made only of these atomic numbers (split_file too)
    max_atoms: Optional[int] = None  # (split_file too)
    train_limit: Optional[int] = None  # cap on training structures (learning curves, quick runs)


@dataclass
class ModelConfig:
    name: str = "painn"  # or "schnet" (smaller and faster; gradient forces only)
    hidden: int = 128
    layers: int = 4
    num_basis: int = 128
    cutoff: float = 5.0
    force_mode: str = "gradient"  # or "direct"
    norm_eps: Optional[float] = None  # PaiNN only: 1.0 for well-defined Hessians at symmetric sites (crystals)


@dataclass
class LossConfig:
    energy: float = 5.0  # λ_U
    forces: float = 100.0  # λ_F
    hessian: float = 400.0  # λ_KD (0: undistilled)
    hessian_rows: int = 1  # s rows sampled per structure and step
    energy_gradient: float = 0.0
    force_distill: float = 0.0
    n2n: float = 0.0  # baseline: teacher per-atom features (labels made with --features)
    a2a: float = 0.0  # baseline: teacher per-element embeddings (labels made with --embeddings)
    stress: float = 0.0  # λ_S: stress of bulk structures (eV/Å³; the reference's, else the teacher's)
    halve_kd_when_better_than_teacher: bool = True
    kind: str = "l2mae"  # l2mae (norms, the paper's code) or mse (squared errors)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 2e-6
    eps: float = 1e-7
    amsgrad: bool = True
    plateau_factor: float = 0.8
    plateau_patience: int = 10
    min_lr: float = 1e-6
    ema_decay: float = 0.999
    grad_clip: float = 10.0


@dataclass
class TrainConfig:
    out: str = "runs/student"
    epochs: int = 100
    batch_size: int = 16
    val_batch_size: int = 32
    seed: int = 0
    dtype: str = "float32"
    checkpoint_every: int = 10  # epochs
    max_time_s: Optional[float] = None  # stop (with a checkpoint) after this wall time
    num_workers: int = 0
    threads: Optional[int] = None  # torch intra-op threads


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values, where: str, prefix: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise HessforgeError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise HessforgeError(
                f"{where}: unknown config key '{prefix}{key}'; known keys in this section: {', '.join(known)}"
            )
        sub = known[key].type
        if isinstance(sub, str) and sub in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[sub], value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _typed(value, sub, f"{prefix}{key}", where)
    return cls(**kwargs)


def _typed(value, annotation: str, key: str, where: str):
    """`value` as the field's declared type (int, float, bool, str, Optional[...], List[int]), or one error
    naming the key. A number YAML read as a string (PyYAML reads 1e-3 as '1e-3') becomes a float."""
    if annotation.startswith("Optional["):
        if value is None:
            return None
        annotation = annotation[len("Optional["):-1]

    def bad(kind: str):
        return HessforgeError(f"{where}: {key} must be {kind}, got {value!r}")

    if annotation == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if annotation == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise bad("a number")
        return float(value)
    if annotation == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if annotation == "List[int]":
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise bad("a list of integers")
        return value
    return value


# (section, key, test, what it must be): value ranges, checked after the types
_RANGES = [
    ("data", "train", lambda v: 0 <= v <= 1, "in [0, 1]"), ("data", "val", lambda v: 0 < v <= 1, "in (0, 1]: "
     "best.pt, the learning-rate schedule and λ_KD halving are decided on it"),
    ("data", "test", lambda v: 0 <= v <= 1, "in [0, 1]"), ("data", "max_atoms", lambda v: v is None or v >= 1, ">= 1"),
    ("data", "train_limit", lambda v: v is None or v >= 1, ">= 1 (or null)"),
    ("model", "cutoff", lambda v: 0 < v < float("inf"), "> 0 Å"),
    ("optim", "lr", lambda v: v > 0, "> 0"), ("optim", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim", "eps", lambda v: v > 0, "> 0"), ("optim", "plateau_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("optim", "plateau_patience", lambda v: v >= 0, ">= 0"), ("optim", "min_lr", lambda v: v >= 0, ">= 0"),
    ("optim", "ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"), ("optim", "grad_clip", lambda v: v > 0, "> 0"),
    ("train", "epochs", lambda v: v >= 1, ">= 1"), ("train", "batch_size", lambda v: v >= 1, ">= 1"),
    ("train", "val_batch_size", lambda v: v >= 1, ">= 1"), ("train", "checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("train", "max_time_s", lambda v: v is None or v > 0, "> 0 (or null)"),
    ("train", "num_workers", lambda v: v >= 0, ">= 0"), ("train", "threads", lambda v: v is None or v >= 1,
                                                         ">= 1 (or null)"),
    ("loss", "hessian_rows", lambda v: v >= 1, "an integer >= 1"),
    ("data", "split_seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    ("train", "seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    ("data", "elements", lambda v: v is None or (len(v) > 0 and all(1 <= z <= 118 for z in v)),
     "a non-empty list of atomic numbers (1-118), or null"),
] + [("loss", key, lambda v: v >= 0, "a number >= 0")
     for key in ("energy", "forces", "hessian", "energy_gradient", "force_distill", "n2n", "a2a", "stress")]


_SECTIONS = {"DataConfig": DataConfig, "ModelConfig": ModelConfig, "LossConfig": LossConfig,
             "OptimConfig": OptimConfig, "TrainConfig": TrainConfig}


def config_from_dict(values: dict, where: str = "config") -> Config:
    config = _build(Config, values, where, "")
    for section in dataclasses.fields(config):  # .inf passes every range below and fails only in training
        for item in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise HessforgeError(f"{where}: {section.name}.{item.name} must be a finite number, got {value!r}")
    for section, key, ok, what in _RANGES:
        value = getattr(getattr(config, section), key)
        if not ok(value):
            raise HessforgeError(f"{where}: {section}.{key} must be {what}, got {value!r}")
    if not config.data.split_file and not config.data.train > 0:
        raise HessforgeError(f"{where}: data.train must be > 0, got {config.data.train!r}")
    if not config.data.path:
        raise HessforgeError(f"{where}: 'data.path' (the LMDB dataset) is required")
    from engine.models import student_class

    student = student_class(config.model.name, where=f"{where}: model.name")
    if config.model.norm_eps is not None:
        if "norm_eps" not in inspect.signature(student).parameters:
            raise HessforgeError(f"{where}: model.norm_eps is a PaiNN setting; {config.model.name} has no vector "
                                 "features (leave it out)")
        if not 0 < config.model.norm_eps < float("inf"):  # a number already (_typed)
            raise HessforgeError(f"{where}: model.norm_eps must be a number > 0, got {config.model.norm_eps!r}")
    if config.model.force_mode not in student.force_modes:
        raise HessforgeError(f"{where}: model.force_mode of {config.model.name} must be "
                             f"{' or '.join(repr(m) for m in student.force_modes)}, got {config.model.force_mode!r}")
    if config.loss.kind not in ("l2mae", "mse"):
        raise HessforgeError(f"{where}: loss.kind must be 'l2mae' or 'mse', got {config.loss.kind!r}")
    if config.train.dtype not in ("float32", "float64"):
        raise HessforgeError(f"{where}: train.dtype must be float32 or float64, got {config.train.dtype!r}")
    lc = config.loss
    if lc.stress > 0 and config.model.force_mode != "gradient":
        raise HessforgeError(f"{where}: loss.stress > 0 needs model.force_mode: gradient (a direct-force student "
                             "has no energy derivative to give a stress)")
    if config.loss.hessian > 0 and not config.data.labels:
        raise HessforgeError(f"{where}: loss.hessian > 0 needs teacher labels: set data.labels (hessforge label)")
    for key, flag in (("force_distill", ""), ("n2n", " --features"), ("a2a", " --embeddings")):
        if getattr(lc, key) > 0 and not config.data.labels:
            raise HessforgeError(f"{where}: loss.{key} > 0 needs teacher labels: set data.labels "
                                 f"(hessforge label{flag})")
    return config


# Settings a resumed run may change: how long and how it runs, not what it computes.
RESUMABLE_KEYS = {("train", "epochs"), ("train", "max_time_s"), ("train", "threads"), ("train", "num_workers"),
                  ("train", "checkpoint_every"), ("train", "out"), ("train", "val_batch_size"),
                  ("data", "path"), ("data", "labels"), ("data", "split_file")}


def without_resumable(values: dict) -> dict:
    """A config dict without RESUMABLE_KEYS: what must stay the same for a run to resume."""
    return {section: {k: v for k, v in keys.items() if (section, k) not in RESUMABLE_KEYS}
            for section, keys in values.items()}


def check_labels_for_loss(config: Config, metadata: dict, where: str) -> None:
    """The labels directory `where` (metadata = LabelStore.metadata) holds what the loss needs: per-atom
    teacher features for loss.n2n > 0, per-element embeddings for loss.a2a > 0, and at least
    loss.hessian_rows stored Hessian rows per structure for the KD term."""
    k = metadata.get("k")
    if config.loss.hessian > 0 and k is not None and config.loss.hessian_rows > k:
        raise HessforgeError(f"{where}: loss.hessian_rows is {config.loss.hessian_rows}, but these labels hold {k} "
                             "Hessian rows per structure; lower loss.hessian_rows, or label with more --rows")
    if config.loss.n2n > 0 and not metadata.get("features"):
        raise HessforgeError(f"{where}: loss.n2n > 0 needs teacher per-atom features, but these labels were made "
                             "without them; label again with `hessforge label --features` (another -o directory)")
    if config.loss.a2a > 0 and not metadata.get("element_embeddings"):
        raise HessforgeError(f"{where}: loss.a2a > 0 needs teacher per-element embeddings, but these labels were "
                             "made without them; label with `hessforge label --embeddings` (the teacher must have "
                             "them: MACE does, ANI-1x does not)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently: a
    second `data:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader names it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str) -> Config:
    if os.path.isdir(path):
        raise HessforgeError(f"{path} is a directory; pass its YAML config file (e.g. {os.path.join(path, 'config.yaml')})")
    if not os.path.isfile(path):
        raise HessforgeError(f"config file not found: {path}")
    with open(path) as fh:
        try:
            values = yaml.load(fh, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise HessforgeError(f"{path}: not valid YAML: {err}") from None
    config = config_from_dict(values, where=path)
    # Relative data paths are relative to the config file, so a run directory can be moved as a whole.
    base = os.path.dirname(os.path.abspath(path))
    for attr in ("path", "labels", "split_file"):
        value = getattr(config.data, attr)
        if value and not os.path.isabs(value):
            setattr(config.data, attr, os.path.join(base, value))
    return config
