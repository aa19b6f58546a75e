"""Cost of the stress term per training step: compute_loss + backward on 4 Si frames (64 atoms) of the study,
PaiNN 64x3 (the study's student), with loss.stress 0 vs 100, interleaved (A B A B ...) so both see the same load.
Usage: python bench/science/stress_step_cost.py WORK   (a materials.sh work folder: data.lmdb, labels/)"""
import os
import sys
import time

import numpy as np
import torch

from engine.models import build_student
from training.data.batch import collate
from training.data.store import Dataset
from training.labels import LabelStore
from training.losses import LossWeights, compute_loss


def main(work: str, repeats: int = 12) -> None:
    torch.set_num_threads(1)
    dataset, labels = Dataset(os.path.join(work, "data.lmdb")), LabelStore(os.path.join(work, "labels"))
    structures = [dataset[i] for i in range(4)]
    batch = collate(structures, [labels.get(s.id) for s in structures], 5.0, torch.float32, 1,
                    torch.Generator().manual_seed(0), teacher_fills_missing=True)
    model = build_student("painn", species=[14], cutoff=5.0, hidden=64, layers=3, num_basis=32,
                          force_mode="gradient", norm_eps=1.0)
    for kd in (0.0, 25.0):
        times = {0.0: [], 100.0: []}
        for _ in range(repeats):
            for stress in times:
                weights = LossWeights(energy=50, forces=100, hessian=kd, stress=stress)
                start = time.perf_counter()
                compute_loss(model, batch, weights)["total"].backward()
                times[stress].append(time.perf_counter() - start)
        without, with_stress = (np.median(t[2:]) for t in times.values())  # the first two: warm-up
        print(f"λ_KD {kd}: step without stress {1000 * without:.1f} ms, with {1000 * with_stress:.1f} ms "
              f"({100 * (with_stress / without - 1):+.1f} %)")


if __name__ == "__main__":
    main(sys.argv[1])
