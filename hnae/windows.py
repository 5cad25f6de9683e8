"""Tensor helpers for the windows a layer keeps: rings, per-stream windows, slot repeats.

Dimension letters as in ``hnae.attention``: B batch, H heads, E head width,
w a window's length, K summary slots.
"""

from __future__ import annotations

import torch


def each_slot(tensor: torch.Tensor, slots: int, dim: int) -> torch.Tensor:
    """Each entry along ``dim`` repeated ``slots`` times in place (``repeat_interleave``, without its index)."""
    shape = list(tensor.shape)
    expanded = tensor.unsqueeze(dim + 1).expand(*shape[:dim + 1], slots, *shape[dim + 1:])
    return expanded.reshape(*shape[:dim], shape[dim] * slots, *shape[dim + 1:])


def take_windows(stream: torch.Tensor, time_dim: int, stream_start: int, first, width: int) -> torch.Tensor:
    """Per batch element, ``width`` consecutive entries of ``stream`` along ``time_dim``.

    stream: (B, ..., n, ...) whose entry i along time_dim is absolute index stream_start + i.
    first: absolute index of the first entry, an int (the same for every element: a copied
    slice) or a (B,) tensor. Returns the stream's shape with ``width`` along time_dim.
    """
    if stream.shape[time_dim] == 0:  # nothing in the stream yet: all entries are empty
        shape = list(stream.shape)
        shape[time_dim] = width
        return stream.new_zeros(shape)
    if isinstance(first, int):
        return stream.narrow(time_dim, first - stream_start, width).clone()  # no view of the stream kept
    moved = stream.movedim(time_dim, 1)  # (B, n, ...)
    offsets = first.unsqueeze(1) - stream_start + torch.arange(width, device=first.device)  # (B, width)
    rows = torch.arange(moved.shape[0], device=first.device).unsqueeze(1)  # (B, 1)
    picked = moved[rows, offsets.clamp(0, moved.shape[1] - 1)]  # (B, width, ...)
    return picked.movedim(1, time_dim)


def times_shared(batched: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """batched (B, H, 1, X) @ shared (H, X, Y) -> (B, H, 1, Y), one matmul per head.

    ``torch.matmul`` would broadcast ``shared`` to (B, H, X, Y) and copy it for every stream.
    """
    per_head = torch.bmm(batched.squeeze(2).transpose(0, 1), shared)  # (H, B, Y)
    return per_head.transpose(0, 1).unsqueeze(2)


def ring_from_ordered(ordered: torch.Tensor, end) -> torch.Tensor:
    """The last w inputs before ``end``, oldest first (B, H, w, E) -> the ring layout of ``hnae.state``.

    In the ring, the input at position p sits at slot p mod w. ``end``: an int, or (B,) per stream.
    """
    width = ordered.shape[2]
    if isinstance(end, int):
        return torch.roll(ordered, end % width, dims=2)
    index = (torch.arange(width, device=ordered.device) - end.view(-1, 1)) % width  # (B, w)
    return ordered.gather(2, index.view(-1, 1, width, 1).expand_as(ordered))


def local_oldest_first(old: torch.Tensor, new: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Attention weights on the old ring (B, H, 1, w0) and the new input (B, H, 1, 1) at
    positions (B,) -> (B, H, w0) on positions t - w0 + 1 .. t, oldest first."""
    batch, heads, _, w0 = old.shape
    slots = (position.view(batch, 1) + 1 + torch.arange(w0 - 1, device=old.device)) % w0  # (B, w0-1)
    older = old.squeeze(2).gather(2, slots.view(batch, 1, w0 - 1).expand(-1, heads, -1))
    return torch.cat([older, new.squeeze(2)], dim=2)


RING_WRITES = ("copy", "in_place", "defer")


def ring_write(ring: torch.Tensor, slot: torch.Tensor, item: torch.Tensor, in_place: bool) -> torch.Tensor:
    """ring (B, H, w, E) with item (B, H, 1, E) written at slot (B,) of each stream. The ring keeps
    its dtype: under autocast the item may be bf16 while the state is float32."""
    item = item.to(ring.dtype)
    index = slot.view(-1, 1, 1, 1).expand_as(item)
    return ring.scatter_(2, index, item) if in_place else ring.scatter(2, index, item)


def items_complete(first: int, count: int, step: int, span: int, device) -> torch.Tensor:
    """(count,) how many items of ``span`` steps each are complete at positions first, first + step, ...
    (a query block's start gives the count at its level-0 block's start where span is a multiple of w0).

    Built from Python integers under ``torch.compile``: torch 2.13's CPU inductor miscompiled the
    tensor form (``arange`` times ``step``, floor-divided, feeding an ``index_select``): it filled
    16 of 22 indices with one constant, read the rest uninitialised, and a training call aborted.
    """
    if torch.compiler.is_compiling():
        return torch.tensor([(first + q * step) // span for q in range(count)], device=device)
    return torch.div(first + torch.arange(count, device=device) * step, span, rounding_mode="floor")
