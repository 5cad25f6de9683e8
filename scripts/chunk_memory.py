"""Peak training memory per token of a `hnae bench perf` hnae model at several CPU time-chunk lengths.

    python scripts/chunk_memory.py [--preset large] [--batch-size 8] --chunks auto,1024 4096 16384

Each (chunk, T) runs in a fresh process, as `hnae bench perf` runs its measurements: a warm-up call at
T = 256, then one training call at full length under `hnae_bench.perf_measure.peak_memory`, which gives
the resident-set peak (VmHWM) and the peak bytes allocated through PyTorch. "auto" is the model's own
chunking (`HNAE.time_chunk = None`); a number sets `time_chunk` to that many steps. What the two figures
differ by is memory that malloc keeps after tensors are freed, which the chunk length changes.
"""
import argparse
import subprocess
import sys

import torch

from hnae_bench.perf_measure import peak_memory
from hnae_bench.perf_models import build_perf_model


def measure(preset: str, batch: int, length: int, chunk: str, max_len: int) -> str:
    torch.manual_seed(0)
    model = build_perf_model("hnae", preset, 32, max_len)
    for module in model.modules():
        if hasattr(module, "time_chunk"):
            module.time_chunk = None if chunk == "auto" else int(chunk)
    x = torch.randn(batch, length, 32)   # (B, T, C)

    def train_call(inputs: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        model(inputs).pow(2).mean().backward()

    train_call(x[:, :256])
    model.zero_grad(set_to_none=True)
    with peak_memory("cpu") as memory:
        train_call(x)
    tokens = batch * length
    allocated = memory["allocated"]
    return (f"chunk {chunk:>5}, T = {length:>6,}: resident {memory['delta'] / tokens:8,.0f} B/token, allocated "
            + (f"{allocated / tokens:8,.0f} B/token" if allocated is not None else "not measured"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lengths", type=int, nargs="+")
    parser.add_argument("--chunks", default="auto,1024", help="comma-separated: 'auto' or steps per chunk")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=65_536, help="the reach the model is built for")
    parser.add_argument("--one", nargs=2, metavar=("CHUNK", "T"), help=argparse.SUPPRESS)   # the child's job
    args = parser.parse_args()
    if args.one:
        print(measure(args.preset, args.batch_size, int(args.one[1]), args.one[0], args.max_len), flush=True)
        return
    for chunk in args.chunks.split(","):
        for length in args.lengths:
            subprocess.run([sys.executable, __file__, "--one", chunk, str(length), "--preset", args.preset,
                            "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "0"], check=True)


if __name__ == "__main__":
    main()
