"""Attention over compacted summary streams without copying each query block's window.

Under a write policy, query block q of a chunk sees items ``seen_q .. seen_q + w_l - 1`` of
each level's compacted stream (``hnae.memory_levels``). ``gathered_levels`` copies that
window, with its age embeddings added, for every query block: (B, H, N, w_l*K, E) per level.
When query blocks are short (a small first window: with w_0 = 1 every input is a block) and
the streams are short, scoring every query against the whole stream and masking it to the
band costs less: the scores are (B, H, N, R, S*K) and the age embeddings enter as
``q . age[i - seen_q]`` on the keys' side and as a sum of the attention per window place on
the values' side. Both give one softmax over the same keys, so the results agree to rounding.

Dimension letters as in ``hnae.attention``: B batch, H heads, N query blocks, R rows per
block, S stream items, K slots, E head width, w a level's window.
"""

from __future__ import annotations

import torch

from .windows import each_slot


# A score of the band costs about this many times a copied window entry: the scores pass through
# the age gather, the masks, the softmax and a scatter back (training steps of ``hnae bench memory``'s
# model, 2-core CPU: the band was 1.5x faster with 108 stream items, 2.4x slower with 508).
BAND_COST = 6


def band_pays(rows: int, streams: list, windows: tuple, head_width: int) -> bool:
    """Whether scoring whole streams (R x S per block and slot) costs less than copying windows (w x E)."""
    scored = sum(rows * stream.keys.shape[2] for stream in streams)
    copied = sum(width * head_width for width in windows[1:])
    return BAND_COST * scored < copied


def banded_attention(attn, queries: torch.Tensor, local_keys: torch.Tensor, local_values: torch.Tensor,
                     local_mask: torch.Tensor, streams: list) -> torch.Tensor:
    """queries (B, H, N, R, E), local keys and values (B, H, N, S_0, E), local mask (N, R, S_0),
    one ``LevelStream`` per summary level -> attended (B, H, N, R, E)."""
    batch, heads, blocks, rows, width = queries.shape
    scores = [torch.matmul(queries, local_keys.transpose(-1, -2))]  # (B, H, N, R, S_0)
    masks = [local_mask.expand(batch, 1, blocks, rows, -1)]  # (B, 1, N, R, S_0)
    bands = []
    for level, (stream_keys, stream_values, seen, had) in enumerate(streams, start=1):
        items, slots = stream_keys.shape[2], stream_keys.shape[3]
        level_width = attn.windows[level]
        age_keys = attn.age_keys[level - 1] * attn.content_mask  # (H, w, E)
        item = torch.arange(items, device=seen.device)  # (S,)
        place = item - seen.unsqueeze(2)  # (B, N, S): the item's place in each block's window
        visible = (place >= 0) & (place < level_width) & (had.view(-1, 1, 1) - level_width + item >= 0)
        place = place.clamp(0, level_width - 1).view(batch, 1, blocks, 1, items).expand(-1, heads, -1, rows, -1)
        content = torch.matmul(queries, stream_keys.flatten(2, 3).unsqueeze(2).transpose(-1, -2))  # (B, H, N, R, S*K)
        ages = torch.einsum("bhnre,hwe->bhnrw", queries, age_keys).gather(4, place)  # (B, H, N, R, S)
        scores.append(content + each_slot(ages, slots, dim=4))
        masks.append(each_slot(visible, slots, dim=2).view(batch, 1, blocks, 1, items * slots).expand(
            -1, -1, -1, rows, -1))
        bands.append((stream_values, place, level))
    weights = torch.cat(scores, dim=-1) * width ** -0.5
    weights = weights.masked_fill(~torch.cat(masks, dim=-1), float("-inf")).softmax(-1)
    weights = weights.split([local_keys.shape[3]] + [v.shape[2] * v.shape[3] for v, _, _ in bands], dim=-1)
    attended = torch.matmul(weights[0], local_values)  # (B, H, N, R, E)
    for part, (stream_values, place, level) in zip(weights[1:], bands):
        items, slots = stream_values.shape[2], stream_values.shape[3]
        attended = attended + torch.matmul(part, stream_values.flatten(2, 3).unsqueeze(2))
        per_item = part.view(*part.shape[:4], items, slots).sum(-1)  # (B, H, N, R, S); 0 outside the band
        per_place = per_item.new_zeros(*per_item.shape[:4], attn.windows[level]).scatter_add(4, place, per_item)
        attended = attended + torch.einsum("bhnrw,hwe->bhnre", per_place, attn.age_value_table(level))
    return attended
