"""Interleaved A/B of hnae configurations against nn.LSTM: training tokens/s at one T, in one process.

    python scripts/preset_ab.py 4096 cur:72:4:2:2:64,64,64:2 w16L3:92:3:2:2:64,16,16,16:2

Each spec is name:width:layers:heads:ffn_multiplier:windows:summary_slots. Batch 8, 32 random
input features, a linear head; nn.LSTM is 2 layers of 176 (~0.4M parameters). One warm-up call
each, then 3 interleaved rounds; prints the median tokens/s and the ratio to nn.LSTM.
"""
import statistics
import sys
import time

import torch
from torch import nn

import hnae

BATCH, FEATURES = 8, 32


class WithHead(nn.Module):
    def __init__(self, body: nn.Module, width: int):
        super().__init__()
        self.body, self.head = body, nn.Linear(width, FEATURES)

    def forward(self, x):
        return self.head(self.body(x)[0])


def build(spec: str) -> tuple[str, nn.Module]:
    name, width, layers, heads, ffn, windows, slots = spec.split(":")
    body = hnae.HNAE(FEATURES, int(width), num_layers=int(layers), batch_first=True,
                     windows=tuple(int(w) for w in windows.split(",")), num_heads=int(heads),
                     summary_slots=int(slots), ffn_multiplier=float(ffn))
    return name, WithHead(body, int(width))


def main() -> None:
    steps = int(sys.argv[1])
    torch.manual_seed(0)
    models = {"lstm": WithHead(nn.LSTM(FEATURES, 176, 2, batch_first=True), 176)}
    models.update(build(spec) for spec in sys.argv[2:])
    for name, model in models.items():
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    x = torch.randn(BATCH, steps, FEATURES)   # (B, T, C)

    def train_call(model: nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        model(x).pow(2).mean().backward()
        return time.perf_counter() - started

    for model in models.values():
        train_call(model)
    seconds = {name: [] for name in models}
    for _ in range(3):
        for name, model in models.items():
            seconds[name].append(train_call(model))
    lstm = statistics.median(seconds["lstm"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:12s} {BATCH * steps / median:9,.0f} tokens/s  {lstm / median:5.2f}x lstm")


if __name__ == "__main__":
    main()
