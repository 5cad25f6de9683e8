"""What the memory kept and where attention went, for one sequence.

``trace_memory(model, x, step)`` runs a causal HNAE over one sequence and
returns, per layer and summary level, every candidate item (the input position
from which it would be visible) and whether the level wrote or skipped it;
then, for output step ``step``, the attention weights of each layer over its
local window (by input position) and over each level's memory items (by the
position at which each item was written), averaged over heads and summed over
slots. ``hnae inspect --plot`` draws it.
"""

from __future__ import annotations

import torch

from .model import HNAE


def _attentions(model: HNAE) -> list:
    return [block.attention for (block,) in model.layers]


@torch.no_grad()
def trace_memory(model: HNAE, x: torch.Tensor, step: int | None = None) -> dict:
    """x: (T, input_size), one sequence. step: the output step to explain (default: the last).

    Returns {"length", "step", "layers": [{"levels": [{"level", "ready", "written"}],
    "local": {"positions", "weights"}, "memory": [{"level", "positions", "weights"}]}]}:
    plain lists, positions in input steps.
    """
    if model.bidirectional:
        raise ValueError("trace_memory: a bidirectional HNAE has no causal memory to trace")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be one sequence (T, input_size), got {getattr(x, 'shape', type(x))}")
    length = x.shape[0]
    step = length - 1 if step is None else step
    if not 0 <= step < length:
        raise ValueError(f"step must be in [0, {length}), got {step}")
    was_training, attentions = model.training, _attentions(model)
    model.eval()
    batched = x.unsqueeze(0 if model.batch_first else 1)
    try:
        for attention in attentions:
            attention.trace = []
        model(batched)  # the whole sequence: every candidate and decision
        decisions = [attention.trace for attention in attentions]
        for attention in attentions:
            attention.trace = []
        prefix = batched[:, :step] if model.batch_first else batched[:step]
        _, state = model(prefix)  # the memory just before the step
        model.step(x[step:step + 1], state)
        attended = [attention.trace[-1]["attention"] for attention in attentions]
    finally:
        for attention in attentions:
            attention.trace = None
        model.train(was_training)
    return {"length": length, "step": step,
            "layers": [_layer_trace(levels, weights, attention, step)
                       for levels, weights, attention in zip(decisions, attended, attentions)]}


def _layer_trace(levels: list, weights: list, attention, step: int) -> dict:
    w0, slots = attention.windows[0], attention.slots
    out_levels, written_positions = [], []
    for entry in levels:
        ready = entry["ready"][0][entry["valid"][0]]
        written = entry["write"][0][entry["valid"][0]]
        out_levels.append({"level": entry["level"], "ready": ready.tolist(), "written": written.tolist()})
        visible = ready[written & (ready <= step - step % w0)]  # written items this step's block sees
        written_positions.append(visible.tolist())
    local = weights[0][0].mean(0)  # (w0,) over heads
    local_positions = list(range(step - w0 + 1, step + 1))
    memory = []
    for level, part in enumerate(weights[1:], start=1):
        per_item = part[0].mean(0).view(-1, slots).sum(1)  # (w_l,) oldest first
        positions = written_positions[level - 1] if level - 1 < len(written_positions) else []
        positions = positions[-per_item.shape[0]:]
        padded = [None] * (per_item.shape[0] - len(positions)) + positions  # empty slots before the stream
        memory.append({"level": level, "positions": padded, "weights": per_item.tolist()})
    return {"levels": out_levels, "local": {"positions": local_positions, "weights": local.tolist()},
            "memory": memory}
