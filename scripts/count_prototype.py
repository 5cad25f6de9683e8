"""`hnae train` with a count of events fed to the hnae body as extra input features: the experiments
that led to ``hnae.event_count`` (docs/RESULTS.md, "Selective copy at 4,096 on 2 CPU cores").

    COUNT=oracle python scripts/count_prototype.py --task selective_copy --seq-len 128 --model hnae ...
    LAM=0.3 GATE=hard SCALE=10 COUNTERS=4 python scripts/count_prototype.py --task selective_copy ...

The body's input gets cos/sin of 2 pi m c_t / 64 (m = 1, 2, 4, 8, 16) for each count c_t = sum of gates
up to t (float64). Environment switches:
    COUNT=oracle   one count, of the data tokens (selective_copy's input ids 1..V): what a perfect gate gives
    COUNT=learned  (default) COUNTERS gates read the raw input x: logit = SCALE * (a . x + b), a = b = 0 at first
    GATE=clamp     (default) gate = clamp(0.5 + logit, 0, 1)
    GATE=sigmoid   gate = sigmoid(logit)
    GATE=hard      gate = 1 if logit > 0 else 0, with sigmoid(logit)'s gradient (straight through)
    LAM=w          add w x the mean (soft) gate to the loss (0: none)
Nothing here changes the library or the bench defaults.
"""
import math
import os
import sys

import torch
from torch import nn

from hnae_bench import models, train_cli
from hnae_bench import train as train_module

MODE = os.environ.get("COUNT", "learned")
SCALE = float(os.environ.get("SCALE", "1"))
GATE = os.environ.get("GATE", "clamp")
COUNTERS = int(os.environ.get("COUNTERS", "1"))
LAM = float(os.environ.get("LAM", "0"))
PERIOD, MULTIPLIERS = 64.0, (1, 2, 4, 8, 16)


class CountBody(nn.Module):
    """The hnae body with count features appended to its input: (B, T, C) -> (B, T, D)."""

    def __init__(self, inner: nn.Module, input_size: int):
        super().__init__()
        self.inner, self.receptive_field = inner, inner.receptive_field
        self.gate = nn.Linear(input_size, COUNTERS)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.register_buffer("multipliers", torch.tensor(MULTIPLIERS, dtype=torch.float64), persistent=False)
        self.mean_gate = torch.zeros(())

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        if MODE == "oracle":
            return x[..., 1:-1].sum(-1, keepdim=True)  # (B, T, 1): 1 on data tokens
        logit = SCALE * self.gate(x)  # (B, T, G)
        if GATE == "clamp":
            gate = (0.5 + logit).clamp(0, 1)
            self.mean_gate = gate.mean()
            return gate
        soft = torch.sigmoid(logit)
        self.mean_gate = soft.mean()
        return soft if GATE == "sigmoid" else (logit > 0).to(soft.dtype) + soft - soft.detach()

    def forward(self, x):  # x (B, T, C)
        counts = self.gates(x).double().cumsum(1).unsqueeze(-1)  # (B, T, G, 1)
        angles = (counts * self.multipliers * (2 * math.pi / PERIOD)).float()  # (B, T, G, F)
        return self.inner(torch.cat([x, angles.cos().flatten(2), angles.sin().flatten(2)], -1))


def _recipe(task, preset, max_len, **options):
    plain = models._recipe_hnae(task, preset, max_len, **options)
    extra = 2 * len(MULTIPLIERS) * (1 if MODE == "oracle" else COUNTERS)

    class Wider:  # the task as the inner body sees it: count features appended to the input
        input_size = task.input_size + extra
        output_size = task.output_size

    inner = models._recipe_hnae(Wider, preset, max_len, **options)
    return models.BodyRecipe(lambda width: CountBody(inner.make(width), task.input_size), plain.width_step,
                             {**plain.config, "count": MODE})


models._RECIPES["hnae"] = _recipe
models.SequenceModel.write_penalty = lambda self: self.body.mean_gate * (LAM / train_module.WRITE_PENALTY_WEIGHT)
if __name__ == "__main__":
    sys.exit(train_cli.main(sys.argv[1:]))
