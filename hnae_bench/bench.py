"""``hnae bench``: the memory-span race, gradient paths and length generalisation.

Every model of a profile gets the same parameter budget (the preset), the
same wall-clock budget and the same ladder of lengths, and climbs it with the
curriculum of ``hnae_bench.train``; the result is the longest T each model
solved and when. Then each trained model is evaluated at every rung (the
metric-against-T curve), the gradient paths of hnae, lstm and tcn are
measured at initialisation and after training, and the race's hnae is
evaluated at 10x and 100x the length it solved.

The run writes ``runs/<timestamp>/`` (or ``--out``): ``results.json`` (all
of it), ``report.md`` (tables and the PNG plots) and each model's training
log under ``train/``.

results.json is laid out as documented in ``hnae_bench.report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hnae_bench import models as model_zoo
from hnae_bench.arguments import increasing_lengths, name_list, positive
from hnae_bench import plots, report
from hnae_bench.gradient_paths import gradient_paths_of_race
from hnae_bench.length_generalisation import evaluate_curve, length_generalisation_of_race
from hnae_bench.speed_check import speed_check
from hnae_bench.streaming_check import streaming_check_of_race
from hnae_bench.tasks import TASK_NAMES, make_task
from hnae_bench.train import TrainConfig, train

CORE_MODELS = ("hnae", "lstm", "gru", "tcn", "transformer")


@dataclass(frozen=True)
class Profile:
    """What one ``--profile`` runs; every field can be narrowed from the command line."""

    description: str
    models: tuple[str, ...]
    ladders: dict  # task name -> tuple of lengths (the curriculum's rungs)
    time_budget: float  # seconds of training per model and task
    steps: int | None = None  # optional step budget on top of the time budget
    batch_size: int = 32
    lr: float = 3e-3  # one learning rate for every model (hnae learns copy faster at 3e-3 than 1e-3)
    eval_every: int = 50
    eval_batches: int = 4
    curve_seconds: float = 10.0  # per model: evaluation at every ladder length
    curve_sequences: int = 32
    gradient_seq_len: int = 1000  # T of the gradient-path measurement (capped by the ladder)
    gradient_samples: int = 2
    length_multipliers: tuple[int, ...] = (10, 100)
    length_seconds: float = 60.0  # the whole length-generalisation section
    length_sequences: int = 16
    task_options: dict = field(default_factory=dict)  # task name -> options for make_task
    speed_seq_lens: tuple[int, ...] = ()  # the speed section: hnae vs nn.LSTM training tokens/s at these T
    speed_preset: str = "large"
    speed_options: tuple[str, ...] = ()  # more `hnae bench perf` arguments for that section

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.ladders)


# From T = 10: a model that cannot copy at 50 within the budget (nn.LSTM and GRU in 130 s) still gets
# a longest solved T to compare.
COPY_LADDER = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
PROFILES = {
    "tiny": Profile("seconds; for tests and a smoke check", ("hnae", "lstm"), {"copy": (10, 20)},
                    time_budget=3.0, batch_size=8, eval_every=10, eval_batches=1, curve_seconds=2.0,
                    curve_sequences=8, gradient_seq_len=20, gradient_samples=1, length_seconds=4.0,
                    length_sequences=4, speed_seq_lens=(64,), speed_preset="small",
                    speed_options=("--batch-size", "2", "--threads", "1", "--matmul-size", "128")),
    # 5 x (130 s training + <= 10 s curve) + gradients (~30 s) + lengths (<= 60 s) + speed (~2 min):
    # about 13 minutes on a 2-core EPYC.
    "default": Profile("the copy race and a speed check on 2 CPU cores in at most 15 minutes", CORE_MODELS,
                       {"copy": COPY_LADDER}, time_budget=130.0, gradient_samples=1,
                       speed_seq_lens=(4096, 16384), speed_options=("--min-seconds", "6")),
    # 5 x 2 x (300 s + 15 s) + sections: about an hour.
    "long": Profile("copy and adding on the CPU in about an hour", CORE_MODELS,
                    {"copy": COPY_LADDER + (10000,), "adding": (50, 100, 200, 500, 1000)},
                    time_budget=300.0, curve_seconds=15.0, gradient_seq_len=2000, length_seconds=180.0),
    "full": Profile("paper-sized budgets, T up to 100,000, every task and peer (for a GPU)",
                    model_zoo.MODEL_NAMES,
                    {"copy": (100, 300, 1000, 3000, 10000, 30000, 100000), "adding": (50, 200, 600, 1000, 5000),
                     "selective_copy": (256, 1024, 4096), "associative_recall": (256, 1024, 4096)},
                    time_budget=3600.0, steps=100_000, eval_every=200, eval_batches=8, curve_seconds=60.0,
                    gradient_seq_len=10000, gradient_samples=4, length_seconds=900.0, length_sequences=32),
}


# ---- command line --------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hnae bench", description="Race hnae against LSTM, GRU, TCN and a transformer on long-memory "
        "tasks under one parameter and wall-clock budget; write a report with plots. "
        "`hnae bench perf --help`: the performance profile (throughput, memory, streaming); "
        "`hnae bench memory --help`: the write policies' benchmark.",
        epilog="profiles: " + "; ".join(f"{name}: {p.description}" for name, p in PROFILES.items()))
    parser.add_argument("--profile", choices=tuple(PROFILES), default="default")
    parser.add_argument("--models", type=name_list(model_zoo.MODEL_NAMES), help="comma-separated subset")
    parser.add_argument("--tasks", type=name_list(TASK_NAMES), help="comma-separated subset")
    parser.add_argument("--seq-lens", type=increasing_lengths, help="the ladder, e.g. 50,100,200 (every task)")
    parser.add_argument("--time-budget", type=positive(float), help="seconds of training per model and task")
    parser.add_argument("--steps", type=positive(int), help="step budget per model and task (on top of the "
                        "time budget)")
    parser.add_argument("--preset", choices=model_zoo.PRESETS, default="small", help="parameter budget")
    parser.add_argument("--batch-size", type=positive(int))
    parser.add_argument("--lr", type=positive(float))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available for "
                        "the full profile, else cpu)")
    parser.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """The profile narrowed by the command line: everything the run needs, JSON-ready."""
    profile = PROFILES[args.profile]
    tasks = args.tasks or profile.tasks
    ladders = {task: list(args.seq_lens or profile.ladders.get(task) or PROFILES["full"].ladders[task])
               for task in tasks}
    device = args.device or ("cuda" if args.profile == "full" and torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must name a torch device such as cpu or cuda:0, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    settings = {
        **{f.name: getattr(profile, f.name) for f in dataclasses.fields(profile) if f.name not in ("ladders",)},
        "models": list(args.models or profile.models), "tasks": list(tasks), "ladders": ladders,
        "preset": args.preset, "seed": args.seed, "device": device, "input_encoding": "one-hot",
    }
    for name in ("time_budget", "steps", "batch_size", "lr"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["length_multipliers"] = list(settings["length_multipliers"])
    return settings


# ---- the race ----------------------------------------------------------------------

def _solved_timeline(rungs: list[dict]) -> list[tuple[float, int]]:
    """(seconds since training began, length) of every rung solved, in order."""
    return [(float(rung["seconds"]), int(rung["seq_len"])) for rung in rungs if rung["solved"]]


def _race_entry(result, ladder, settings, task_name) -> dict:
    timeline = _solved_timeline(result.rungs)
    return {
        "status": "ok", "parameters": result.parameters, "model_config": result.model.model_config,
        "rungs": result.rungs, "solved_timeline": timeline, "longest_solved": result.longest_solved,
        "longest_solved_at_seconds": timeline[-1][0] if timeline else None,
        "final_metrics": result.final_metrics, "last_seq_len": result.final_seq_len,
        "steps": result.steps, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
        "curve": evaluate_curve(result.model, task_name, ladder, seconds=settings["curve_seconds"],
                                sequences=settings["curve_sequences"], device=settings["device"],
                                seed=settings["seed"] + 7919,
                                task_options=settings["task_options"].get(task_name)),
    }


def new_race(task_name: str, settings: dict) -> dict:
    """The race record of one task before any model ran: its ladder and chance levels."""
    ladder = settings["ladders"][task_name]
    task_options = settings["task_options"].get(task_name, {})
    return {"ladder": ladder,
            "chance_loss": {str(n): make_task(task_name, n, **task_options).chance_loss for n in ladder},
            "chance_accuracy": make_task(task_name, ladder[0], **task_options).chance_accuracy,
            "models": {}}


# hnae options a task needs beyond the preset (recorded in each run's model config). Selective copy asks
# for the k-th data token among noise at random steps: without counts of them hnae sat near 50% at
# T = 128 after 300 s on the CPU, with them it climbed 128 .. 4096 (docs/RESULTS.md, "Selective copy").
TASK_HNAE_OPTIONS = {"selective_copy": {"event_counters": 4}}


def run_race(task_name: str, settings: dict, out_dir: Path, say, race: dict, trained: dict) -> None:
    """Train every model on the ladder of ``task_name``, filling ``race`` and ``trained`` (name -> TrainResult).

    They are filled as models finish, so a Ctrl-C keeps what has run: the
    model being trained is marked interrupted and the interrupt goes on up.
    """
    ladder = settings["ladders"][task_name]
    task_options = settings["task_options"].get(task_name, {})
    for index, name in enumerate(settings["models"], start=1):
        say(f"[{task_name} {index}/{len(settings['models'])}] {name}: ladder {ladder}, "
            f"budget {settings['time_budget']:g} s")
        config = TrainConfig(
            task=task_name, seq_len=ladder[-1], model=name, preset=settings["preset"], steps=settings["steps"],
            time_budget=settings["time_budget"], batch_size=settings["batch_size"], lr=settings["lr"],
            seed=settings["seed"], device=settings["device"], out=str(out_dir / "train" / f"{task_name}-{name}"),
            curriculum=True, ladder=tuple(ladder), eval_every=settings["eval_every"],
            eval_batches=settings["eval_batches"], progress=settings["progress"], task_options=task_options,
            stop_when_solved=True, **(TASK_HNAE_OPTIONS.get(task_name, {}) if name == "hnae" else {}))
        try:
            result = train(config)
            race["models"][name] = _race_entry(result, ladder, settings, task_name)
            trained[name] = result
            say("  " + result.summary())
        except KeyboardInterrupt:
            race["models"][name] = {"status": "interrupted", "error": "stopped by Ctrl-C"}
            raise
        except model_zoo.ModelUnavailable as error:
            race["models"][name] = {"status": "unavailable", "error": str(error)}
            say(f"  {name} unavailable: {error}")
        except Exception as error:  # noqa: BLE001 - one model's crash must not end the bench
            race["models"][name] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                                    "traceback": traceback.format_exc()}
            say(f"  {name} crashed ({type(error).__name__}: {error}); going on")


# ---- the sections and the report ---------------------------------------------------

def _run_section(name: str, function, say) -> dict:
    say(f"{name} ...")
    started = time.perf_counter()
    try:
        section = function()
    except Exception as error:  # noqa: BLE001 - a failed section is reported, the report still gets written
        section = {"skipped": f"failed: {type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    section["seconds"] = time.perf_counter() - started
    say(f"{name}: {section['seconds']:.1f} s" + (f" ({section['skipped']})" if "skipped" in section else ""))
    return section


def _make_plots(results: dict, out_dir: Path, say) -> dict:
    """Every PNG of the run; a plot that fails is reported and the others are still drawn."""
    budget = results["settings"]["time_budget"]
    wanted = []
    for task, race in results["races"].items():
        wanted.append((f"{task}_race", plots.plot_race, race, f"{task}: longest solved T, {budget:g} s per model"))
        wanted.append((f"{task}_curve", plots.plot_curve, race, f"{task}: after training"))
    if "skipped" not in results["gradient_paths"]:
        wanted.append(("gradient_paths", plots.plot_gradient_paths, results["gradient_paths"], None))
    made = {}
    for key, draw, data, title in wanted:
        try:
            path = draw(data, out_dir / f"{key}.png", *([title] if title else []))
            made[key] = path.name
        except Exception as error:  # noqa: BLE001 - the report is still written without this plot
            say(f"plot {key} failed: {type(error).__name__}: {error}")
    return made


def _new_run_dir(requested: str | None) -> Path:
    if requested:
        path = Path(requested)
    else:
        path = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while path.exists():
            path = path.with_name(f"{path.name.split('.')[0]}.{suffix}")
            suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str]) -> int:
    if argv and argv[0] == "perf":  # `hnae bench perf`: the performance profile has its own options
        from .perf import main as perf_main
        return perf_main(argv[1:])
    if argv and argv[0] == "memory":  # `hnae bench memory`: write policies on their own tasks
        from .memory_bench import main as memory_main
        return memory_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
    except ValueError as error:
        print(f"hnae bench: {error}", file=sys.stderr)
        return 2
    settings["progress"] = not args.no_progress
    out_dir = _new_run_dir(args.out)

    def say(message: str) -> None:
        print(message, flush=True)

    runs = len(settings["tasks"]) * len(settings["models"])
    say(f"hnae bench --profile {args.profile}: {', '.join(settings['models'])} on {', '.join(settings['tasks'])}; "
        f"{runs} x {settings['time_budget']:g} s of training, then evaluations (up to {runs} x "
        f"{settings['curve_seconds']:g} s), gradient paths and length generalisation (up to "
        f"{settings['length_seconds']:g} s); writing {out_dir}")
    started, started_at = time.perf_counter(), datetime.datetime.now().isoformat(timespec="seconds")
    results = {"profile": args.profile, "command": "hnae bench " + shlex.join(argv), "argv": list(argv),
               "started_at": started_at, "machine": report.describe_machine(settings["device"]),
               "settings": settings, "races": {}}
    trained_by_task = {task_name: {} for task_name in settings["tasks"]}
    try:
        for task_name in settings["tasks"]:
            results["races"][task_name] = new_race(task_name, settings)
            run_race(task_name, settings, out_dir, say, results["races"][task_name], trained_by_task[task_name])
    except KeyboardInterrupt:
        results["interrupted"] = True
        say("interrupted: writing the report of what has run so far")
    first, first_trained = settings["tasks"][0], trained_by_task[settings["tasks"][0]]
    for key, title, run_section in (("gradient_paths", "gradient paths", gradient_paths_of_race),
                                    ("length_generalisation", "length generalisation", length_generalisation_of_race),
                                    ("streaming", "streaming = parallel", streaming_check_of_race)):
        if results.get("interrupted"):
            results[key] = {"skipped": "the run was interrupted"}
        else:
            results[key] = _run_section(title, lambda: run_section(first, first_trained, settings), say)
    results["speed"] = ({"skipped": "the run was interrupted"} if results.get("interrupted") else
                        _run_section("speed", lambda: speed_check(settings, out_dir), say))
    results["verdict"] = report.verdict(results)
    results["plots"] = _make_plots(results, out_dir, say)
    results["seconds_total"] = time.perf_counter() - started
    json_path, report_path = report.write_results(results, out_dir)
    report.print_summary(results, say)
    say(f"\nreport: {report_path}\nresults: {json_path}")
    return 0
