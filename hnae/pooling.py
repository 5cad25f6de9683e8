"""Summaries: attention pooling of complete blocks into ``K`` slot vectors.

The pool reuses the keys and values the layer already computed for the items
(inputs at level 0, summaries above), so a summary costs one small attention
and one output projection per block, not a projection per item.

Dimension letters: B batch, H heads, M blocks, n items per block (x slots),
K summary slots, E head width, D model width (``D = H * E``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import attend
from .places import add_place_table, place_table


class AttentionPool(nn.Module):
    """Learned queries attend over the items of each block; one vector per slot.

    Each item's key and value get a learned embedding of its place in the
    block, so a summary keeps the order of what it pools (copying needs it).
    Queries use only the content dimensions of a head (``content_mask``), so
    the rotary phase of input keys never enters a summary.

    forward(keys, values): (B, H, M, n, E) each -> summaries (B, M, K, D),
    layer-normalised like the inputs the layer attends to.
    """

    def __init__(self, d_model: int, num_heads: int, items_per_block: int, slots: int,
                 content_mask: torch.Tensor, bias: bool = True, place_rank: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        head_width = d_model // num_heads
        self.num_heads, self.items_per_block, self.slots = num_heads, items_per_block, slots
        for name in ("place_keys", "place_values"):  # (H, n, E) each
            add_place_table(self, name, (num_heads, items_per_block, head_width), place_rank, factory)
        self.queries = nn.Parameter(torch.randn(num_heads, slots, head_width, **factory) * 0.5)  # (H, K, E)
        self.register_buffer("content_mask", content_mask.clone(), persistent=False)  # (E,)
        self.output = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.norm = nn.LayerNorm(d_model, **factory)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        batch, heads, blocks, items, width = keys.shape  # (B, H, M, n, E)
        if items != self.items_per_block:
            raise ValueError(f"keys: expected {self.items_per_block} items per block, got {items}")
        keys = (keys + place_table(self, "place_keys").unsqueeze(1)).flatten(0, 1)  # (B*H, M, n, E)
        values = (values + place_table(self, "place_values").unsqueeze(1)).flatten(0, 1)  # (B*H, M, n, E)
        queries = (self.queries * self.content_mask).unsqueeze(1)  # (H, 1, K, E)
        queries = queries.expand(heads, blocks, self.slots, width).repeat(batch, 1, 1, 1)  # (B*H, M, K, E)
        pooled = attend(queries, keys, values)  # (B*H, M, K, E)
        pooled = pooled.view(batch, heads, blocks, self.slots, width).permute(0, 2, 3, 1, 4)
        pooled = pooled.reshape(batch, blocks, self.slots, heads * width)  # (B, M, K, D)
        return self.norm(self.output(pooled))  # (B, M, K, D)
