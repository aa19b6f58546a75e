#!/usr/bin/env bash
# The GPU checks of issue 3 in one device call (~9 min: step limits 300 + 80 + 150 s, then a profile that the
# call's limit may cut short; the torch-cluster build in the background during the first); run it through the
# device tool as
#     run(command="bash bench/gpu/checks.sh", carry=[".whl"], timeout_s=570)
# after `bash bench/gpu/fetch_wheels.sh` here. The device returns at most 8 files from $OUT, so everything is
# written to a work folder and packed into $OUT/results.tar.gz after every step (a call stopped at its limit
# still returns what was measured); beside it in $OUT: gpu.txt, summary.txt (this script's output) and the two
# markdown reports. Unpack with `tar xzf results.tar.gz` and copy to bench/results/ with the device named:
#   gpu.txt            device, driver, torch/triton versions
#   students_gpu.*     bench/bench_students.py: eager / compiled / compiled+triton / cudagraphs PaiNN and the
#                      MACE-OFF23-L architecture, batch 16, 64 and each one's best batch; students_gpu.jsonl
#                      gets each case as soon as it is measured (bench_students.py report reads it too)
#   torch_cluster_build.log  torch-cluster's radius operator built from the carried sdist, the peer of the
#                      >= 3x target
#   neighbors_gpu.*    bench/bench_neighbors.py (Triton vs torch path vs reference vs torch-cluster radius_graph)
#   tests.log          tests/test_triton_kernels.py + tests/test_compile.py with the Triton kernels compiled
#                      for real (no interpreter) vs the torch reference, on cuda; and the barostat driven by
#                      fused students (the kernel's cell gradient) against the eager student, on cuda
#   profile.log        bench_students.py profile: per mode, wall ms per step vs device-busy ms and kernels run
#                      (launch-bound or compute-bound), and the top operators
# Measurements first (the targets), the compiled-kernel tests last; every step has its own time limit, so one
# slow step cannot take the others' results with it.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/hessforge_gpu_out}
WORK=/tmp/hessforge_gpu_work
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/summary.txt") 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export HESSFORGE_BENCH_DEVICE=cuda
export TRITON_PRINT_AUTOTUNING=1  # the tuned launch configurations (count, fill, backward kernels), in each step's log
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc; date -u; git log -1 --format='commit %H' 2>/dev/null; } > "$WORK/gpu.txt" 2>&1
cp "$WORK/gpu.txt" "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
pack() { tar czf "$OUT/results.tar.gz.part" -C "$WORK" . && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
         for f in students_gpu.md neighbors_gpu.md; do [ -s "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"; done; }
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; local t0=$SECONDS
         timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; local rc=$?
         echo "   rc=$rc, $((SECONDS - t0)) s"; tail -n 4 "$WORK/$name.log"; pack; }
TC_PID=
if ls .whl/torch_cluster-*.tar.gz > /dev/null 2>&1; then
    MAX_JOBS=6 timeout 240 python3 bench/torch_cluster_peer.py build > "$WORK/torch_cluster_build.log" 2>&1 &
    TC_PID=$!
fi
# TORCH_LOGS: why a graph recompiled or was left without CUDA graphs (the report also flags skipped graphs)
TORCH_LOGS=recompiles,cudagraphs HESSFORGE_BENCH_LOG="$WORK/students_gpu.jsonl" step students 300 python3 -m pytest bench/bench_students.py -q -s \
    -p no:cacheprovider --benchmark-columns=min,median,mean,rounds --benchmark-json="$WORK/students_gpu.json"
if [ -s "$WORK/students_gpu.json" ]; then
    python3 bench/bench_students.py report "$WORK/students_gpu.json" > "$WORK/students_gpu.md"
elif [ -s "$WORK/students_gpu.jsonl" ]; then  # stopped early: what was measured
    python3 bench/bench_students.py report "$WORK/students_gpu.jsonl" > "$WORK/students_gpu.md"
fi
grep -m 5 -i "skipping cudagraphs\|recompil" "$WORK/students.log"
if [ -n "$TC_PID" ]; then wait "$TC_PID"; echo "== torch-cluster build rc=$?"; tail -n 3 "$WORK/torch_cluster_build.log"; fi
step neighbors 80 python3 -m pytest bench/bench_neighbors.py -q -p no:cacheprovider \
    --benchmark-columns=min,median,mean,rounds --benchmark-json="$WORK/neighbors_gpu.json"
[ -s "$WORK/neighbors_gpu.json" ] && python3 bench/bench_neighbors.py "$WORK/neighbors_gpu.json" > "$WORK/neighbors_gpu.md"
pack
step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_compile.py \
    tests/test_md.py -k "not test_md or fused"
# last, and cut short if the call runs out of time: wall time vs device-busy time and kernels per step at batch
# 64 (eager, teacher, compiled+triton, cudagraphs): the measurement behind any missed target
step profile 90 python3 bench/bench_students.py profile 64 eager,teacher,compiled+triton,cudagraphs
grep "^## " "$WORK/profile.log"
echo "== summary"
for f in students_gpu.md neighbors_gpu.md; do [ -s "$WORK/$f" ] && { echo "-- $f"; tail -n 25 "$WORK/$f"; }; done
pack
