"""Memory write policies: which summaries a level writes into its memory.

Level ``l >= 1`` of a layer makes a *candidate* item each time a block of the
level below completes (a summary: ``K`` slot vectors per head). The policy of
level ``l`` decides whether the candidate is written into that level's memory
window. Windows count *written* items, and a block of the next level is ``w_l``
written items, so every skipped item stretches the reach in time.

Policies (one per summary level; level 0, the local window, keeps every input):

- ``"all"``: write every candidate (the default).
- ``"novelty"``: skip a candidate whose cosine similarity to the last item this
  level wrote is at or above ``threshold``. Comparing with the last *written*
  item (not the previous candidate) means a slow drift is written once it has
  drifted far enough, and a small change on a near-identical vector is written
  when its similarity falls below the threshold: choose the threshold above
  the similarity of the smallest change that matters. Two identical vectors
  (zeros included) have similarity 1; a zero vector and any other have 0. The
  first item of a level is always written.
- ``"learned"``: a gate scores the candidate, ``score = a . x + b + c * (1 - s)``
  with ``x`` the candidate, ``s`` its cosine similarity to the last item the
  level wrote (``1 - s`` is 1 for the first item) and ``a``, ``b``, ``c`` learned
  (``c``, the ``novelty_weights`` entry, starts at 4: what repeats the last
  written item scores lower, so an application that pays for writing learns
  to skip repeats first). The candidate is written when the gate
  ``g = sigmoid(score)`` is at least 1/2, and its values are stored scaled by
  ``g``, so the task loss trains the gate through how much attention uses the
  item. ``HNAE.write_penalty()`` adds the cost of writing more than ``budget``
  (the fraction of candidates written, straight-through). A gate of content
  alone cannot tell a scene's first frame from its repeats, and on a long
  redundant stream it closed for everything (``hnae bench memory``).

The similarity and the gate read the candidate's values (all heads and slots),
which is what the memory stores, so streaming holds the last written item at
no extra cost. Decisions are hard: parallel and streaming runs agree exactly
unless a similarity or gate lies within rounding error of its threshold.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POLICIES = ("all", "novelty", "learned")
DEFAULT_THRESHOLD = 0.95
DEFAULT_BUDGET = 0.2
NOVELTY_WEIGHT = 4.0  # the learned gate's starting weight on 1 - (similarity to the last written item)


def _per_level(name: str, value, levels: int) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != levels:
            raise ValueError(f"{name}: a tuple needs one entry per summary level ({levels}: "
                             f"len(windows) - 1), got {len(value)}")
        return tuple(value)
    return (value,) * levels


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def normalise_policy(write_policy, threshold, budget, num_levels: int):
    """Validated per-summary-level tuples (policies, thresholds, budgets).

    Every value given is checked, and a threshold or budget that no level would use is
    refused (nothing is silently ignored). Stored thresholds and budgets of levels that do
    not use them are None.
    """
    levels = num_levels - 1
    policies = _per_level("write_policy", write_policy, levels)
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"write_policy must be one of {POLICIES}, got {policy!r}")
    if levels == 0 and write_policy not in ("all", ()):
        raise ValueError("write_policy: a single-level hierarchy has no summary levels to apply it to; "
                         "give windows at least two levels")
    thresholds = [None if value is None else _number("threshold", value)
                  for value in _per_level("threshold", threshold, levels)]
    budgets = [None if value is None else _number("budget", value) for value in _per_level("budget", budget, levels)]
    for value in thresholds:
        if value is not None and not -1.0 <= value <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {value}")
    for value in budgets:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got {value}")
    if any(value is not None for value in thresholds) and "novelty" not in policies:
        raise ValueError(f"threshold: only the 'novelty' write policy uses it, and no level has it {policies}")
    if any(value is not None for value in budgets) and "learned" not in policies:
        raise ValueError(f"budget: only the 'learned' write policy uses it, and no level has it {policies}")
    out_thresholds = tuple((DEFAULT_THRESHOLD if value is None else value) if policy == "novelty" else None
                           for policy, value in zip(policies, thresholds))
    out_budgets = tuple((DEFAULT_BUDGET if value is None else value) if policy == "learned" else None
                        for policy, value in zip(policies, budgets))
    return policies, out_thresholds, out_budgets


def cosine_similarity(items: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, F), (B, F) -> (B,): 1 for identical vectors, 0 if exactly one of them is zero."""
    dot = (items * last).sum(-1)
    norms = items.norm(dim=-1) * last.norm(dim=-1)
    similarity = (dot / norms.clamp_min(torch.finfo(items.dtype).tiny)).clamp(-1.0, 1.0)
    return torch.where((items == last).all(-1), torch.ones_like(similarity), similarity)


