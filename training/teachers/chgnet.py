"""CHGNet (Deng et al., Nat. Mach. Intell. 2023) as a teacher for crystals: pretrained on MPtrj, weights
bundled in the `chgnet` wheel (0.3.0 by default; "0.2.0" and "r2scan" also ship), so it works offline.

CHGNet runs in float32 and builds its graphs from pymatgen structures, so Hessian rows are central
differences of its forces (training.teachers.finite_difference) with a 0.01 Å step. Measured on rattled
diamond Si (8 atoms): the slope dF/dx of CHGNet's own forces oscillates by about ±15 % with a period of
about 0.01 Å, so rows at a 1e-3 Å step differ from rows at 1e-2 Å by up to 1.2 eV/Å² (on entries up to
9.8 eV/Å²); the 0.01 Å step gives that wiggle's average over ±0.01 Å, not its value at one point.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Optional, Sequence

import numpy as np

from engine.errors import HessforgeError
from training.teachers.base import TeacherOutput, check_periodic_cell
from training.teachers.finite_difference import FiniteDifferenceTeacher

CHGNET_MODELS = ("0.3.0", "0.2.0", "r2scan")
CHGNET_ELEMENTS = frozenset(range(1, 95))  # its element embedding: H..Pu
CHGNET_FD_STEP = 1e-2  # Å


def _import_chgnet():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from chgnet.model import CHGNet
            from chgnet.model.dynamics import CHGNetCalculator
    except ModuleNotFoundError:
        raise HessforgeError("teacher 'chgnet' needs the chgnet package: pip install 'hessforge[chgnet]'") from None
    return CHGNet, CHGNetCalculator


class CHGNetTeacher(FiniteDifferenceTeacher):
    failure = "CHGNet failed"
    takes_charge = False  # neutral only

    def __init__(self, model_name: Optional[str] = None, h: float = CHGNET_FD_STEP):
        model_name = model_name or "0.3.0"
        if model_name not in CHGNET_MODELS:
            raise HessforgeError(f"teacher 'chgnet:{model_name}': unknown CHGNet model; bundled: "
                                 f"{', '.join(CHGNET_MODELS)}")
        CHGNet, CHGNetCalculator = _import_chgnet()
        with contextlib.redirect_stdout(io.StringIO()):  # its banners ("CHGNet will run on cpu") are not ours
            self.model = CHGNet.load(model_name=model_name, use_device="cpu", verbose=False)
            # on_isolated_atoms="error": an atom with no neighbour within its 6 Å atom graph gets no forces
            calc = CHGNetCalculator(model=self.model, use_device="cpu", on_isolated_atoms="error")
        self.model = self.model.float().eval()  # float32 like its inputs, whatever torch's default dtype is
        super().__init__(calc, h=h, name="chgnet" if model_name == "0.3.0" else f"chgnet:{model_name}",
                         elements=CHGNET_ELEMENTS)
        self.model_name = model_name

    def check_periodic(self, atoms):
        if not np.all(atoms.get_pbc()):
            raise HessforgeError(f"teacher {self.name}: CHGNet is a crystal model and needs a periodic cell in "
                                 f"all 3 directions (pbc is {atoms.get_pbc().tolist()}); for molecules use "
                                 "ani1x, so3lr or a MACE-OFF file")
        return check_periodic_cell(atoms, f"teacher {self.name}")

    def _forces_energy(self, atoms, positions, with_stress: bool = False):
        # its isolated-atom check and pymatgen's structure checks come back as "teacher chgnet: CHGNet failed: ..."
        with warnings.catch_warnings():  # CHGNet warns about tensor-to-scalar conversions on every call
            warnings.simplefilter("ignore", UserWarning)
            return super()._forces_energy(atoms, positions, with_stress)

    def compute(self, atoms, rows: Optional[Sequence[int]] = None) -> TeacherOutput:
        return super().compute(self.check_periodic(atoms), rows)

    # ------------------------------------------------------------------ feature-distillation baselines
    def atomic_features(self, atoms) -> np.ndarray:
        """CHGNet's per-atom features before its last convolution (`return_atom_feas`), [N, 64] float64."""
        from pymatgen.io.ase import AseAtomsAdaptor

        self.check_elements(atoms.numbers, f"teacher {self.name}")
        atoms = self.check_periodic(atoms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pred = self.model.predict_structure(AseAtomsAdaptor.get_structure(atoms), task="e",
                                                return_atom_feas=True)
        return np.asarray(pred["atom_fea"], dtype=np.float64)

    def element_embeddings(self):
        """{Z: [D]}: CHGNet's learned element embedding (row Z-1 of its nn.Embedding)."""
        weight = self.model.atom_embedding.embedding.weight.detach()
        return {z: weight[z - 1].cpu().numpy().astype(np.float64) for z in sorted(self.elements)}
