"""Gradient paths: how strongly the last output depends on an input d steps back.

For a sequence x (B, T, C) and a model's output y (B, T, K) we measure

    g(d) = || d y[T-1] / d x[T-1-d] ||_F

the Frobenius norm of the (K, C) Jacobian block, averaged over a few sampled
sequences. One backward pass gives every d at once: the batch holds K copies
of each sequence and copy k back-propagates output unit k only (samples in a
batch are independent in eval mode, so the copies do not mix).

Next to the measurement, ``sequential_hops`` counts how many sequential
operations stand between x[T-1-d] and y[T-1] in each architecture, computed
from the model itself:

- lstm / gru: one recurrent step per time step, so d;
- tcn: the causal convolutions (kernel > 1, in order) needed before their
  receptive field spans d, read from the model's Conv1d layers: ~log2(d);
- transformer: one attention hop per layer, whatever d;
- hnae: within one layer, level 0 sees the last w_0 inputs; reaching further
  takes l pooling hops up to a level-l summary plus one attention hop, so at
  most L hops per layer; beyond one layer's reach, one more layer per reach.
"""
from __future__ import annotations

import numpy as np
import torch

from hnae_bench import models as model_zoo
from hnae_bench.tasks import make_task

GRADIENT_MODELS = ("hnae", "lstm", "tcn")  # the models the bench section measures


def log_spaced_distances(max_distance: int, count: int = 12) -> list[int]:
    """0 and about ``count`` log-spaced integers in [1, max_distance]."""
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    if max_distance == 0:
        return [0]
    spaced = np.unique(np.round(np.geomspace(1, max_distance, count)).astype(int))
    return [0, *(int(d) for d in spaced)]


