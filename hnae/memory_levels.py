"""Summary levels under a write policy, computed in parallel over a chunk.

With every candidate written, level-l items arrive on a fixed schedule and
``HierarchicalAttention.forward_chunk`` slices them. When a policy skips some,
each level keeps a *compacted stream* per batch element:

    stream[0 : w_l]        the memory window from the state (oldest first),
    stream[w_l : w_l + n]  the candidates written in this chunk, in time order,

and every item carries the level-0 block from which it is visible (``ready``).
A query block ``q`` sees the last ``w_l`` stream items ready by ``q``: their
count is a ``searchsorted`` over the ready blocks, so no loop runs over time.
A level-(l+1) candidate is the last ``w_l`` written items each time the written
count reaches a multiple of ``w_l`` (exactly what streaming pools: its memory
window), ready when its newest item is.

Dimension letters: B batch, H heads, M candidates, n written items, N query
blocks, K slots, E head width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FAR = torch.iinfo(torch.int64).max // 4  # "never ready": padding entries of a stream


class LevelStream(NamedTuple):
    """A level's compacted stream in one chunk, and where each query block's window starts.

    keys, values (B, H, S, K, E): the memory window (w_l items, oldest first) then the items
    written in this chunk; seen (B, N): query block q sees keys[:, :, seen : seen + w_l];
    had (B,): items the level had written before the chunk (stream item i is written
    item had - w_l + i, which exists if >= 0).
    """

    keys: torch.Tensor
    values: torch.Tensor
    seen: torch.Tensor
    had: torch.Tensor


def _take(stream: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """stream (B, H, S, K, E), index (B, *shape) -> (B, H, *shape, K, E)."""
    batch, heads, _, slots, width = stream.shape
    flat = index.reshape(batch, 1, -1, 1, 1).expand(batch, heads, -1, slots, width)
    return stream.gather(2, flat).view(batch, heads, *index.shape[1:], slots, width)


def _kth_true(flags: torch.Tensor, count: int) -> torch.Tensor:
    """flags (B, M) bool -> (B, count): index of the 1st, 2nd, ... True per row (clamped)."""
    running = flags.long().cumsum(1)  # (B, M)
    wanted = torch.arange(1, count + 1, device=flags.device).expand(flags.shape[0], count).contiguous()
    return torch.searchsorted(running, wanted).clamp(max=max(flags.shape[1] - 1, 0))


def policy_levels(attn, item_keys: torch.Tensor, item_values: torch.Tensor, state: dict, block_start: int,
                  block_index: torch.Tensor, end, trace: list | None = None):
    """The summary levels' keys, values and masks for every query block, and their new state.

    item_keys, item_values: (B, H, n, E) level-0 inputs from ``block_start`` on.
    block_index: (N,) absolute level-0 block of each query block. end: int or (B,).
    Returns (streams, new_state): per level a ``LevelStream``, whose windows ``gathered_levels``
    or ``hnae.banded`` read. ``trace``, if a list, gets one dict per level.
    """
    batch, heads, inputs, width = item_keys.shape
    windows, slots, device = attn.windows, attn.slots, item_keys.device
    w0 = windows[0]
    end = torch.as_tensor(end, device=device).expand(batch)  # (B,)
    complete = inputs // w0
    shape = (batch, heads, complete, w0, width)
    keys, values = attn.summarise(1, item_keys[:, :, :complete * w0].reshape(shape),
                                  item_values[:, :, :complete * w0].reshape(shape))  # (B, H, M, K, E)
    candidate_block = block_start // w0 + torch.arange(complete, device=device)  # (M,) absolute
    ready = (candidate_block + 1).expand(batch, complete)  # (B, M): the first block that sees it
    valid = ready * w0 <= end.unsqueeze(1)  # complete before the stream ends
    streams, new_state = [], {}
    written_before, skipped_before = state["written"], state["skipped"]  # (B, L-1) each
    written_now, skipped_now = [], []
    for level in range(1, len(windows)):
        level_width = windows[level]
        memory_shape = (batch, heads, level_width, slots, width)
        memory_keys = state[f"memory_keys_{level}"].view(memory_shape)
        memory_values = state[f"memory_values_{level}"].view(memory_shape)
        had = written_before[:, level - 1]  # (B,)
        write, values = attn.policy.decide(level, values, valid, memory_values[:, :, -1], had > 0)
        count = write.long().sum(1)  # (B,) written in this chunk
        most = int(count.max()) if count.numel() else 0
        source = _kth_true(write, most)  # (B, n): candidate index of each written item
        exists_new = torch.arange(most, device=device).unsqueeze(0) < count.unsqueeze(1)  # (B, n)
        stream_keys = torch.cat([memory_keys, _take(keys, source)], dim=2)  # (B, H, w + n, K, E)
        stream_values = torch.cat([memory_values, _take(values, source)], dim=2)
        new_ready = torch.where(exists_new, ready.gather(1, source) if most else source, FAR)  # (B, n)

        # Query block q sees stream[s : s + w], s = written items ready by q.
        seen = torch.searchsorted(new_ready.contiguous(), block_index.expand(batch, -1).contiguous(),
                                  right=True)  # (B, N)
        streams.append(LevelStream(stream_keys, stream_values, seen, had))

        last = count.unsqueeze(1) + torch.arange(level_width, device=device)  # (B, w): the newest w
        state_shape = (batch, heads, level_width * slots, width)
        new_state[f"memory_keys_{level}"] = _take(stream_keys, last).reshape(state_shape)
        new_state[f"memory_values_{level}"] = _take(stream_values, last).reshape(state_shape)
        written_now.append(had + count)
        skipped_now.append(skipped_before[:, level - 1] + (valid & ~write).long().sum(1))
        if trace is not None:
            trace.append({"level": level, "ready": ready * w0, "valid": valid, "write": write})

        if level + 1 < len(windows):  # the next level's candidates: each completed block of w written
            position = had.unsqueeze(1) + torch.arange(1, most + 1, device=device)  # (B, n) written count
            completes = exists_new & (position % level_width == 0)
            total = completes.long().sum(1)
            made = int(total.max()) if total.numel() else 0
            newest = _kth_true(completes, made) + level_width  # (B, m) stream index of each block's end
            block = newest.unsqueeze(2) - level_width + 1 + torch.arange(level_width, device=device)  # (B, m, w)
            block_shape = (batch, heads, made, level_width * slots, width)
            keys, values = attn.summarise(level + 1, _take(stream_keys, block).reshape(block_shape),
                                          _take(stream_values, block).reshape(block_shape))
            valid = torch.arange(made, device=device).unsqueeze(0) < total.unsqueeze(1)  # (B, m)
            ready = new_ready.gather(1, newest - level_width) if made else newest
    new_state["written"] = torch.stack(written_now, dim=1)
    new_state["skipped"] = torch.stack(skipped_now, dim=1)
    return streams, new_state


def gathered_levels(attn, streams: list) -> tuple[list, list, list]:
    """Each query block's window of every level's stream, with the age embeddings added.

    Returns key and value parts (B, H, N, w_l*K, E) and masks (B, N, w_l*K), one per level.
    """
    key_parts, value_parts, mask_parts = [], [], []
    for level, (stream_keys, stream_values, seen, had) in enumerate(streams, start=1):
        batch, heads, _, slots, width = stream_keys.shape
        level_width = attn.windows[level]
        window = seen.unsqueeze(2) + torch.arange(level_width, device=seen.device)  # (B, N, w)
        age_keys = (attn.age_keys[level - 1] * attn.content_mask).unsqueeze(1).unsqueeze(3)  # (H, 1, w, 1, E)
        age_values = attn.age_value_table(level).unsqueeze(1).unsqueeze(3)
        flat_shape = (batch, heads, seen.shape[1], level_width * slots, width)
        key_parts.append((_take(stream_keys, window) + age_keys).reshape(flat_shape))
        value_parts.append((_take(stream_values, window) + age_values).reshape(flat_shape))
        absolute = had.view(batch, 1, 1) - level_width + window  # (B, N, w) written index of each entry
        mask_parts.append((absolute >= 0).repeat_interleave(slots, dim=2))  # (B, N, w*K)
    return key_parts, value_parts, mask_parts
