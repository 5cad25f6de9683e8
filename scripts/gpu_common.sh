# Sourced by the GPU scripts: the repository root as the working directory, the Python to use
# (PYTHON, default python3) with the repository on its path, and `perf_command`: the perf bench as
# `python -m hnae bench perf`, or `python -m hnae_bench.perf` (no plots) where matplotlib is missing.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
    perf_command=(-m hnae bench perf)
else
    perf_command=(-m hnae_bench.perf)
fi
