"""A short causal convolution: each step mixed with the few steps just before it, per channel.

    out[t] = sum_i weight[:, i] * h[t - (k - 1) + i]      i = 0 .. k-1, h before the stream's start = 0

Depthwise (one kernel of k taps per channel), so it costs k multiply-adds per channel and step. An
attention's query is a function of its own step alone; with this in front of it, a step's query also
says what the last k steps were (the third step of a run of equal inputs is told from the first), and
it does so the same way at every position, so nothing ties the model to a length. The k - 1 inputs
before a chunk are the layer's state field ``conv_tail`` (B, k - 1, D), oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .windows import take_windows


class ShortConv(nn.Module):
    """Depthwise causal convolution over the last ``kernel`` steps of (B, C, D) inputs.

    The weights start at zero, so a layer with it computes what it did without it until training
    moves them.
    """

    def __init__(self, d_model: int, kernel: int, device=None, dtype=None) -> None:
        super().__init__()
        if kernel < 2:
            raise ValueError(f"ShortConv needs kernel >= 2, got {kernel}")
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(d_model, kernel, device=device, dtype=dtype))  # (D, k), oldest first

    def forward_chunk(self, h: torch.Tensor, tail: torch.Tensor, start: int, end) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, C, D) at positions start.. ; tail (B, k-1, D): the inputs before start.

        Returns the convolution (B, C, D) and the k - 1 inputs before ``end`` (an int, or (B,) per stream)."""
        history = self.kernel - 1
        padded = torch.cat([tail.to(h.dtype), h], dim=1)  # (B, k-1+C, D): entry i is position start-(k-1)+i
        mixed = F.conv1d(padded.transpose(1, 2), self.weight.unsqueeze(1), groups=h.shape[2])  # (B, D, C)
        new_tail = take_windows(padded, 1, start - history, end - history, history)  # (B, k-1, D)
        return mixed.transpose(1, 2), new_tail.to(tail.dtype)

    def step(self, h: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, D), tail (B, k-1, D) -> the convolution (B, D) and the next tail."""
        window = torch.cat([tail.to(h.dtype), h.unsqueeze(1)], dim=1)  # (B, k, D), oldest first
        mixed = (window * self.weight.t()).sum(dim=1)  # (B, D)
        return mixed, window[:, 1:].to(tail.dtype)
