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
#   TEACHER   the Hessian-row teacher, a `hessforge label --teacher` spec (default ani1x, at the labels' DFT
#             level); LABEL_FLAGS what else to store (default --features; "--features --embeddings" for a
#             teacher with element embeddings, such as so3lr, adds the a2a baseline)
#   ONLY      comma-separated sweep runs to train (default: every run of the sweep)
#   SEEDS     extra training seeds (e.g. "1 2") for the runs in SEED_RUNS (default undistilled,kd_s1,kd_lambda100):
#             RUN_seedN, the sweep config with train.seed N, trained, evaluated and (if in MD_RUNS) md-evaluated
#   The MD judge stays ANI-1x (the labels' level of theory) whatever the teacher.
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
TEACHER=${TEACHER:-ani1x}
LABEL_FLAGS=${LABEL_FLAGS:---features}
ONLY=${ONLY:-}
SEEDS=${SEEDS:-}
SEED_RUNS=${SEED_RUNS:-undistilled,kd_s1,kd_lambda100}
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

# 2. teacher labels: 4 sampled Hessian rows per structure (s <= 4), last-layer features (n2n), with ANI-1x
stamp "label ($TEACHER)"
hessforge label "$WORK/data.lmdb" --teacher "$TEACHER" --rows 4 $LABEL_FLAGS -o "$WORK/labels"

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
# the runs to train (ONLY, else all the sweep holds: a2a only with embeddings, kd_s4 only with >= 4 rows), in
# two lanes of about equal cost (kd_s4 costs ~3x kd_s1); lane 1 gets the listed ones, lane 2 the rest
RUNS=$(python - "$WORK/sweep/sweep.json" "$ONLY" <<'PY'
import json, sys
names = [r["name"] for r in json.load(open(sys.argv[1]))["runs"]]
only = [n for n in sys.argv[2].split(",") if n]
missing = sorted(set(only) - set(names))
if missing:
    sys.exit(f"ONLY: no run named {missing} in this sweep; runs: {', '.join(names)}")
print(" ".join(n for n in names if not only or n in only))
PY
)
lane1=() lane2=()
for r in $RUNS; do
    case $r in kd_s4|undistilled|force_distill|n2n|a2a) lane1+=("$r") ;; *) lane2+=("$r") ;; esac; done
join() { local IFS=,; echo "$*"; }
stamp "training (2 lanes; logs in $WORK/lane*.log)"
pid1=""
if [ ${#lane1[@]} -gt 0 ]; then
    hessforge sweep "$WORK/base.yaml" -o "$WORK/sweep" --run --only "$(join "${lane1[@]}")" > "$WORK/lane1.log" 2>&1 &
    pid1=$!
fi
if [ ${#lane2[@]} -gt 0 ]; then
    hessforge sweep "$WORK/base.yaml" -o "$WORK/sweep" --run --only "$(join "${lane2[@]}")" > "$WORK/lane2.log" 2>&1 \
        || echo "lane 2 had a failing run: see $WORK/lane2.log"
fi
[ -z "$pid1" ] || wait "$pid1" || echo "lane 1 had a failing run: see $WORK/lane1.log"

# 3b. extra seeds: RUN_seedN = the sweep's RUN config with train.seed N and its own out dir, two lanes
seeded=()
for seed in $SEEDS; do for r in ${SEED_RUNS//,/ }; do
    [ -e "$WORK/sweep/$r.yaml" ] || { echo "SEED_RUNS: no sweep config $WORK/sweep/$r.yaml"; exit 1; }
    name="${r}_seed${seed}"
    seeded+=("$name")
    [ -e "$WORK/sweep/$name.yaml" ] || python - "$WORK/sweep/$r.yaml" "$WORK/sweep/$name.yaml" "$seed" <<'PY'
import os, sys, yaml
src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = yaml.safe_load(open(src))
cfg["train"]["seed"] = seed
cfg["train"]["out"] = os.path.join(os.path.dirname(cfg["train"]["out"]), os.path.basename(dst)[:-5])
with open(dst, "w") as fh:
    fh.write(f"# {os.path.basename(src)} with train.seed {seed} (bench/science/run.sh SEEDS)\n")
    yaml.safe_dump(cfg, fh, sort_keys=False, allow_unicode=True)
PY
done; done
train_seeded() {  # every other seeded run, from $1 (0 or 1); a run with a summary.json is done
    local i=0
    for name in "${seeded[@]}"; do
        if [ $((i % 2)) -eq "$1" ] && [ ! -e "$WORK/sweep/$name/summary.json" ]; then
            stamp "train $name"
            hessforge train "$WORK/sweep/$name.yaml" > "$WORK/sweep/$name.log" 2>&1 \
                || echo "$name failed: see $WORK/sweep/$name.log"
        fi
        i=$((i + 1))
    done
}
if [ ${#seeded[@]} -gt 0 ]; then train_seeded 0 & pid1=$!; train_seeded 1; wait "$pid1"; fi
RUNS="$RUNS ${seeded[*]}"

# 4. accuracy on the test split (vs DFT, and vs the teacher's labels)
for r in $RUNS; do
    run="$WORK/sweep/$r"
    [ -e "$run/best.pt" ] && [ ! -e "$run/eval.json" ] && { stamp "evaluate $r";
        hessforge evaluate "$run/best.pt" "$WORK/data.lmdb" --labels "$WORK/labels" --json "$run/eval.json" > /dev/null; }
done

# 5. speed: every student has the same architecture, so one bench (student vs the teacher) is copied
#    into each run; ns/day does not depend on the weights
first=$(echo $RUNS | cut -d' ' -f1)
if [ ! -e "$WORK/bench.json" ]; then
    stamp bench
    hessforge bench "$WORK/sweep/$first/best.pt" "$WORK/data.lmdb" --compare "$TEACHER" --batch-size 64 --sweep \
        --batch-sizes 1,8,64,256 --threads 1 --repeats 3 --json "$WORK/bench.json" > "$WORK/bench.txt"
fi
for r in $RUNS; do [ -d "$WORK/sweep/$r" ] && cp "$WORK/bench.json" "$WORK/sweep/$r/bench.json"; done

# 6. MD stability, NVE drift, FIRE (judged by the ANI-1x ensemble), two lanes
[ "$MD_RUNS" = all ] && MD_RUNS=$(echo $RUNS | tr ' ' ',')
for name in "${seeded[@]}"; do  # a seeded run gets md-eval when its method does
    [[ ",$MD_RUNS," == *",${name%_seed*},"* ]] && MD_RUNS="$MD_RUNS,$name"; done
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
hessforge report "${dirs[@]}" --title "QM9 N+O 9-heavy-atom slice (CPU): Hessian KD from $TEACHER vs baselines, PaiNN students" \
    -o "$REPORT"
stamp done
