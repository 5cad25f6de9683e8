"""The bench report's streaming section: the race's trained hnae fed step by step equals one call.

On the user's own machine, the trained model runs a held-out batch of the task
once in parallel and once streamed through its state in chunks of a fixed plan
(single steps, then sizes that straddle block boundaries); the section reports
the largest difference of the encoder's outputs (layer-normalised, where the
1e-5 float32 bound of the design applies; the task head only scales them), and
the time of one streaming step.
"""

from __future__ import annotations

import time

import torch

from hnae_bench.length_generalisation import streaming_step
from hnae_bench.tasks import make_task

CHUNK_PLAN = (1, 1, 1, 3, 7, 64, 1, 129, 5)  # cycled over the sequence
TOLERANCE = 1e-5  # float32: the documented streaming = parallel bound


@torch.no_grad()
def streaming_check(model: torch.nn.Module, task_name: str, seq_len: int, *, sequences: int = 4,
                    device: str = "cpu", seed: int = 0, task_options: dict | None = None) -> dict:
    """{'seq_len', 'total_length', 'chunks', 'max_abs_difference', 'equal', 'step_ms'} for ``model``."""
    encoder = getattr(getattr(model, "body", None), "encoder", None)
    if hasattr(encoder, "init_state"):  # an hnae.HNAE: compare its own outputs (layer-normalised)
        compared, whole_of = "encoder outputs", (lambda inputs: encoder(inputs)[0])
        step = encoder
    else:  # a model that streams some other way: compare what it outputs
        compared, whole_of, step = "model outputs", model, streaming_step(model)
    if step is None:
        return {"skipped": "the model cannot stream"}
    task = make_task(task_name, seq_len, **(task_options or {}))
    x, _ = task.sample(sequences, torch.Generator().manual_seed(seed))  # (B, T, C)
    x = x.to(device)
    was_training = model.training
    model.eval()
    try:
        whole = whole_of(x)  # (B, T, D or K)
        pieces, state, start, index, step_seconds = [], None, 0, 0, []
        while start < x.shape[1]:
            size = CHUNK_PLAN[index % len(CHUNK_PLAN)]
            began = time.perf_counter()
            output, state = step(x[:, start:start + size], state)
            if size == 1:
                step_seconds.append(time.perf_counter() - began)
            pieces.append(output)
            start, index = start + size, index + 1
    finally:
        model.train(was_training)
    difference = (torch.cat(pieces, dim=1) - whole).abs().max().item()
    step_seconds.sort()
    return {"seq_len": seq_len, "total_length": task.total_length, "sequences": sequences, "chunks": index,
            "compared": compared, "largest_output": whole.abs().max().item(),
            "max_abs_difference": difference, "equal": difference <= TOLERANCE, "tolerance": TOLERANCE,
            "step_ms": 1000 * step_seconds[len(step_seconds) // 2] if step_seconds else None}


def streaming_check_of_race(task_name: str, trained: dict, settings: dict) -> dict:
    """The section for a bench run: the race's hnae at the length it last trained at."""
    if "hnae" not in trained:
        return {"skipped": "hnae did not train in this run"}
    result = trained["hnae"]
    return streaming_check(result.model, task_name, result.task.seq_len, device=settings["device"],
                           seed=settings["seed"] + 7919, task_options=settings["task_options"].get(task_name))
