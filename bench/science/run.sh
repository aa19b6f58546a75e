#!/usr/bin/env bash
# The science benchmark of issue 5, end to end on the committed QM9 N+O slice (bench/data/qm9_no9):
#   ingest -> ANI-1x labels (k=4 Hessian rows + n2n features) -> baseline sweep (trained in 2 lanes) ->
#   evaluate (test split vs DFT and vs the teacher) -> md-eval (NVT, NVE, FIRE) -> bench (ns/day) -> report.
# Every stage is resumable: rerun the same command and finished work is reused (labels are resumed, runs with
# a summary.json are skipped, metric files that exist are kept). Knobs (environment):
#   WORK      work directory (default runs/qm9_no9; runs/ is gitignored)
#   EPOCHS    epochs of every student (default 180: equal epochs for all methods, not equal time)
#   MD_RUNS   runs that get md-eval (default: the main methods; "all" for every run)
#   MD_N      md-eval structures (default 8: two per test molecule); MD_STEPS NVT and NVE steps (1000)
#   DATA      the benchmark folder (default bench/data/qm9_no9)
#   REPORT    report directory (default bench/results/qm9_no9_report)
# Usage, from the repository root with the venv active:  bash bench/science/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-bench/data/qm9_no9}
WORK=${WORK:-runs/qm9_no9}
EPOCHS=${EPOCHS:-180}
MD_N=${MD_N:-8}
MD_STEPS=${MD_STEPS:-1000}
MD_RUNS=${MD_RUNS:-undistilled,force_distill,n2n,kd_s1,kd_s4}
REPORT=${REPORT:-bench/results/qm9_no9_report}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # two single-threaded lanes beat one two-threaded on 2 cores
mkdir -p "$WORK"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

# 1. data: the split of the builder, and the labelled frames in the same order
hessforge build-benchmark --out "$DATA" --report-only > /dev/null
cp "$DATA/split.json" "$WORK/split.json"
if [ ! -e "$WORK/data.lmdb" ]; then
    stamp ingest
    hessforge ingest "$DATA/labels.extxyz" -o "$WORK/data.lmdb"
fi

# 2. teacher labels: ANI-1x ensemble, 4 sampled Hessian rows per structure (s <= 4), last-layer features (n2n)
stamp label
hessforge label "$WORK/data.lmdb" --teacher ani1x --rows 4 --features -o "$WORK/labels"

# 3. the sweep: configs from one base, trained in two lanes of about equal cost (kd_s4 costs ~3x kd_s1)
python - "$WORK/base.yaml" "$EPOCHS" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("bench/science/base.yaml"))
cfg["train"]["epochs"] = int(sys.argv[2])
with open(sys.argv[1], "w") as fh:
    fh.write("# written by bench/science/run.sh from bench/science/base.yaml\n")
    yaml.safe_dump(cfg, fh, sort_keys=False, allow_unicode=True)
PY
hessforge sweep "$WORK/base.yaml" -o "$WORK/sweep"
stamp "training (2 lanes; logs in $WORK/lane*.log)"
hessforge sweep "$WORK/base.yaml" -o "$WORK/sweep" --run --only kd_s4,undistilled,force_distill,n2n \
    > "$WORK/lane1.log" 2>&1 &
lane1=$!
hessforge sweep "$WORK/base.yaml" -o "$WORK/sweep" --run --only kd_s1,kd_s1_nohalve,kd_lambda10,kd_lambda100,kd_lambda1000 \
    > "$WORK/lane2.log" 2>&1 || echo "lane 2 had a failing run: see $WORK/lane2.log"
wait $lane1 || echo "lane 1 had a failing run: see $WORK/lane1.log"
RUNS=$(python -c "import json,sys; print(' '.join(r['name'] for r in json.load(open(sys.argv[1]))['runs']))" \
       "$WORK/sweep/sweep.json")

# 4. accuracy on the test split (vs DFT, and vs the teacher's labels)
for r in $RUNS; do
    run="$WORK/sweep/$r"
    [ -e "$run/best.pt" ] && [ ! -e "$run/eval.json" ] && { stamp "evaluate $r";
        hessforge evaluate "$run/best.pt" "$WORK/data.lmdb" --labels "$WORK/labels" --json "$run/eval.json" > /dev/null; }
done

# 5. speed: every student has the same architecture, so one bench (student vs the ANI-1x ensemble) is copied
#    into each run; ns/day does not depend on the weights
first=$(echo $RUNS | cut -d' ' -f1)
if [ ! -e "$WORK/bench.json" ]; then
    stamp bench
    hessforge bench "$WORK/sweep/$first/best.pt" "$WORK/data.lmdb" --compare ani1x --batch-size 64 --sweep \
        --batch-sizes 1,8,64,256 --threads 1 --repeats 3 --json "$WORK/bench.json" > "$WORK/bench.txt"
fi
for r in $RUNS; do [ -d "$WORK/sweep/$r" ] && cp "$WORK/bench.json" "$WORK/sweep/$r/bench.json"; done

# 6. MD stability, NVE drift, FIRE (judged by the ANI-1x ensemble), two lanes
[ "$MD_RUNS" = all ] && MD_RUNS=$(echo $RUNS | tr ' ' ',')
md_one() {
    local run="$WORK/sweep/$1"
    [ -e "$run/best.pt" ] && [ ! -e "$run/md.json" ] || return 0
    stamp "md-eval $1"
    hessforge md-eval "$run" "$WORK/data.lmdb" --structures "$MD_N" --steps "$MD_STEPS" --nve-steps "$MD_STEPS" \
        --reference ani1x --threads 1 > "$run/md.log" 2>&1 || echo "md-eval $1 failed: see $run/md.log"
}
i=0
for r in $(echo "$MD_RUNS" | tr ',' ' '); do
    md_one "$r" &
    i=$((i + 1)); [ $((i % 2)) -eq 0 ] && wait
done
wait

# 7. the report: run directories' metric files and configs are copied beside it (runs/ is not committed)
mkdir -p "$REPORT/run_dirs"
dirs=()
for r in $RUNS; do
    run="$WORK/sweep/$r"
    [ -e "$run/eval.json" ] || continue
    mkdir -p "$REPORT/run_dirs/$r"
    for f in config.yaml summary.json eval.json bench.json md.json; do
        [ -e "$run/$f" ] && cp "$run/$f" "$REPORT/run_dirs/$r/"
    done
    grep '"kind": "epoch"' "$run/log.jsonl" > "$REPORT/run_dirs/$r/epochs.jsonl"   # the per-epoch records
    dirs+=("$REPORT/run_dirs/$r")
done
cp "$WORK/sweep/sweep.json" "$WORK/bench.txt" "$REPORT/" 2>/dev/null || true
stamp report
hessforge report "${dirs[@]}" --title "QM9 N+O 9-heavy-atom slice (CPU): Hessian KD vs baselines, PaiNN students" \
    -o "$REPORT"
stamp done
