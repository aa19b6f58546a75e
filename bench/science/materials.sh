#!/usr/bin/env bash
# A materials distillation study without DFT: crystalline Si, CHGNet (bundled weights) as the only source of
# labels, PaiNN students trained on CHGNet's energies and forces with and without its Hessian rows, at two
# training-set sizes, two seeds each. Results: bench/results/materials_si_chgnet_cpu.md.
#   frames (CHGNet MD, bench/science/si_chgnet.py) -> ingest --allow-missing-labels -> label --teacher chgnet
#   -> train (teacher-only: the student's energy/force targets are CHGNet's) -> evaluate on a held-out
#   trajectory -> phonons, lattice constant and bulk modulus vs CHGNet -> bench (ns/day, student vs CHGNet).
# Resumable: finished stages and runs are skipped (a stopped training run resumes from its last.pt).
# Knobs (environment):
#   WORK     work directory (default runs/si_chgnet)
#   TEACHER  the label source, a `hessforge label --teacher` spec (default chgnet); e.g. the Stillinger-Weber
#            control: TEACHER=lammps:bench/science/si_sw.lammps FRAMES=runs/si_chgnet WORK=runs/si_sw
#   FRAMES   a work directory whose frames.extxyz and split.json to reuse (default: make them with CHGNet MD)
#   EPOCHS   epochs of the runs on the full training set (default 30); training sets under 100 structures get
#            4x as many (fewer steps per epoch)
#   PLAN     runs, "SIZE:METHOD,METHOD[:SEED+SEED] ..." (270 = every training frame; seeds default to SEEDS).
#            Methods: ef (energies + forces), kd (+ Hessian rows, λ_KD 400), kdNNN (λ_KD NNN); options appended
#            with "-": "smooth", the PaiNN with model.norm_eps 1 (smooth at symmetric sites, engine/models/painn.py),
#            else 1e-8; "sNNN", the teacher's stress as a target with loss.stress NNN (e.g. kd25-smooth-s100)
#   SEEDS    (default "0 1");  REPORT  (default bench/results/materials_si_chgnet)
# Usage, from the repository root with the venv active:  bash bench/science/materials.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-runs/si_chgnet}
TEACHER=${TEACHER:-chgnet}
FRAMES=${FRAMES:-}
EPOCHS=${EPOCHS:-30}
PLAN=${PLAN:-25:ef,kd,ef-smooth,kd-smooth 270:ef,kd 270:ef-smooth,kd-smooth:0}
SEEDS=${SEEDS:-0 1}
REPORT=${REPORT:-bench/results/materials_si_chgnet}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$WORK" "$REPORT"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

if [ ! -e "$WORK/frames.extxyz" ] && [ -n "$FRAMES" ]; then
    stamp "frames and split from $FRAMES"; cp "$FRAMES/frames.extxyz" "$FRAMES/split.json" "$WORK/"; fi
[ -e "$WORK/frames.extxyz" ] || { stamp frames; python bench/science/si_chgnet.py frames "$WORK"; }
[ -e "$WORK/data.lmdb" ] || { stamp ingest;
    hessforge ingest "$WORK/frames.extxyz" -o "$WORK/data.lmdb" --group-key group --allow-missing-labels; }
stamp "label (2 ranks)"
hessforge label "$WORK/data.lmdb" --teacher "$TEACHER" --rows 4 -o "$WORK/labels" --rank 1 --world-size 2 \
    > "$WORK/label_rank1.log" 2>&1 &
hessforge label "$WORK/data.lmdb" --teacher "$TEACHER" --rows 4 -o "$WORK/labels" --rank 0 --world-size 2
wait $! || { echo "label rank 1 failed: see $WORK/label_rank1.log"; exit 1; }

# one config per (size, method, seed); the methods differ only in λ_KD. Cost (for the lanes): steps x (2 with KD)
runs=() costs=()
for entry in $PLAN; do
    IFS=: read -r limit methods seeds <<< "$entry"
    seeds=${seeds:-$SEEDS}
    for seed in ${seeds//+/ }; do for method in ${methods//,/ }; do
        name="${method}_n${limit}_seed${seed}"
        IFS=- read -r base options <<< "$method"
        norm_eps="" stress=""
        for option in ${options//-/ }; do
            case $option in
                smooth) norm_eps=", norm_eps: 1.0" ;;
                s[0-9]*) stress=", stress: ${option#s}.0" ;;
                *) echo "unknown option $option of method $method in PLAN"; exit 1 ;;
            esac
        done
        case $base in
            ef) hessian=0.0 ;; kd) hessian=400.0 ;; kd[0-9]*) hessian="${base#kd}.0" ;;
            *) echo "unknown method $method in PLAN"; exit 1 ;;
        esac
        epochs=$EPOCHS; [ "$limit" -lt 100 ] && epochs=$((4 * EPOCHS))
        runs+=("$name")
        costs+=($(( epochs * ((limit + 3) / 4) * (${hessian%.*} > 0 ? 2 : 1) )))
        [ -e "$WORK/$name.yaml" ] && continue
        cat > "$WORK/$name.yaml" <<YAML
