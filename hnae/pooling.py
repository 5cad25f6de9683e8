"""Summaries of complete blocks into ``K`` slot vectors: pooled, or selected.

- ``AttentionPool`` (``summary_pool="attention"``): K learned queries attend over
  the block's items; each slot is a weighted mix of them.
- ``SelectPool`` (``summary_pool="select"``): each slot is one of the block's K
  most salient items itself, in the block's order; nothing is mixed.

Both reuse the keys and values the layer already computed for the items
(inputs at level 0, summaries above), so a summary costs one small attention
or one selection, and one output projection per block, not a projection per item.

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


class SelectPool(nn.Module):
    """Keeps each block's ``K`` most salient items, in their order in the block.

    An item's salience is a learned linear score of its value plus a learned
    weight (starting at ``DEVIATION_WEIGHT``) times its squared distance from
    the block's mean value, relative to the block's mean square: items that
    stand out from their block are kept from the first step (a symbol among
    blanks, a scene change), and training decides what else to keep. Each kept
    value, with the learned value of its place in the block, is projected and
    normalised, then scaled by ``sigmoid(salience)``: that is how the loss
    reaches the score (the scale comes after the norm, which would undo it).
    A mixing pool has to learn to keep places apart before its summaries hold
    order; a kept item holds its order from the start.

    forward(keys, values): (B, H, M, n, E) each -> summaries (B, M, K, D),
    layer-normalised and gated. Needs K <= n. Only the values are read, so
    ``content_mask`` (the pools' common signature) is not needed: values carry
    no rotary phase.
    """

    DEVIATION_WEIGHT = 4.0
    # Ranking prefers the earlier item when two saliences are closer than this: the items of a block
    # of the same content differ by rounding only (1e-7), and rounding must not pick which places a
    # summary keeps, or two such blocks give different summaries (and a novelty policy writes both).
    TIE_BREAK = 1e-3

    def __init__(self, d_model: int, num_heads: int, items_per_block: int, slots: int,
                 content_mask: torch.Tensor, bias: bool = True, place_rank: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if slots > items_per_block:
            raise ValueError(f"summary_pool='select' keeps summary_slots={slots} items of a block of "
                             f"{items_per_block}: it needs summary_slots <= the block's items")
        factory = {"device": device, "dtype": dtype}
        head_width = d_model // num_heads
        self.num_heads, self.items_per_block, self.slots = num_heads, items_per_block, slots
        add_place_table(self, "place_values", (num_heads, items_per_block, head_width), place_rank, factory)
        self.salience = nn.Parameter(torch.zeros(num_heads, head_width, **factory))  # (H, E)
        self.salience_bias = nn.Parameter(torch.zeros((), **factory))
        self.deviation_weight = nn.Parameter(torch.full((), self.DEVIATION_WEIGHT, **factory))
        self.output = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.norm = nn.LayerNorm(d_model, **factory)

    def salience_scores(self, values: torch.Tensor) -> torch.Tensor:
        """values (B, H, M, n, E) -> each item's salience (B, M, n)."""
        centred = values - values.mean(dim=3, keepdim=True)  # (B, H, M, n, E)
        mean_square = values.pow(2).sum(dim=(1, 4)).mean(dim=-1, keepdim=True)  # (B, M, 1)
        deviation = centred.pow(2).sum(dim=(1, 4)) / (mean_square + torch.finfo(values.dtype).tiny)  # (B, M, n)
        learned = torch.einsum("bhmne,he->bmn", values, self.salience) + self.salience_bias  # (B, M, n)
        return learned + self.deviation_weight * deviation

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        batch, heads, blocks, items, width = values.shape  # (B, H, M, n, E)
        if items != self.items_per_block:
            raise ValueError(f"values: expected {self.items_per_block} items per block, got {items}")
        salience = self.salience_scores(values)  # (B, M, n)
        earlier = torch.arange(items, 0, -1, device=values.device, dtype=salience.dtype) * (self.TIE_BREAK / items)
        ranking = salience.detach() + earlier  # (B, M, n): ties go to the earlier place
        kept = ranking.topk(self.slots, dim=-1).indices.sort(dim=-1).values  # (B, M, K): in block order
        gate = torch.sigmoid(salience.gather(-1, kept)).unsqueeze(-1)  # (B, M, K, 1)
        placed = values + place_table(self, "place_values").unsqueeze(1)  # (B, H, M, n, E)
        index = kept[:, None, :, :, None].expand(batch, heads, blocks, self.slots, width)
        chosen = placed.gather(3, index)  # (B, H, M, K, E)
        chosen = chosen.permute(0, 2, 3, 1, 4).reshape(batch, blocks, self.slots, heads * width)  # (B, M, K, D)
        return self.norm(self.output(chosen)) * gate  # gated after the norm, which would undo a scale


POOLS = {"attention": AttentionPool, "select": SelectPool}
