#!/usr/bin/env bash
# GPU run for issue 3's full-profile targets, four `hnae train` runs side by side on one GPU
# (small models leave a large GPU mostly idle, so they share it):
#   copy1000   copy T=1000, novelty memory, lengths jittered over a block; then evaluated at
#              T=10,000 and 100,000 without retraining (length generalisation)
#   copy10000  copy climbing the ladder to T=10,000, same memory and jitter
#   selective  selective_copy at length 4096 (Mamba's task), large preset
#   adding600  adding climbing to T=600 (the TCN paper's best MSE is 5.3e-5)
#
#   OUT=runs/gpu-long SECONDS_BUDGET=360 RUNS='copy1000 adding600' bash scripts/gpu_long_check.sh   (RUNS: default all four;
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
export OMP_NUM_THREADS=3
common=(--model hnae --device "${DEVICE:-cuda}" --time-budget "$BUDGET" --no-progress)
memory=(--write-policy novelty --threshold 0.99 --length-jitter 128)
run() {  # name, then the train arguments
    local name="$1"; shift
    timeout $((BUDGET + 150)) "$PYTHON" -m hnae train "$@" "${common[@]}" --out "$OUT_DIR/$name" \
        > "$OUT_DIR/$name.log" 2>&1
    echo "== $name (exit $?)"; tail -4 "$OUT_DIR/$name.log"
}
RUNS="${RUNS:-copy1000 copy10000 selective adding600}"  # a subset narrows the run
for name in $RUNS; do
    case "$name" in
        copy1000) run copy1000 --task copy --seq-len 1000 --curriculum "${memory[@]}" \
            --generalise 1100,1500,10000,100000 & ;;
        copy10000) run copy10000 --task copy --seq-len 10000 --curriculum "${memory[@]}" & ;;
        selective) run selective --task selective_copy --seq-len 4096 --preset large & ;;
        adding600) run adding600 --task adding --seq-len 600 --curriculum & ;;
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
