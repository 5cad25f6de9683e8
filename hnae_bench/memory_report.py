"""The report of ``hnae bench memory``: tables per task, verdicts against the targets, plots."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

NEW_CONTENT = ("New content: the share of frames whose noise-free content differs from the frame before "
               "(each scene start, each query, and the first frame), the least a policy that stores each new "
               "thing once can write.")
COLOURS = {"all": "#7f7f7f", "novelty": "#1f77b4", "learned": "#d62728"}


def _share(run: dict, key: str) -> str:
    return f"{run[key]:.1%}" if key in run else "-"


def _runs(section: dict, policy: str) -> list[dict]:
    return [run for run in section["runs"] if run["policy"] == policy and "skipped" not in run]


def _plot_accuracy_and_written(runs: list[dict], x_key: str, label: str, titles: tuple[str, str],
                               path: Path, ticks: list | None = None) -> Path:
    """Accuracy (left) and written fraction (right) against ``run[x_key]``, one line per policy.

    ``ticks``: a log-scaled x axis with these ticks, and the 1/x line (one item per scene) on the right."""
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    accuracy_axes, written_axes = figure.subplots(1, 2)
    for policy in dict.fromkeys(run["policy"] for run in runs):
        mine = [run for run in runs if run["policy"] == policy]
        xs = [run[x_key] for run in mine]
        accuracy_axes.plot(xs, [run["accuracy"] for run in mine], "o-", label=policy, color=COLOURS.get(policy))
        written_axes.plot(xs, [run["written_fraction"][0] for run in mine], "o-", label=policy,
                          color=COLOURS.get(policy))
    if ticks:
        written_axes.plot(ticks, [1 / tick for tick in ticks], ":", color="black", label="1/r (one item per scene)")
    accuracy_axes.set(xlabel=label, ylabel="query accuracy", title=titles[0], ylim=(0, 1.05))
    accuracy_axes.axhline(0.99, color="black", linewidth=0.5, linestyle="--")
    written_axes.set(xlabel=label, ylabel="fraction of candidates written (level 1)", title=titles[1],
                     ylim=(0, 1.05))
    for axes in (accuracy_axes, written_axes):
        if ticks:
            axes.set_xscale("log")
            axes.set_xticks(ticks, [str(tick) for tick in ticks])
            axes.minorticks_off()
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_task(task_name: str, section: dict, path: Path) -> Path:
    """Accuracy (left) and written fraction (right) against length, one line per policy."""
    runs = [run for run in section["runs"] if "skipped" not in run]
    label = "distance (frames)" if task_name == "redundant_stream" else "stream length"
    return _plot_accuracy_and_written(runs, "seq_len", label,
                                      (f"{task_name}: accuracy", f"{task_name}: items written"), path)


def verdicts(results: dict) -> list[str]:
    """The issue's targets, checked against what ran (missing runs say so)."""
    lines = []
    stream = results["tasks"].get("redundant_stream")
    if stream:
        furthest = stream["furthest_solved"]
        novelty, everything = _runs(stream, "novelty"), _runs(stream, "all")
        if novelty:  # "all" writes every candidate, so the ratio is novelty's written fraction
            fractions = ", ".join(f"{run['written_fraction'][0]:.1%} at {run['seq_len']}" for run in novelty)
            worst = max(run["written_fraction"][0] for run in novelty)
            floors = [run["new_content_fraction"] for run in novelty if "new_content_fraction" in run]
            floor = (f" (frames with new content, the least a policy that stores each new thing once writes: "
                     f"{min(floors):.1%} to {max(floors):.1%})" if floors else "")
            lines.append(f"- redundant_stream: novelty writes {fractions} (distance) of what all writes "
                         f"(target <= 15%){floor}: {'PASS' if worst <= 0.15 else 'MISS'}")
        if novelty and everything:
            both = [(n, a) for n, a in zip(novelty, everything) if a["solved"]]
            gap = max((a["accuracy"] - n["accuracy"] for n, a in both), default=None)
            if gap is not None:
                lines.append(f"- redundant_stream: where all solves, novelty's accuracy is at most {gap:.1%} "
                             f"lower (target <= 1 point): {'PASS' if gap <= 0.01 else 'MISS'}")
            far_all, far_novelty = furthest.get("all"), furthest.get("novelty")
            if far_all and far_novelty:
                ratio = far_novelty / far_all
                lines.append(f"- redundant_stream: furthest distance solved: novelty {far_novelty}, all {far_all} "
                             f"({ratio:.1f}x; target >= 5x): {'PASS' if ratio >= 5 else 'MISS'}")
            else:
                lines.append(f"- redundant_stream: furthest distance solved: novelty {far_novelty}, all {far_all}")
    sparse = results["tasks"].get("sparse_signal")
    if sparse:
        for learned, everything in zip(_runs(sparse, "learned"), _runs(sparse, "all")):
            written = learned["written_fraction"][0]
            better = learned["accuracy"] >= everything["accuracy"]
            lines.append(f"- sparse_signal (length {learned['seq_len']}): learned writes {written:.1%} "
                         f"(target <= 20%) with accuracy {learned['accuracy']:.3f} vs all's "
                         f"{everything['accuracy']:.3f}: {'PASS' if written <= 0.2 and better else 'MISS'}")
    sizes = {run["policy"]: run["state_bytes_per_stream"] for section in results["tasks"].values()
             for run in section["runs"] if "skipped" not in run}
    if "all" in sizes:
        larger = [policy for policy, size in sizes.items() if size > sizes["all"]]
        lines.append(f"- streaming state per stream: {', '.join(f'{p} {s:,} B' for p, s in sizes.items())}: "
                     f"{'PASS' if not larger else 'MISS (' + ', '.join(larger) + ' larger)'}")
    return lines


