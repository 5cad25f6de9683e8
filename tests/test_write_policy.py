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
from hnae.write_policy import WritePolicy, cosine_similarity

torch.set_num_threads(1)

FEATURES = 3
HIDDEN = 8
EXACT = 1e-10  # float64: streaming and parallel differ by rounding only


# ----------------------------------------------------------------- helpers
def policy_model(windows, num_layers=1, policy="all", threshold=None, budget=None, slots=1, seed=0,
                 gate_bias=0.0, gate_std=0.5):
    """A tiny float64 model; learned gates set so that some candidates fall on each side of 1/2."""
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
# (checked below) so that every novelty level both writes and skips; learned gates have bias 0
# and weights of std 0.5, which puts some gates on each side of 1/2.
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
    level, values (B, H, M, K, E) of the candidates, and the trace's valid and write (B, M)."""
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
            result.append([{"level": level, "values": values, "valid": entry["valid"], "write": entry["write"]}
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
    and the final memory window holds the last w_l *written* items (scaled by the gate if learned)."""
    x = inputs(2, 3 * hnae.receptive_field((3, 2, 2)), seed=5)
    model = calibrate_gates(policy_model((3, 2, 2), 1, policy, threshold, slots=2), x)
    attention = model.layers[0][0].attention
    _, state, (records,) = record_candidates(model, x)
    assert [entry["level"] for entry in records] == [1, 2]
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
