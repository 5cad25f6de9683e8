#!/usr/bin/env bash
# hnae and cuDNN nn.LSTM training on the GPU with hnae through torch.compile (issue 4: "an optional
# torch.compile path"), bf16, T = 4k and 16k; in about 4 minutes on one H100 / H200.
# Installs nothing; run after scripts/gpu_check.sh (same PYTHON and OUT conventions).
#
#   OUT=runs/gpu-h200 bash scripts/gpu_compile_check.sh   # writes $OUT/compiled-$MODE/perf/{report.md,perf.json}
#   MODE=reduce-overhead SEQ_LENS=4096 REPEATS=3 bash scripts/gpu_compile_check.sh
set -u
source "$(dirname "$0")/gpu_common.sh"
MODE="${MODE:-default}"
OUT_DIR="${OUT:-runs/gpu}/compiled-$MODE"
mkdir -p "$OUT_DIR"
timeout -s INT -k 30 "${SECONDS_BUDGET:-240}" "$PYTHON" "${perf_command[@]}" --device cuda --dtype bf16 --compile "$MODE" \
    --models hnae,lstm --seq-lens "${SEQ_LENS:-4096,16384}" --batch-size 8 --repeats "${REPEATS:-1}" \
    --max-seconds 20 --no-stream --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/perf.log"
test -s "$OUT_DIR/perf/report.md"
