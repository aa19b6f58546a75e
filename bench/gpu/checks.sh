#!/usr/bin/env bash
# The GPU checks of issue 3 in one device call (~8 min: step limits 260 + 90 + 50 + 40 s = 440 s after ~20 s
# of setup; the torch-cluster build runs beside the untimed tests, not beside the timings); run it through the
# device tool as
#     run(command="bash bench/gpu/checks.sh", carry=[".whl"], timeout_s=500)
# after `bash bench/gpu/fetch_wheels.sh` here. That leaves ~4 of a session's 15 device minutes (after a 2-3 min
# machine start) to rerun a step that failed on the still-warm machine: `bash bench/gpu/checks.sh STEP...`
# runs only the named steps (students, tests, neighbors, profile). The device returns at most 8 files from $OUT, so everything is
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
# Order: the student/teacher timings (the targets) alone on the machine, the compiled-kernel tests (torch-cluster
# builds beside them, at most 90 s), the neighbor-list timings, the profile; every step has its own time limit,
# so one slow step cannot take the others' results with it (worst case 20 + 260 + 90 + 50 + 40 = 460 s).
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
pack() { local part="$OUT/.results.$BASHPID.part"  # per process: the background packer and a step may overlap
         tar czf "$part" -C "$WORK" . 2>/dev/null
         if [ $? -le 1 ]; then mv "$part" "$OUT/results.tar.gz"; else rm -f "$part"; fi  # 1: a log grew meanwhile
         for f in students_gpu.md neighbors_gpu.md; do [ -s "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"; done; }
# every 15 s: a call stopped at its limit (the tool kills the whole command) still returns the logs so far
( while true; do sleep 15 & wait $!; pack; done ) > /dev/null 2>&1 &
PACKER=$!
trap 'kill $PACKER 2>/dev/null; wait $PACKER 2>/dev/null; pack; rm -f "$OUT"/.results.*.part' EXIT
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; local t0=$SECONDS
         timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; local rc=$?
         echo "   rc=$rc, $((SECONDS - t0)) s"; tail -n 4 "$WORK/$name.log"; pack; }
STEPS=" ${*:-students tests neighbors profile} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
TC_PID=
build_torch_cluster() {  # in the background; neighbors waits for it
    if [ -z "$TC_PID" ] && ls .whl/torch_cluster-*.tar.gz > /dev/null 2>&1; then
        MAX_JOBS=4 timeout 90 python3 bench/torch_cluster_peer.py build > "$WORK/torch_cluster_build.log" 2>&1 &
        TC_PID=$!
    fi; }
# 1. the targets, first and alone on the machine (nothing compiling beside the timings)
if want students; then
    # TORCH_LOGS: why a graph recompiled or was left without CUDA graphs (the report also flags skipped graphs)
    TORCH_LOGS=recompiles,cudagraphs HESSFORGE_BENCH_LOG="$WORK/students_gpu.jsonl" step students 260 \
        python3 -m pytest bench/bench_students.py -q -s -p no:cacheprovider \
        --benchmark-columns=min,median,mean,rounds --benchmark-json="$WORK/students_gpu.json"
    if [ -s "$WORK/students_gpu.json" ]; then
        python3 bench/bench_students.py report "$WORK/students_gpu.json" > "$WORK/students_gpu.md"
    elif [ -s "$WORK/students_gpu.jsonl" ]; then  # stopped early: what was measured
        python3 bench/bench_students.py report "$WORK/students_gpu.jsonl" > "$WORK/students_gpu.md"
    fi
    grep -m 5 -i "skipping cudagraphs\|recompil" "$WORK/students.log"
fi
# 2. the compiled-kernel tests (correctness, not timed), while torch-cluster's radius operator builds beside them
want neighbors && build_torch_cluster
want tests && step tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_compile.py tests/test_md.py -k "not test_md or fused"
if [ -n "$TC_PID" ]; then wait "$TC_PID"; echo "== torch-cluster build rc=$?"; tail -n 3 "$WORK/torch_cluster_build.log"; fi
# 3. the neighbor-list target (Triton vs torch-cluster radius_graph)
if want neighbors; then
    step neighbors 50 python3 -m pytest bench/bench_neighbors.py -q -p no:cacheprovider \
        --benchmark-columns=min,median,mean,rounds --benchmark-json="$WORK/neighbors_gpu.json"
    [ -s "$WORK/neighbors_gpu.json" ] && python3 bench/bench_neighbors.py "$WORK/neighbors_gpu.json" > "$WORK/neighbors_gpu.md"
    pack
fi
# 4. wall time vs device-busy time and kernels per step at batch 64 (eager, teacher, compiled+triton,
# cudagraphs): the measurement behind any missed target
if want profile; then
    step profile 40 python3 bench/bench_students.py profile 64 eager,teacher,compiled+triton,cudagraphs
    grep "^## " "$WORK/profile.log"
fi
echo "== summary"
for f in students_gpu.md neighbors_gpu.md; do [ -s "$WORK/$f" ] && { echo "-- $f"; tail -n 25 "$WORK/$f"; }; done
exit 0  # the steps report their own status above; the EXIT trap packs the results
