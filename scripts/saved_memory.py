"""Bytes per token that autograd saves for the backward pass, for a `hnae bench perf` model at several T.

    python scripts/saved_memory.py [--preset large] [--batch-size 8] 4096 16384 65536

Counts each storage a saved tensor points to once (views share storages) during one training
forward, and groups the bytes by the tensors' rank and last dimension (the attention's keys and
values are the rank-4 tensors of head width E). Set this against the peak memory `hnae bench perf`
measures (VmHWM): the difference is memory that is not saved activations (the backward's transient
buffers, temporaries of the forward, and the allocator's free but unreturned memory).
"""
import argparse
import collections

import torch

from hnae_bench.perf_models import build_perf_model


def saved_bytes(model: torch.nn.Module, batch: int, length: int, features: int) -> tuple[int, collections.Counter]:
    """Total saved bytes of one forward at (batch, length), and the same bytes by (rank, last dim)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = (storage.nbytes(), tensor.dim(), tensor.shape[-1] if tensor.dim() else 1)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(torch.randn(batch, length, features))
    del output
    groups = collections.Counter()
    for nbytes, rank, last in storages.values():
        groups[(rank, last)] += nbytes
    return sum(groups.values()), groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lengths", type=int, nargs="+")
    parser.add_argument("--model", default="hnae")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_perf_model(args.model, args.preset, args.input_size, max(args.lengths))
    for length in args.lengths:
        total, groups = saved_bytes(model, args.batch_size, length, args.input_size)
        tokens = args.batch_size * length
        print(f"T = {length:,}: {total / tokens:,.0f} saved bytes per token")
        for (rank, last), nbytes in groups.most_common(6):
            print(f"    rank {rank}, last dim {last}: {nbytes / tokens:,.0f} B/token")


if __name__ == "__main__":
    main()
