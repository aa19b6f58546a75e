#!/usr/bin/env bash
# Run HERE (not on the device), once per checkout, before `bench/gpu/checks.sh` on a lent GPU machine:
# downloads the pure-Python packages the device image lacks (ase, mace-torch with the e3nn it pins, torch-ema)
# into .whl/, ignored by git, to travel with the device call (`carry: [".whl"]`). The device image has
# torch, triton, numpy, scipy, pytest, pytest-benchmark, matplotlib, pandas, torchmetrics, opt-einsum-fx.
# Also torch-cluster's sdist (54 kB), whose radius operator checks.sh builds there (bench/torch_cluster_peer.py):
# PyG's wheels are on its own index, which the device cannot reach.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "ase==3.29.0" "mace-torch==0.3.16" "e3nn==0.4.4" "torch-ema==0.3" "lmdb==1.7.3"
# pip reads an sdist's metadata by running its setup.py, which imports torch: use the project's venv
.venv/bin/python -c "import torch" 2>/dev/null || { echo "run 'make install' first (pip needs torch to read torch-cluster's sdist)"; exit 1; }
.venv/bin/python -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl "torch-cluster==1.6.3"
ls -la .whl
du -sh .whl
