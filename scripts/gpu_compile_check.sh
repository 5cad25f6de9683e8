#!/usr/bin/env bash
# hnae and cuDNN nn.LSTM training on the GPU with hnae through torch.compile (issue 4: "an optional
# torch.compile path"), bf16, T = 4k and 16k; in about 4 minutes on one H100 / H200.
# Installs nothing; run after scripts/gpu_check.sh (same PYTHON and OUT conventions).
#
#   OUT=runs/gpu-h200 bash scripts/gpu_compile_check.sh   # writes $OUT/compiled-$MODE/perf/{report.md,perf.json}
#   MODE=reduce-overhead SEQ_LENS=4096 REPEATS=3 bash scripts/gpu_compile_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
PYTHON="${PYTHON:-python3}"
MODE="${MODE:-default}"
OUT_DIR="${OUT:-runs/gpu}/compiled-$MODE"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then command=(-m hnae bench perf); else command=(-m hnae_bench.perf); fi
timeout -s INT -k 30 "${SECONDS_BUDGET:-240}" "$PYTHON" "${command[@]}" --device cuda --dtype bf16 --compile "$MODE" \
    --models hnae,lstm --seq-lens "${SEQ_LENS:-4096,16384}" --batch-size 8 --repeats "${REPEATS:-1}" \
    --max-seconds 20 --no-stream --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/perf.log"
test -s "$OUT_DIR/perf/report.md"