def plot_hold_sweep(section: dict, path: Path) -> Path:
    """Accuracy (left) and written fraction (right) against r at one distance, with the 1/r line."""
    return _plot_accuracy_and_written(section["runs"], "hold", "frames per scene (r)",
                                      (f"redundant_stream, distance {section['distance']}: accuracy",
                                       "items written"), path, ticks=section["holds"])


def hold_sweep_lines(section: dict, out_dir: Path, window: int) -> list[str]:
    """The hold sweep's section of the report: a table, a plot."""
    lines = [f"## redundant_stream: frames per scene (r) at distance {section['distance']}", "",
             f"The same task and model at one distance, each scene held r frames. `all` is not run: it "
             f"writes every frame whatever r is, so it sees the last {window} frames at every r.", "",
             "| policy | r | frames | accuracy | solved | written (level 1) | 1/r | new content | steps | "
             "seconds to solve |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in section["runs"]:
        solved_at = f"{run['solved_at_seconds']:.0f}" if run["solved_at_seconds"] is not None else "-"
        lines.append(f"| {run['policy']} | {run['hold']} | {run['total_length']} | {run['accuracy']:.3f} | "
                     f"{'yes' if run['solved'] else 'no'} | {run['written_fraction'][0]:.1%} | "
                     f"{1 / run['hold']:.1%} | {_share(run, 'new_content_fraction')} | {run['steps']} | "
                     f"{solved_at} |")
    plot = plot_hold_sweep(section, out_dir / "memory-hold_sweep.png")
    return lines + ["", f"![hold sweep]({plot.name})", ""]


def write_report(results: dict, out_dir: Path) -> Path:
    settings = results["settings"]
    lines = ["# hnae bench memory", "", f"Command: `{results['command']}`", "",
             "Machine: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in results["machine"].items()),
             "",
             f"Model: one HNAE layer, width {settings['width']}, windows (1, {settings['window']}) "
             f"(every input is a level-1 candidate; the memory holds {settings['window']} written items), "
             f"2 heads; Adam, batch {settings['batch']}, up to {settings['seconds']:g} s per run; "
             f"novelty threshold {settings['threshold']}, learned budget {settings['budget']}.", "",
             "## Targets", "", *verdicts(results), ""]
    for task_name, section in results["tasks"].items():
        lines += [f"## {task_name}", "", f"Options: {section['options']}", "",
                  *([NEW_CONTENT, ""] if task_name == "redundant_stream" else []),
                  "| policy | length | accuracy | solved | written (level 1) | new content | state B/stream | steps "
                  "| seconds to solve |", "|---|---|---|---|---|---|---|---|---|"]
        for run in section["runs"]:
            if "skipped" in run:
                lines.append(f"| {run['policy']} | {run['seq_len']} | not run: {run['skipped']} | | | | | | |")
                continue
            solved_at = f"{run['solved_at_seconds']:.0f}" if run["solved_at_seconds"] is not None else "-"
            lines.append(f"| {run['policy']} | {run['seq_len']} | {run['accuracy']:.3f} | "
                         f"{'yes' if run['solved'] else 'no'} | {run['written_fraction'][0]:.1%} | "
                         f"{_share(run, 'new_content_fraction')} | {run['state_bytes_per_stream']:,} | "
                         f"{run['steps']} | {solved_at} |")
        plot = plot_task(task_name, section, out_dir / f"memory-{task_name}.png")
        lines += ["", f"Furthest solved: {section['furthest_solved'] or 'none'}", "", f"![{task_name}]({plot.name})", ""]
    if results.get("hold_sweep", {}).get("runs"):
        lines += hold_sweep_lines(results["hold_sweep"], out_dir, settings["window"])
    if results.get("interrupted"):
        lines += ["The run was interrupted: the tables hold what had run.", ""]
    path = out_dir / "memory-report.md"
    path.write_text("\n".join(lines))
    return path
