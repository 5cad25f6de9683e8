"""Write policies ("all", "novelty", "learned") at the summary levels.

Streaming equals one parallel call under every policy (float64, counters exact);
the compacted path reproduces the fixed-block path under "all"; padding and
streams at different positions are exact; novelty is causal and keeps the state
bounded; the decision rules (thresholds, zero vectors, the last *written* item)
hold at their edges; the learned gate trains; bad arguments are refused by name;
and skipped candidates stretch the reach in time.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import hnae
import hnae.attention
from hnae.reach import level_spans
from hnae.write_policy import WritePolicy, cosine_similarity

torch.set_num_threads(1)

FEATURES = 3
HIDDEN = 8
EXACT = 1e-10  # float64: streaming and parallel differ by rounding only


# ----------------------------------------------------------------- helpers
def policy_model(windows, num_layers=1, policy="all", threshold=None, budget=None, slots=1, seed=0,
                 gate_bias=0.0, gate_std=0.5):
    """A tiny float64 model in eval mode. Learned gates get weights of std ``gate_std`` (not the
    initial 0.02, which makes every gate almost the same) and bias ``gate_bias``: see ``calibrate_gates``."""
    torch.manual_seed(seed)
    model = hnae.HNAE(FEATURES, HIDDEN, num_layers, batch_first=True, windows=windows, num_heads=2,
                      summary_slots=slots, write_policy=policy, threshold=threshold, budget=budget)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for (block,) in model.layers:
            for gate in block.attention.policy.gates.values():
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * gate_std)
                gate.bias.fill_(gate_bias)
    return model.double().eval()


def inputs(batch, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, FEATURES, generator=generator, dtype=torch.float64)


def run_in_chunks(model, x, sizes, state=None):
    """Feed x (B, T, F) in chunks of the given sizes (cycled), carrying the state."""
    outputs, start, index = [], 0, 0
    while start < x.shape[1]:
        size = sizes[index % len(sizes)]
        output, state = model(x[:, start:start + size], state)
        outputs.append(output)
        start, index = start + size, index + 1
    return torch.cat(outputs, dim=1), state


def max_difference(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_states_equal(first, second, tolerance=EXACT):
    """Same names; position and counters identical; floating tensors within tolerance."""
    assert first.names() == second.names()
    for name, a, b in zip(first.names(), first.tensors(), second.tensors()):
        assert a.shape == b.shape, name
        if a.is_floating_point():
            assert max_difference(a, b) <= tolerance, name
        else:
            assert torch.equal(a, b), (name, a.tolist(), b.tolist())


def counters(state, level):
    """Written and skipped totals of summary level ``level`` over layers and streams."""
    written = sum(int(layer["written"][:, level - 1].sum()) for layer in state.layers)
    skipped = sum(int(layer["skipped"][:, level - 1].sum()) for layer in state.layers)
    return written, skipped


def chunk_plans(w0):
    rng = random.Random(w0 * 31 + 7)
    return {"1": [1], "3": [3], "w0-1": [max(1, w0 - 1)], "w0": [w0], "w0+1": [w0 + 1],
            "random": [rng.randint(1, 2 * w0 + 3) for _ in range(40)]}


# One config per line: windows, layers, slots, policy, threshold. Novelty thresholds are chosen
# so that every novelty level both writes and skips (summaries of a random model are similar:
# cosines mostly 0.5 to 0.95); learned gates are calibrated to split their candidates. Each test
# checks it with ``assert_policies_bite``.
CONFIGS = {
    "all": ((3, 2, 2), 1, 1, "all", None),
    "novelty-3lvl": ((3, 2, 2), 2, 2, "novelty", 0.9),
    "novelty-2lvl": ((4, 3), 1, 1, "novelty", 0.95),
    "learned-3lvl": ((3, 2, 2), 1, 2, "learned", None),
    "learned-2lvl": ((4, 3), 2, 1, "learned", None),
    "novelty,all": ((3, 2, 2), 1, 1, ("novelty", "all"), (0.9, None)),
    "all,learned": ((3, 2, 2), 2, 2, ("all", "learned"), None),
    "learned,novelty": ((3, 2, 2), 1, 2, ("learned", "novelty"), (None, 0.9)),
}


def record_candidates(model, x):
    """One forward of x. Returns the output, the state, and per layer one dict per level:
    level, values (B, H, M, K, E) of the candidates, and the trace's ready, valid and write (B, M)."""
    attentions = [block.attention for (block,) in model.layers]
    records = [[] for _ in attentions]
    for attention, layer_records in zip(attentions, records):
        original = attention.summarise

        def summarise(level, keys, values, original=original, layer_records=layer_records):
            new_keys, new_values = original(level, keys, values)
            layer_records.append((level, new_values.detach().clone()))
            return new_keys, new_values

        attention.summarise = summarise  # an instance attribute shadows the method
        attention.trace = []
    try:
        with torch.no_grad():
            output, state = model(x)
        result = []
        for attention, layer_records in zip(attentions, records):
            assert [level for level, _ in layer_records] == [entry["level"] for entry in attention.trace]
            result.append([{"level": level, "values": values, **entry}
                           for (level, values), entry in zip(layer_records, attention.trace)])
    finally:
        for attention in attentions:
            del attention.summarise
            attention.trace = None
    return output, state, result


