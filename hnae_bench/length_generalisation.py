"""Evaluating trained models at lengths they were not trained on.

Two uses share the helpers here:

- the accuracy-against-T curve of the race: every trained model evaluated at
  every rung of the ladder (``evaluate_curve``);
- the length-generalisation section: the race's hnae, trained at one T,
  evaluated at 10x and 100x that T (``length_generalisation``), with lstm and
  gru at 10x their own T for comparison.

Long sequences are evaluated in several calls so that one call never holds
more than ``tokens_per_call`` tokens (B * T). A single sequence longer than
that is streamed in chunks through the model's state when the model supports
streaming (see ``streaming_step``), else it is run in one parallel call. Every evaluation runs under a wall-clock budget: a length whose
estimated time does not fit is skipped, and the skip is recorded with its
reason rather than left out.
"""
from __future__ import annotations

import inspect
import math
import time

import torch

from hnae_bench.tasks import make_task

# Tokens (B * T) a single forward call may hold before we split or stream.
DEFAULT_TOKENS_PER_CALL = 131_072

LENGTH_COMPARISON_MODELS = ("lstm", "gru")  # compared with hnae at 10x their own T


def streaming_step(model: torch.nn.Module):
    """A function ``(chunk, state) -> (output, state)`` when ``model`` can stream, else None.

    A model may offer ``forward_streaming(chunk, state)`` itself. The bench's
    ``SequenceModel`` (``head(body(x))``) streams when its body wraps an
    encoder whose ``forward`` takes a ``state``, as ``hnae.HNAE`` does.
    """
    if hasattr(model, "forward_streaming"):
        return model.forward_streaming
    encoder = getattr(getattr(model, "body", None), "encoder", None)
    head = getattr(model, "head", None)
    if encoder is None or head is None:
        return None
    try:
        takes_state = "state" in inspect.signature(encoder.forward).parameters
    except (TypeError, ValueError):
        return None
    if not takes_state:
        return None

    def step(chunk, state):
        hidden, state = encoder(chunk, state)  # (B, chunk, D)
        return head(hidden), state  # (B, chunk, K)
    return step


def supports_streaming(model: torch.nn.Module) -> bool:
    return streaming_step(model) is not None


