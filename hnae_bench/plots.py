"""PNG plots of a bench run (matplotlib's Agg canvas; no display, no pyplot state).

- ``plot_race``: longest solved T against wall-clock seconds, one step line
  per model (a step up each time the model solves a rung of the ladder).
- ``plot_curve``: accuracy and loss against T for every trained model, with
  the chance level drawn.
- ``plot_gradient_paths``: gradient norm against distance d, after training
  (solid) and at initialisation (dashed).
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# One colour per model, fixed so that every plot of a run agrees.
MODEL_COLOURS = {"hnae": "tab:red", "lstm": "tab:blue", "gru": "tab:cyan", "tcn": "tab:green",
                 "transformer": "tab:purple", "mamba": "tab:orange", "xlstm": "tab:brown",
                 "htransformer": "tab:pink"}


def _colour(name: str) -> str:
    return MODEL_COLOURS.get(name, "tab:gray")


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_race(race: dict, path: Path, title: str) -> Path:
    """Step plot of the longest solved T over time; 'none' sits below the ladder."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    lowest = min(race["ladder"])
    floor = lowest / 2  # where "solved nothing yet" is drawn on the log axis
    for index, (name, entry) in enumerate(race["models"].items()):
        if entry["status"] != "ok":
            continue
        lift = 1 + 0.02 * index  # a hair apart, so that models on the same rung do not hide each other
        times = [0.0] + [seconds for seconds, _ in entry["solved_timeline"]] + [entry["seconds"]]
        values = [floor * lift] + [length * lift for _, length in entry["solved_timeline"]]
        values.append(values[-1])
        axes.step(times, values, where="post", color=_colour(name), label=name, linewidth=2)
        if entry["solved_timeline"]:
            axes.plot(times[1:-1], values[1:-1], "o", color=_colour(name))
    axes.set_yscale("log")
    ticks = [floor, *race["ladder"]]
    axes.set_yticks(ticks, ["none", *(f"{n:,}" for n in race["ladder"])])
    axes.minorticks_off()
    axes.set_xlabel("wall-clock seconds of training")
    axes.set_ylabel("longest solved T")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left")
    return _save(figure, path)


def _curve_points(entry: dict, key: str) -> tuple[list[int], list[float]]:
    points = [p for p in entry.get("curve", []) if "metrics" in p and key in p["metrics"]]
    return [p["seq_len"] for p in points], [p["metrics"][key] for p in points]


def plot_curve(race: dict, path: Path, title: str) -> Path:
    """Accuracy (when the task has one) and loss against T, chance levels dashed."""
    has_accuracy = race.get("chance_accuracy") is not None
    figure = Figure(figsize=(11 if has_accuracy else 6, 4.5))
    panels = figure.subplots(1, 2 if has_accuracy else 1, squeeze=False)[0]
    metric_panels = [("accuracy", panels[0]), ("loss", panels[1])] if has_accuracy else [("loss", panels[0])]
    for key, axes in metric_panels:
        for name, entry in race["models"].items():
            if entry["status"] != "ok":
                continue
            lengths, values = _curve_points(entry, key)
            if lengths:
                axes.plot(lengths, values, "o-", color=_colour(name), label=name)
        if key == "accuracy":
            axes.axhline(race["chance_accuracy"], color="black", linestyle="--", label="chance")
            axes.set_ylim(-0.02, 1.02)
        else:
            chance = sorted((int(length), value) for length, value in race["chance_loss"].items())
            axes.plot([c[0] for c in chance], [c[1] for c in chance], "k--", label="chance")
            axes.set_yscale("log")
        axes.set_xscale("log")
        axes.set_xlabel("T")
        axes.set_ylabel(key)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    panels[0].set_title(title)
    return _save(figure, path)


def plot_gradient_paths(section: dict, path: Path) -> Path:
    """log-log gradient norm against d; zeros (no path at all) are not drawable and left out."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    distances = section["distances"]
    for name, entry in section["models"].items():
        for stage, style in (("trained", "-"), ("initial", "--")):
            if stage not in entry:
                continue
            pairs = [(d, v) for d, v in zip(distances, entry[stage]) if v is not None and v > 0]
            if pairs:
                axes.plot([p[0] for p in pairs], [p[1] for p in pairs], style, marker=".",
                          color=_colour(name), label=f"{name} ({stage})")
    axes.set_xscale("symlog", linthresh=1)
    axes.set_yscale("log")
    axes.set_xlabel("distance d (steps back from the last output)")
    axes.set_ylabel("||d y[T-1] / d x[T-1-d]||")
    axes.set_title(f"gradient paths, {section['task']} T = {section['seq_len']:,}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)
