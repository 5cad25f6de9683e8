"""Event counters: each layer learns which steps are events and reads how many it has seen.

    e[t]     = 1 if gate(norm(h[t])) > 0 else 0         (B, C, G)  G counters; h: the layer's input
    count[t] = count[start - 1] + sum_{s <= t} e[s]     (B, C, G)  events since the stream began
    out[t]   = read(cos, sin of 2 pi * m * count[t] / PERIOD, m in MULTIPLIERS)   (B, C, D)

Attention finds things by what they are and by how far back they lie; it has no way to ask for
"the fifth data token" when the data lie at random steps among noise (selective copying: the
Mamba paper's task). With a gate that is open on the data and shut on the noise, the count is
that ordinal, and a query can ask for a key whose count is its own minus k, as a rotary query
asks for a distance. The features repeat every PERIOD events (64), so counts up to 63 apart
are told apart; the multipliers resolve single events.

The decisions are hard, so a count is a whole number (a float64 in the state field
``event_count`` (B, G), exact to 2**53): streaming and parallel runs agree exactly unless a
gate's logit lies within rounding error of zero, as the write policies' decisions do. The
gradient goes straight through: it is that of the soft gate ``sigmoid(GATE_GAIN * logit)``.
The count is the one thing in a layer that reaches past its windows: an event anywhere
before ``t`` moves it, so a shut gate (noise) is what keeps the far past out.
``HNAE.count_penalty()`` is the mean soft gate, to add to a loss: a weight on it shuts the gates
of the steps the task needs no count of (without it, the gates of frequent noise stay open and
the counts blur). The gates start at zero logit: shut, with the largest gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PERIOD = 64                  # the features repeat every PERIOD counted events
MULTIPLIERS = (1, 2, 4, 8, 16)
GATE_GAIN = 10.0             # the soft gates are sigmoid(10 x logit): they move 10x faster under Adam


class EventCounter(nn.Module):
    """``counters`` learned gates over (B, C, D) inputs and the features of their running counts."""

    def __init__(self, d_model: int, counters: int, device=None, dtype=None) -> None:
        super().__init__()
        if counters < 1:
            raise ValueError(f"EventCounter needs counters >= 1, got {counters}")
        factory = {"device": device, "dtype": dtype}
        self.counters, self.width = counters, d_model
        self.gate = nn.Linear(d_model, counters, **factory)  # starts at zero: shut, on the edge
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.read = nn.Linear(2 * counters * len(MULTIPLIERS), d_model, **factory)
        self.register_buffer("multipliers", torch.tensor(MULTIPLIERS, dtype=torch.float64, device=device),
                             persistent=False)  # (F,)
        self._gate_total, self._gate_steps = None, 0

    def forget(self) -> None:
        """Start a new ``penalty`` (each forward calls this)."""
        self._gate_total, self._gate_steps = None, 0

    def penalty(self) -> torch.Tensor | None:
        """The mean soft gate over the steps seen since ``forget`` (None before any)."""
        return None if self._gate_total is None else self._gate_total / self._gate_steps

    def _remember(self, gates: torch.Tensor) -> None:
        steps = gates.numel()
        total = gates.sum()
        self._gate_total = total if self._gate_total is None else self._gate_total + total
        self._gate_steps += steps

    def _gates(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) -> the events (..., G): 0 or 1 in value, the soft gate's gradient."""
        # normalised (no parameters): each token's logit moves as fast as the shared bias under Adam,
        # so the count penalty cannot shut every gate before the task has opened the ones it needs
        logits = self.gate(F.layer_norm(h, (self.width,)))
        soft = torch.sigmoid(GATE_GAIN * logits)
        self._remember(soft)
        return (logits > 0).to(soft.dtype) + (soft - soft.detach())

    def _read(self, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """counts (..., G) float64 -> the read-out (..., D)."""
        turns = (counts.unsqueeze(-1) * self.multipliers / PERIOD).remainder(1.0)  # (..., G, F), float64
        angles = turns * (2 * math.pi)
        features = torch.cat([angles.cos(), angles.sin()], dim=-1).flatten(-2)  # (..., 2 G F)
        return self.read(features.to(dtype))

    def forward_chunk(self, h: torch.Tensor, count: torch.Tensor, start: int,
                      end) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, C, D) at positions start.. ; count (B, G) float64 before start.

        Returns the read-out (B, C, D) and the count at ``end`` (an int, or (B,) per stream)."""
        gates = self._gates(h)  # (B, C, G)
        counts = count.unsqueeze(1) + gates.double().cumsum(dim=1)  # (B, C, G): the count after each step
        read = self._read(counts, h.dtype)  # (B, C, D)
        taken = torch.as_tensor(end, device=h.device) - start  # () or (B,): steps of this chunk counted
        taken = taken.expand(h.shape[0]).clamp(0, h.shape[1])  # (B,)
        last = counts.gather(1, (taken - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, self.counters))[:, 0]
        return read, torch.where((taken > 0).unsqueeze(1), last, count)  # (B, C, D), (B, G)

    def step(self, h: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, D), count (B, G) float64 -> the read-out (B, D) and the next count."""
        gates = self._gates(h)  # (B, G)
        count = count + gates.double()
        return self._read(count, h.dtype), count
