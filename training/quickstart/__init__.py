"""A small committed dataset for a first run: ANI-1x MD conformers of 6 HCNO molecules with ωB97x/6-31G(d)
energies and forces (see data/PROVENANCE.md; rebuilt by `python -m training.quickstart.make_dataset`)."""
from __future__ import annotations

import os

QUICKSTART_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quickstart.extxyz")


def read_quickstart(path: str = QUICKSTART_PATH) -> list:
    """All frames as ase.Atoms with energy (eV) and forces (eV/Å) on a SinglePointCalculator; info holds
    `mol_id` (group key for splits), `conf_id` and `md_step`."""
    from ase.io import read

    return read(path, index=":", format="extxyz")


__all__ = ["QUICKSTART_PATH", "read_quickstart"]
