"""Write policies: the rules.

The decision rules (thresholds, zero vectors, the last *written* item) hold at
their edges; the learned gate trains and its penalty covers the last forward;
bad arguments are refused by name; skipped candidates stretch the reach in time.
"""

from __future__ import annotations

import math

import pytest
import torch

import hnae
from hnae.write_policy import WritePolicy, cosine_similarity

from policy_helpers import (FEATURES, HIDDEN, EXACT, policy_model, inputs, run_in_chunks,
                            max_difference, assert_states_equal, counters, calibrate_gates)

# ------------------------------------------------ 6. decision edge cases
def novelty_decisions(items, threshold, last=None, valid=None):
    """Decisions of one novelty level for one stream: items (M, F) float64 -> list of bools.

    The items go in as (B=1, H=1, M, K=1, E=F), as ``policy_levels`` and ``step`` pass them.
    """
    items = torch.as_tensor(items, dtype=torch.float64)
    count, width = items.shape
    policy = WritePolicy(("novelty",), (threshold,), (None,), width, 1, dtype=torch.float64)
    values = items.view(1, 1, count, 1, width)
    valid = torch.ones(1, count, dtype=torch.bool) if valid is None else torch.tensor([valid])
    has_last = torch.tensor([last is not None])
    last = torch.zeros(1, 1, 1, width, dtype=torch.float64) if last is None else \
        torch.as_tensor(last, dtype=torch.float64).view(1, 1, 1, width)
    write, stored = policy.decide(1, values, valid, last, has_last)
    assert torch.equal(stored, values)  # novelty stores the candidate as it is
    return write[0].tolist()


def unit(index, width=8):
    vector = torch.zeros(width, dtype=torch.float64)
    vector[index] = 1.0
    return vector


