"""The layer's attention against references written here, position by position."""

import math

import pytest
import torch

import hnae
from hnae.reach import level_spans


def fresh_state(attention, batch, dtype):
    return {name: torch.zeros(batch, *shape, dtype=dtype) for name, shape in attention.state_shapes().items()}


def run_layer(attention, x):
    batch, steps = x.shape[0], x.shape[1]
    output, _ = attention.forward_chunk(x, fresh_state(attention, batch, x.dtype), 0,
                                        torch.full((batch,), steps))
    return output


def split_heads(t, heads):  # (T, D) -> (H, T, E)
    return t.view(t.shape[0], heads, -1).transpose(0, 1)


def test_dense_causal_softmax_when_the_window_covers_everything():
    """windows=(w0,) with w0 >= T: exactly dense causal attention with rotary positions."""
    torch.manual_seed(3)
    steps, d_model, heads = 12, 16, 2
    attention = hnae.HierarchicalAttention(d_model, heads, windows=(16,)).eval()
    x = torch.randn(1, steps, d_model)
    with torch.no_grad():
        q, k, v = attention.query_key_value(x[0]).chunk(3, dim=-1)  # (T, D) each
        q, k, v = (split_heads(t, heads) for t in (q, k, v))  # (H, T, E)
        positions = torch.arange(steps)
        q, k = attention.rotary(q, positions), attention.rotary(k, positions)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_model // heads)  # (H, T, T)
        scores = scores.masked_fill(torch.ones(steps, steps).triu(1).bool(), float("-inf"))
        dense = (scores.softmax(-1) @ v).transpose(0, 1).reshape(steps, d_model)  # (T, D)
        expected = attention.output(dense)
        actual = run_layer(attention, x)[0]
    assert (actual - expected).abs().max().item() <= 1e-5


def naive_hierarchy(attention, x):
    """One position at a time: build the visible key set explicitly, one softmax over it."""
    steps, d_model = x.shape
    heads, width, slots = attention.num_heads, attention.head_width, attention.slots
    windows, spans, w0 = attention.windows, level_spans(attention.windows), attention.windows[0]
    q, k, v = attention.query_key_value(x).chunk(3, dim=-1)  # (T, D)
    positions = torch.arange(steps)
    q = attention.rotary(split_heads(q, heads), positions)  # (H, T, E)
    k = attention.rotary(split_heads(k, heads), positions)
    v = split_heads(v, heads)
    weight_k, weight_v = attention.query_key_value.weight[d_model:].chunk(2)
    bias_k, bias_v = attention.query_key_value.bias[d_model:].chunk(2)
    # Items of each level as keys/values (H, n, P, E); level 0: the inputs.
    item_keys, item_values = [k.unsqueeze(2)], [v.unsqueeze(2)]
    for level in range(1, len(windows)):
        below = windows[level - 1]
        keys_below, values_below = item_keys[-1], item_values[-1]
        new_keys, new_values = [], []
        for j in range(keys_below.shape[1] // below):
            block_keys = keys_below[:, j * below:(j + 1) * below].reshape(1, heads, 1, -1, width)
            block_values = values_below[:, j * below:(j + 1) * below].reshape(1, heads, 1, -1, width)
            summary = attention.pools[level - 1](block_keys, block_values)[0, 0]  # (K, D)
            new_keys.append(split_heads(summary @ weight_k.T + bias_k, heads) * attention.content_mask)
            new_values.append(split_heads(summary @ weight_v.T + bias_v, heads))  # (H, K, E)
        empty = x.new_zeros(heads, 0, slots, width)
        item_keys.append(torch.stack(new_keys, 1) if new_keys else empty)
        item_values.append(torch.stack(new_values, 1) if new_values else empty)
    outputs = []
    for t in range(steps):
        keys, values = [], []
        for s in range(max(0, t - w0 + 1), t + 1):
            keys.append(k[:, s])
            values.append(v[:, s])
        block = t // w0
        for level in range(1, len(windows)):
            visible = block * w0 // spans[level]
            for place, j in enumerate(range(visible - windows[level], visible)):
                if j < 0:
                    continue
                for slot in range(slots):
                    keys.append(item_keys[level][:, j, slot]
                                + attention.age_keys[level - 1][:, place] * attention.content_mask)
                    values.append(item_values[level][:, j, slot] + attention.age_values[level - 1][:, place])
        key_set, value_set = torch.stack(keys, 1), torch.stack(values, 1)  # (H, S, E)
        scores = (key_set @ q[:, t].unsqueeze(-1)).squeeze(-1) / math.sqrt(width)  # (H, S)
        outputs.append((scores.softmax(-1).unsqueeze(-1) * value_set).sum(1).reshape(d_model))
    return attention.output(torch.stack(outputs))  # (T, D)


@pytest.mark.parametrize("windows,slots,query_rows", [
    ((4, 4), 1, None), ((4, 4), 3, None), ((3, 2, 2), 2, None), ((2, 3, 1, 2), 1, None),
    ((4, 4), 2, 1), ((4, 4), 2, 2), ((6, 2, 2), 1, 3), ((6, 2, 2), 2, 2)])  # query_rows: blocks shorter than w0
def test_hierarchy_matches_a_naive_position_by_position_reference(windows, slots, query_rows):
    torch.manual_seed(5)
    attention = hnae.HierarchicalAttention(16, 2, windows, summary_slots=slots).double().eval()
    attention.query_rows = query_rows or windows[0]
    steps = 2 * math.prod(windows) + 7
    x = torch.randn(1, steps, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = naive_hierarchy(attention, x[0])
        actual = run_layer(attention, x)[0]
    assert (actual - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("query_rows", [3, 0, 8, 2.0])
def test_query_rows_must_divide_the_first_window(query_rows):
    attention = hnae.HierarchicalAttention(16, 2, (4, 4))
    attention.query_rows = query_rows
    with pytest.raises(ValueError, match="query_rows must be a positive divisor of the first window 4"):
        run_layer(attention, torch.randn(1, 9, 16))
