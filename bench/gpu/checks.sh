#!/usr/bin/env bash
# The GPU checks of issue 3 in one device call (at most ~9 min: step limits 180 + 100 + 240 s); run it
# through the device tool as
#     run(command="bash bench/gpu/checks.sh", carry=[".whl"], timeout_s=540)
# after `bash bench/gpu/fetch_wheels.sh` here. Writes under $OUT (copy to bench/results/ afterwards):
#   gpu.txt            device, driver, torch/triton versions
#   tests.txt          tests/test_triton_kernels.py + tests/test_compile.py with the Triton kernels compiled
#                      for real (no interpreter) vs the torch reference, on cuda
#   torch_cluster_build.log  torch-cluster's radius operator built from the carried sdist (in the background,
#                      while the tests run), the peer of the >= 3x target
#   neighbors_gpu.*    bench/bench_neighbors.py (Triton vs torch path vs reference vs torch-cluster radius_graph)
#   students_gpu.*     bench/bench_students.py (eager / compiled / compiled+fused / compiled+triton PaiNN,
#                      MACE-OFF23-L architecture, batch 16, 64 and each one's best batch)
# Every step has its own time limit, so one slow step cannot take the others' results with it.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/hessforge_gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
unset TRITON_INTERPRET
export HESSFORGE_BENCH_DEVICE=cuda
export TRITON_PRINT_AUTOTUNING=1  # the tuned launch configurations (count, fill, backward kernels), in each step's log
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc; date -u; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; local t0=$SECONDS
         timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
         echo "   rc=$rc, $((SECONDS - t0)) s"; tail -n 4 "$OUT/$name.log"; }
TC_PID=
if ls .whl/torch_cluster-*.tar.gz > /dev/null 2>&1; then
    MAX_JOBS=8 timeout 240 python3 bench/torch_cluster_peer.py build > "$OUT/torch_cluster_build.log" 2>&1 &
    TC_PID=$!
fi
step tests 180 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_compile.py
cp "$OUT/tests.log" "$OUT/tests.txt"
if [ -n "$TC_PID" ]; then wait "$TC_PID"; echo "== torch-cluster build rc=$?"; tail -n 3 "$OUT/torch_cluster_build.log"; fi
step neighbors 100 python3 -m pytest bench/bench_neighbors.py -q -p no:cacheprovider \
    --benchmark-columns=min,median,mean,rounds --benchmark-json="$OUT/neighbors_gpu.json"
[ -s "$OUT/neighbors_gpu.json" ] && python3 bench/bench_neighbors.py "$OUT/neighbors_gpu.json" > "$OUT/neighbors_gpu.md"
step students 240 python3 -m pytest bench/bench_students.py -q -s -p no:cacheprovider \
    --benchmark-columns=min,median,mean,rounds --benchmark-json="$OUT/students_gpu.json"
[ -s "$OUT/students_gpu.json" ] && python3 bench/bench_students.py report "$OUT/students_gpu.json" > "$OUT/students_gpu.md"
echo "== summary"
for f in neighbors_gpu.md students_gpu.md; do [ -s "$OUT/$f" ] && { echo "-- $f"; tail -n 25 "$OUT/$f"; }; done
