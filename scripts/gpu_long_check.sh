#!/usr/bin/env bash
# GPU run for issue 3's full-profile targets: several `hnae train` runs side by side on one GPU
# (small models leave a large GPU mostly idle, so they share it). The small preset (selecting
# summaries) unless a run says otherwise; --lr-plateau halves the rate once the last rung stops improving:
#   copy1000       copy T=1000 for the loss target (TCN paper: 3.5e-5); then evaluated at 1,100, 1,500
#                  and 10,000 without retraining (length generalisation)
#   copy1000relative the same with positions="relative", a short convolution (16) and a novelty memory
#                  (a copy that does not depend on the length; evaluated at 100,000 too)
#   copy10000      copy climbing the ladder to T=10,000
#   copy10000jitter the same with lengths jittered over a block
#   selective      selective_copy at length 4096 (Mamba's task, 99.8%)
#   selectiveladder the same, climbing a ladder of data-region lengths
#   selectivecount  selective_copy climbing 128 .. 4096 with 4 event counters per layer (hnae.event_count)
#   adding600      adding climbing to T=600 (the TCN paper's best MSE is 5.3e-5)
#
#   OUT=runs/gpu-long SECONDS_BUDGET=360 RUNS='copy1000 adding600' bash scripts/gpu_long_check.sh   (RUNS: default all;
#   DEVICE=cpu to try it here)
#
# ARCHIVE=path.tgz packs OUT into one file at the end (the device tool returns at most 8 files).
# Installs nothing from the network (see install_train_wheels in gpu_common.sh).
set -u
source "$(dirname "$0")/gpu_common.sh"
OUT_DIR="${OUT:-runs/gpu-long}"
BUDGET="${SECONDS_BUDGET:-360}"
mkdir -p "$OUT_DIR"
install_train_wheels
write_machine_info "$OUT_DIR/machine.txt"
export OMP_NUM_THREADS=2
common=(--model hnae --device "${DEVICE:-cuda}" --time-budget "$BUDGET" --no-progress)
generalise=(--generalise 1100,1500,10000)
slow=(--lr-plateau 4)
run() {  # name, then the train arguments
    local name="$1"; shift
    timeout $((BUDGET + 150)) "$PYTHON" -m hnae train "$@" "${common[@]}" --out "$OUT_DIR/$name" \
        > "$OUT_DIR/$name.log" 2>&1
    echo "== $name (exit $?)"; tail -4 "$OUT_DIR/$name.log"
}
RUNS="${RUNS:-copy1000 copy1000relative copy10000 copy10000jitter selectivecount adding600}"
for name in $RUNS; do
    case "$name" in
        copy1000) run copy1000 --task copy --seq-len 1000 --curriculum "${slow[@]}" "${generalise[@]}" & ;;
        copy1000relative) run copy1000relative --task copy --seq-len 1000 --curriculum --positions relative \
            --short-conv 16 --write-policy novelty --threshold 0.99 --stop-when-solved --generalise 1100,1500,10000,100000 & ;;
        copy10000) run copy10000 --task copy --seq-len 10000 --curriculum --stop-when-solved & ;;
        copy10000jitter) run copy10000jitter --task copy --seq-len 10000 --curriculum --length-jitter 128 \
            --stop-when-solved & ;;
        selective) run selective --task selective_copy --seq-len 4096 "${slow[@]}" & ;;
        selectiveladder) run selectiveladder --task selective_copy --seq-len 4096 --curriculum "${slow[@]}" & ;;
        selectivecount) run selectivecount --task selective_copy --seq-len 4096 --event-counters 4 --curriculum \
            --ladder 128,256,512,1024,2048,4096 "${slow[@]}" & ;;
        adding600) run adding600 --task adding --seq-len 600 --curriculum "${slow[@]}" & ;;
        *) echo "unknown run: $name" >&2 ;;
    esac
done
wait
for name in $RUNS; do  # keep the last checkpoint's config, not every one
    ls -d "$OUT_DIR/$name"/ckpt-* 2>/dev/null | sort | head -n -1 | xargs -r rm -rf
done
if [ -n "${ARCHIVE:-}" ]; then
    tar czf "$ARCHIVE" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")"
fi