def gradient_norms(model: torch.nn.Module, x: torch.Tensor, distances, output_size: int) -> dict[int, float]:
    """``{d: g(d)}`` for every d in ``distances`` that lies inside x (d < T).

    x: (B, T, C) inputs. Distances at or beyond T have no input and are left
    out of the result, never reported as zero.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, C), got shape {tuple(x.shape)}")
    batch_size, total_length, channels = x.shape
    was_training = model.training
    model.eval()
    try:
        copies = x.repeat_interleave(output_size, dim=0).detach().requires_grad_(True)  # (B*K, T, C)
        output = model(copies)  # (B*K, T, K)
        if output.shape[-1] != output_size:
            raise ValueError(f"output_size is {output_size} but the model outputs {output.shape[-1]} features")
        unit = torch.arange(batch_size * output_size, device=x.device) % output_size  # (B*K,)
        picked = output[:, -1, :].gather(1, unit[:, None])  # (B*K, 1): copy k keeps output unit k
        (gradient,) = torch.autograd.grad(picked.sum(), copies)  # (B*K, T, C)
    finally:
        model.train(was_training)
    jacobian = gradient.reshape(batch_size, output_size, total_length, channels)  # (B, K, T, C)
    norms = jacobian.pow(2).sum(dim=(1, 3)).sqrt().mean(dim=0)  # (T,)
    return {int(d): float(norms[total_length - 1 - d]) for d in distances if 0 <= d < total_length}


# ---- sequential hops -------------------------------------------------------

def _hnae_windows(model: torch.nn.Module) -> tuple[tuple[int, ...], int] | None:
    """(windows, num_layers) of an hnae model: from model_config, else its HNAE submodule."""
    config = getattr(model, "model_config", {}) or {}
    if "windows" in config:
        return tuple(int(w) for w in config["windows"]), int(config.get("num_layers", 1))
    for module in model.modules():
        inner = getattr(module, "config", None)
        if inner is not None and hasattr(inner, "windows") and hasattr(inner, "num_layers"):
            return tuple(inner.windows), int(inner.num_layers)
    return None


def _oldest_per_level(t: int, windows: tuple[int, ...]) -> list[int]:
    """Oldest input position that level l of one causal layer shows to position t.

    Level 0: the last w_0 inputs. Level l >= 1: the last w_l summaries complete
    when t's level-0 block began, each covering B_l = w_0 * ... * w_{l-1} inputs.
    """
    oldest = [max(0, t - windows[0] + 1)]
    block_start = (t // windows[0]) * windows[0]
    span = 1
    for level in range(1, len(windows)):
        span *= windows[level - 1]  # B_l
        oldest.append(max(0, (block_start // span - windows[level]) * span))
    return oldest


def hnae_hops(d: int, t: int, windows: tuple[int, ...], num_layers: int) -> int | None:
    """Hops from x[t-d] to y[t] in an hnae stack; None when beyond the stack's reach.

    Inside one layer it is exact: l pooling hops up to the first level l that
    sees x[t-d], plus one attention hop. Beyond one layer it is an upper bound:
    each layer crossed adds at most L hops.
    """
    target = t - d
    levels = _oldest_per_level(t, windows)
    for level, oldest in enumerate(levels):
        if oldest <= target:
            return level + 1
    position, layers = t, 0
    while position > target:
        if layers == num_layers:
            return None
        position = _oldest_per_level(position, windows)[-1]
        layers += 1
    return layers * len(windows)


def tcn_hops(d: int, model: torch.nn.Module) -> int | None:
    """Causal convolutions, in forward order, needed before their receptive field spans d.

    A convolution with kernel k and dilation r widens the receptive field by
    (k - 1) * r; with dilations doubling per level this grows like log2(d).
    None when the model's whole receptive field is shorter than d.
    """
    extents = [(m.kernel_size[0] - 1) * m.dilation[0]
               for m in model.modules() if isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1]
    span, hops = 0, 0  # span: how far back the first `hops` convolutions reach
    for extent in extents:
        if span >= d:
            break
        span += extent
        hops += 1
    return hops if span >= d else None


def sequential_hops(name: str, model: torch.nn.Module, distances, t: int) -> dict:
    """``{'rule': str, 'hops': [int | None per distance]}`` for one architecture."""
    kind = getattr(model, "model_name", name)
    if kind in ("lstm", "gru"):
        return {"rule": "one recurrent step per time step: d", "hops": [int(d) for d in distances]}
    if kind == "tcn":
        return {"rule": "causal convolutions (in order) until their receptive field spans d, read from "
                        "the model's Conv1d layers: about 2 log2(d / (k - 1)) with two per level",
                "hops": [tcn_hops(int(d), model) for d in distances]}
    if kind == "transformer":
        return {"rule": "one attention hop, whatever d (full causal attention)",
                "hops": [1 for _ in distances]}
    if kind == "hnae":
        found = _hnae_windows(model)
        if found is None:
            return {"rule": "windows unknown: at most L + 1 hops per layer (DESIGN.md, property 7)",
                    "hops": [None for _ in distances]}
        windows, num_layers = found
        rule = (f"windows {list(windows)}, {num_layers} layer(s): l pooling hops + 1 attention hop "
                f"inside one layer (<= {len(windows)}); beyond one layer's reach, <= {len(windows)} per layer")
        return {"rule": rule, "hops": [hnae_hops(int(d), t, windows, num_layers) for d in distances]}
    return {"rule": "not analysed", "hops": [None for _ in distances]}


def gradient_section(trained: dict, initial: dict, task, *, samples: int = 2, seed: int = 99,
                     distance_count: int = 12) -> dict:
    """Gradient norms at initialisation and after training, and the hops table.

    trained / initial: model name -> model (same architecture, same task);
    task: the Task whose sequences are fed (its total_length is T).
    """
    generator = torch.Generator().manual_seed(seed)
    x, _ = task.sample(samples, generator)  # (S, T, C)
    total_length = task.total_length
    distances = log_spaced_distances(total_length - 1, distance_count)
    section = {"task": task.name, "seq_len": task.seq_len, "total_length": total_length,
               "distances": distances, "samples": samples, "models": {}}
    names = [*trained, *(name for name in initial if name not in trained)]
    for name in names:
        entry = {}
        for stage, models in (("initial", initial), ("trained", trained)):
            if name not in models:
                continue
            model = models[name]
            device = next(model.parameters()).device
            norms = gradient_norms(model, x.to(device), distances, task.output_size)
            entry[stage] = [norms.get(d) for d in distances]
        reference = trained.get(name, initial.get(name))
        entry["sequential_hops"] = sequential_hops(name, reference, distances, total_length - 1)
        section["models"][name] = entry
    return section



def gradient_paths_of_race(task_name: str, trained: dict, settings: dict) -> dict:
    """The section for a bench run: ``trained`` maps names to TrainResults, ``settings`` is the bench's."""
    names = [name for name in GRADIENT_MODELS if name in trained]
    if not names:
        return {"skipped": f"none of {', '.join(GRADIENT_MODELS)} trained in this run"}
    ladder = settings["ladders"][task_name]
    task_options = settings["task_options"].get(task_name, {})
    task = make_task(task_name, min(settings["gradient_seq_len"], ladder[-1]), **task_options)
    longest = make_task(task_name, ladder[-1], **task_options).total_length  # what train built for
    initial = {}
    for name in names:
        torch.manual_seed(settings["seed"])
        model = model_zoo.build_model(name, task, settings["preset"], max_len=longest)
        initial[name] = model.to(settings["device"])
    return gradient_section({name: trained[name].model for name in names}, initial, task,
                            samples=settings["gradient_samples"], seed=settings["seed"] + 104729)
