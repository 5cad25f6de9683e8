"""Causality is exact; the reach is exactly what ``first_visible``/``receptive_field`` document."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hnae
from conftest import random_input, tiny_model

CASES = [((4, 4), 1), ((4, 4), 2), ((7, 5, 3), 1), ((7, 5, 3), 2), ((5,), 3), ((3, 2, 2), 3)]
# windows, layers, short_conv: a convolution in front of each layer's attention reaches k - 1 further
CONV_CASES = [((4, 4), 1, 3), ((4, 4), 2, 5), ((7, 5, 3), 2, 2), ((5,), 3, 4), ((3, 2, 2), 2, 8)]


def assert_reach_both_ways(model, x, positions):
    """For each t: changing x[first_visible(t)] changes out[t]; changing everything before it does not.
    x (1, T, 5) float64: no rounding luck."""
    with torch.no_grad():
        reference, _ = model(x)
        for t in positions:
            oldest = int(model.first_visible(t))
            inside = x.clone()
            inside[0, oldest] += 1.0
            assert (model(inside)[0][0, t] - reference[0, t]).abs().max() > 1e-9, (t, oldest)
            if oldest > 0:
                beyond = x.clone()
                beyond[0, :oldest] += torch.randn(oldest, 5, dtype=torch.float64)
                assert torch.equal(model(beyond)[0][0, t], reference[0, t]), (t, oldest)


@pytest.mark.parametrize("windows,num_layers", CASES)
@pytest.mark.parametrize("pool", ["attention", "select"])
def test_future_inputs_never_change_past_outputs(windows, num_layers, pool):
    model = tiny_model(windows, num_layers, summary_pool=pool)
    steps = 2 * model.receptive_field
    x = random_input(2, steps, 5)
    with torch.no_grad():
        reference, _ = model(x)
        for t in range(0, steps - 1, max(1, steps // 25)):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 10
            output, _ = model(changed)
            assert torch.equal(output[:, : t + 1], reference[:, : t + 1]), t


@pytest.mark.parametrize("windows,num_layers", CASES)
@pytest.mark.parametrize("pool", ["attention", "select"])
def test_reach_both_ways(windows, num_layers, pool):
    """x[first_visible(t)] changes out[t]; nothing before it does (float64: no rounding luck).
    A selecting pool also passes: every item moves its block's mean, so every kept item's gate."""
    model = tiny_model(windows, num_layers, dtype=torch.float64, summary_pool=pool)
    steps = 3 * model.receptive_field
    x = random_input(1, steps, 5, dtype=torch.float64)
    assert_reach_both_ways(model, x, range(0, steps, max(1, steps // 40)))


@pytest.mark.parametrize("windows,num_layers", CASES)
def test_receptive_field_is_the_largest_span(windows, num_layers):
    model = tiny_model(windows, num_layers)
    t = torch.arange(4 * model.receptive_field)
    spans = t - model.first_visible(t) + 1
    assert int(spans.max()) == model.receptive_field
    if num_layers == 1:  # one layer always sees at least prod(windows) past inputs
        far = t[t >= model.receptive_field]
        assert int((far - model.first_visible(far)).min()) >= model.config.guaranteed_reach


@pytest.mark.parametrize("windows,num_layers,kernel", CONV_CASES)
def test_reach_with_a_short_conv(windows, num_layers, kernel):
    """Both ways with short_conv: x[first_visible(t)] changes out[t], nothing before it does, and the
    receptive field is the largest span; one layer reaches k - 1 further than without, a stack more."""
    model = tiny_model(windows, num_layers, dtype=torch.float64, short_conv=kernel)
    steps = 3 * model.receptive_field
    x = random_input(1, steps, 5, dtype=torch.float64)
    t = torch.arange(steps)
    assert int((t - model.first_visible(t) + 1).max()) == model.receptive_field
    plain = tiny_model(windows, num_layers)
    far = torch.arange(4 * model.receptive_field, 5 * model.receptive_field)
    if num_layers == 1:
        assert torch.equal(model.first_visible(far), plain.first_visible(far) - (kernel - 1))
    else:  # the shifts compose through first_visible, which is flat within a block: at least one per layer
        assert torch.all(model.first_visible(far) <= plain.first_visible(far) - (kernel - 1))
    assert_reach_both_ways(model, x, range(0, steps, max(1, steps // 30)))


@settings(max_examples=40, deadline=None)
@given(windows=st.lists(st.integers(1, 6), min_size=1, max_size=3), t=st.integers(0, 500))
def test_one_layer_reach_formula(windows, t):
    """At least prod(windows) steps back (where the stream is long enough), at most that plus a top block."""
    windows = tuple(windows)
    oldest = int(hnae.first_visible(torch.tensor(t), windows))
    reach = 1
    for w in windows:
        reach *= w
    top_span = reach // windows[-1]
    assert oldest <= t
    assert oldest <= max(0, t - reach + (1 if len(windows) == 1 else 0))
    assert t - oldest + 1 <= reach + (top_span if len(windows) > 1 else 0)


@settings(max_examples=15, deadline=None)
@given(windows=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_reach_random_windows(windows, seed):
    """Both ways, for random windows and a random position."""
    model = tiny_model(tuple(windows), 1, dtype=torch.float64)
    steps = 2 * model.receptive_field + 3
    t = seed % steps
    x = random_input(1, steps, 5, dtype=torch.float64, seed=seed)
    oldest = int(model.first_visible(t))
    with torch.no_grad():
        reference = model(x)[0][0, t]
        inside = x.clone()
        inside[0, oldest] += 1.0
        assert (model(inside)[0][0, t] - reference).abs().max() > 1e-9
        if oldest > 0:
            beyond = x.clone()
            beyond[0, :oldest] -= 3.0
            assert torch.equal(model(beyond)[0][0, t], reference)
