"""Writing a bench run down: results.json, report.md and the table on stdout.

Everything here reads the ``results`` dict that ``hnae_bench.bench`` builds
(laid out as below) and writes text; nothing is measured here,
so every number in the report is one the run produced.

results.json layout::

    profile, command, argv, started_at, seconds_total, machine{...}, settings{...},
    races: {task: {ladder, chance_loss: {T: loss}, chance_accuracy,
                   models: {name: {status: ok | unavailable | error, error?,
                                   parameters, model_config, rungs, solved_timeline,
                                   longest_solved, longest_solved_at_seconds,
                                   final_metrics, last_seq_len, steps, seconds,
                                   tokens_per_second, curve: [evaluation]}}}},
    gradient_paths: {...} | {skipped}, length_generalisation: {...} | {skipped},
    verdict, plots: {key: relative path}
"""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

TARGET_RATIO = 5  # the target: hnae's longest solved copy T >= 5x lstm's and gru's


def describe_machine(device: str) -> dict:
    """CPU model, cores, platform, torch version and device: what the report states the run ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device}


# ---- small formatters --------------------------------------------------------

def format_number(value, digits: int = 3) -> str:
    """Short human form of a number; '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(digits - 2, 1)}f}"
    return str(value)


def headline_metric(metrics: dict | None) -> str:
    """'accuracy 0.99' for classification tasks, 'mse 1e-4' for regression, else the loss."""
    if not metrics:
        return "-"
    for key in ("accuracy", "mse"):
        if key in metrics:
            return f"{key} {format_number(metrics[key])}"
    return f"loss {format_number(metrics.get('loss'))}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- the race ----------------------------------------------------------------

RACE_HEADER = ["model", "status", "parameters", "longest solved T", "solved T@seconds", "steps",
               "tokens/s", "final evaluation"]


def race_rows(race: dict) -> list[list[str]]:
    """One row per model: status, parameters, longest solved T and when, speed, final metric."""
    rows = []
    for name, entry in race["models"].items():
        status = entry["status"]
        if status != "ok":
            reason = entry.get("error", "").splitlines()[0][:100] if entry.get("error") else ""
            rows.append([name, status + (f": {reason}" if reason else ""), *["-"] * (len(RACE_HEADER) - 2)])
            continue
        climb = " ".join(f"{length:,}@{seconds:.0f}s" for seconds, length in entry["solved_timeline"])
        rows.append([
            name, "ok", format_number(entry["parameters"]),
            format_number(entry["longest_solved"]) if entry["longest_solved"] else "none",
            climb or "-",
            format_number(entry["steps"]), format_number(entry["tokens_per_second"]),
            f"T={entry['last_seq_len']}: {headline_metric(entry['final_metrics'])}",
        ])
    return rows


def verdict(results: dict) -> str:
    """One plain sentence comparing hnae's longest solved copy T with lstm's and gru's."""
    race = results.get("races", {}).get("copy")
    if race is None:
        return "No copy race was run, so there is no memory-span verdict."
    models = race["models"]
    hnae = models.get("hnae")
    if hnae is None or hnae["status"] != "ok":
        return "hnae did not run in the copy race" + (f" ({hnae['status']})" if hnae else "") + ": no verdict."
    lowest_rung = min(race["ladder"])
    hnae_best = hnae["longest_solved"]
    parts = [f"hnae solved copy up to T = {hnae_best:,}" if hnae_best else
             f"hnae solved no rung of the copy ladder (lowest T = {lowest_rung:,})"]
    met = []
    for rival in ("lstm", "gru"):
        entry = models.get(rival)
        if entry is None or entry["status"] != "ok":
            parts.append(f"{rival} {'was not run' if entry is None else entry['status']}")
            continue
        best = entry["longest_solved"]
        if not best:
            bound = f", so hnae/{rival} > {hnae_best / lowest_rung:.1f}x" if hnae_best else ""
            parts.append(f"{rival} solved no rung (lowest T = {lowest_rung:,}){bound}")
            met.append(bool(hnae_best) and hnae_best >= TARGET_RATIO * lowest_rung)
            continue
        ratio = (hnae_best or 0) / best
        parts.append(f"{rival} up to T = {best:,} (hnae/{rival} = {ratio:.1f}x)")
        met.append(ratio >= TARGET_RATIO)
    sentence = "; ".join(parts) + "."
    if met:
        outcome = "met" if all(met) else "NOT met"
        sentence += f" Target (hnae >= {TARGET_RATIO}x lstm and gru): {outcome}."
    return sentence + _further_than_hnae(models, hnae_best or 0)


def _further_than_hnae(models: dict, hnae_best: int) -> str:
    """A sentence naming every model of the race that solved a longer copy T than hnae, or saying none did."""
    ahead = sorted(((entry["longest_solved"], name) for name, entry in models.items()
                    if name != "hnae" and entry.get("status") == "ok"
                    and (entry.get("longest_solved") or 0) > hnae_best), reverse=True)
    if not ahead:
        return " No model of this race solved a longer T than hnae."
    named = ", ".join(f"{name} (T = {best:,})" for best, name in ahead)
    return f" Further than hnae in this race: {named}."


