"""Student checkpoints as written by the trainer, read without importing `training`."""
from __future__ import annotations

import os
import warnings

import torch

from engine.errors import HessforgeError
from engine.models import build_student
from engine.paths import EXPORTED_MODEL, artifact_kind

CHECKPOINT_FORMAT = "hessforge-checkpoint"
CHECKPOINT_VERSION = 1


def read_checkpoint(path: str) -> dict:
    if os.path.isdir(path):
        raise HessforgeError(f"{path}: is a directory; give the checkpoint file (e.g. {os.path.join(path, 'best.pt')})")
    if not os.path.isfile(path):
        raise HessforgeError(f"checkpoint not found: {path}")
    if artifact_kind(path) == EXPORTED_MODEL:
        raise HessforgeError(f"{path}: is an exported model (hessforge export output), not a trainer checkpoint; "
                             "give the run's best.pt or last.pt")
    try:
        with warnings.catch_warnings():  # a foreign TorchScript file: torch warns before the error below says it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise HessforgeError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise HessforgeError(f"{path}: not a hessforge checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise HessforgeError(
            f"{path}: checkpoint format version {state['version']} is newer than this hessforge "
            f"({CHECKPOINT_VERSION}); upgrade hessforge"
        )
    return state


def load_student(path: str, use_ema: bool = True, dtype: torch.dtype = torch.float64):
    """The student of a checkpoint, with its EMA weights by default, in eval mode."""
    state = read_checkpoint(path)
    hp = state.get("model_hparams")
    if not isinstance(hp, dict) or "name" not in hp:
        raise HessforgeError(f"{path}: no model settings (model_hparams with the architecture's name): a damaged "
                             "checkpoint")
    hp = dict(hp)
    name = hp.pop("name")
    try:
        model = build_student(name, **hp)
    except HessforgeError as err:
        raise HessforgeError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:  # a setting this version does not know, or a value of a wrong type
        raise HessforgeError(f"{path}: its model settings {hp} do not build a {name} student ({err}): a damaged "
                             "checkpoint, or one from another hessforge version") from None
    key = "ema_model_state" if use_ema and state.get("ema_model_state") is not None else "model_state"
    try:
        model.load_state_dict(state[key])
    except (RuntimeError, KeyError, TypeError) as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err).splitlines()[0])
        raise HessforgeError(f"{path}: its weights do not fit its model settings {hp} (a damaged checkpoint, or "
                             f"weights of another model): {detail}") from None
    if not all(bool(torch.isfinite(t).all()) for t in state[key].values() if torch.is_tensor(t)
               and t.is_floating_point()):
        raise HessforgeError(f"{path}: its weights hold NaN or Inf (a training run that diverged?)")
    return model.to(dtype).eval()