# written by bench/science/materials.sh; teacher-only: no reference labels, the teacher's ($TEACHER) are the targets
data: {path: data.lmdb, labels: labels, split_file: split.json, train_limit: $limit}
model: {name: painn, hidden: 64, layers: 3, num_basis: 32, cutoff: 5.0, force_mode: gradient$norm_eps}
loss: {energy: 50.0, forces: 100.0, hessian: $hessian, hessian_rows: 1, kind: l2mae$stress}
train: {out: $WORK/$name, epochs: $epochs, batch_size: 4, seed: $seed, checkpoint_every: 5, threads: 1}
YAML
    done; done
done

# two lanes of training on the two cores: the unfinished runs, longest first, each to the less loaded lane
busy() { pgrep -f "hessforge train $WORK/$1.yaml" > /dev/null; }  # trained by another call right now
train_lane() {
    for name in "$@"; do
        [ -e "$WORK/$name/summary.json" ] && continue
        busy "$name" && { stamp "$name: being trained by another process"; continue; }
        stamp "train $name"  # resumes from $name/last.pt when a previous call was stopped
        hessforge train "$WORK/$name.yaml" > "$WORK/$name.log" 2>&1 || echo "train $name failed: see $WORK/$name.log"
    done
}
lane1=() lane2=() load1=0 load2=0
for k in $(for i in "${!runs[@]}"; do echo "${costs[$i]} $i"; done | sort -rn | cut -d' ' -f2); do
    [ -e "$WORK/${runs[$k]}/summary.json" ] && continue
    busy "${runs[$k]}" && continue
    if [ $load1 -le $load2 ]; then lane1+=("${runs[$k]}"); load1=$((load1 + costs[k]))
    else lane2+=("${runs[$k]}"); load2=$((load2 + costs[k])); fi
done
train_lane "${lane1[@]}" &
train_lane "${lane2[@]}"
wait
for name in "${runs[@]}"; do while busy "$name"; do sleep 30; done; done  # evaluate finished runs only

for name in "${runs[@]}"; do
    [ -e "$WORK/$name/best.pt" ] && [ ! -e "$WORK/$name/eval.json" ] && { stamp "evaluate $name";
        hessforge evaluate "$WORK/$name/best.pt" "$WORK/data.lmdb" --labels "$WORK/labels" \
            --split-file "$WORK/split.json" --json "$WORK/$name/eval.json" > "$WORK/$name/eval.txt"; }
done
stamp phonons
python bench/science/si_chgnet.py phonons "$WORK" "${runs[@]/#/$WORK/}" --teacher "$TEACHER" | tee -a "$WORK/phonons.txt"
[ -e "$WORK/bench.json" ] || [ "$TEACHER" != chgnet ] || { stamp bench;  # hessforge bench times CHGNet, not LAMMPS
    hessforge bench "$WORK/${runs[0]}/best.pt" "$WORK/data.lmdb" --compare chgnet --modes eager,compiled \
        --batch-size 64 --sweep --batch-sizes 1,4,16,64 --threads 1 --repeats 3 --json "$WORK/bench.json" \
        | tee "$WORK/bench.txt"; }

for f in "$WORK"/*_phonons.json "$WORK"/{phonons.txt,bench.json,bench.txt,split.json}; do
    if [ -e "$f" ]; then cp "$f" "$REPORT/"; fi; done
for name in "${runs[@]}"; do
    mkdir -p "$REPORT/$name"
    for f in summary.json eval.json eval.txt phonons.json; do
        [ -e "$WORK/$name/$f" ] && cp "$WORK/$name/$f" "$REPORT/$name/"
    done
    cp "$WORK/$name.yaml" "$REPORT/$name/config.yaml"
done
python bench/science/si_chgnet.py report "$REPORT"
stamp done
