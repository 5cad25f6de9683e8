#!/usr/bin/env bash
# The GPU check (issue 4, item 3): the tests that touch CUDA, then `hnae bench perf` on cuda in bf16,
# in under 5 minutes on one H100 / H200. Installs nothing and needs no .venv: the system python with torch.
#
#   bash scripts/gpu_check.sh                 # from the repository root
#   PYTHON=python3.11 OUT=runs/gpu-h200 bash scripts/gpu_check.sh
#
# Writes into ${OUT:-runs/gpu}: machine.txt, pytest.log, perf.log and perf/ (report.md, perf.json, PNGs).
# Exit status: 0 when the tests passed (or pytest is missing) and the bench wrote its report, else 1.
set -u
source "$(dirname "$0")/gpu_common.sh"
OUT_DIR="${OUT:-runs/gpu}"
mkdir -p "$OUT_DIR"
status=0

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
    "$PYTHON" - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cpu cores", os.cpu_count())
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
} 2>&1 | tee "$OUT_DIR/machine.txt"

# 1. The tests that touch CUDA (tests/test_cuda.py and any test named *cuda*); about 30 s.
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    timeout 120 "$PYTHON" -m pytest -q -x -k cuda tests/ -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest.log"
    test "${PIPESTATUS[0]}" -eq 0 || status=1
else
    echo "pytest is not installed for $PYTHON: CUDA tests not run" | tee "$OUT_DIR/pytest.log"
fi

# 2. The perf bench on the GPU; SIGINT at 220 s makes it write the report of what has run by then.
#    Without matplotlib it runs as `python -m hnae_bench.perf` (gpu_common.sh) and has no plots.
timeout -s INT -k 30 220 "$PYTHON" "${perf_command[@]}" --device cuda --dtype bf16 \
    --models hnae,lstm,gru,tcn,transformer,mamba,xlstm,htransformer --seq-lens 1024,4096,16384,65536 \
    --batch-size 8 --repeats 2 --max-seconds 20 --stream-steps 100 --no-compile --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/perf.log"
test -s "$OUT_DIR/perf/report.md" || status=1
echo "gpu_check: status $status; report $OUT_DIR/perf/report.md"
exit "$status"