def calibrate_gates(model, x):
    """Set each learned gate's bias so that its scores split the valid candidates of x in half.

    Layer by layer, level by level (a gate changes what the levels and layers above see). The bias
    is minus the midpoint of the two middle scores: no gate lies within rounding of 1/2.
    """
    for layer, (block,) in enumerate(model.layers):
        for level, policy in enumerate(model.write_policy, start=1):
            if policy != "learned":
                continue
            gate = block.attention.policy.gates[str(level)]
            record, = [r for r in record_candidates(model, x)[2][layer] if r["level"] == level]
            flat = record["values"].permute(0, 2, 1, 3, 4).flatten(2)[record["valid"]]  # (n, H*K*E)
            scores = (flat @ gate.weight[0]).sort().values
            assert len(scores) >= 2, (layer, level)
            middle = len(scores) // 2
            with torch.no_grad():
                gate.bias.fill_(-0.5 * float(scores[middle - 1] + scores[middle]))
    return model


def config_model(name, x):
    windows, num_layers, slots, policy, threshold = CONFIGS[name]
    return calibrate_gates(policy_model(windows, num_layers, policy, threshold, slots=slots), x)


def assert_policies_bite(model, state):
    """Every novelty or learned level of the run wrote some candidates and skipped some."""
    for level, policy in enumerate(model.write_policy, start=1):
        written, skipped = counters(state, level)
        if policy == "all":
            assert skipped == 0, (level, policy)
            assert written > 0, (level, policy)
        else:
            assert written > 0 and skipped > 0, (level, policy, written, skipped)


