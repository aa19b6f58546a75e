"""argparse types shared by the subcommands: a bad value is argparse's one-line usage error naming the option."""
from __future__ import annotations

import argparse

SEED_LIMIT = 2 ** 32  # numpy's legacy seeding and the training config take seeds in [0, 2**32)


def seed_option(text: str) -> int:
    """A random seed in [0, 2**32): -1 reached numpy/torch as a traceback, 2**64 as an overflow."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: an integer in [0, 2**32)") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed {value} is outside [0, 2**32)")
    return value
