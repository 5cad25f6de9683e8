"""How far back an output sees: the exact first visible input of every step.

One layer with windows ``(w_0, ..., w_{L-1})``: position ``t`` lies in level-0
block ``b = t // w_0``. It sees the inputs ``t - w_0 + 1 .. t`` directly, and at
level ``l >= 1`` the last ``w_l`` summaries that were complete when its block
started (a summary is shown only after its whole block is in: the
shift-before-pool rule). A level-``l`` summary covers ``B_l = w_0 * ... *
w_{l-1}`` inputs, so the oldest input seen is

    first_visible(t) = (floor(b * w_0 / B_top) - w_top) * B_top   (L >= 2)
    first_visible(t) = t - w_0 + 1                                (L == 1)

clamped at 0, where ``top = L - 1``. Every output therefore sees at least the
last ``R = w_0 * ... * w_{L-1}`` inputs and at most ``R + B_top`` of them,
depending on where ``t`` sits inside its top-level block. Stacked layers
compose: ``first_visible_stack(t) = f(f(...f(t)))`` because ``f`` is
non-decreasing. A layer with a short convolution of ``k`` steps in front of
its attention (``short_conv=k``) sees ``k - 1`` steps further back than ``f``.
"""

from __future__ import annotations

import math

import torch


def level_spans(windows: tuple[int, ...]) -> list[int]:
    """``B_l``: inputs covered by one level-``l`` item (``B_0 = 1``)."""
    spans = [1]
    for width in windows[:-1]:
        spans.append(spans[-1] * width)
    return spans


def first_visible(t: torch.Tensor, windows: tuple[int, ...], short_conv: int = 0) -> torch.Tensor:
    """Oldest input index one causal layer's output at ``t`` depends on.

    t: integer tensor of positions, any shape. Returns the same shape.
    short_conv: the layer's convolution kernel (0: none), which reaches ``k - 1`` steps further.
    """
    w0, reach_of_conv = windows[0], max(short_conv - 1, 0)
    if len(windows) == 1:
        return (t - w0 + 1 - reach_of_conv).clamp(min=0)
    top_span = level_spans(windows)[-1]
    block_start = torch.div(t, w0, rounding_mode="floor") * w0
    visible_items = torch.div(block_start, top_span, rounding_mode="floor")
    oldest = (visible_items - windows[-1]) * top_span - reach_of_conv
    return oldest.clamp(min=0)


def first_visible_stack(t: torch.Tensor, windows: tuple[int, ...], num_layers: int,
                        short_conv: int = 0) -> torch.Tensor:
    """Oldest input index a stack of ``num_layers`` causal layers depends on at ``t``."""
    for _ in range(num_layers):
        t = first_visible(t, windows, short_conv)
    return t


def receptive_field(windows: tuple[int, ...], num_layers: int = 1, short_conv: int = 0) -> int:
    """The most inputs (the current one included) any output of the stack sees.

    The pattern of ``first_visible`` repeats with period ``B_top``, so scanning
    one period far from the start (where nothing is clamped) gives the maximum.
    """
    period = level_spans(windows)[-1]
    start = (num_layers + 2) * (math.prod(windows) + period + windows[0] + short_conv)
    t = torch.arange(start, start + period, dtype=torch.int64)
    spans = t - first_visible_stack(t, windows, num_layers, short_conv) + 1
    return int(spans.max())
