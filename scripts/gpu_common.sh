# Sourced by the GPU scripts: the repository root as the working directory, the Python to use
# (PYTHON, default python3) with the repository on its path, and `perf_command`: the perf bench as
# `python -m hnae bench perf`, or `python -m hnae_bench.perf` (no plots) where matplotlib is missing;
# install_train_wheels and write_machine_info for the training scripts.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
    perf_command=(-m hnae bench perf)
else
    perf_command=(-m hnae_bench.perf)
fi

# The training scripts need safetensors and tqdm: from build/wheels where the machine lacks them
# (download them beforehand with `pip download`; nothing comes from the network).
install_train_wheels() {
    "$PYTHON" -c "import safetensors, tqdm" 2>/dev/null \
        || "$PYTHON" -m pip install -q --no-index --find-links build/wheels safetensors tqdm 2>&1 | tail -2
}

# The date, GPU, Python and torch of this run, into the file named by $1.
write_machine_info() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
        "$PYTHON" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__)"
    } > "$1" 2>&1
}
