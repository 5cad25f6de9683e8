"""Shared helpers of the write-policy tests: tiny float64 models, chunked runs, gate calibration."""

from __future__ import annotations

import random

import torch

import hnae
from conftest import run_in_chunks  # noqa: F401 (re-exported for the policy tests)

torch.set_num_threads(1)

FEATURES = 3
HIDDEN = 8
EXACT = 1e-10  # float64: streaming and parallel differ by rounding only

def policy_model(windows, num_layers=1, policy="all", threshold=None, budget=None, slots=1, seed=0,
                 gate_bias=0.0, gate_std=0.5, summary_pool="attention"):
    """A tiny float64 model in eval mode. Learned gates get weights of std ``gate_std`` (not the
    initial 0.02, which makes every gate almost the same) and bias ``gate_bias``: see ``calibrate_gates``."""
    torch.manual_seed(seed)
    model = hnae.HNAE(FEATURES, HIDDEN, num_layers, batch_first=True, windows=windows, num_heads=2,
                      summary_slots=slots, write_policy=policy, threshold=threshold, budget=budget,
                      summary_pool=summary_pool)
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
    "novelty-select": ((3, 2, 2), 2, 2, "novelty", 0.9),
    "learned,all-select": ((4, 3, 2), 1, 2, ("learned", "all"), None),
}
SELECTING = {"novelty-select", "learned,all-select"}   # these build with summary_pool="select"


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


def reference_decisions(policy, candidates, threshold=None, gate=None, weight=None, with_margin=False):
    """The documented rule, one candidate at a time: candidates (M, H, K, E) of one stream.

    Returns the write decisions and the scale each item is stored with (1, or the learned gate g);
    ``with_margin``: also the smallest |score| of a learned gate (how far from a tie).
    """
    writes, scales, last, margin = [], [], None, float("inf")
    for item in candidates:
        flat = item.reshape(-1)
        if last is None:
            similarity = None
        elif torch.equal(flat, last):
            similarity = 1.0
        else:
            norms = flat.norm() * last.norm()
            similarity = 0.0 if norms == 0 else float(flat @ last / norms)
        if policy == "novelty":
            write, scale = similarity is None or similarity < threshold, 1.0
        else:
            with torch.no_grad():
                score = gate(flat) + weight * (1.0 - (similarity or 0.0))
            scale, margin = float(torch.sigmoid(score)), min(margin, abs(float(score)))
            write = scale >= 0.5
        if write:
            last = flat * scale
        writes.append(write)
        scales.append(scale)
    return (writes, scales, margin) if with_margin else (writes, scales)


def calibrate_gates(model, x):
    """Set each learned gate's bias so that it writes about half of the valid candidates of x.

    Layer by layer, level by level (a gate changes what the levels and layers above see). The
    decisions depend on the bias through the similarity to the last written item, so the bias is
    found by bisection on the rule itself (``reference_decisions``).
    """
    for layer, (block,) in enumerate(model.layers):
        policy = block.attention.policy
        for level, level_policy in enumerate(model.write_policy, start=1):
            if level_policy != "learned":
                continue
            gate, weight = policy.gates[str(level)], policy.novelty_weights[str(level)]
            record, = [r for r in record_candidates(model, x)[2][layer] if r["level"] == level]
            streams = [record["values"][row].movedim(1, 0)[record["valid"][row]] for row in range(x.shape[0])]
            total = sum(len(stream) for stream in streams)
            assert total >= 2, (layer, level)

            def outcome(bias):  # (written, smallest |score|) over the streams at this bias
                with torch.no_grad():
                    gate.bias.fill_(bias)
                runs = [reference_decisions("learned", s, gate=gate, weight=weight, with_margin=True)
                        for s in streams]
                return sum(sum(run[0]) for run in runs), min(run[2] for run in runs)
            low, high = -50.0, 50.0
            for _ in range(50):  # the bias where half are written: a decision flips there
                middle = 0.5 * (low + high)
                low, high = (low, middle) if outcome(middle)[0] > total / 2 else (middle, high)
            # step away from the flip, to a bias where no score is within 1e-4 of a tie
            for offset in (0.013 * k * sign for k in range(1, 60) for sign in (1, -1)):
                written, margin = outcome(low + offset)
                if 0 < written < total and margin > 1e-4:
                    break
            assert 0 < written < total and margin > 1e-4, (layer, level, written, margin)
    return model


def config_model(name, x):
    windows, num_layers, slots, policy, threshold = CONFIGS[name]
    pool = "select" if name in SELECTING else "attention"
    return calibrate_gates(policy_model(windows, num_layers, policy, threshold, slots=slots, summary_pool=pool), x)


def assert_policies_bite(model, state):
    """Every novelty or learned level of the run wrote some candidates and skipped some."""
    for level, policy in enumerate(model.write_policy, start=1):
        written, skipped = counters(state, level)
        if policy == "all":
            assert skipped == 0, (level, policy)
            assert written > 0, (level, policy)
        else:
            assert written > 0 and skipped > 0, (level, policy, written, skipped)
