"""Hierarchical attention of one layer, computed in parallel over a chunk.

Dimension letters (as in the rest of ``hnae``):
    B batch, C chunk length (time steps in this call), D model width,
    H heads, E head width (D = H * E), K summary slots,
    L levels with windows w_0 .. w_{L-1}, B_l inputs per level-l item,
    N level-0 blocks in this chunk, Q query blocks of R positions, S keys per query block.

Level-0 items are the inputs; a level-(l+1) item is the summary (K vectors) of
one complete block of w_l level-l items, pooled from their keys and values.
Position t in level-0 block b attends with one softmax over
    - the last w_0 inputs (t - w_0 + 1 .. t), positions by periodic rotary;
    - for each l >= 1, the last w_l level-l summaries complete when block b
      started, each with a learned embedding of its age in the window.
All positions of a block share the summaries, so one
``scaled_dot_product_attention`` call serves every block at once: queries in
blocks of R = ``query_rows`` positions (R divides w_0; w_0 by default),
(B*H, Q, R, E) against keys (B*H, Q, S, E), S = w_0 + R + sum_l w_l*K.
Smaller query blocks compute fewer masked scores but copy more keys: on a
2-core CPU R = w_0 was as fast or faster (training steps on copy, T = 500, 1000).

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

from .kernels import attend
from .banded import band_pays, banded_attention
from .memory_levels import gathered_levels, policy_levels
from .pooling import POOLS
from .rotary import PeriodicRotary
from .reach import level_spans
from .state import layer_state_shapes
from .windows import (RING_WRITES, each_slot, items_complete, local_oldest_first, ring_from_ordered, ring_write,
                      take_windows, times_shared)
from .write_policy import WritePolicy


class HierarchicalAttention(nn.Module):
    """Causal attention over a hierarchy of windows and block summaries.

    ``forward_chunk(x, state, start, end)``: x (B, C, D) normalised inputs at
    positions start .. start + C - 1; state: this layer's dict of tensors at
    ``start``; end: where each element's stream stops (``start + length``), an int when
    all stop together, else a (B,) tensor.
    Returns the output (B, C, D) and the layer's state at ``end``.
    """

    def __init__(self, d_model: int, num_heads: int, windows: tuple[int, ...], summary_slots: int = 1,
                 bias: bool = True, write_policy: tuple = (), thresholds: tuple = (), budgets: tuple = (),
                 place_rank: int | None = None, summary_pool: str = "attention", relative_values: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads = d_model, num_heads
        self.head_width = d_model // num_heads
        # relative_values: local values turned by their step's phase, outputs back by the query's, so a local
        # read's rotary dims depend on the distance alone; summaries and ages are zero there (HNAEConfig.positions)
        self.windows, self.slots, self.relative_values = tuple(windows), summary_slots, relative_values
        self.spans = level_spans(self.windows)
        self.query_rows = self.windows[0]  # positions per query block in forward_chunk (divides w0)
        # under a write policy: score whole compacted streams (True), copy each block's windows
        # (False), or whichever moves less (None; see hnae.banded)
        self.banded: bool | None = None
        self.query_key_value = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.output = nn.Linear(d_model, d_model, bias=bias, **factory)
        # Rotary phase on the first dims of each head (local keys only); summary keys are
        # zero there, so their scores do not depend on where the query sits in its block.
        self.rotary = PeriodicRotary(self.head_width, self.windows[0])
        content = torch.ones(self.head_width, **factory)
        content[: self.rotary.rotary_width] = 0.0
        self.register_buffer("content_mask", content, persistent=False)  # (E,)
        self.pools = nn.ModuleList(
            POOLS[summary_pool](d_model, num_heads, width * (1 if level == 0 else summary_slots), summary_slots,
                                content, bias=bias, place_rank=place_rank, **factory)
            for level, width in enumerate(self.windows[:-1]))
        self.age_keys = nn.ParameterList(
            nn.Parameter(torch.randn(num_heads, width, self.head_width, **factory) * 0.02)
            for width in self.windows[1:])  # (H, w_l, E) per level
        self.age_values = nn.ParameterList(
            nn.Parameter(torch.randn(num_heads, width, self.head_width, **factory) * 0.02)
            for width in self.windows[1:])
        levels = len(self.windows) - 1
        self.trace: list | None = None  # set to a list to record each level's write decisions
        self.policy = WritePolicy(write_policy or ("all",) * levels, thresholds or (None,) * levels,
                                  budgets or (None,) * levels, d_model, summary_slots, **factory)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return layer_state_shapes(self.windows, self.slots, self.num_heads, self.d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, ..., D) -> (B, H, n, ..., E)."""
        heads = x.view(*x.shape[:-1], self.num_heads, self.head_width)
        return heads.movedim(x.dim() - 1, 1)  # positive dims: exporters mistranslate negative ones

    def summarise(self, level: int, keys: torch.Tensor, values: torch.Tensor):
        """Pool complete blocks of level-(l-1) items into level-l summaries and their keys/values.

        keys, values: (B, H, M, n, E) with n = w_{l-1} items (x K slots above level 0).
        Returns the summaries' keys and values, (B, H, M, K, E) each; keys (and, under
        relative_values, values) are zero on rotary dims.
        """
        summaries = self.pools[level - 1](keys, values)  # (B, M, K, D)
        d_model = self.d_model
        weight = self.query_key_value.weight[d_model:]  # (2D, D)
        bias = None if self.query_key_value.bias is None else self.query_key_value.bias[d_model:]
        new_keys, new_values = (self._split_heads(part) for part in F.linear(summaries, weight, bias).chunk(2, -1))
        return new_keys * self.content_mask, new_values * self.content_mask if self.relative_values else new_values

    def age_value_table(self, level: int) -> torch.Tensor:
        """The age embeddings of level ``level``'s values, (H, w_l, E): zero on rotary dims under relative_values."""
        return self.age_values[level - 1] * self.content_mask if self.relative_values else self.age_values[level - 1]

    def turn_back(self, attended: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Under relative_values, the attention output (..., E) turned back by its query's phase."""
        return self.rotary.rotate(attended, cos, -sin) if self.relative_values else attended

    def forward_chunk(self, x: torch.Tensor, state: dict[str, torch.Tensor], start: int,
                      end) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, length, d_model = x.shape  # (B, C, D)
        heads, width, slots = self.num_heads, self.head_width, self.slots
        w0 = self.windows[0]
        offset = start % w0  # inputs of the current level-0 block already consumed
        block_start = start - offset  # absolute position of the first level-0 block
        num_blocks = math.ceil((offset + length) / w0)
        tail = num_blocks * w0 - offset - length
        device = x.device

        queries, keys, values = self.query_key_value(x).chunk(3, dim=-1)  # (B, C, D) each
        phases = self.rotary.phases(torch.arange(start, start + length, device=device), queries.dtype)
        queries = self.rotary.rotate(self._split_heads(queries), *phases)  # (B, H, C, E)
        keys = self.rotary.rotate(self._split_heads(keys), *phases)  # (B, H, C, E), stored rotated
        values = self._split_heads(values)  # (B, H, C, E)

        def local_stream(stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            # absolute positions block_start - w0 .. : (B, H, (N + 1) * w0, E)
            return torch.cat([new.new_zeros(batch, heads, offset, width), stored, new,
                              new.new_zeros(batch, heads, tail, width)], dim=2)

        # The state's ring holds input p at slot p mod w0: oldest first is a roll by the offset.
        key_stream = local_stream(torch.roll(state["local_keys"], -offset, dims=2), keys)
        value_stream = local_stream(torch.roll(state["local_values"], -offset, dims=2), values)
        read_values = value_stream  # what the local window reads (pools and the state keep value_stream)
        if self.relative_values:  # each value turned by its step's phase: positions block_start - w0 ..
            stream_positions = torch.arange(block_start - w0, block_start - w0 + value_stream.shape[2], device=device)
            read_values = self.rotary.rotate(value_stream, *self.rotary.phases(stream_positions, values.dtype))

        # Queries go in blocks of R = query_rows positions (R divides w0); each sees the w0 + R
        # inputs before its block's end: fewer masked scores than whole level-0 blocks would
        # compute. Query block q starts at absolute position rows_start + q * R.
        rows = self.query_rows
        if not (isinstance(rows, int) and 0 < rows <= w0 and w0 % rows == 0):
            raise ValueError(f"query_rows must be a positive divisor of the first window {w0}, got {rows!r}")
        row_offset = start % rows
        rows_start = start - row_offset
        num_queries = math.ceil((row_offset + length) / rows)  # query blocks (Q)
        first = offset - row_offset  # key_stream index of position rows_start - w0
        query_start = rows_start + torch.arange(num_queries, device=device) * rows  # (Q,) absolute
        block_index = torch.div(query_start, w0, rounding_mode="floor")  # (Q,) level-0 block of each
        last_block = (rows_start + (num_queries - 1) * rows) // w0  # level-0 block of the last query block
        query_place = torch.arange(rows, device=device).view(1, rows, 1)
        if num_queries == 1:  # a chunk inside one query block: its own rows and the keys they can see
            first_key = max(row_offset + 1, w0 - rows_start)  # older keys are out of the window or before 0
            last_key = w0 + row_offset + length  # (exclusive)
            key_parts = [key_stream[:, :, first + first_key:first + last_key].unsqueeze(2)]  # (B, H, 1, S_0, E)
            value_parts = [read_values[:, :, first + first_key:first + last_key].unsqueeze(2)]
            query_place = query_place[:, row_offset:row_offset + length]
            key_place = torch.arange(first_key, last_key, device=device).view(1, 1, -1)
            query_blocks = queries.unsqueeze(2)  # (B, H, 1, C, E)
        else:  # keys of query block q: key_stream[first + q*R : first + q*R + w0 + R], as w0/R + 1 pieces
            pieces = key_stream[:, :, first:first + (num_queries * rows + w0)]
            pieces = pieces.view(batch, heads, num_queries + w0 // rows, rows, width)
            value_pieces = read_values[:, :, first:first + (num_queries * rows + w0)].view(pieces.shape)
            key_parts = [pieces[:, :, k:k + num_queries] for k in range(w0 // rows + 1)]  # (B, H, Q, R, E)
            value_parts = [value_pieces[:, :, k:k + num_queries] for k in range(w0 // rows + 1)]
            key_place = torch.arange(w0 + rows, device=device).view(1, 1, -1)
            query_blocks = torch.cat([queries.new_zeros(batch, heads, row_offset, width), queries,
                                      queries.new_zeros(batch, heads, num_queries * rows - row_offset - length,
                                                        width)], dim=2).view(batch, heads, num_queries, rows, width)
        query_blocks = query_blocks.flatten(0, 1)  # (B*H, Q, R', E)
        block_rows = query_blocks.shape[2]  # R' = R, or C for a chunk inside one query block
        # Local mask: query i of block q sees key j (position q_start - w0 + j) iff i < j <= i + w0, and j >= 0.
        mask_parts = [(key_place > query_place) & (key_place <= query_place + w0)
                      & ((query_start - w0).view(-1, 1, 1) + key_place >= 0)]  # (Q, R, S_0)
        new_state = {
            "local_keys": ring_from_ordered(take_windows(key_stream, 2, block_start - w0, end - w0, w0), end),
            "local_values": ring_from_ordered(take_windows(value_stream, 2, block_start - w0, end - w0, w0), end),
        }

        # Items of the level below as (B, H, n, P, E) streams; level 0: the inputs from block_start.
        item_keys = key_stream[:, :, w0:w0 + offset + length].unsqueeze(3)  # (B, H, n, 1, E)
        item_values = value_stream[:, :, w0:w0 + offset + length].unsqueeze(3)
        compacted = self.policy.active or self.trace is not None
        banded = None
        if compacted:  # data-dependent schedules (or a trace): compacted streams per element
            streams, level_state = policy_levels(self, item_keys.squeeze(3), item_values.squeeze(3), state,
                                                 block_start, block_index, end, self.trace)
            new_state.update(level_state)
            use_band = band_pays(block_rows, streams, self.windows, width) if self.banded is None else self.banded
            if use_band:
                banded = streams  # scored against whole streams below, no window copies
            else:
                level_keys, level_values, level_masks = gathered_levels(self, streams)
                key_parts += level_keys
                value_parts += level_values
                mask_parts = [mask_parts[0].expand(batch, -1, -1, -1)] + [
                    m.unsqueeze(2).expand(-1, -1, block_rows, -1) for m in level_masks]  # (B, Q, R', S_l)
        for level in range(1, len(self.windows) if not compacted else 1):
            below, level_width, span = self.windows[level - 1], self.windows[level], self.spans[level]
            complete = item_keys.shape[2] // below
            block_shape = (batch, heads, complete, below * item_keys.shape[3], width)
            new_keys, new_values = self.summarise(
                level, item_keys[:, :, : complete * below].reshape(block_shape),
                item_values[:, :, : complete * below].reshape(block_shape))  # (B, H, m, K, E)
            first_new = block_start // span  # absolute index of the first new level-l item
            stored_shape = (batch, heads, level_width, slots, width)
            key_items = torch.cat([state[f"memory_keys_{level}"].view(stored_shape), new_keys], dim=2)
            value_items = torch.cat([state[f"memory_values_{level}"].view(stored_shape), new_values], dim=2)
            stream_start = first_new - level_width  # absolute index of key_items[:, :, 0]

            visible = items_complete(rows_start, num_queries, rows, span, device)  # (Q,) complete at each block's start
            # Window entries older than the stream's first item are masked for every block: leave
            # them out (at the start of a stream whole levels are empty). Exact: they weigh 0.
            kept = min(level_width, last_block * w0 // span)  # may be 0: empty parts keep
            # the age embeddings in the graph (zero gradients, as DDP expects of every parameter)
            places = torch.arange(level_width - kept, level_width, device=device)  # (kept,) window places
            window = (visible - first_new - level_width).unsqueeze(1) + places  # (Q, kept) item indices
            window_shape = (batch, heads, num_queries, kept, slots, width)
            flat_shape = (batch, heads, num_queries, kept * slots, width)
            level_keys = key_items.index_select(2, (window + level_width).flatten()).view(window_shape)
            level_values = value_items.index_select(2, (window + level_width).flatten()).view(window_shape)
            age_keys = (self.age_keys[level - 1][:, level_width - kept:] * self.content_mask)
            age_values = self.age_value_table(level)[:, level_width - kept:]  # (H, kept, E)
            key_parts.append((level_keys + age_keys.unsqueeze(1).unsqueeze(3)).reshape(flat_shape))
            value_parts.append((level_values + age_values.unsqueeze(1).unsqueeze(3)).reshape(flat_shape))
            exists = (visible.unsqueeze(1) - level_width + places) >= 0  # (Q, kept)
            mask_parts.append(each_slot(exists, slots, dim=1).unsqueeze(1).expand(-1, block_rows, -1))

            state_shape = (batch, heads, level_width * slots, width)
            newest = end // span  # level-l items complete at each element's end (int or (B,))
            new_state[f"memory_keys_{level}"] = take_windows(
                key_items, 2, stream_start, newest - level_width, level_width).reshape(state_shape)
            new_state[f"memory_values_{level}"] = take_windows(
                value_items, 2, stream_start, newest - level_width, level_width).reshape(state_shape)
            # The next level pools this level's items from its incomplete block on (held in memory).
            carried = first_new % level_width
            item_keys = key_items[:, :, level_width - carried:]  # (B, H, n, K, E)
            item_values = value_items[:, :, level_width - carried:]
        if len(self.windows) > 1 and not compacted:  # every candidate written, on schedule
            new_state["written"] = torch.stack([torch.as_tensor(end // span, device=device).expand(batch)
                                                for span in self.spans[1:]], dim=1)  # (B, L-1)
            new_state["skipped"] = state["skipped"]

        if banded is not None:  # key_parts and mask_parts hold the local window only
            attended = banded_attention(self, query_blocks.view(batch, heads, *query_blocks.shape[1:]),
                                        torch.cat(key_parts, dim=3), torch.cat(value_parts, dim=3),
                                        mask_parts[0], banded).flatten(0, 1)
        elif mask_parts[-1].dim() == 3:  # one mask for every stream: (1, Q, R, S); 4-D keeps the fused CPU kernel
            mask = torch.cat(mask_parts, dim=-1)  # (Q, R, S)
            all_keys = torch.cat(key_parts, dim=3).flatten(0, 1)  # (B*H, Q, S, E)
            all_values = torch.cat(value_parts, dim=3).flatten(0, 1)  # (B*H, Q, S, E)
            attended = attend(query_blocks, all_keys, all_values, mask.unsqueeze(0))  # (B*H, Q, R, E)
        else:  # a mask per stream: blocks before heads, so that one mask serves every head
            attended = self._attend_per_stream(query_blocks, key_parts, value_parts, torch.cat(mask_parts, dim=-1))
        if num_queries > 1:
            attended = attended.reshape(batch, heads, num_queries * rows, width)[:, :, row_offset:row_offset + length]
        attended = self.turn_back(attended.reshape(batch, heads, length, width), *phases)  # (B, H, C, E)
        output = self.output(attended.transpose(1, 2).reshape(batch, length, d_model))  # (B, C, D)
        return output, new_state

    def _attend_per_stream(self, query_blocks: torch.Tensor, key_parts: list, value_parts: list,
                           mask: torch.Tensor) -> torch.Tensor:
        """Attention with a mask that differs per stream (the write policies' compacted levels).

        query_blocks (B*H, Q, R, E); key/value parts (B, H, Q, S_i, E); mask (B, Q, R, S).
        Laid out as (B*Q, H, ., E), the mask (B*Q, 1, R, S) broadcasts over heads: no copy
        of it per head. Returns (B*H, Q, R, E) like the shared-mask path.
        """
        batch, blocks, rows, _ = mask.shape
        heads, width = self.num_heads, self.head_width
        keys = torch.cat([part.transpose(1, 2) for part in key_parts], dim=3).flatten(0, 1)  # (B*Q, H, S, E)
        values = torch.cat([part.transpose(1, 2) for part in value_parts], dim=3).flatten(0, 1)
        queries = query_blocks.view(batch, heads, blocks, rows, width).transpose(1, 2).flatten(0, 1)
        attended = attend(queries, keys, values, mask.flatten(0, 1).unsqueeze(1))  # (B*Q, H, R, E)
        return attended.view(batch, blocks, heads, rows, width).transpose(1, 2).reshape(
            batch * heads, blocks, rows, width)

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], position: torch.Tensor,
             branch_free: bool = False, completes: bool | None = None,
             ring: str = "copy") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One input per stream: x (B, D) at positions (B,) (they may differ) -> (B, D), new state.

        The same keys as ``forward_chunk`` sees, held in fixed-size buffers: the local window
        is a ring (one slot written per step), and a summary is pooled when its block
        completes and shifted into its level's window. The step attends over the ring as it
        was plus its own input, then writes that input's slot (``ring``): into a copy of
        the state's tensors ("copy"), into them ("in_place": the caller's state changes), or
        not at all ("defer": the new state's ``local_keys``/``local_values`` are the (B, H, 1,
        E) item, for the caller to write at slot ``position mod w0``, outside a compiled graph).
        ``branch_free`` pools every step and selects with ``torch.where`` (for export).
        ``completes``: whether a level-0 block completes at this step in some stream, when the
        caller knows (a compiled graph per case); None finds out (a data-dependent branch).
        """
        if ring not in RING_WRITES:
            raise ValueError(f"ring must be one of {RING_WRITES}, got {ring!r}")
        batch, d_model = x.shape  # (B, D)
        heads, width, slots = self.num_heads, self.head_width, self.slots
        w0 = self.windows[0]
        queries, keys, values = self.query_key_value(x).view(batch, 1, 3 * d_model).chunk(3, dim=-1)
        phases = self.rotary.phases(position.view(batch, 1, 1), queries.dtype)  # broadcast over (H, 1)
        queries = self.rotary.rotate(self._split_heads(queries), *phases)  # (B, H, 1, E)
        keys, values = self.rotary.rotate(self._split_heads(keys), *phases), self._split_heads(values)
        old_keys, old_values = state["local_keys"], state["local_values"]  # (B, H, w0, E) rings
        # One softmax over all parts, without concatenating their keys and values:
        # scores are small (B, H, 1, S); summary ages enter as q . age and p . age.
        scores = [torch.matmul(queries, old_keys.transpose(-1, -2)),  # (B, H, 1, w0)
                  (queries * keys).sum(-1, keepdim=True)]  # (B, H, 1, 1): the step's own input
        places = torch.arange(w0, device=x.device)
        now = position.view(batch, 1)
        slot_positions = now - 1 - (now - 1 - places) % w0  # (B, w0): what each old slot holds
        # in the window and since the stream began (this step's slot holds t - w0: out)
        masks = [(slot_positions > now - w0) & (slot_positions >= 0), torch.ones_like(now, dtype=torch.bool)]
        memories = []
        for level in range(1, len(self.windows)):
            level_width = self.windows[level]
            age_keys = each_slot(self.age_keys[level - 1] * self.content_mask, slots, dim=1)
            age_values = each_slot(self.age_value_table(level), slots, dim=1)  # (H, w_l*K, E)
            memory_values = state[f"memory_values_{level}"]  # (B, H, w_l*K, E)
            scores.append(torch.matmul(queries, state[f"memory_keys_{level}"].transpose(-1, -2))
                          + times_shared(queries, age_keys.transpose(-1, -2)))  # (B, H, 1, w_l*K)
            memories.append((memory_values, age_values))
            complete = state["written"][:, level - 1]  # (B,) items this level has written
            exists = complete.view(batch, 1) - level_width + torch.arange(level_width, device=x.device) >= 0
            masks.append(each_slot(exists, slots, dim=1))  # (B, w_l*K)
        mask = torch.cat(masks, dim=1).view(batch, 1, 1, -1)  # (B, 1, 1, S)
        weights = (torch.cat(scores, dim=-1) * width ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        weights = weights.split([w0, 1] + [v.shape[2] for v, _ in memories], dim=-1)
        if self.trace is not None:  # where this step's attention went: (B, H, w0) and (B, H, w_l*K) per level
            local = local_oldest_first(weights[0], weights[1], position)  # (B, H, w0)
            self.trace.append({"attention": [local.detach()] + [part.squeeze(2).detach() for part in weights[2:]]})
        read_old, read_own = old_values, values  # (B, H, w0, E), (B, H, 1, E)
        if self.relative_values:  # each slot's value turned by the phase of the step it holds
            slot_phases = self.rotary.phases(slot_positions, values.dtype)  # (B, w0, E_r/2) each
            read_old = self.rotary.rotate(old_values, *(p.unsqueeze(1) for p in slot_phases))
            read_own = self.rotary.rotate(values, *phases)
        attended = torch.matmul(weights[0], read_old) + weights[1] * read_own  # (B, H, 1, E)
        for part, (memory_values, age_values) in zip(weights[2:], memories):
            attended = attended + torch.matmul(part, memory_values) + times_shared(part, age_values)
        attended = self.turn_back(attended, *phases)
        output = self.output(attended.transpose(1, 2).reshape(batch, d_model))  # (B, D)

        if ring == "defer":
            new_state = {"local_keys": keys, "local_values": values}
        else:
            slot = position % w0  # (B,): this input's slot in the ring
            new_state = {"local_keys": ring_write(old_keys, slot, keys, ring == "in_place"),
                         "local_values": ring_write(old_values, slot, values, ring == "in_place")}
        candidate = (position + 1) % w0 == 0  # (B,): a level-0 block completes, a level-1 candidate
        written, skipped = [], []
        for level in range(1, len(self.windows)):
            level_width = self.windows[level]
            memory_shape = (batch, heads, level_width, slots, width)
            memory_keys = state[f"memory_keys_{level}"].view(memory_shape)
            memory_values = state[f"memory_values_{level}"].view(memory_shape)
            had = state["written"][:, level - 1]  # (B,)
            write = candidate
            if branch_free or (bool(candidate.any()) if completes is None else completes):
                if level == 1:  # where a block completes, the old ring's first w0 - 1 slots hold it
                    # oldest first; then this input (other streams' blocks are pooled, then discarded)
                    item_keys = torch.cat([old_keys[:, :, :w0 - 1], keys], dim=2).unsqueeze(3)  # (B, H, w0, 1, E)
                    item_values = torch.cat([old_values[:, :, :w0 - 1], values], dim=2).unsqueeze(3)
                block_shape = (batch, heads, 1, item_keys.shape[2] * item_keys.shape[3], width)
                new_keys, new_values = self.summarise(level, item_keys.reshape(block_shape),
                                                      item_values.reshape(block_shape))  # (B, H, 1, K, E)
                write, new_values = self.policy.decide(level, new_values, candidate.unsqueeze(1),
                                                       memory_values[:, :, -1], had > 0)
                write = write.squeeze(1)  # (B,)
                chosen = write.view(batch, 1, 1, 1, 1)
                memory_keys = torch.where(chosen, torch.cat([memory_keys[:, :, 1:], new_keys], 2), memory_keys)
                memory_values = torch.where(chosen, torch.cat([memory_values[:, :, 1:], new_values], 2),
                                            memory_values)
            new_state[f"memory_keys_{level}"] = memory_keys.reshape(batch, heads, level_width * slots, width)
            new_state[f"memory_values_{level}"] = memory_values.reshape(batch, heads, level_width * slots, width)
            written.append(had + write.long())
            skipped.append(state["skipped"][:, level - 1] + (candidate & ~write).long())
            # The next level's candidate: this level's window when its written count fills a block.
            candidate = write & (written[-1] % level_width == 0)
            item_keys, item_values = memory_keys, memory_values  # the newest w_l items: a block when complete
        if written:
            new_state["written"], new_state["skipped"] = torch.stack(written, 1), torch.stack(skipped, 1)
        return output, new_state