def forward_long(model: torch.nn.Module, x: torch.Tensor, tokens_per_call: int) -> torch.Tensor:
    """Run ``model`` on ``x`` (B, T, in), streaming in chunks when B * T is too large.

    Streaming is used only when the model supports it; the chunks are
    ``tokens_per_call // B`` steps long, so memory stays bounded whatever T is.
    """
    batch_size, total_length, _ = x.shape
    step = streaming_step(model)
    if batch_size * total_length <= tokens_per_call or step is None:
        return model(x)  # (B, T, out)
    chunk_length = max(1, tokens_per_call // batch_size)
    outputs, state = [], None
    for start in range(0, total_length, chunk_length):
        output, state = step(x[:, start:start + chunk_length], state)  # (B, chunk, out)
        outputs.append(output)
    return torch.cat(outputs, dim=1)  # (B, T, out)


def _average_metrics(weighted: list[tuple[int, dict]]) -> dict[str, float]:
    """Average per-batch metrics, each weighted by its number of sequences."""
    total = sum(count for count, _ in weighted)
    keys = weighted[0][1].keys()
    return {key: sum(count * metrics[key] for count, metrics in weighted) / total for key in keys}


@torch.no_grad()
def evaluate_at_length(
    model: torch.nn.Module,
    task_name: str,
    seq_len: int,
    *,
    sequences: int = 32,
    seconds: float | None = None,
    tokens_per_call: int = DEFAULT_TOKENS_PER_CALL,
    device: str = "cpu",
    seed: int = 1234,
    task_options: dict | None = None,
) -> dict:
    """Evaluate ``model`` on up to ``sequences`` fresh sequences of ``task_name`` at ``seq_len``.

    Returns ``{'seq_len', 'total_length', 'sequences', 'seconds', 'metrics',
    'solved', 'streamed'}``. Batches stop once ``seconds`` have passed, after at
    least one batch; 'sequences' says how many were actually evaluated.
    """
    if sequences < 1:
        raise ValueError(f"sequences must be >= 1, got {sequences}")
    task = make_task(task_name, seq_len, **(task_options or {}))
    generator = torch.Generator().manual_seed(seed)
    batch_size = max(1, min(sequences, tokens_per_call // task.total_length))
    streamed = task.total_length > tokens_per_call and supports_streaming(model)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    weighted, done = [], 0
    try:
        while done < sequences:
            count = min(batch_size, sequences - done)
            x, y = task.sample(count, generator)  # x (b, total_length, in)
            output = forward_long(model, x.to(device), tokens_per_call)  # (b, total_length, out)
            weighted.append((count, task.metrics(output, y.to(device))))
            done += count
            if seconds is not None and time.perf_counter() - started > seconds:
                break
    finally:
        model.train(was_training)
    metrics = _average_metrics(weighted)
    return {
        "seq_len": seq_len,
        "total_length": task.total_length,
        "sequences": done,
        "seconds": time.perf_counter() - started,
        "metrics": metrics,
        "solved": bool(task.is_solved(metrics)),
        "streamed": streamed,
    }


def _skip(seq_len: int, reason: str) -> dict:
    return {"seq_len": seq_len, "skipped": reason}


def _evaluate_within_budget(model, task_name, lengths, *, seconds, sequences, min_sequences,
                            device, seed, task_options, tokens_per_call) -> list[dict]:
    """Evaluate at ``lengths`` (ascending) sharing one time budget.

    The tokens/s measured at each length predicts the next one's cost; the
    number of sequences shrinks to fit and a length that cannot get
    ``min_sequences`` in the remaining time is skipped with the estimate.
    """
    started = time.perf_counter()
    tokens_per_second = None
    results = []
    for seq_len in lengths:
        remaining = seconds - (time.perf_counter() - started)
        total_length = make_task(task_name, seq_len, **(task_options or {})).total_length
        count = sequences
        if tokens_per_second is not None:
            affordable = int(remaining * tokens_per_second / total_length)
            count = min(sequences, affordable)
        if remaining <= 0 or count < min_sequences:
            estimate = (min_sequences * total_length / tokens_per_second) if tokens_per_second else math.inf
            results.append(_skip(seq_len, f"estimated {estimate:.0f} s for {min_sequences} sequences "
                                          f"exceeds the remaining {max(remaining, 0):.0f} s"))
            continue
        try:
            result = evaluate_at_length(model, task_name, seq_len, sequences=count, seconds=remaining,
                                        tokens_per_call=tokens_per_call, device=device, seed=seed,
                                        task_options=task_options)
        except (RuntimeError, ValueError) as error:  # e.g. a positional table shorter than T
            results.append(_skip(seq_len, f"{type(error).__name__}: {error}"))
            continue
        tokens_per_second = result["sequences"] * result["total_length"] / max(result["seconds"], 1e-6)
        results.append(result)
    return results


def evaluate_curve(model, task_name, lengths, *, seconds: float, sequences: int = 32,
                   device: str = "cpu", seed: int = 1234, task_options: dict | None = None,
                   tokens_per_call: int = DEFAULT_TOKENS_PER_CALL) -> list[dict]:
    """Metrics of one trained model at every length of ``lengths`` (the ladder)."""
    return _evaluate_within_budget(model, task_name, sorted(lengths), seconds=seconds,
                                   sequences=sequences, min_sequences=min(4, sequences),
                                   device=device, seed=seed, task_options=task_options,
                                   tokens_per_call=tokens_per_call)


def _budget_share(name: str, trained: dict, others: list[str], seconds: float) -> float:
    """hnae gets half the budget when others are compared; the others split the rest."""
    if "hnae" in trained and others:
        return seconds / 2 if name == "hnae" else seconds / 2 / len(others)
    return seconds / len(trained)


def length_generalisation(trained: dict, task_name: str, *, multipliers=(10, 100), seconds: float,
                          sequences: int = 16, device: str = "cpu", seed: int = 4321,
                          task_options: dict | None = None, comparison_multiplier: int = 10,
                          tokens_per_call: int = DEFAULT_TOKENS_PER_CALL) -> dict:
    """The length-generalisation section.

    ``trained`` maps a model name to ``(model, train_length)``, the length it
    was trained (and solved) at. hnae is evaluated at 1x and every multiplier;
    every other model at 1x and ``comparison_multiplier`` only. Half the budget
    goes to hnae, the rest is shared by the others.
    """
    if any(m < 1 for m in multipliers):
        raise ValueError(f"multipliers must be >= 1, got {multipliers}")
    section = {"task": task_name, "multipliers": list(multipliers), "budget_seconds": seconds, "models": {}}
    others = [name for name in trained if name != "hnae"]
    for name, (model, train_length) in trained.items():
        factors = [1, *multipliers] if name == "hnae" else [1, comparison_multiplier]
        share = _budget_share(name, trained, others, seconds)
        lengths = [train_length * factor for factor in factors]
        evaluations = _evaluate_within_budget(model, task_name, lengths, seconds=share, sequences=sequences,
                                              min_sequences=min(2, sequences), device=device, seed=seed,
                                              task_options=task_options, tokens_per_call=tokens_per_call)
        for factor, evaluation in zip(factors, evaluations):
            evaluation["multiplier"] = factor
        section["models"][name] = {"train_length": train_length, "evaluations": evaluations}
    return section


def length_generalisation_of_race(task_name: str, trained: dict, settings: dict) -> dict:
    """The section for a bench run: the race's hnae at its longest solved T, lstm and gru at theirs."""
    if "hnae" not in trained:
        return {"skipped": "hnae did not train in this run"}
    hnae_result = trained["hnae"]
    note = None
    train_length = hnae_result.longest_solved
    if train_length is None:
        train_length = hnae_result.task.seq_len
        note = f"hnae solved no rung; evaluated from the length it last trained at (T = {train_length})"
    chosen = {"hnae": (hnae_result.model, train_length)}
    for name in LENGTH_COMPARISON_MODELS:
        if name in trained and trained[name].longest_solved:
            chosen[name] = (trained[name].model, trained[name].longest_solved)
    section = length_generalisation(chosen, task_name, multipliers=settings["length_multipliers"],
                                    seconds=settings["length_seconds"], sequences=settings["length_sequences"],
                                    device=settings["device"], seed=settings["seed"] + 1299709,
                                    task_options=settings["task_options"].get(task_name))
    if note:
        section["note"] = note
    return section
