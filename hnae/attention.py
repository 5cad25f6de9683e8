"""Hierarchical attention of one layer, computed in parallel over a chunk.

Dimension letters (as in the rest of ``hnae``):
    B batch, C chunk length (time steps in this call), D model width,
    H heads, E head width (D = H * E), K summary slots,
    L levels with windows w_0 .. w_{L-1}, B_l inputs per level-l item,
    N query blocks of w_0 positions in this chunk, S keys per query block.

Level-0 items are the inputs; a level-(l+1) item is the summary (K vectors) of
one complete block of w_l level-l items. Position t in level-0 block b attends
with one softmax over
    - the last w_0 inputs (t - w_0 + 1 .. t), positions by rotary embedding;
    - for each l >= 1, the last w_l level-l summaries complete when block b
      started, each with a learned embedding of its age in the window.
All positions of a block share the summaries, so one
``scaled_dot_product_attention`` call serves every block at once: queries
(B*H, N, w_0, E) against keys (B*H, N, S, E), S = 2*w_0 + sum_l w_l*K.

A chunk continues the stream held by the state (see ``hnae.state``); a fresh
stream is the special case of an all-zero state at position 0. So the same
code does training (one long chunk) and streaming (many short ones), which is
why the two agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import AttentionPool
from .reach import level_spans
from .state import layer_state_shapes


def take_windows(stream: torch.Tensor, time_dim: int, stream_start: int, first: torch.Tensor,
                 width: int, count: torch.Tensor | None = None) -> torch.Tensor:
    """Per batch element, ``width`` consecutive entries of ``stream`` along ``time_dim``.

    stream: (B, ..., n, ...) whose entry i along time_dim is absolute index stream_start + i.
    first: (B,) absolute index of each element's first entry. count: (B,) entries to keep;
    the rest are zeroed. Returns the stream's shape with ``width`` along time_dim.
    """
    moved = stream.movedim(time_dim, 1)  # (B, n, ...)
    if moved.shape[1] == 0:  # nothing in the stream yet: all entries are empty
        return moved.new_zeros(moved.shape[0], width, *moved.shape[2:]).movedim(1, time_dim)
    offsets = first.unsqueeze(1) - stream_start + torch.arange(width, device=first.device)  # (B, width)
    rows = torch.arange(moved.shape[0], device=first.device).unsqueeze(1)  # (B, 1)
    picked = moved[rows, offsets.clamp(0, moved.shape[1] - 1)]  # (B, width, ...)
    if count is not None:
        keep = torch.arange(width, device=first.device).unsqueeze(0) < count.unsqueeze(1)  # (B, width)
        picked = picked * keep.view(*keep.shape, *([1] * (picked.dim() - 2))).to(picked.dtype)
    return picked.movedim(1, time_dim)


class HierarchicalAttention(nn.Module):
    """Causal attention over a hierarchy of windows and block summaries.

    ``forward_chunk(x, state, start, end)``: x (B, C, D) normalised inputs at
    positions start .. start + C - 1; state: this layer's dict of tensors at
    ``start``; end (B,): where each element's stream stops (``start + length``).
    Returns the output (B, C, D) and the layer's state at ``end``.
    """

    def __init__(self, d_model: int, num_heads: int, windows: tuple[int, ...], summary_slots: int = 1,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads = d_model, num_heads
        self.head_width = d_model // num_heads
        self.windows, self.slots = tuple(windows), summary_slots
        self.spans = level_spans(self.windows)
        self.query_key_value = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.output = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.pools = nn.ModuleList(
            AttentionPool(d_model, num_heads, width * (1 if level == 0 else summary_slots), summary_slots,
                          bias=bias, **factory)
            for level, width in enumerate(self.windows[:-1]))
        self.age_keys = nn.ParameterList(
            nn.Parameter(torch.randn(width, d_model, **factory) * 0.02) for width in self.windows[1:])
        self.age_values = nn.ParameterList(
            nn.Parameter(torch.randn(width, d_model, **factory) * 0.02) for width in self.windows[1:])
        # Rotary positions on the first `rotary_width` dims of each head (local keys only);
        # summary keys are zero there, so their scores do not depend on the query's place.
        self.rotary_width = 2 * (self.head_width // 4)
        half = self.rotary_width // 2
        inverse_frequency = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / max(half, 1)))
        self.register_buffer("inverse_frequency", inverse_frequency.float(), persistent=False)
        content = torch.ones(self.head_width)
        content[: self.rotary_width] = 0.0
        self.register_buffer("content_mask", content, persistent=False)  # (E,)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return layer_state_shapes(self.windows, self.slots, self.num_heads, self.d_model)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x (..., P, E) at integer positions (P,)."""
        if self.rotary_width == 0:
            return x
        half = self.rotary_width // 2
        angles = positions.to(torch.float32).unsqueeze(1) * self.inverse_frequency  # (P, E_r/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        first, second, rest = x[..., :half], x[..., half:self.rotary_width], x[..., self.rotary_width:]
        return torch.cat([first * cos - second * sin, first * sin + second * cos, rest], dim=-1)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, ..., D) -> (B, H, n, ..., E)."""
        heads = x.view(*x.shape[:-1], self.num_heads, self.head_width)
        return heads.movedim(-2, 1)

    def forward_chunk(self, x: torch.Tensor, state: dict[str, torch.Tensor], start: int,
                      end: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, length, d_model = x.shape  # (B, C, D)
        heads, width, slots = self.num_heads, self.head_width, self.slots
        w0 = self.windows[0]
        offset = start % w0  # inputs of the current block already consumed
        block_start = start - offset  # absolute position of the first query block
        num_blocks = math.ceil((offset + length) / w0)
        tail = num_blocks * w0 - offset - length
        device = x.device

        queries, keys, values = self.query_key_value(x).chunk(3, dim=-1)  # (B, C, D) each
        queries, keys, values = (self._split_heads(t) for t in (queries, keys, values))  # (B, H, C, E)

        def local_stream(stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            # absolute positions block_start - w0 .. : (B, H, (N + 1) * w0, E)
            return torch.cat([new.new_zeros(batch, heads, offset, width), stored, new,
                              new.new_zeros(batch, heads, tail, width)], dim=2)

        key_stream = local_stream(state["local_keys"], keys)
        value_stream = local_stream(state["local_values"], values)
        places = torch.arange(2 * w0, device=device)
        key_parts = [self._rotate(key_stream.unfold(2, 2 * w0, w0).transpose(-1, -2), places)]  # (B, H, N, 2w0, E)
        value_parts = [value_stream.unfold(2, 2 * w0, w0).transpose(-1, -2)]  # (B, H, N, 2w0, E)
        query_blocks = torch.cat([queries.new_zeros(batch, heads, offset, width), queries,
                                  queries.new_zeros(batch, heads, tail, width)], dim=2)
        query_blocks = self._rotate(query_blocks.view(batch, heads, num_blocks, w0, width), places[w0:])

        # Local mask: query i of block b sees key j (position (b-1)*w0 + j) iff i < j <= i + w0, j >= 0.
        block_index = torch.arange(num_blocks, device=device) + block_start // w0  # (N,) absolute
        query_place = torch.arange(w0, device=device).view(1, w0, 1)
        key_place = places.view(1, 1, 2 * w0)
        mask_parts = [(key_place > query_place) & (key_place <= query_place + w0)
                      & ((block_index - 1).view(-1, 1, 1) * w0 + key_place >= 0)]  # (N, w0, 2w0)

        new_state = {
            "local_keys": take_windows(key_stream, 2, block_start - w0, end - w0, w0),
            "local_values": take_windows(value_stream, 2, block_start - w0, end - w0, w0),
        }
        # Raw items of the level below, by item: (B, n, P, D); P = 1 for inputs, K for summaries.
        items = torch.cat([state["pending_0"][:, :offset], x], dim=1).unsqueeze(2)
        items_start = block_start
        new_state["pending_0"] = take_windows(items, 1, items_start, end // w0 * w0, w0, end % w0).squeeze(2)

        key_weight, value_weight = self.query_key_value.weight[d_model:].chunk(2, dim=0)
        key_bias = value_bias = None
        if self.query_key_value.bias is not None:
            key_bias, value_bias = self.query_key_value.bias[d_model:].chunk(2)
        for level in range(1, len(self.windows)):
            below, level_width, span = self.windows[level - 1], self.windows[level], self.spans[level]
            complete = items.shape[1] // below
            block_items = items[:, : complete * below].reshape(batch * complete, below * items.shape[2], d_model)
            summaries = self.pools[level - 1](block_items).view(batch, complete, slots, d_model)  # (B, m, K, D)
            first_new = items_start // below  # absolute index of the first new level-l item

            new_keys = self._split_heads(F.linear(summaries, key_weight, key_bias))  # (B, H, m, K, E)
            new_values = self._split_heads(F.linear(summaries, value_weight, value_bias))
            stored_shape = (batch, heads, level_width, slots, width)
            key_items = torch.cat([state[f"memory_keys_{level}"].view(stored_shape), new_keys], dim=2)
            value_items = torch.cat([state[f"memory_values_{level}"].view(stored_shape), new_values], dim=2)
            stream_start = first_new - level_width  # absolute index of key_items[:, :, 0]

            visible = block_index * w0 // span  # (N,) level-l items complete when each block starts
            window = (visible - first_new).unsqueeze(1) + torch.arange(level_width, device=device)  # (N, w_l)
            age_keys = self._split_heads(self.age_keys[level - 1].unsqueeze(0)).squeeze(0)  # (H, w_l, E)
            age_values = self._split_heads(self.age_values[level - 1].unsqueeze(0)).squeeze(0)
            window_shape = (batch, heads, num_blocks, level_width * slots, width)
            level_keys = key_items.index_select(2, window.flatten()).view(
                batch, heads, num_blocks, level_width, slots, width) + age_keys.unsqueeze(1).unsqueeze(3)
            level_values = value_items.index_select(2, window.flatten()).view(
                batch, heads, num_blocks, level_width, slots, width) + age_values.unsqueeze(1).unsqueeze(3)
            key_parts.append((level_keys * self.content_mask).reshape(window_shape))
            value_parts.append(level_values.reshape(window_shape))
            exists = (visible.unsqueeze(1) - level_width + torch.arange(level_width, device=device)) >= 0
            mask_parts.append(exists.repeat_interleave(slots, dim=1).unsqueeze(1).expand(-1, w0, -1))

            state_shape = (batch, heads, level_width * slots, width)
            newest = end // span  # (B,) items complete at each element's end
            new_state[f"memory_keys_{level}"] = take_windows(
                key_items, 2, stream_start, newest - level_width, level_width).reshape(state_shape)
            new_state[f"memory_values_{level}"] = take_windows(
                value_items, 2, stream_start, newest - level_width, level_width).reshape(state_shape)
            if level < len(self.windows) - 1:
                carried = first_new % level_width
                pending = state[f"pending_{level}"].view(batch, level_width, slots, d_model)[:, :carried]
                items = torch.cat([pending, summaries], dim=1)  # (B, n, K, D)
                items_start = first_new - carried
                first_pending = newest - newest % level_width
                new_state[f"pending_{level}"] = take_windows(
                    items, 1, items_start, first_pending, level_width, newest % level_width
                ).reshape(batch, level_width * slots, d_model)

        all_keys = torch.cat(key_parts, dim=3).flatten(0, 1)  # (B*H, N, S, E)
        all_values = torch.cat(value_parts, dim=3).flatten(0, 1)  # (B*H, N, S, E)
        mask = torch.cat(mask_parts, dim=2)  # (N, w0, S)
        attended = F.scaled_dot_product_attention(query_blocks.flatten(0, 1), all_keys, all_values,
                                                  attn_mask=mask)  # (B*H, N, w0, E)
        attended = attended.view(batch, heads, num_blocks * w0, width)[:, :, offset:offset + length]
        output = self.output(attended.transpose(1, 2).reshape(batch, length, d_model))  # (B, C, D)
        return output, new_state
