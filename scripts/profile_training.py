"""Where a training call of a `hnae bench perf` model spends its time, grouped by kind of operation.

    python scripts/profile_training.py [--model hnae] [--preset large] [--batch-size 8] [--calls 3] 4096

The model is built as `hnae bench perf` builds it for its longest T (``--max-len``, the default profile's
65,536): the preset's width is set so that the parameter count at that reach stays on budget.

The call is the bench's: forward, then the backward of the outputs' mean square, on random features
(B, T, 32). After one warm-up call at the full length, `torch.profiler` records ``--calls`` calls; each
operator's self time (time not spent in the operators it calls) is put into one group: matrix
products, attention kernels, normalisation, element-wise arithmetic, copies and layout, reductions, the
rest. The model FLOPs (counted as `hnae bench perf` counts them) are done in the matrix products and
the attention kernels: for those two groups the script prints the FLOP rate they reach, against the
peak of a (2048 x 2048) matmul measured in the same process. The other groups are time without
model FLOPs.
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from hnae_bench.perf_measure import count_flops, measure_matmul_peak
from hnae_bench.perf_models import build_perf_model

GROUPS = (   # first match wins: (group, substrings of the aten operator's name)
    ("matrix products", ("addmm", "::mm", "bmm", "matmul", "linear", "baddbmm", "mkldnn")),
    ("attention kernels", ("scaled_dot_product", "flash_attention")),
    ("normalisation", ("layer_norm", "rms_norm")),
    ("copies and layout", ("copy_", "cat", "clone", "contiguous", "index", "gather", "scatter", "stack", "pad",
                           "slice_backward", "select_backward", "unfold", "as_strided", "fill_", "zero_", "where")),
    ("reductions", ("sum", "mean", "amax", "softmax", "logsumexp")),
    ("element-wise", ("add", "mul", "sub", "div", "neg", "exp", "sigmoid", "silu", "gelu", "relu", "tanh",
                      "pow", "sqrt", "rsqrt", "cos", "sin", "masked_fill", "threshold", "clamp")),
)


def group_of(name: str) -> str:
    for group, parts in GROUPS:
        if any(part in name for part in parts):
            return group
    return "other"


def flops_by_group(by_op: dict) -> collections.Counter:
    """Counted FLOPs (by aten overload name) summed into the profile's groups."""
    groups = collections.Counter()
    for op, flops in by_op.items():
        groups[group_of("aten::" + op.removeprefix("aten."))] += flops   # 'aten.mm' -> 'aten::mm'
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("length", type=int)
    parser.add_argument("--model", default="hnae")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=65_536, help="the reach the model is built for")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="operators listed one by one")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_perf_model(args.model, args.preset, args.input_size, max(args.length, args.max_len))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    x = torch.randn(args.batch_size, args.length, args.input_size)   # (B, T, C)

    def train_call() -> None:
        model.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()

    train_call()   # warm-up at the full length: first touch of the memory, oneDNN primitives
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.calls):
            train_call()
    events = [event for event in profiler.key_averages() if event.key.startswith("aten::")]
    total = sum(event.self_cpu_time_total for event in events)
    by_group = collections.Counter()
    for event in events:
        by_group[group_of(event.key)] += event.self_cpu_time_total
    calls = args.calls
    counted = count_flops(model, x, "cpu", "fp32")
    flops = flops_by_group(counted["by_op"])
    peak = measure_matmul_peak({"device": "cpu", "size": 2048, "dtype": "fp32", "min_seconds": 0.0,
                                "max_calls": 10}, lambda phase: None)["median_flops_per_second"]
    print(f"{args.model} ({args.preset}, {parameters:,} parameters), B = {args.batch_size}, T = {args.length:,}, "
          f"torch threads "
          f"{torch.get_num_threads()}: {total / 1e3 / calls:,.0f} ms of operator self time a call, "
          f"{counted['training'] / 1e9:.1f} GFLOP counted; matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"  whole call: {counted['training'] / (total / 1e6 / calls) / 1e9:.0f} GFLOP/s, "
          f"{counted['training'] / (total / 1e6 / calls) / peak:.0%} of the peak")
    for group, micros in by_group.most_common():
        seconds = micros / 1e6 / calls
        rate = (f"  {flops[group] / 1e9:5.1f} GFLOP at {flops[group] / seconds / 1e9:4.0f} GFLOP/s "
                f"({flops[group] / seconds / peak:.0%} of the peak)" if flops[group] else "")
        print(f"  {group:20s} {seconds * 1e3:8.1f} ms  {micros / total:6.1%}{rate}")
    print("operators:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {event.key:45s} {event.self_cpu_time_total / 1e3 / calls:8.1f} ms  "
              f"{event.count // calls:5d} calls  {group_of(event.key)}")


if __name__ == "__main__":
    main()