# ---- sections ----------------------------------------------------------------

def curve_table(race: dict) -> str:
    """Accuracy (or loss) of every trained model at every ladder length."""
    lengths = race["ladder"]
    rows = []
    for name, entry in race["models"].items():
        if entry["status"] != "ok":
            continue
        by_length = {point["seq_len"]: point for point in entry.get("curve", [])}
        cells = []
        for length in lengths:
            point = by_length.get(length)
            if point is None:
                cells.append("-")
            elif "skipped" in point:
                cells.append("skipped")
            else:
                cells.append(headline_metric(point["metrics"]).split(" ", 1)[1])
        rows.append([name, *cells])
    header = ["model", *(f"T={length:,}" for length in lengths)]
    if race.get("chance_accuracy") is not None:
        note = f"Accuracy at each ladder length (chance {format_number(race['chance_accuracy'])})"
    else:
        chance = race["chance_loss"][str(lengths[0])]
        note = f"Error (mse, else loss) at each ladder length (chance loss {format_number(chance)} at T={lengths[0]:,})"
    return note + ", final weights:\n\n" + markdown_table(header, rows)


def gradient_tables(section: dict) -> str:
    distances = section["distances"]
    header = ["model", "stage", *(f"d={d:,}" for d in distances)]
    rows = []
    for name, entry in section["models"].items():
        for stage in ("initial", "trained"):
            if stage in entry:
                rows.append([name, stage, *(format_number(v, 2) for v in entry[stage])])
    norms = markdown_table(header, rows)
    hop_rows = [[name, *(format_number(h) if h is not None else "unreachable" for h in
                         entry["sequential_hops"]["hops"]), entry["sequential_hops"]["rule"]]
                for name, entry in section["models"].items()]
    hops = markdown_table(["model", *(f"d={d:,}" for d in distances), "how counted"], hop_rows)
    return (f"Gradient norm ||d y[T-1] / d x[T-1-d]|| on `{section['task']}` at T = {section['seq_len']:,} "
            f"(total length {section['total_length']:,}), mean of {section['samples']} sequence(s); "
            f"0 means it underflowed float32 (or no path exists); 'trained' is the race's model at the end "
            f"of its budget:\n\n{norms}\n\n"
            f"Sequential hops from x[T-1-d] to y[T-1]:\n\n{hops}")


def length_table(section: dict) -> str:
    rows = []
    for name, entry in section["models"].items():
        for evaluation in entry["evaluations"]:
            if "skipped" in evaluation:
                rows.append([name, f"{evaluation['multiplier']}x", format_number(evaluation["seq_len"]),
                             "skipped: " + evaluation["skipped"], "-", "-", "-"])
                continue
            rows.append([name, f"{evaluation['multiplier']}x", format_number(evaluation["seq_len"]),
                         headline_metric(evaluation["metrics"]), format_number(evaluation["solved"]),
                         format_number(evaluation["sequences"]),
                         "streamed" if evaluation["streamed"] else "one call"])
    header = ["model", "x train T", "T", "result", "solved", "sequences", "mode"]
    note = f"\n\nNote: {section['note']}." if section.get("note") else ""
    return (f"Each model, with its weights at the end of the race, evaluated at multiples of the longest "
            f"T it solved, without retraining; budget {format_number(section['budget_seconds'])} s. "
            f"'streamed' means fed in chunks through the streaming state.\n\n"
            + markdown_table(header, rows) + note)


def _machine_lines(machine: dict) -> list[str]:
    return [f"- Machine: {machine['cpu']} ({machine['logical_cores']} logical cores, "
            f"{machine['torch_threads']} torch threads), {machine['platform']}",
            f"- Device: {machine['device']}; torch {machine['torch']}; Python {machine['python']}"]


