"""CHGNet at 1600 K through md-eval's nvt_stability, same frames and seeds as `hessforge md-eval --structures 4`.
Run from the repository root: PYTHONPATH=. python bench/results/materials_si_chgnet/md1600/chgnet_reference.py 0 1 2 3"""
import json, sys
sys.path.insert(0, "bench/science")
import torch; torch.set_num_threads(1)
from si_chgnet import chgnet_calculator
from training.data import Dataset
from training.md_eval import nvt_stability
ds = Dataset("runs/si_chgnet/data.lmdb")
test = json.load(open("runs/si_chgnet/split.json"))["splits"]["test"]
out = []
for k in map(int, sys.argv[1:]):
    r = nvt_stability(ds[test[k]].to_atoms(), chgnet_calculator(), steps=1000, temperature_K=1600, seed=1000 * k)
    out.append((k, r["time_to_failure_ps"], r["reason"], r["max_rdf_change"]))
    print(out[-1], flush=True)
