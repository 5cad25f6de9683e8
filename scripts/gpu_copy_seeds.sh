#!/usr/bin/env bash
# GPU run for issue 3: how many seeds solve copy at T = 1000 by steps, for the candidate small preset
# (windows (32, 32), no summary age embeddings, novelty memory 0.99, Adam 3e-3) and for the plain
# `hnae train` defaults. All runs share one GPU at once; each stops when T = 1000 is solved or after
# STEPS optimizer steps. Steps, not seconds, are what carries over to the 2-core CPU: see
# scripts/project_cpu_seconds.py, which turns each run's steps per rung into CPU seconds.
#
#   OUT=runs/gpu-seeds SWEEP_SECONDS=250 bash scripts/gpu_copy_seeds.sh
#
# Installs nothing from the network (safetensors/tqdm from build/wheels where missing).
set -u
source "$(dirname "$0")/gpu_common.sh"
OUT_DIR="${OUT:-runs/gpu-seeds}"
SWEEP="${SWEEP_SECONDS:-250}"
STEPS="${STEPS:-3500}"
CANDIDATE_SEEDS="${CANDIDATE_SEEDS:-0 1 2 3 4 5 6 7}"
PLAIN_SEEDS="${PLAIN_SEEDS:-0 1 2 3}"
mkdir -p "$OUT_DIR"
install_train_wheels
write_machine_info "$OUT_DIR/machine.txt"
common=(--task copy --seq-len 1000 --model hnae --curriculum --device "${DEVICE:-cuda}" --steps "$STEPS"
        --stop-when-solved --no-progress --checkpoint-every 1000000)
for seed in $CANDIDATE_SEEDS; do
    FIRST=32 WIN=32 AGE=zero OMP_NUM_THREADS=1 timeout "$SWEEP" "$PYTHON" scripts/copy_variant.py "${common[@]}" \
        --write-policy novelty --threshold 0.99 --lr 3e-3 --seed "$seed" \
        --out "$OUT_DIR/candidate_s$seed" > "$OUT_DIR/candidate_s$seed.log" 2>&1 &
done
for seed in $PLAIN_SEEDS; do
    OMP_NUM_THREADS=1 timeout "$SWEEP" "$PYTHON" -m hnae train "${common[@]}" --seed "$seed" \
        --out "$OUT_DIR/plain_s$seed" > "$OUT_DIR/plain_s$seed.log" 2>&1 &
done
wait
rm -rf "$OUT_DIR"/*/ckpt-*  # keep metrics, not weights
tail -n 2 "$OUT_DIR"/*.log