def render_markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [f"# hnae bench: `{results['profile']}` profile", "",
             f"- Command: `{results['command']}`", f"- Started: {results['started_at']}; "
             f"took {format_number(results['seconds_total'])} s", *_machine_lines(results["machine"]),
             f"- Budget per model and task: {format_number(settings['time_budget'])} s wall clock"
             + (f", at most {settings['steps']:,} steps" if settings.get("steps") else "")
             + f"; preset `{settings['preset']}`; batch {settings['batch_size']}; lr {settings['lr']}; "
               f"seed {settings['seed']}",
             "- Every model climbs the same ladder (curriculum): it moves to the next length once it "
             "solves the current one; the result is the longest T solved and when.",
             "- Symbols are fed one-hot (the TCN paper fed the copy task's symbols as one scalar channel).",
             "", "## Verdict", "", results["verdict"], ""]
    if results.get("interrupted"):
        lines[-1:-1] = ["", "**The run was interrupted (Ctrl-C): the tables hold only what finished.**"]
    for task, race in results["races"].items():
        lines += [f"## Race: `{task}`", "", "Ladder: " + ", ".join(f"{n:,}" for n in race["ladder"]), "",
                  markdown_table(RACE_HEADER, race_rows(race)), ""]
        for key, caption in (("race", "longest solved T against wall-clock time"),
                             ("curve", "metric against T, with chance")):
            path = results["plots"].get(f"{task}_{key}")
            if path:
                lines += [f"![{task}: {caption}]({path})", ""]
        lines += [curve_table(race), ""]
    gradients = results.get("gradient_paths")
    lines += ["## Gradient paths", ""]
    if gradients and "skipped" not in gradients:
        if results["plots"].get("gradient_paths"):
            lines += [f"![gradient norm against distance]({results['plots']['gradient_paths']})", ""]
        lines += [gradient_tables(gradients), ""]
    else:
        lines += [f"Not measured: {(gradients or {}).get('skipped', 'not run')}.", ""]
    generalisation = results.get("length_generalisation")
    lines += ["## Length generalisation", ""]
    if generalisation and "skipped" not in generalisation:
        lines += [length_table(generalisation), ""]
    else:
        lines += [f"Not measured: {(generalisation or {}).get('skipped', 'not run')}.", ""]
    streaming = results.get("streaming")
    lines += ["## Streaming equals parallel", ""]
    if streaming and "skipped" not in streaming:
        lines += [f"The trained hnae on {streaming['sequences']} held-out sequences of T = "
                  f"{streaming['total_length']:,} steps, once in one call and once fed through its state in "
                  f"{streaming['chunks']:,} chunks (single steps and sizes that straddle blocks): largest "
                  f"difference of the {streaming['compared']} {streaming['max_abs_difference']:.2e} (largest "
                  f"output {streaming['largest_output']:.3g}) "
                  f"({'within' if streaming['equal'] else 'OVER'} the {streaming['tolerance']:g} bound); "
                  f"one streaming step took {format_number(streaming['step_ms'])} ms (median).", ""]
    else:
        lines += [f"Not measured: {(streaming or {}).get('skipped', 'not run')}.", ""]
    lines += speed_lines(results.get("speed"))
    failures = [(task, name, entry) for task, race in results["races"].items()
                for name, entry in race["models"].items() if entry["status"] != "ok"]
    if failures:
        lines += ["## Models that did not run", ""]
        lines += [f"- `{name}` on `{task}`: {entry['status']}: {entry.get('error', '')}" for task, name, entry
                  in failures]
        lines += [""]
    return "\n".join(lines)


def speed_lines(speed: dict | None) -> list[str]:
    """The report's speed section: hnae against nn.LSTM in training tokens/s at long T."""
    lines = ["## Speed: training tokens/s against nn.LSTM", ""]
    if not speed or "skipped" in speed:
        return lines + [f"Not measured: {(speed or {}).get('skipped', 'not run')}.", ""]
    rows = [[f"{row['seq_len']:,}", f"{row['hnae']:,.0f}" if row["hnae"] else row["status"]["hnae"],
             f"{row['lstm']:,.0f}" if row["lstm"] else row["status"]["lstm"],
             f"{row['ratio']:.2f}x" if row["ratio"] else "-"] for row in speed["rows"]]
    return lines + [f"`{speed['command']}` (preset {speed['preset']}, one round; its report: "
                    f"[{speed['report']}]({speed['report']})):", "",
                    markdown_table(["T", "hnae tokens/s", "nn.LSTM tokens/s", "hnae / lstm"], rows), ""]


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write results.json and report.md into ``out_dir``; return their paths."""
    json_path, report_path = out_dir / "results.json", out_dir / "report.md"
    _atomic_write(json_path, json.dumps(results, indent=2, allow_nan=True, default=str) + "\n")
    _atomic_write(report_path, render_markdown(results) + "\n")
    return json_path, report_path


def print_summary(results: dict, printer=print) -> None:
    """The race table(s) and the verdict, as plain text."""
    for task, race in results["races"].items():
        widths = [max(len(str(row[i])) for row in [RACE_HEADER, *race_rows(race)]) for i in
                  range(len(RACE_HEADER))]
        printer(f"\n{task} race, ladder {race['ladder']}")
        for row in [RACE_HEADER, *race_rows(race)]:
            printer("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    printer("\n" + results["verdict"])
    streaming = results.get("streaming")
    if streaming and "skipped" not in streaming:
        printer(f"streaming: the trained hnae fed in {streaming['chunks']:,} chunks equals one call within "
                f"{streaming['max_abs_difference']:.1e} ({'within' if streaming['equal'] else 'NOT within'} "
                f"the {streaming['tolerance']:g} bound)")
    speed = results.get("speed")
    if speed and "skipped" not in speed:
        printer("speed (training tokens/s, preset " + speed["preset"] + "): " + ", ".join(
            f"T={row['seq_len']:,} hnae/lstm {row['ratio']:.2f}x" if row["ratio"] else f"T={row['seq_len']:,} -"
            for row in speed["rows"]))