# ----------------------------------------------------------- 1. exactness
@pytest.mark.parametrize("plan", ["1", "3", "w0-1", "w0", "w0+1", "random"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_streaming_equals_parallel(config, plan):
    windows, num_layers = CONFIGS[config][:2]
    steps = 3 * hnae.receptive_field(windows, num_layers)
    x = inputs(2, steps)
    model = config_model(config, x)
    with torch.no_grad():
        whole, whole_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, chunk_plans(model.windows[0])[plan])
    assert_policies_bite(model, whole_state)
    assert max_difference(whole, chunked) <= EXACT
    assert_states_equal(whole_state, chunked_state)
    assert whole_state.position.tolist() == [steps, steps]


def _reference_decisions(policy, candidates, threshold, gate):
    """The documented rule, one candidate at a time: candidates (M, H, K, E) of one stream."""
    writes, last = [], None
    for item in candidates:
        flat = item.reshape(-1)
        if policy == "novelty":
            if last is None:
                write = True
            elif torch.equal(flat, last):
                write = False
            else:
                norms = flat.norm() * last.norm()
                similarity = 0.0 if norms == 0 else float(flat @ last / norms)
                write = similarity < threshold
        else:
            with torch.no_grad():
                write = float(torch.sigmoid(gate(flat))) >= 0.5
        if write:
            last = flat
        writes.append(write)
    return writes


@pytest.mark.parametrize("policy,threshold", [
    (("novelty", "novelty"), (0.8, 0.95)),
    ("learned", None),
    (("learned", "novelty"), (None, 0.95)),
])
def test_parallel_decisions_follow_the_rule_and_windows_hold_written_items(policy, threshold):
    """One layer, one call: each level's decisions match a one-by-one reference of the rule,
    the final memory window holds the last w_l *written* items (scaled by the gate if learned),
    and a level-2 candidate is made (and visible) when the level-1 written count fills a block."""
    x = inputs(2, 3 * hnae.receptive_field((3, 2, 2)), seed=5)
    model = calibrate_gates(policy_model((3, 2, 2), 1, policy, threshold, slots=2), x)
    attention = model.layers[0][0].attention
    _, state, (records,) = record_candidates(model, x)
    assert [entry["level"] for entry in records] == [1, 2]
    w0, w1 = model.windows[:2]
    first, second = records
    for row in range(x.shape[0]):
        count = first["ready"].shape[1]
        assert first["ready"][row].tolist() == [w0 * (block + 1) for block in range(count)]
        written_ready = first["ready"][row][first["write"][row]].tolist()  # level-1 items, when visible
        made = len(written_ready) // w1
        assert int(second["valid"][row].sum()) == made and bool(second["valid"][row, :made].all())
        assert second["ready"][row, :made].tolist() == written_ready[w1 - 1::w1][:made]
    for entry in records:
        level, values = entry["level"], entry["values"]  # values (B, H, M, K, E)
        level_policy = model.write_policy[level - 1]
        gate = attention.policy.gates[str(level)] if level_policy == "learned" else None
        decisions = []
        for row in range(x.shape[0]):
            valid = entry["valid"][row]
            candidates = values[row].movedim(1, 0)[valid]  # (M', H, K, E), in time order
            expected = _reference_decisions(level_policy, candidates, model.threshold[level - 1], gate)
            assert entry["write"][row][valid].tolist() == expected, (level, row)
            assert not entry["write"][row][~valid].any()
            assert int(state.layers[0]["written"][row, level - 1]) == sum(expected)
            assert int(state.layers[0]["skipped"][row, level - 1]) == len(expected) - sum(expected)
            decisions += expected
            written = candidates[torch.tensor(expected, dtype=torch.bool)]
            if gate is not None:
                with torch.no_grad():
                    written = written * torch.sigmoid(gate(written.flatten(1))).view(-1, 1, 1, 1)
            width = model.windows[level]
            newest = written[-width:]  # (n, H, K, E), oldest first
            stored = state.layers[0][f"memory_values_{level}"][row]  # (H, w*K, E)
            stored = stored.view(stored.shape[0], width, -1, stored.shape[-1]).movedim(1, 0)[-len(newest):]
            assert max_difference(stored, newest) <= EXACT, (level, row)
        assert any(decisions) and not all(decisions), level  # the level both wrote and skipped


@pytest.mark.parametrize("config", ["novelty-3lvl", "learned-3lvl", "learned,novelty"])
def test_branch_free_steps_equal_parallel(config):
    """``step(branch_free=True)`` (the export path: pools and decides every step) streams exactly."""
    windows, num_layers = CONFIGS[config][:2]
    steps = 2 * hnae.receptive_field(windows, num_layers)
    x = inputs(2, steps)
    model = config_model(config, x)
    with torch.no_grad():
        whole, whole_state = model(x)
        state, outputs = None, []
        for t in range(steps):
            output, state = model.step(x[:, t], state, branch_free=True)
            outputs.append(output)
    assert_policies_bite(model, whole_state)
    assert max_difference(torch.stack(outputs, dim=1), whole) <= EXACT
    assert_states_equal(whole_state, state)


# ------------------------------------ 2. "all" through the compacted path
@pytest.mark.parametrize("windows,num_layers,slots", [((3, 2, 2), 2, 2), ((4, 3), 1, 1)])
def test_all_through_compacted_path_equals_fixed_blocks(windows, num_layers, slots, monkeypatch):
    """Forcing ``policy_levels`` under "all" gives the fixed-block path's outputs and states:
    one call, chunks, and padding with a different length per element."""
    model = policy_model(windows, num_layers, "all", slots=slots)
    steps = 3 * model.receptive_field
    x = inputs(3, steps, seed=2)
    lengths = torch.tensor([steps, steps // 3, 2 * steps // 3 + 1])
    calls = []
    original = hnae.attention.policy_levels

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hnae.attention, "policy_levels", counting)

    def run():
        calls.clear()
        with torch.no_grad():
            results = [model(x), run_in_chunks(model, x, chunk_plans(windows[0])["random"]),
                       model(x, lengths=lengths)]
        return results, len(calls) > 0

    fixed, compacted_used = run()
    assert not compacted_used  # "all" normally takes the fixed-block path
    monkeypatch.setattr(WritePolicy, "active", property(lambda self: True))
    compacted, compacted_used = run()
    assert compacted_used  # ... and now the compacted one
    for (fixed_output, fixed_state), (compacted_output, compacted_state) in zip(fixed, compacted):
        assert max_difference(fixed_output, compacted_output) <= EXACT
        assert_states_equal(fixed_state, compacted_state)
        assert all(int(layer["skipped"].sum()) == 0 for layer in compacted_state.layers)
    written = compacted[2][1].layers[0]["written"]  # padded run: each element's own count
    spans = level_spans(windows)[1:]
    assert written.tolist() == [[int(length) // span for span in spans] for length in lengths]


# ------------------------------------------------------------- 3. padding
PADDING_CASES = [
    ((3, 2, 2), 2, 2, "novelty", 0.9),
    ((4, 3), 1, 1, "novelty", 0.95),
    ((3, 2, 2), 1, 2, "learned", None),
    ((3, 2, 2), 2, 1, ("novelty", "learned"), (0.9, None)),
]


@pytest.mark.parametrize("windows,num_layers,slots,policy,threshold", PADDING_CASES)
def test_padded_sequences_as_if_alone(windows, num_layers, slots, policy, threshold):
    steps = 3 * hnae.receptive_field(windows, num_layers)
    lengths = [steps, steps // 3, 0, 2 * steps // 3 + 1, 1]
    x = inputs(len(lengths), steps, seed=3)
    model = calibrate_gates(policy_model(windows, num_layers, policy, threshold, slots=slots), x)
    garbage = x.clone()
    for row, length in enumerate(lengths):
        garbage[row, length:] = float("nan")  # whatever sits in the padding must not matter
    with torch.no_grad():
        output, state = model(garbage, lengths=torch.tensor(lengths))
        assert_policies_bite(model, state)
        for row, length in enumerate(lengths):
            alone, alone_state = model(x[row:row + 1, :length])
            assert max_difference(output[row, :length], alone[0]) <= EXACT, row
            assert torch.all(output[row, length:] == 0), row
            assert_states_equal(state.select([row]), alone_state)


@pytest.mark.parametrize("windows,num_layers,slots,policy,threshold", PADDING_CASES)
def test_streams_at_different_positions_continue_exactly(windows, num_layers, slots, policy, threshold):
    """States from prefixes of different lengths continue each stream exactly, in chunks of any size."""
    reach = hnae.receptive_field(windows, num_layers)
    prefix = [2 * reach + 1, reach // 2, 0, reach + windows[0] - 1]
    following = 2 * reach
    x = inputs(len(prefix), max(prefix) + following, seed=4)
    model = calibrate_gates(policy_model(windows, num_layers, policy, threshold, slots=slots), x)
    with torch.no_grad():
        _, state = model(x[:, :max(prefix)], lengths=torch.tensor(prefix))
        assert state.position.tolist() == prefix
        rest = torch.stack([x[row, length:length + following] for row, length in enumerate(prefix)])
        continued, final = run_in_chunks(model, rest, [1, 2, 1, windows[0] + 2, 5], state)
        for row, length in enumerate(prefix):
            alone, alone_state = model(x[row:row + 1, :length + following])
            assert max_difference(continued[row], alone[0, length:]) <= EXACT, row
            assert_states_equal(final.select([row]), alone_state)
    assert_policies_bite(model, final)


def test_bidirectional_padded_sequences_as_if_alone():
    torch.manual_seed(0)
    model = hnae.HNAE(FEATURES, HIDDEN, 2, batch_first=True, windows=(3, 2, 2), num_heads=2, summary_slots=2,
                      write_policy="novelty", threshold=0.9, bidirectional=True).double().eval()
    lengths = [40, 9, 25, 1]
    x = inputs(len(lengths), max(lengths), seed=3)
    with torch.no_grad():
        output, state = model(x, lengths=torch.tensor(lengths))
        assert state is None
        for row, length in enumerate(lengths):
            alone, _ = model(x[row:row + 1, :length])
            assert max_difference(output[row, :length], alone[0]) <= EXACT, row
            assert torch.all(output[row, length:] == 0), row


# ----------------------------------------------------------- 4. causality
@pytest.mark.parametrize("windows,policy,threshold", [
    ((3, 2, 2), "novelty", 0.9),
    ((3, 2, 2), ("novelty", "novelty"), (0.7, 0.95)),
    ((3, 2, 2), ("novelty", "all"), (0.8, None)),
    ((4, 3), "learned", None),  # one summary level: see the note below on learned level 2
])
def test_changing_an_input_leaves_earlier_outputs_bit_identical(windows, policy, threshold):
    model = policy_model(windows, 2, policy, threshold, slots=2)
    steps = 2 * model.receptive_field
    x = inputs(2, steps, seed=6)
    model = calibrate_gates(model, x)
    with torch.no_grad():
        reference, state = model(x)
        assert_policies_bite(model, state)
        for t in range(0, steps - 1, 4):
            one = x.clone()
            one[:, t] = torch.randn(2, FEATURES, dtype=torch.float64) * 5
            output, _ = model(one)
            assert torch.equal(output[:, :t], reference[:, :t]), t
            assert not torch.equal(output[:, t], reference[:, t]), t  # the change does reach t
            future = x.clone()
            future[:, t:] = torch.randn(2, steps - t, FEATURES, dtype=torch.float64) * 10
            output, _ = model(future)
            assert torch.equal(output[:, :t], reference[:, :t]), t


def test_learned_second_level_is_causal_up_to_rounding():
    """Learned at two levels: later inputs change earlier outputs by rounding only.

    Not bit-identical: the level-2 gate's Linear runs over a batch of candidates whose size
    depends on how many level-1 candidates were written, i.e. on later inputs, and the CPU
    matmul rounds a row differently for different batch sizes (reported, not fixed here).
    """
    model = policy_model((3, 2, 2), 2, "learned", None, slots=2)
    steps = 2 * model.receptive_field
    x = inputs(2, steps, seed=6)
    model = calibrate_gates(model, x)
    with torch.no_grad():
        reference, state = model(x)
        assert_policies_bite(model, state)
        for t in range(0, steps - 1, 4):
            future = x.clone()
            future[:, t:] = torch.randn(2, steps - t, FEATURES, dtype=torch.float64) * 10
            output, _ = model(future)
            assert max_difference(output[:, :t], reference[:, :t]) <= 1e-12, t


# ------------------------------------------------------- 5. bounded state
def test_state_is_bounded_and_the_same_size_under_every_policy():
    windows, num_layers = (3, 2, 2), 2
    reach = hnae.receptive_field(windows, num_layers)
    sizes = set()
    for policy, threshold in [("all", None), ("novelty", 0.9), ("learned", None),
                              (("novelty", "learned"), (0.9, None)), (("learned", "all"), None)]:
        x = inputs(2, 4 * reach, seed=9)
        model = calibrate_gates(policy_model(windows, num_layers, policy, threshold, slots=2), x)
        fresh = model.init_state(2)
        with torch.no_grad():
            _, state = model(x[:, :reach])
            shapes = {name: tuple(t.shape) for name, t in state.as_dict().items()}
            _, state = run_in_chunks(model, x[:, reach:], [1, 4, 7], state)
        assert_policies_bite(model, state)
        assert {name: tuple(t.shape) for name, t in state.as_dict().items()} == shapes, policy
        assert state.nbytes == fresh.nbytes, policy
        assert state.position.tolist() == [4 * reach] * 2
        sizes.add(state.nbytes)
    assert len(sizes) == 1


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
    gates = [(index, level, gate) for index, (block,) in enumerate(model.layers)
             for level, gate in block.attention.policy.gates.items()]
    assert len(gates) == num_layers * (len(windows) - 1)
    for index, level, gate in gates:
        for parameter in (gate.weight, gate.bias):
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
