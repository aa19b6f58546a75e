"""Student checkpoints as written by the trainer, read without importing `training`."""
from __future__ import annotations

import os

import torch

from engine.errors import HessforgeError
from engine.models import build_student

CHECKPOINT_FORMAT = "hessforge-checkpoint"
CHECKPOINT_VERSION = 1


def read_checkpoint(path: str) -> dict:
    if os.path.isdir(path):
        raise HessforgeError(f"{path}: is a directory; give the checkpoint file (e.g. {os.path.join(path, 'best.pt')})")
    if not os.path.isfile(path):
        raise HessforgeError(f"checkpoint not found: {path}")
    try:
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
    hp = dict(state["model_hparams"])
    model = build_student(hp.pop("name"), **hp)
    key = "ema_model_state" if use_ema and state.get("ema_model_state") is not None else "model_state"
    model.load_state_dict(state[key])
    return model.to(dtype).eval()