def test_cosine_similarity_edges():
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    zero = torch.zeros(3, 64, dtype=torch.float64)
    assert torch.equal(cosine_similarity(v, v), torch.ones(3, dtype=torch.float64))
    assert torch.equal(cosine_similarity(zero, zero), torch.ones(3, dtype=torch.float64))
    assert torch.equal(cosine_similarity(zero, v), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(cosine_similarity(v, zero), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(cosine_similarity(v, -v), -torch.ones(3, dtype=torch.float64))  # clamped: never < -1
    assert torch.equal(cosine_similarity(v * 3.0, v), torch.ones(3, dtype=torch.float64))  # never > 1
    a, b = unit(0).unsqueeze(0), unit(1).unsqueeze(0)
    assert cosine_similarity(a, b).tolist() == [0.0]
    assert cosine_similarity(a + b, a).item() == pytest.approx(math.sqrt(0.5), abs=1e-15)
    w = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    expected = torch.nn.functional.cosine_similarity(v, w, dim=-1)
    assert max_difference(cosine_similarity(v, w), expected) <= 1e-14
    assert max_difference(cosine_similarity(v * 1e3, w * 1e-3), expected) <= 1e-14  # scale-free
    half = cosine_similarity(v.float(), w.float())  # any floating dtype, rows independent
    assert half.dtype == torch.float32 and max_difference(half.double(), expected) <= 1e-6


def test_identical_items_are_skipped_and_the_first_is_always_written():
    v = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert novelty_decisions(v[[0, 0, 0]], 0.95) == [True, False, False]
    assert novelty_decisions(v[[0, 0, 0]], 1.0) == [True, False, False]  # identical: similarity 1, not < 1
    for threshold in (-1.0, 0.0, 0.5, 1.0):  # the first candidate of a level: whatever the threshold
        assert novelty_decisions(v[[2]], threshold) == [True]
    assert novelty_decisions(v[[2]], 0.5, last=v[2]) == [False]  # a level that has written: compared
    assert novelty_decisions(v[[2]], 0.5, last=-v[2]) == [True]


def test_orthogonal_items_are_written():
    assert novelty_decisions(torch.stack([unit(0), unit(1), unit(2), unit(1)]), 0.5) == [True] * 4
    assert novelty_decisions(torch.stack([unit(0), unit(1)]), 0.0) == [True, False]  # 0 is not < 0


def test_zero_vectors():
    zero, v = torch.zeros(8, dtype=torch.float64), unit(3) + 0.5 * unit(5)
    assert novelty_decisions(torch.stack([zero, zero, zero]), 0.5) == [True, False, False]  # zero after zero
    assert novelty_decisions(torch.stack([v, zero, zero, v]), 0.5) == [True, True, False, True]
    assert novelty_decisions(torch.stack([zero, v]), 0.5) == [True, True]
    assert novelty_decisions(torch.stack([zero]), 0.5, last=zero) == [False]
    assert novelty_decisions(torch.stack([zero, v]), -0.5) == [True, False]  # similarity 0 >= -0.5


def test_threshold_minus_one_skips_everything_after_the_first():
    v = torch.randn(6, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    items = torch.stack([v[0], -v[0], v[1], -v[1] * 1e-3, torch.zeros(32, dtype=torch.float64), v[2]])
    assert novelty_decisions(items, -1.0) == [True] + [False] * 5
    assert novelty_decisions(items[1:], -1.0, last=v[0]) == [False] * 5


def test_threshold_one_writes_every_item_not_identical_to_the_last_written():
    v = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    nudged = v.clone()
    nudged[4] += 1e-3 * v.norm()
    items = torch.stack([v, nudged, nudged, v, v, -v])
    assert novelty_decisions(items, 1.0) == [True, True, False, True, False, True]


def test_a_small_change_on_a_long_vector_is_not_swallowed():
    """One coordinate of 64 moves from 0: written at 0.95, skipped at 0.85 (similarity ~0.9)."""
    before = torch.ones(64, dtype=torch.float64)
    before[0] = 0.0
    after = before.clone()
    after[0] = math.sqrt(63 * (1 / 0.81 - 1))  # similarity exactly sqrt(0.81) = 0.9 in exact arithmetic
    similarity = cosine_similarity(after.unsqueeze(0), before.unsqueeze(0)).item()
    assert similarity == pytest.approx(0.9, abs=1e-12)
    items = torch.stack([before, after])
    assert novelty_decisions(items, 0.95) == [True, True]
    assert novelty_decisions(items, 0.85) == [True, False]
    assert novelty_decisions(torch.stack([after]), 0.95, last=before) == [True]  # across calls alike


def test_a_slow_drift_is_written_once_far_enough_from_the_last_written_item():
    """Each step turns by 0.1 rad (similarity to the previous item 0.995 > 0.95): compared with
    the previous candidate nothing would ever be written; compared with the last *written* item,
    one is written every 4 steps (cos 0.3 = 0.955 is skipped, cos 0.4 = 0.921 is written)."""
    angles = torch.arange(13, dtype=torch.float64) * 0.1
    items = torch.zeros(13, 16, dtype=torch.float64)
    items[:, 2], items[:, 9] = angles.cos(), angles.sin()
    consecutive = cosine_similarity(items[1:], items[:-1])
    assert bool((consecutive > 0.95).all())
    writes = novelty_decisions(items, 0.95)
    assert any(writes[1:])
    assert [index for index, write in enumerate(writes) if write] == [0, 4, 8, 12]


def test_invalid_candidates_are_neither_written_nor_compared_against():
    a, b = unit(0), unit(1)
    assert novelty_decisions(torch.stack([a, b, b]), 0.5, valid=[True, False, True]) == [True, False, True]
    assert novelty_decisions(torch.stack([b, a]), 0.5, valid=[False, True]) == [False, True]


def test_each_stream_compares_with_its_own_last_written_item():
    policy = WritePolicy(("novelty", "novelty"), (0.5, 0.5), (None, None), 8, 1, dtype=torch.float64)
    a, b = unit(0), unit(1)
    values = torch.stack([torch.stack([a, a]), torch.stack([a, b])]).view(2, 1, 2, 1, 8)  # (B, H, M, K, E)
    last = torch.stack([b, a]).view(2, 1, 1, 8)
    write, _ = policy.decide(2, values, torch.ones(2, 2, dtype=torch.bool), last, torch.tensor([True, True]))
    assert write.tolist() == [[True, False], [False, True]]
    write, _ = policy.decide(2, values, torch.ones(2, 2, dtype=torch.bool), last, torch.tensor([False, True]))
    assert write.tolist() == [[True, False], [False, True]]
    write, _ = policy.decide(2, values, torch.ones(2, 2, dtype=torch.bool), last, torch.tensor([True, False]))
    assert write.tolist() == [[True, False], [True, True]]


def test_novelty_compares_all_heads_and_slots():
    """The candidate's values as a whole: a change confined to one head and one slot counts."""
    policy = WritePolicy(("novelty",), (0.99,), (None,), 8, 2, dtype=torch.float64)
    first = torch.ones(1, 2, 1, 2, 4, dtype=torch.float64)  # (B, H, M, K, E)
    second = first.clone()
    second[0, 1, 0, 1] = -1.0  # head 1, slot 1 flipped: similarity 0.5
    values = torch.cat([first, second, first], dim=2)
    write, _ = policy.decide(1, values, torch.ones(1, 3, dtype=torch.bool),
                             torch.zeros(1, 2, 2, 4, dtype=torch.float64), torch.tensor([False]))
    assert write.tolist() == [[True, True, True]]
    write, _ = policy.decide(1, values, torch.ones(1, 3, dtype=torch.bool), first[:, :, 0], torch.tensor([True]))
    assert write.tolist() == [[False, True, True]]


# ------------------------------------------------------ 7. learned gates
@pytest.mark.parametrize("windows,num_layers,slots", [((3, 2, 2), 1, 2), ((4, 3), 2, 1)])
def test_gradient_reaches_the_learned_gates(windows, num_layers, slots):
    model = policy_model(windows, num_layers, "learned", slots=slots, budget=0.3)
    x = inputs(2, 3 * model.receptive_field, seed=7)
    model = calibrate_gates(model, x).train()
    output, state = model(x)
    penalty = model.write_penalty()
    assert penalty.item() > 0  # calibrated: about half written, above the budget of 0.3
    (output.sum() + penalty).backward()
    gates = [(index, level, gate, block.attention.policy.novelty_weights[level])
             for index, (block,) in enumerate(model.layers) for level, gate in block.attention.policy.gates.items()]
    assert len(gates) == num_layers * (len(windows) - 1)
    for index, level, gate, novelty_weight in gates:
        for parameter in (gate.weight, gate.bias, novelty_weight):
            assert parameter.grad is not None, (index, level)
            assert torch.isfinite(parameter.grad).all(), (index, level)
            assert parameter.grad.abs().sum() > 0, (index, level)


def test_write_penalty_is_the_written_fraction_beyond_the_budget():
    """Straight-through value: the hard written fraction (from the counters) minus the budget."""
    budget = 0.1
    model = policy_model((4, 3), 1, "learned", budget=budget)
    x = inputs(2, 3 * model.receptive_field, seed=8)
    model = calibrate_gates(model, x).train()
    _, state = model(x)
    written, skipped = counters(state, 1)
    assert written > 0 and skipped > 0
    assert model.write_penalty().item() == pytest.approx(written / (written + skipped) - budget, abs=1e-12)


@pytest.mark.parametrize("windows,num_layers", [((3, 2, 2), 1), ((4, 3), 2)])
def test_write_penalty_zero_at_full_budget_positive_when_tiny(windows, num_layers):
    x = inputs(2, 2 * hnae.receptive_field(windows, num_layers), seed=9)
    levels = num_layers * (len(windows) - 1)
    for budget, expected in [(1.0, 0.0), (0.01, 0.99 * levels)]:
        torch.manual_seed(0)
        model = hnae.HNAE(FEATURES, HIDDEN, num_layers, batch_first=True, windows=windows, num_heads=2,
                          write_policy="learned", budget=budget).double().train()  # gates start at bias 2
        output, state = model(x)
        assert all(int(layer["skipped"].sum()) == 0 for layer in state.layers)  # everything written
        penalty = model.write_penalty()
        assert penalty.item() == pytest.approx(expected, abs=1e-12), budget
        if expected:
            penalty.backward()
            bias = model.layers[0][0].attention.policy.gates["1"].bias
            assert bias.grad is not None and bias.grad.item() > 0  # lowering the gate lowers the cost
    model = hnae.HNAE(FEATURES, HIDDEN, num_layers, batch_first=True, windows=windows, num_heads=2,
                      write_policy="learned", budget=0.01).double().eval()
    with torch.no_grad():
        model(x)
    assert model.write_penalty().item() == 0.0  # eval forwards record nothing


# ------------------------------------------------------------- 8. errors
@pytest.mark.parametrize("options,error,name", [
    ({"write_policy": "sometimes"}, ValueError, "write_policy"),
    ({"write_policy": ("novelty", "bogus")}, ValueError, "write_policy"),
    ({"write_policy": None}, ValueError, "write_policy"),
    ({"write_policy": "novelty", "threshold": 1.5}, ValueError, "threshold"),
    ({"write_policy": "novelty", "threshold": -2}, ValueError, "threshold"),
    ({"write_policy": "novelty", "threshold": float("inf")}, ValueError, "threshold"),
    ({"write_policy": "novelty", "threshold": float("nan")}, TypeError, "threshold"),
    ({"write_policy": "novelty", "threshold": "0.9"}, TypeError, "threshold"),
    ({"write_policy": "novelty", "threshold": True}, TypeError, "threshold"),
    ({"write_policy": ("novelty", "novelty"), "threshold": (0.9, 1.01)}, ValueError, "threshold"),
    ({"write_policy": "learned", "budget": 0}, ValueError, "budget"),
    ({"write_policy": "learned", "budget": 1.5}, ValueError, "budget"),
    ({"write_policy": "learned", "budget": -0.1}, ValueError, "budget"),
    ({"write_policy": "learned", "budget": "a fifth"}, TypeError, "budget"),
    ({"write_policy": ("novelty",)}, ValueError, "write_policy"),
    ({"write_policy": ("novelty", "all", "all")}, ValueError, "write_policy"),
    ({"write_policy": "novelty", "threshold": (0.9,)}, ValueError, "threshold"),
    ({"write_policy": "learned", "budget": (0.2, 0.2, 0.2)}, ValueError, "budget"),
    ({"windows": (8,), "write_policy": "novelty"}, ValueError, "write_policy"),
    ({"windows": (8,), "write_policy": "learned"}, ValueError, "write_policy"),
    ({"windows": (8,), "write_policy": ("novelty",)}, ValueError, "write_policy"),
    ({"threshold": 0.9}, ValueError, "threshold"),  # no level uses it: refused, not ignored
    ({"write_policy": "learned", "threshold": 0.9}, ValueError, "threshold"),
    ({"write_policy": "novelty", "budget": 0.2}, ValueError, "budget"),
    ({"write_policy": ("novelty", "all"), "threshold": (0.9, 1.5)}, ValueError, "threshold"),
    ({"write_policy": "novelty", "threshold": 0.9, "budget": "x"}, TypeError, "budget"),
])
def test_bad_policy_arguments_name_the_argument(options, error, name):
    arguments = {"windows": (3, 2, 2)} | options
    with pytest.raises(error, match=name):
        hnae.HNAE(FEATURES, HIDDEN, **arguments)


def test_good_policy_arguments_are_normalised_per_level():
    model = hnae.HNAE(FEATURES, HIDDEN, windows=(3, 2, 2), write_policy=["novelty", "learned"],
                      threshold=-1, budget=1)
    assert model.write_policy == ("novelty", "learned")
    assert model.threshold == (-1.0, None) and model.budget == (None, 1.0)
    model = hnae.HNAE(FEATURES, HIDDEN, windows=(3, 2, 2), write_policy="novelty")
    assert model.threshold == (0.95, 0.95)  # the documented default
    assert hnae.HNAE(FEATURES, HIDDEN, windows=(3, 2), write_policy="learned").budget == (0.2,)
    assert hnae.HNAE(FEATURES, HIDDEN, windows=(8,)).write_policy == ()
    config = model.config
    assert hnae.HNAEConfig.from_dict(config.to_dict()) == config


def test_a_state_of_another_policy_is_refused():
    novelty = policy_model((3, 2), 1, "novelty", 0.9)
    other = policy_model((3, 2), 1, "novelty", 0.8)
    x = inputs(1, 10)
    with torch.no_grad():
        _, state = novelty(x)
        with pytest.raises(ValueError, match="state"):
            other(x, state)
        with pytest.raises(ValueError, match="state"):
            policy_model((3, 2), 1, "all")(x, state)


# ------------------------------------------- 9. skipping stretches the reach
def test_skipped_candidates_stretch_the_reach_beyond_the_fixed_schedule():
    """A constant stream after one distinct early input: novelty skips the identical level-1
    summaries, so the early ones stay in memory and the last output still depends on the first
    input, far beyond the fixed reach of "all" (prod(windows) + a top block = 6 inputs)."""
    windows, steps = (2, 2), 60
    constant = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
    x = constant.expand(1, steps, FEATURES).clone()
    x[0, 0] = torch.tensor([2.0, 1.0, -1.5], dtype=torch.float64)
    changed = x.clone()
    changed[0, 0] = torch.tensor([-1.0, 2.0, 0.5], dtype=torch.float64)
    assert hnae.receptive_field(windows) == 6 and int(hnae.first_visible(torch.tensor(steps - 1), windows)) > 0
    fixed = policy_model(windows, 1, "all")
    novelty = policy_model(windows, 1, "novelty", 0.99)
    with torch.no_grad():
        fixed_output, _ = fixed(x)
        assert torch.equal(fixed(changed)[0][0, 6:], fixed_output[0, 6:])  # "all": forgotten after 6 steps
        output, state = novelty(x)
        changed_output, changed_state = novelty(changed)
        streamed, streamed_state = run_in_chunks(novelty, x, [1])
    written, skipped = counters(state, 1)
    assert written <= 2 and written + skipped == steps // windows[0]  # nearly every candidate skipped
    late = (output[0, -10:] - changed_output[0, -10:]).abs().amax(-1)
    assert bool((late > 1e-6).all())  # every late output still sees the first input
    assert max_difference(streamed, output) <= EXACT  # and so does streaming
    assert_states_equal(streamed_state, state)


def test_write_penalty_covers_only_the_last_forward():
    """A forward with no candidate completing gives no penalty, not the previous forward's."""
    model = hnae.HNAE(3, 8, 1, batch_first=True, windows=(4, 3), num_heads=2, write_policy="learned",
                      budget=0.1).double().train()
    x = torch.randn(2, 20, 3, dtype=torch.float64)
    output, state = model(x)
    first = model.write_penalty()
    assert first.item() > 0  # gates start open: everything written, far above the budget
    assert model.write_penalty().item() == first.item()  # asking twice gives the same
    (output.sum() + first).backward()
    output, _ = model(x[:, :2], state.detach())  # positions 20, 21: no level-0 block completes
    penalty = model.write_penalty()
    assert penalty.item() == 0.0
    (output.sum() + penalty).backward()  # nothing from the freed graph of the first forward


def test_write_penalty_counts_every_stream_when_positions_differ():
    """Streams at different positions run in groups; the penalty is over all their candidates."""
    model = hnae.HNAE(3, 8, 1, batch_first=True, windows=(2, 3), num_heads=2, write_policy="learned",
                      budget=0.01).double()
    with torch.no_grad():
        gate = model.layers[0][0].attention.policy.gates["1"]
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(3)) * 3)
        gate.bias.zero_()
    x = torch.randn(2, 34, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model.eval()
    _, first = model(x[:1, :4])
    _, second = model(x[1:, :1])
    state = hnae.HNAEState.concatenate([first, second])  # positions [4, 1]
    model.train()
    _, end = model(x[:, 4:], state)
    written = (end.layers[0]["written"] - state.layers[0]["written"]).sum().item()
    candidates = written + (end.layers[0]["skipped"] - state.layers[0]["skipped"]).sum().item()
    expected = max(written / candidates - 0.01, 0.0)
    assert abs(model.write_penalty().item() - expected) <= 1e-12
