#!/usr/bin/env bash
# The real-data protocol on a lent GPU machine (valve-model realdata train --device cuda), from a copy
# written by `valve-model realdata pack` (the raw datasets are larger than what travels to it).
#
#   [RECIPES="gap:mask,image mix:mask"] tools/gpu_realdata.sh DATASET DATA_ROOT RUNS_ROOT OUT BUDGET_S
#
# Runs, at once, for DATASET and each RECIPES entry <head>:<labels> (default: "gap", the compact IRA-CNN
# at width 0.25 with a GAP head, with mask and image labels; "mix", width 0.25 with the alpha-mixed
# GMP/GAP head, with mask labels), 3 seeds each; each recipe in RUNS_ROOT/<head>. Training + evaluation stop at BUDGET_S (what finished is kept;
# a re-run resumes). Writes OUT/<DATASET>-runs.tar.gz (metrics, configs, logs, weights; no tiles) and
# OUT/<DATASET>-log.txt. CPU smoke run: DEVICE=cpu EPOCHS=1 EPOCH_SIZE=32 tools/gpu_realdata.sh ...
#
# ABLATION=1: instead, the attention ablation (valve-model realdata ablation) in RUNS_ROOT/ablation, one process
# per attention variant, 3 seeds each, by the protocol's own recipe for DATASET unless EPOCHS / EPOCH_SIZE / WIDTH /
# HEAD / BATCH are set (width and head default to the CPU ablation's: the compact preset, GAP head); the runs come
# back in the same tarball, and `valve-model realdata ablation --no-train --runs <unpacked>` writes the section here.
set -u
dataset=$1 data=$2 runs=$3 out=$4 budget=$5
device=${DEVICE:-cuda} epochs=${EPOCHS:-30} epoch_size=${EPOCH_SIZE:-1024} py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out" "$runs"
log="$out/$dataset-log.txt"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  common=(--datasets "$dataset" --data-root "$data" --device "$device" --epochs "$epochs" --epoch-size "$epoch_size"
          --batch-size 32 --width 0.25 --threads 1 --seeds 0,1,2)
  t0=$(date +%s)
  if [ -n "${ABLATION:-}" ]; then
    abl=(--datasets "$dataset" --data-root "$data" --device "$device" --threads 1 --seeds 0,1,2 --runs "$runs/ablation")
    [ -n "${EPOCHS:-}" ] && abl+=(--epochs "$epochs")
    [ -n "${EPOCH_SIZE:-}" ] && abl+=(--epoch-size "$epoch_size")
    [ -n "${WIDTH:-}" ] && abl+=(--width "$WIDTH")
    [ -n "${HEAD:-}" ] && abl+=(--head-pool "$HEAD")
    [ -n "${BATCH:-}" ] && abl+=(--batch-size "$BATCH")
    $py -m models.cli realdata tiles --datasets "$dataset" --labels mask --data-root "$data" --runs "$runs/ablation"
    for att in none iam-no-spatial cbam iam; do
      timeout -k 15 "$budget" $py -m models.cli realdata ablation "${abl[@]}" --attentions "$att" \
          --summary "$out/ablation-$att.json" --doc "$out/ablation-$att.md" &
    done
    wait
    echo "ablation trainings + evaluations: $(( $(date +%s) - t0 )) s"
    for f in "$runs"/ablation/*/"$dataset"-*/seed*.log; do echo "== $f"; tail -n 3 "$f"; done
    nvidia-smi --query-gpu=memory.used --format=csv 2>&1 | tail -1
  else
  for recipe in ${RECIPES:-gap:mask,image mix:mask}; do
    head=${recipe%%:*} labels=${recipe#*:}
    n=$(( 3 * $(tr ',' '\n' <<< "$labels" | wc -l) ))
    timeout -k 15 "$budget" $py -m models.cli realdata train "${common[@]}" --runs "$runs/$head" --labels "$labels" \
        --jobs "$n" --head-pool "$head" &
  done
  wait
  echo "trainings + evaluations: $(( $(date +%s) - t0 )) s"
  for f in "$runs"/*/"$dataset"-*/seed*.log; do echo "== $f"; tail -n 4 "$f"; done
  nvidia-smi --query-gpu=memory.used --format=csv 2>&1 | tail -1
  fi
} > "$log" 2>&1
tar czf "$out/$dataset-runs.tar.gz" --exclude='./*/tiles' --exclude='train_state.pt' --exclude='last.safetensors' --exclude='ema.safetensors' \
    -C "$runs" . 2>>"$log"
tail -n 40 "$log"
