#!/usr/bin/env bash
# GPU run for issues 3 and 5: the CUDA tests (write policies included), then
# `hnae train --task copy --seq-len 1000 --curriculum` on cuda for a fixed time budget.
#
#   OUT=runs/gpu-copy SECONDS_BUDGET=380 bash scripts/gpu_copy_check.sh
#
# Installs nothing from the network: where safetensors/tqdm are missing it installs the wheels
# found in build/wheels (download them beforehand with `pip download`).
set -u
source "$(dirname "$0")/gpu_common.sh"
OUT_DIR="${OUT:-runs/gpu-copy}"
BUDGET="${SECONDS_BUDGET:-380}"
mkdir -p "$OUT_DIR"
install_train_wheels
write_machine_info "$OUT_DIR/machine.txt"
timeout 150 "$PYTHON" -m pytest -q -x tests/test_cuda.py -p no:cacheprovider > "$OUT_DIR/pytest.log" 2>&1
tail -3 "$OUT_DIR/pytest.log"
timeout $((BUDGET + 60)) "$PYTHON" -m hnae train --task copy --seq-len 1000 --model hnae --curriculum \
    --time-budget "$BUDGET" --device cuda --out "$OUT_DIR/copy1000" --no-progress > "$OUT_DIR/train.log" 2>&1
tail -5 "$OUT_DIR/train.log"
rm -rf "$OUT_DIR"/copy1000/ckpt-*  # keep metrics, not weights
