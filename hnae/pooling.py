"""Summaries: attention pooling of one complete block into ``K`` slot vectors.

Dimension letters: N blocks (batch x blocks flattened), n items per block,
K summary slots, H heads, E head width, D model width (``D = H * E``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionPool(nn.Module):
    """Learned queries attend over the items of a block; one vector per slot.

    Each item also gets a learned embedding of its place in the block, so a
    summary can keep the order of what it pools (copying needs it).

    Input ``items``: (N, n, D) with ``n = items_per_block``.
    Output: (N, K, D), layer-normalised like the tokens the layer attends to.
    """

    def __init__(self, d_model: int, num_heads: int, items_per_block: int, slots: int,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.items_per_block = items_per_block
        self.slots = slots
        self.place_embedding = nn.Parameter(torch.randn(items_per_block, d_model, **factory) * 0.02)
        self.queries = nn.Parameter(torch.randn(slots, d_model, **factory) * 0.02)  # (K, D)
        self.key_value = nn.Linear(d_model, 2 * d_model, bias=bias, **factory)
        self.output = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.norm = nn.LayerNorm(d_model, **factory)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        num_blocks, num_items, d_model = items.shape  # (N, n, D)
        if num_items != self.items_per_block:
            raise ValueError(f"items: expected {self.items_per_block} per block, got {num_items}")
        heads, head_width = self.num_heads, d_model // self.num_heads
        keys, values = self.key_value(items + self.place_embedding).chunk(2, dim=-1)  # (N, n, D) each
        keys = keys.view(num_blocks, num_items, heads, head_width).transpose(1, 2)  # (N, H, n, E)
        values = values.view(num_blocks, num_items, heads, head_width).transpose(1, 2)  # (N, H, n, E)
        queries = self.queries.view(self.slots, heads, head_width).transpose(0, 1)  # (H, K, E)
        queries = queries.unsqueeze(0).expand(num_blocks, -1, -1, -1)  # (N, H, K, E)
        pooled = F.scaled_dot_product_attention(queries, keys, values)  # (N, H, K, E)
        pooled = pooled.transpose(1, 2).reshape(num_blocks, self.slots, d_model)  # (N, K, D)
        return self.norm(self.output(pooled))  # (N, K, D)