class WritePolicy(nn.Module):
    """The write decisions of one layer's summary levels (index ``l - 1`` for level ``l``).

    ``decide(level, values, valid, last, has_last)``: candidate values
    (B, H, M, K, E) in time order, valid (B, M), the level's last written values
    (B, H, K, E) and whether it has one (B,). Returns write (B, M) bool and the
    values to store (scaled by the gate under ``"learned"``).
    """

    def __init__(self, policies: tuple[str, ...], thresholds: tuple, budgets: tuple, d_model: int,
                 slots: int, device=None, dtype=None) -> None:
        super().__init__()
        self.policies, self.thresholds, self.budgets = tuple(policies), tuple(thresholds), tuple(budgets)
        self.gates = nn.ModuleDict({
            str(level + 1): nn.Linear(slots * d_model, 1, device=device, dtype=dtype)
            for level, policy in enumerate(self.policies) if policy == "learned"})
        for gate in self.gates.values():
            nn.init.normal_(gate.weight, std=0.02)
            nn.init.constant_(gate.bias, 2.0)  # start by writing everything (g >= 0.88)
        self.novelty_weights = nn.ParameterDict({  # c of each learned level's gate
            level: nn.Parameter(torch.tensor(NOVELTY_WEIGHT, device=device, dtype=dtype)) for level in self.gates})
        # level -> (sum of straight-through write flags, candidates) over the current forward
        self.written_record: dict[int, tuple[torch.Tensor, int]] = {}

    @property
    def active(self) -> bool:
        """Whether any level skips anything (else the layer takes its fixed-block path)."""
        return any(policy != "all" for policy in self.policies)

    def decide(self, level: int, values: torch.Tensor, valid: torch.Tensor, last: torch.Tensor,
               has_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        policy = self.policies[level - 1]
        if policy == "all":  # first: the streaming step of an "all" level does nothing more
            return valid, values
        batch, heads, count, slots, width = values.shape
        flat = values.permute(0, 2, 1, 3, 4).reshape(batch, count, heads * slots * width)  # (B, M, F)
        last = last.reshape(batch, -1)  # (B, F)
        if policy == "novelty":
            threshold = self.thresholds[level - 1]
            write, _ = self._in_order(flat, valid, last, has_last, lambda index, similarity, first: (
                first | (similarity < threshold), None))
            return write, values
        content = self.gates[str(level)](flat).squeeze(-1)  # (B, M): a . x + b
        weight = self.novelty_weights[str(level)]

        def rule(index, similarity, first):  # the gate of candidate ``index``: written if g >= 1/2, stored times g
            gate = torch.sigmoid(content[:, index] + weight * (1.0 - similarity))
            return gate >= 0.5, gate
        write, novelty = self._in_order(flat, valid, last, has_last, rule)
        gate = torch.sigmoid(content + weight * novelty)  # (B, M), differentiable in a, b and c
        if self.training and bool(valid.any()):
            straight = write.to(gate.dtype) + gate - gate.detach()  # value: written or not; gradient: the gate's
            total, seen = self.written_record.get(level, (0.0, 0))
            self.written_record[level] = (total + straight[valid].sum(), seen + int(valid.sum()))
        return write, values * gate.view(batch, 1, count, 1, 1)

    @staticmethod
    def _in_order(flat: torch.Tensor, valid: torch.Tensor, last: torch.Tensor, has_last: torch.Tensor, rule):
        """Decisions over the M candidates flat (B, M, F) in time order, each against the last one written.

        ``rule(index, similarity, first)`` -> (novel (B,) bool, scale (B,) or None): candidate
        ``index``, with its cosine similarity to the last written item (0 where none is: ``first``),
        is written where valid and novel, and becomes the last one, times ``scale`` (as stored).
        Returns write (B, M) and 1 - similarity (B, M), without gradients.
        """
        writes, novelty = [], []
        with torch.no_grad():
            for index in range(flat.shape[1]):
                item = flat[:, index]  # (B, F)
                similarity = torch.where(has_last, cosine_similarity(item, last), 0.0)  # (B,)
                novel, scale = rule(index, similarity, ~has_last)
                write = valid[:, index] & novel  # (B,)
                stored = item if scale is None else item * scale.unsqueeze(1)
                last = torch.where(write.unsqueeze(1), stored, last)
                has_last = has_last | write
                writes.append(write)
                novelty.append(1.0 - similarity)
        if not writes:
            return valid, flat.new_zeros(valid.shape)
        return torch.stack(writes, dim=1), torch.stack(novelty, dim=1)  # (B, M) each

    def forget(self) -> None:
        """Start a new forward: drop the write records of the previous one."""
        self.written_record = {}

    def penalty(self) -> torch.Tensor | None:
        """Sum over learned levels of max(0, written fraction - budget) over the last training forward."""
        terms = [torch.relu(total / seen - self.budgets[level - 1])
                 for level, (total, seen) in self.written_record.items()]
        return sum(terms) if terms else None
