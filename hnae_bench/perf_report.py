"""Writing ``hnae bench perf`` down: medians, ratios to nn.LSTM, report.md, perf.json, PNGs.

Nothing is measured here: ``summarise`` reads the raw rounds that
``hnae_bench.perf`` collected and adds the figures derived from them, so every
number in the report is one the run produced.

perf.json layout::

    profile, command, argv, started_at, seconds_total, machine{...}, load_average_start/end,
    settings{...}, models: {name: {status, max_len, config | error}},
    matmul: [round result], matmul_peak: {flops_per_second, rounds, size, dtype},
    training: {name: {T: {status, error?, rounds: [raw], summary{...}, ratio_to_lstm{...}}}},
    streaming: {name: {status, error?, rounds: [raw], summary{...}, ratio_to_lstm{...}}},
    targets: [{target, status: PASS | MISS | N/A, value, threshold, detail}], plots: {key: file}
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from hnae_bench.perf_targets import evaluate_targets, short_number, target_lines
from hnae_bench.report import format_number, markdown_table

TRAINING_RATIO_KEYS = ("train_tokens_per_second", "inference_tokens_per_second", "train_peak_bytes",
                       "train_bytes_per_token", "train_allocated_bytes_per_token", "mfu")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


# ---- derived figures ---------------------------------------------------------------------------

def _summarise_training(entry: dict, peak: float | None) -> dict:
    rounds = entry["rounds"]
    tokens = rounds[0]["tokens"]
    train = _median([statistics.median(r["train_seconds"]) for r in rounds])
    infer = _median([statistics.median(r["inference_seconds"]) for r in rounds])
    memory, inference_memory = _median([r["train_peak_bytes"] for r in rounds]), _median(
        [r["inference_peak_bytes"] for r in rounds])
    allocated = _median([r.get("train_peak_allocated_bytes") for r in rounds])   # absent in older perf.json
    flops = next((r["flops"] for r in rounds if "flops" in r), None)
    achieved = flops["training"] / train if flops else None
    return {"rounds": len(rounds), "tokens": tokens, "train_seconds": train, "train_tokens_per_second": tokens / train,
            "inference_seconds": infer, "inference_tokens_per_second": tokens / infer,
            "train_peak_bytes": memory, "train_bytes_per_token": _ratio(memory, tokens),
            "train_peak_allocated_bytes": allocated, "train_allocated_bytes_per_token": _ratio(allocated, tokens),
            "inference_peak_bytes": inference_memory, "inference_bytes_per_token": _ratio(inference_memory, tokens),
            "flops_training": flops["training"] if flops else None,
            "flops_per_token": flops["training"] / tokens if flops else None,
            "model_flops_per_second": achieved, "mfu": _ratio(achieved, peak),
            "flops_note": next((r.get("flops_skipped") or f"not counted: {r['cut_short']}" for r in rounds
                                if "flops_skipped" in r or "cut_short" in r), None)}


def _summarise_streaming(entry: dict) -> dict:
    rounds = entry["rounds"]
    positions = rounds[0]["positions"]
    latency = [_median([r["latency_seconds"][i] for r in rounds]) for i in range(len(positions))]
    batch_step = _median([r["batch_step_seconds"] for r in rounds])
    return {"rounds": len(rounds), "positions": positions, "latency_seconds": latency,
            "latency_last_over_first": latency[-1] / latency[0], "state_bytes": rounds[0]["state_bytes"],
            "stream_batch": rounds[0]["stream_batch"], "batch_step_seconds": batch_step,
            "batch_tokens_per_second": rounds[0]["stream_batch"] / batch_step, "precision": rounds[0].get("precision"),
            "batch_state_bytes": rounds[0]["batch_state_bytes"]}


def summarise(results: dict) -> None:
    """Add summary, ratio_to_lstm, matmul_peak and targets (``hnae_bench.perf_targets``) to ``results``."""
    peaks = [r["best_flops_per_second"] for r in results.get("matmul", []) if r["status"] == "ok"]
    settings = results["settings"]
    results["matmul_peak"] = {"flops_per_second": _median(peaks), "rounds": peaks, "size": settings["matmul_size"],
                              "dtype": next((r["dtype"] for r in results.get("matmul", []) if r["status"] == "ok"),
                                            None)}
    training = results.get("training", {})
    for by_length in training.values():
        for entry in by_length.values():
            if entry["status"] == "ok":
                entry["summary"] = _summarise_training(entry, results["matmul_peak"]["flops_per_second"])
    for name, by_length in training.items():
        for steps, entry in by_length.items():
            lstm = training.get("lstm", {}).get(steps, {}).get("summary")
            if "summary" in entry and lstm:
                entry["ratio_to_lstm"] = {key: _ratio(entry["summary"][key], lstm[key]) for key in TRAINING_RATIO_KEYS}
    streaming = results.get("streaming", {})
    for entry in streaming.values():
        if entry["status"] == "ok":
            entry["summary"] = _summarise_streaming(entry)
    lstm = streaming.get("lstm", {}).get("summary")
    for entry in streaming.values():
        if "summary" in entry and lstm:
            entry["ratio_to_lstm"] = {
                "latency_seconds": [_ratio(a, b) for a, b in zip(entry["summary"]["latency_seconds"],
                                                                 lstm["latency_seconds"])],
                "batch_tokens_per_second": _ratio(entry["summary"]["batch_tokens_per_second"],
                                                  lstm["batch_tokens_per_second"])}
    results["targets"] = evaluate_targets(results)


# ---- tables ------------------------------------------------------------------------------------

def _with_ratio(value, ratio) -> str:
    return short_number(value) + (f" ({ratio:.2f}x)" if value is not None and ratio is not None else "")


TRAINING_HEADER = ["model", "T", "parameters", "status", "train tokens/s (x lstm)", "inference tokens/s (x lstm)",
                   "train peak MB (x lstm)", "bytes/token (x lstm)", "allocated bytes/token (x lstm)", "MFU (x lstm)",
                   "rounds"]


def training_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, by_length in results.get("training", {}).items():
        parameters = results["models"][name].get("config", {}).get("parameters")
        for steps, entry in by_length.items():
            summary, ratio = entry.get("summary"), entry.get("ratio_to_lstm", {})
            if summary is None:
                status = entry["status"] + (f": {entry['error'].splitlines()[0][:90]}" if entry.get("error") else "")
                rows.append([name, f"{int(steps):,}", format_number(parameters), status] + ["-"] * 7)
                continue
            mb = summary["train_peak_bytes"] / 2 ** 20 if summary["train_peak_bytes"] is not None else None
            rows.append([name, f"{int(steps):,}", format_number(parameters), "ok",
                         _with_ratio(summary["train_tokens_per_second"], ratio.get("train_tokens_per_second")),
                         _with_ratio(summary["inference_tokens_per_second"], ratio.get("inference_tokens_per_second")),
                         _with_ratio(mb, ratio.get("train_peak_bytes")),
                         _with_ratio(summary["train_bytes_per_token"], ratio.get("train_bytes_per_token")),
                         _with_ratio(summary.get("train_allocated_bytes_per_token"),
                                     ratio.get("train_allocated_bytes_per_token")),
                         (summary.get("flops_note") or "-")
                         if summary["mfu"] is None else f"{summary['mfu']:.1%}" + (
                             f" ({ratio['mfu']:.2f}x)" if ratio.get("mfu") is not None else ""),
                         str(summary["rounds"])])
    return rows


def streaming_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    streaming = results.get("streaming", {})
    positions = next((e["summary"]["positions"] for e in streaming.values() if "summary" in e),
                     results["settings"]["stream_positions"])
    batch = results["settings"]["stream_batch"]
    header = (["model", "parameters", "status"] + [f"step ms at t={p:,} (x lstm)" for p in positions]
              + ["last / first", "state bytes", f"tokens/s at batch {batch} (x lstm)"])
    rows = []
    for name, entry in streaming.items():
        parameters = results["models"][name].get("config", {}).get("parameters")
        summary, ratio = entry.get("summary"), entry.get("ratio_to_lstm", {})
        if summary is None:
            rows.append([name, format_number(parameters), f"{entry['status']}: {entry.get('error', '')[:90]}"]
                        + ["-"] * (len(header) - 3))
            continue
        latency_ratios = ratio.get("latency_seconds", [None] * len(positions))
        precision = summary["precision"]
        rows.append([name, format_number(parameters), "ok" if precision in (None, results["settings"]["dtype"])
                     else f"ok in {precision} (cuDNN refused {results['settings']['dtype']})"]
                    + [_with_ratio(s * 1e3, r) for s, r in zip(summary["latency_seconds"], latency_ratios)]
                    + [f"{summary['latency_last_over_first']:.3f}",
                       " / ".join(f"{b:,}" for b in sorted(set(summary["state_bytes"]))),
                       _with_ratio(summary["batch_tokens_per_second"], ratio.get("batch_tokens_per_second"))])
    return header, rows


# ---- plots -------------------------------------------------------------------------------------

def plot_training(results: dict, path: Path, key: str, label: str, dashed_key: str | None = None,
                  dashed_label: str = "") -> Path:
    """``key`` against T on log-log axes, one line per model (``dashed_key`` dashed, same colour)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # here: a GPU box without matplotlib still reports
    from matplotlib.figure import Figure

    from hnae_bench.plots import MODEL_COLOURS
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for name, by_length in results.get("training", {}).items():
        for line_key, style, label_of in ((key, "o-", name), (dashed_key, "s--", None)):
            points = [(int(t), e["summary"][line_key]) for t, e in by_length.items()
                      if line_key and "summary" in e and e["summary"][line_key]]
            if points:
                axes.plot(*zip(*points), style, color=MODEL_COLOURS.get(name, "tab:gray"), label=label_of,
                          linewidth=2 if label_of else 1.5)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    lengths = results["settings"]["seq_lens"]
    axes.set_xticks(lengths, [f"{n:,}" for n in lengths])
    axes.minorticks_off()
    axes.set_xlabel("T (time steps per sequence)")
    axes.set_ylabel(label)
    settings = results["settings"]
    axes.set_title(f"{label}, batch {settings['batch_size']}, {settings['device']} {settings['dtype']}"
                   + (f" (dashed: {dashed_label})" if dashed_key else ""), fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def write_report(results: dict, out_dir: Path, say=print) -> dict:
    """perf.json, the PNGs and report.md in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    plots = {}
    for key, data_key, label, dashed, dashed_label in (
            ("throughput", "train_tokens_per_second", "tokens/s (forward + backward)", "inference_tokens_per_second",
             "no-grad inference"),
            ("memory", "train_peak_bytes", "peak training memory (bytes)", "train_peak_allocated_bytes",
             "allocated by PyTorch")):
        try:
            plots[key] = plot_training(results, out_dir / f"perf_{key}.png", data_key, label, dashed,
                                       dashed_label).name
        except Exception as error:  # noqa: BLE001 - the report is still written without this plot
            say(f"plot {key} failed: {type(error).__name__}: {error}")
    results["plots"] = plots
    json_path = out_dir / "perf.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    report_path = out_dir / "report.md"
    report_path.write_text(markdown(results))
    return {"report": report_path, "json": json_path}


def markdown(results: dict) -> str:
    machine, settings = results["machine"], results["settings"]
    peak = results["matmul_peak"]
    lines = [
        "# hnae bench perf", "",
        f"Command: `{results['command']}`  ", f"Started {results['started_at']}, "
        f"{results['seconds_total']:.0f} s in all" + (" (interrupted)" if results.get("interrupted") else "") + ".", "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, torch {machine['torch']}, device "
        f"{machine['device']}, {machine['platform']}, Python {machine['python']}. Load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.2f}' for v in results['load_average_start'])} at the start, "
        f"{', '.join(f'{v:.2f}' for v in results.get('load_average_end', []))} at the end.", "",
        f"Settings: batch {settings['batch_size']}, input {settings['input_size']} random float features per step, "
        f"preset {settings['preset']}, precision {settings['dtype']}, {settings['repeats']} interleaved rounds, "
        f"{settings['max_seconds']:g} s cap per timed call, torch threads "
        f"{settings['threads'] or 'default'}"
        + (f"; training through torch.compile (mode {settings['compile']}) for every model but nn.LSTM / nn.GRU "
           "(compiled before timing; inference eager)" if settings.get("compile") else "") + ".", "",
        f"Matmul peak ({peak['size']} x {peak['size']} {peak['dtype']}, best call, median over rounds): "
        f"{format_number(peak['flops_per_second'])} FLOP/s.", "",
        "## Targets", "", *[f"- **{line.split(':', 1)[0]}**:{line.split(':', 1)[1]}" for line in target_lines(results)],
        "", f"## Training (forward + backward of a mean-square loss) and parallel inference, batch "
        f"{settings['batch_size']}", "", markdown_table(TRAINING_HEADER, training_rows(results)), "",
        *([] if "lstm" in results.get("training", {}) else ["No nn.LSTM in this run, so no ratios to it.", ""]),
    ]
    header, rows = streaming_rows(results)
    if rows:
        lines += [f"## Streaming: one step at a time (batch 1 at each position; batch {settings['stream_batch']} "
                  f"from t={settings['stream_positions'][0]:,})", "", markdown_table(header, rows), ""]
    lines += ["## Models", "", markdown_table(["model", "status", "parameters", "width", "built for T <=", "config"], [
        [name, m["status"], format_number(m.get("config", {}).get("parameters")),
         format_number(m.get("config", {}).get("width")), format_number(m.get("max_len")),
         m.get("error", "")[:120] or ", ".join(f"{k}={v}" for k, v in m["config"].items()
                                               if k not in ("name", "parameters", "width", "max_len"))]
        for name, m in results.get("models", {}).items()]), ""]
    lines += [f"![{key}]({name})" for key, name in results.get("plots", {}).items()]
    lines += ["", "## How it was measured", "",
              "Each (model, T) and each streaming model runs in a fresh child process (forkserver); its calls are "
              "timed after a warm-up call at T <= 256 and after the first full-size call (which also pays the "
              "process's first touch of its memory; it alone is timed where it took over "
              f"{settings['repeat_below']:g} s); a call over the cap is killed and reported as a timeout, and "
              "the model's longer T are skipped (also when the last T's time, scaled linearly, is over "
              f"{settings['prediction_margin']:g}x the cap). Medians are over calls within a round, then over "
              f"rounds; a call longer than {settings['repeat_below']:g} s is measured in the first round only. "
              "Peak memory: "
              + next((r["rounds"][0]["memory_method"] for e in results.get("training", {}).values()
                      for r in e.values() if r.get("rounds")), "-")
              + ", over the first full-size call; allocated bytes: "
              + ("torch.cuda.max_memory_allocated" if results["settings"]["device"].startswith("cuda") else
                 "the running sum of the profiler's records of PyTorch's CPU allocator (profile_memory=True) at "
                 "its largest, over the same call (the profiler runs through it)")
              + ". Model FLOPs (first round, where a training call took under "
              f"{settings['flop_count_fraction']:g}x the cap): torch.utils.flop_counter.FlopCounterMode on one "
              "forward + backward (matmuls, convolutions, attention at full T x S as torch counts it; oneDNN/cuDNN "
              "off while counting so that recurrent gates are seen; nn.LSTM/nn.GRU over 256 steps counted at 128 and "
              "256 steps and extrapolated, exact for a recurrence), divided by the median training time and by "
              "the matmul peak (MFU). Ratios (x lstm) divide by nn.LSTM's figure at the same T in this run.", ""]
    return "\n".join(lines)


def print_summary(results: dict, say=print) -> None:
    header = ["model", "T", "status", "train tok/s (x lstm)", "infer tok/s", "bytes/token", "allocated", "MFU"]
    rows = [[r[0], r[1], r[3][:64], r[4], r[5].split(" (")[0], r[7].split(" (")[0], r[8].split(" (")[0],
             r[9].split(" (")[0]]
            for r in training_rows(results)]
    say("\n" + markdown_table(header, rows))
    stream_header, stream_rows_ = streaming_rows(results)
    if stream_rows_:
        say("\n" + markdown_table(stream_header, stream_rows_))
    say(f"\nmatmul peak: {format_number(results['matmul_peak']['flops_per_second'])} FLOP/s")
    say("\n".join(["", "targets:"] + target_lines(results)))
