"""Rotary position embedding with an exact period, for the local window.

Every frequency is a whole number of turns over a period ``P`` (a power of two
at least four windows long): ``angle_j(t) = 2*pi * (t * m_j mod P) / P``. So a
rotation depends on ``t mod P`` only, computed in integers: the phase is
exact at step 10 or at step 10**9, keys can be rotated once when they are
made and stored rotated in the streaming state, and the score of a query at
``t`` with a key at ``s`` depends on ``t - s`` alone. The slowest frequency
(``m = 1``) turns once per ``P >= 4 * w_0`` steps, so no two distances inside
the window look alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PeriodicRotary(nn.Module):
    """Rotates the first ``rotary_width`` dims of each head by the absolute position."""

    def __init__(self, head_width: int, window: int) -> None:
        super().__init__()
        self.rotary_width = 2 * (head_width // 4)  # half the head (even); the rest carries content
        self.period = 1 << max(2, math.ceil(math.log2(4 * window)))
        half = self.rotary_width // 2
        if half:
            exponents = torch.linspace(1.0, 0.0, half, dtype=torch.float64)
            multipliers = torch.round((self.period / 2) ** exponents).to(torch.int64).clamp(min=1)
        else:
            multipliers = torch.zeros(0, dtype=torch.int64)
        self.register_buffer("multipliers", multipliers, persistent=False)  # (E_r/2,)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (..., E) rotated by integer positions broadcastable to x.shape[:-1], e.g. (P,) for x (B, H, P, E)."""
        return self.rotate(x, *self.phases(positions, x.dtype))

    def phases(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every rotary frequency at integer ``positions``: (..., E_r/2) each."""
        phase = (positions.to(torch.int64).remainder(self.period).unsqueeze(-1) * self.multipliers) % self.period
        angles = phase.to(torch.float32) * (2 * math.pi / self.period)  # (..., E_r/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (..., E) rotated by ``phases`` (several tensors at the same positions share them)."""
        if self.rotary_width == 0:
            return x
        half = self.rotary_width // 2
        # split, not three slices: its backward is one concatenation, where each slice's backward would
        # zero-fill a tensor of x's full size and copy its part in, and autograd then add the three up
        first, second, rest = x.split([half, half, x.shape[-1] - self.rotary_width], dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos, rest], dim=-1)
