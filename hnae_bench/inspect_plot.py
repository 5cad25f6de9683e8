"""The memory plot of ``hnae inspect --plot``: what each level wrote, where one step's attention went.

``plot_memory_trace(trace, x, path, title)`` draws a ``hnae.trace_memory``
result as one PNG, panels from top to bottom on a shared x axis (input steps):

- the input sequence ``x`` (T, C) as a heat map, channels against time (if given);
- one row of markers per layer and summary level at the candidates' ``ready``
  positions (the input step from which an item is visible): written items
  filled in the level's colour, skipped items hollow and grey; the row label
  holds written/candidates (the axis reaches T when the last block's item
  is ready only after the sequence);
- per layer, the attention of the chosen step: stems at input positions, the
  local window in blue and each level's memory items (at the position each
  item was written) in the level's colour; a dashed line marks the step.

Memory slots with no item yet (position None) and local-window positions before
the sequence (< 0) are not drawn. ``summarise_trace`` gives the numbers that
``hnae inspect`` prints next to the plot.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from hnae_bench.plots import _save

LOCAL_COLOUR = "tab:blue"
LEVEL_COLOURS = ("tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink")
LEVEL_MARKERS = ("s", "^", "D", "v", "P", "X")
SKIPPED_COLOUR = "tab:gray"


def level_colour(level: int) -> str:
    """Colour of summary level ``level >= 1`` (the same in the event rows and the attention stems)."""
    return LEVEL_COLOURS[(level - 1) % len(LEVEL_COLOURS)]


def summarise_trace(trace: dict) -> list[dict]:
    """Per layer: {"layer", "levels": [{"level", "written", "candidates"}], "attention": {part: mass}}.

    The attention masses are the chosen step's weights summed per part ("local",
    "level 1", ...); over one layer they add up to 1.
    """
    layers = []
    for index, layer in enumerate(trace["layers"]):
        levels = [{"level": entry["level"], "written": sum(bool(flag) for flag in entry["written"]),
                   "candidates": len(entry["ready"])} for entry in layer["levels"]]
        attention = {"local": float(sum(layer["local"]["weights"]))}
        for part in layer["memory"]:
            attention[f"level {part['level']}"] = float(sum(part["weights"]))
        layers.append({"layer": index, "levels": levels, "attention": attention})
    return layers


def _drawn(positions: list, weights: list, length: int) -> tuple[list[int], list[float]]:
    """The (position, weight) pairs that lie on the input axis: None slots and positions < 0 dropped."""
    pairs = [(p, w) for p, w in zip(positions, weights) if p is not None and 0 <= p < length]
    return [p for p, _ in pairs], [w for _, w in pairs]


def _draw_input(axes, x: torch.Tensor) -> None:
    values = x.detach().float().cpu().numpy().T  # (C, T)
    channels, length = values.shape
    axes.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower",
                extent=(-0.5, length - 0.5, -0.5, channels - 0.5))
    axes.set_ylabel("input channel")


def _draw_events(axes, trace: dict, step: int) -> None:
    """One row per (layer, level), top row first: written filled, skipped hollow grey."""
    labels = []
    row = 0
    for index, layer in enumerate(trace["layers"]):
        for entry in layer["levels"]:
            level = entry["level"]
            written = [r for r, flag in zip(entry["ready"], entry["written"]) if flag]
            skipped = [r for r, flag in zip(entry["ready"], entry["written"]) if not flag]
            line, = axes.plot(written, [row] * len(written), linestyle="none", marker="o", markersize=5,
                              color=level_colour(level))
            line.set_gid(f"written layer {index} level {level}")
            line, = axes.plot(skipped, [row] * len(skipped), linestyle="none", marker="o", markersize=5,
                              markerfacecolor="none", markeredgecolor=SKIPPED_COLOUR)
            line.set_gid(f"skipped layer {index} level {level}")
            labels.append(f"layer {index} level {level}: {len(written)}/{len(entry['ready'])} written")
            row += 1
    axes.set_yticks(range(row), labels)
    axes.set_ylim(row - 0.5, -0.5)  # the first layer's first level on top
    axes.axvline(step, color="black", linestyle="--", linewidth=1)
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_title("memory candidates at their ready step (filled: written, hollow: skipped)", fontsize=9)


def _draw_attention(axes, layer: dict, index: int, step: int, length: int) -> None:
    """Stems of the step's attention weights by input position: local window and each level's items."""
    positions, weights = _drawn(layer["local"]["positions"], layer["local"]["weights"], length)
    stems = axes.vlines(positions, 0, weights, color=LOCAL_COLOUR, linewidth=1.5)
    stems.set_gid(f"attention layer {index} local")
    axes.plot(positions, weights, "o", color=LOCAL_COLOUR, markersize=3,
              label=f"local window ({len(layer['local']['positions'])} steps)")
    for part in layer["memory"]:
        level = part["level"]
        positions, weights = _drawn(part["positions"], part["weights"], length)
        stems = axes.vlines(positions, 0, weights, color=level_colour(level), linewidth=1.5)
        stems.set_gid(f"attention layer {index} level {level}")
        axes.plot(positions, weights, LEVEL_MARKERS[(level - 1) % len(LEVEL_MARKERS)], markersize=4,
                  color=level_colour(level), label=f"level {level} memory ({len(positions)} items)")
    axes.axvline(step, color="black", linestyle="--", linewidth=1, label=f"step {step}")
    axes.set_ylim(bottom=0)
    axes.set_ylabel(f"layer {index}\nattention")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # outside, right of the stems


def build_figure(trace: dict, x: torch.Tensor | None, title: str) -> Figure:
    """The figure ``plot_memory_trace`` saves (panels as in the module docstring)."""
    length, step = trace["length"], trace["step"]
    if x is not None:
        if x.dim() == 3 and x.shape[0] == 1:
            x = x[0]  # (1, T, C) -> (T, C)
        if x.dim() != 2 or x.shape[0] != length:
            raise ValueError(f"x must be the traced sequence (T={length}, C), got {tuple(x.shape)}")
    event_rows = sum(len(layer["levels"]) for layer in trace["layers"])
    panels, heights = [], []  # (kind, payload) top to bottom; heights in figure rows
    if x is not None:
        panels.append(("input", None))
        heights.append(1.6)
    if event_rows:
        panels.append(("events", None))
        heights.append(0.6 + 0.35 * event_rows)
    for index, layer in enumerate(trace["layers"]):
        panels.append(("attention", (index, layer)))
        heights.append(1.8)
    figure = Figure(figsize=(11, 0.6 + sum(heights)))
    grid = figure.subplots(len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    for axes, (kind, payload) in zip(grid[:, 0], panels):
        if kind == "input":
            _draw_input(axes, x)
        elif kind == "events":
            _draw_events(axes, trace, step)
        else:
            _draw_attention(axes, payload[1], payload[0], step, length)
    # the last candidate can be ready at T (visible only after the sequence): keep it on the axis
    last = max([length - 1] + [r for layer in trace["layers"] for entry in layer["levels"] for r in entry["ready"]])
    bottom = grid[-1, 0]
    bottom.set_xlim(-0.5, last + 0.5)
    bottom.set_xlabel("input step")
    figure.suptitle(title, fontsize=11)
    return figure


def plot_memory_trace(trace: dict, x: torch.Tensor | None, path, title: str) -> Path:
    """Write the memory plot of ``trace`` (from ``hnae.trace_memory``) to the PNG ``path``; x: (T, C) or None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(build_figure(trace, x, title), path)
