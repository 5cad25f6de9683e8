"""``hnae bench perf``: training and inference throughput, memory, FLOP utilisation and streaming latency.

Every model is built once at a matched parameter budget (``--preset``, ~0.4M
for ``large``) for the longest T of the run, and measured at every T:
forward + backward tokens/s and peak memory, no-grad forward tokens/s, and the
model FLOP utilisation against a matmul peak measured in the same run. Then
hnae, nn.LSTM and nn.GRU stream one step at a time at positions 1k, 10k and
100k, and at batch 32. Each measurement runs in a fresh child process (a
forkserver: no torch state shared), so a crash or an out-of-memory is one
row's status, and every call is capped in time (``--max-seconds``). Repeats
are interleaved (round r measures every model before round r + 1 begins) and
the report gives medians, each also as a ratio to nn.LSTM from the same run.

The run writes ``<run>/perf/``: ``report.md``, ``perf.json`` and PNG plots
(laid out in ``hnae_bench.perf_report``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hnae_bench import perf_measure, perf_models, perf_report
from hnae_bench.arguments import increasing_lengths, name_list, positive
from hnae_bench.perf_isolation import forkserver_context, run_isolated
from hnae_bench import models as model_zoo
from hnae_bench.report import describe_machine

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STREAMING_MODELS = ("hnae", "lstm", "gru")   # the families with a step; plus perf_models.REFERENCE_STEP_MODEL
PREDICTION_MARGIN = 1.5     # skip T when the last T's call, scaled linearly, is over this many caps
FLOP_COUNT_FRACTION = 0.25  # FLOPs are counted (first round) where a training call took under this many caps


@dataclass(frozen=True)
class PerfProfile:
    """What one ``--profile`` measures; each field can be narrowed from the command line."""

    description: str
    models: tuple[str, ...]
    seq_lens: tuple[int, ...]
    batch_size: int = 8
    repeats: int = 3
    max_seconds: float = 60.0       # per timed call; a model over it is 'timeout' and skips its larger T
    preset: str = "large"
    min_seconds: float = 1.0        # timed calls of one measurement fill at least this much
    max_calls: int = 10
    repeat_below: float = 15.0      # a call longer than this is measured in the first round only
    stream_positions: tuple[int, ...] = (1000, 10_000, 100_000)
    stream_steps: int = 200
    stream_batch: int = 32
    matmul_size: int = 2048
    threads: int | None = None      # torch threads per measurement; None: torch's default
    compile_step: bool = True       # also stream the reference model through HNAE.compile_step


PROFILES = {
    "quick": PerfProfile("seconds; for tests and CI", ("hnae", "lstm"), (256, 512), batch_size=4, repeats=2,
                         max_seconds=30.0, preset="small", min_seconds=0.05, max_calls=3,
                         stream_positions=(100, 1000), stream_steps=10, stream_batch=8, matmul_size=256,
                         threads=1, compile_step=False),
    "default": PerfProfile("every model, T = 1k..64k, batch 8, ~0.4M parameters; 15-25 minutes on 2 CPU cores",
                           model_zoo.MODEL_NAMES, (1024, 4096, 16_384, 65_536)),
}


# ---- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hnae bench perf", description="Throughput, memory, FLOP utilisation and streaming latency of hnae "
        "against its peers, each also as a ratio to nn.LSTM; writes <run>/perf/report.md, perf.json and plots.",
        epilog="profiles: " + "; ".join(f"{name}: {p.description}" for name, p in PROFILES.items()))
    parser.add_argument("--profile", choices=tuple(PROFILES), default="default")
    parser.add_argument("--models", type=name_list(model_zoo.MODEL_NAMES), help="comma-separated subset of " + ",".join(model_zoo.MODEL_NAMES))
    parser.add_argument("--seq-lens", type=increasing_lengths, help="training lengths T, e.g. 1024,4096")
    parser.add_argument("--batch-size", type=positive(int))
    parser.add_argument("--repeats", type=positive(int), help="interleaved rounds")
    parser.add_argument("--max-seconds", type=positive(float), help="cap per timed call")
    parser.add_argument("--min-seconds", type=positive(float), help="timed calls of one measurement fill at "
                        "least this much (more calls, a steadier median)")
    parser.add_argument("--preset", choices=model_zoo.PRESETS, help="parameter budget (default: the profile's)")
    parser.add_argument("--stream-positions", type=increasing_lengths,
                        help="stream positions of the batch-1 step latency, e.g. 1000,10000,100000")
    parser.add_argument("--stream-steps", type=positive(int), help="timed steps per position")
    parser.add_argument("--stream-batch", type=positive(int), help="batch of the streaming "
                        "throughput")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming measurements")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                        help="train every model but nn.LSTM / nn.GRU through torch.compile (compiled once per "
                        "T, before timing; inference stays eager); MODE: one of torch.compile's modes "
                        f"({', '.join(COMPILE_MODES)}; default: default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd streaming step "
                        "of the reference model (compiling takes tens of seconds per batch size)")
    parser.add_argument("--matmul-size", type=positive(int), help="n of the n x n matmul peak "
                        "(default: the profile's on the CPU, 8192 on CUDA)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1")
    parser.add_argument("--dtype", choices=tuple(perf_measure.DTYPES), default="fp32",
                        help="fp32, or bf16 autocast (forward under torch.autocast)")
    parser.add_argument("--threads", type=positive(int), help="torch threads in each measurement "
                        "(default: the profile's; torch's own default for the default profile)")
    parser.add_argument("--input-size", type=positive(int), default=32,
                        help="float features per step of the random input")
    parser.add_argument("--memory-limit-gb", type=positive(float),
                        help="CPU memory one measurement may take (default: 80%% of the free memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="run directory; the perf section goes to <out>/perf (default: runs/<timestamp>)")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """The profile narrowed by the command line: everything the run needs, JSON-ready."""
    profile = PROFILES[args.profile]
    settings = {field.name: getattr(profile, field.name) for field in dataclasses.fields(profile)}
    for key in ("models", "seq_lens", "batch_size", "repeats", "max_seconds", "min_seconds", "preset", "stream_positions",
                "stream_steps", "stream_batch", "matmul_size", "threads"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must name a torch device such as cpu or cuda:0, got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: only cpu and cuda are measured, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cuda" and args.matmul_size is None:
        settings["matmul_size"] = 8192
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")   # free memory now
    limit = int(args.memory_limit_gb * 2 ** 30) if args.memory_limit_gb else int(0.8 * available)
    settings.update(models=list(settings["models"]), seq_lens=list(settings["seq_lens"]),
                    stream_positions=list(settings["stream_positions"]), device=args.device, dtype=args.dtype,
                    input_size=args.input_size, seed=args.seed, stream=not args.no_stream, compile=args.compile,
                    memory_limit_bytes=limit, profile=args.profile, prediction_margin=PREDICTION_MARGIN,
                    flop_count_fraction=FLOP_COUNT_FRACTION,
                    stream_models=[name for name in STREAMING_MODELS if name in settings["models"]]
                    + [perf_models.REFERENCE_STEP_MODEL]
                    + ([perf_models.REFERENCE_COMPILED] if settings["compile_step"] and not args.no_compile else []))
    return settings


# ---- the run -----------------------------------------------------------------------------------

def _base_job(settings: dict, kind: str) -> dict:
    keys = ("device", "dtype", "threads", "input_size", "seed", "preset", "min_seconds", "max_calls",
            "repeat_below", "memory_limit_bytes", "compile")
    return {"kind": kind, **{key: settings[key] for key in keys}}


def _training_decision(entries: dict, seq_lens: list[int], index: int, settings: dict):
    """None to measure (model, T) in this round, or the reason not to (recorded when it is a skip)."""
    entry = entries[str(seq_lens[index])]
    if entry["status"] not in ("pending", "ok"):
        return "final"
    if entry["status"] == "ok":
        first = entry["rounds"][0]["train_seconds"]
        return "once" if min(first) > settings["repeat_below"] else None
    for smaller in reversed(seq_lens[:index]):
        previous = entries[str(smaller)]
        if previous["status"] == "timeout":
            return f"skipped: slower than the {settings['max_seconds']:g} s cap at T={smaller:,}"
        if previous["status"] == "oom":
            return f"skipped: out of memory at T={smaller:,}"
        if previous["status"].startswith("skipped"):
            return previous["status"]
        if previous["status"] == "ok":
            predicted = min(previous["rounds"][0]["train_seconds"]) * seq_lens[index] / smaller
            if predicted > settings["prediction_margin"] * settings["max_seconds"]:
                return (f"skipped: slower than the cap; a call at T={smaller:,} took "
                        f"{min(previous['rounds'][0]['train_seconds']):.1f} s, so >= {predicted:.0f} s here")
            return None
    return None


def _new_entries(settings: dict, described: dict) -> dict:
    """{name: {T: entry}}: 'pending' where the model was built for T, else why it will not run there."""
    training = {}
    for name in settings["models"]:
        model, training[name] = described[name], {}
        for steps in settings["seq_lens"]:
            if model["status"] != "ok":
                training[name][str(steps)] = {"status": model["status"], "error": model["error"]}
            elif steps > model["max_len"]:
                training[name][str(steps)] = dict(model["refused_longer"])
            else:
                training[name][str(steps)] = {"status": "pending", "rounds": []}
    return training


def _record(entries: dict, key: str, outcome: dict) -> bool:
    """Add an 'ok' outcome to ``entries[key]``'s rounds; a failure replaces the entry, unless earlier
    rounds went well (then it is kept in ``failed_rounds``). True when the outcome is ok."""
    entry = entries[key]
    if outcome["status"] == "ok":
        entry["status"] = "ok"
        entry["rounds"].append(outcome)
    elif entry["status"] == "ok":
        entry.setdefault("failed_rounds", []).append({"status": outcome["status"], "error": outcome.get("error", "")})
    else:   # phase_seconds: its last phase is the one that failed
        entries[key] = {field: outcome[field] for field in ("status", "error", "phase_seconds") if field in outcome}
    return outcome["status"] == "ok"


def run_perf(settings: dict, say, results: dict) -> None:
    """Measure everything ``settings`` asks for into ``results`` (filled as it goes, round by round)."""
    say("models:")
    payloads: dict[str, bytes | None] = {}
    described = results["models"] = perf_models.describe_models(settings, say, payloads)
    seq_lens, cap = settings["seq_lens"], settings["max_seconds"]
    training = results["training"] = _new_entries(settings, described)
    streaming = results["streaming"] = {name: {"status": "pending", "rounds": []} for name in settings["stream_models"]
                                        if settings["stream"] and described[name]["status"] == "ok"}
    results["matmul"] = []
    context = forkserver_context(settings["models"])
    for round_index in range(settings["repeats"]):
        say(f"round {round_index + 1}/{settings['repeats']}")
        peak = run_isolated(context, {**_base_job(settings, "matmul"), "size": settings["matmul_size"]}, cap)
        results["matmul"].append(peak)
        say(f"  matmul {settings['matmul_size']}: " + (f"{peak['best_flops_per_second'] / 1e9:.1f} GFLOP/s"
                                                       if peak["status"] == "ok" else peak["status"]))
        for index, steps in enumerate(seq_lens):
            for name in settings["models"]:
                decision = _training_decision(training[name], seq_lens, index, settings)
                if decision is not None:
                    if decision.startswith("skipped"):
                        training[name][str(steps)] = {"status": decision}
                    continue
                job = {**_base_job(settings, "train"), "name": name, "max_len": described[name]["max_len"],
                       "model_bytes": payloads[name], "seq_len": steps, "batch_size": settings["batch_size"],
                       "count_flops": round_index == 0, "count_flops_below": cap * FLOP_COUNT_FRACTION}
                outcome = run_isolated(context, job, cap)
                say(f"  {name:>12} T={steps:>7,}: " + (
                    f"{outcome['tokens'] / min(outcome['train_seconds']):>10,.0f} tokens/s training"
                    if _record(training[name], str(steps), outcome) else
                    f"{outcome['status']}: {outcome.get('error', '')[:160]}"))
        for name, entry in streaming.items():
            if entry["status"] not in ("pending", "ok"):
                continue
            job = {**_base_job(settings, "stream"), "name": name, "max_len": described[name]["max_len"],
                   "model_bytes": payloads[name], "positions": settings["stream_positions"],
                   "steps": settings["stream_steps"], "warmup_steps": max(2, settings["stream_steps"] // 10),
                   "stream_batch": settings["stream_batch"]}
            outcome = run_isolated(context, job, cap)
            say(f"  {name:>12} step at batch 1: " + (", ".join(
                f"t={p:,} {s * 1e3:.2f} ms" for p, s in zip(outcome["positions"], outcome["latency_seconds"]))
                if _record(streaming, name, outcome) else f"{outcome['status']}: {outcome.get('error', '')[:160]}"))


def _new_run_dir(requested: str | None) -> Path:
    if requested:
        return Path(requested)
    path = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while path.exists():
        path, suffix = path.with_name(f"{path.name.split('.')[0]}.{suffix}"), suffix + 1
    return path


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
    except ValueError as error:
        print(f"hnae bench perf: {error}", file=sys.stderr)
        return 2
    out_dir = _new_run_dir(args.out) / "perf"
    out_dir.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(message, flush=True)

    say(f"hnae bench perf --profile {args.profile}: {', '.join(settings['models'])} at T = "
        f"{', '.join(f'{n:,}' for n in settings['seq_lens'])}, batch {settings['batch_size']}, "
        f"{settings['repeats']} rounds, {settings['max_seconds']:g} s cap per call, on {settings['device']} "
        f"({settings['dtype']}); writing {out_dir}")
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        say(f"note: the machine is busy (load average {load:.2f} on {os.cpu_count()} logical cores): figures will be "
            "noisy, and with more torch threads than idle cores OpenMP's waits can slow small operations 10-100x; "
            "--threads 1 measures one core steadily")
    started = time.perf_counter()
    results = {"profile": args.profile, "command": "hnae bench perf " + shlex.join(argv), "argv": list(argv),
               "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": describe_machine(settings["device"]), "load_average_start": list(os.getloadavg()),
               "settings": settings}
    def stop(signal_number, frame):   # a SIGTERM (timeout, CI) ends the run like Ctrl-C: with a report
        raise KeyboardInterrupt(f"signal {signal_number}")
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        run_perf(settings, say, results)
    except KeyboardInterrupt:
        results["interrupted"] = True
        say("interrupted: writing the report of what has run so far")
        for entries in [*results.get("training", {}).values(), results.get("streaming", {})]:
            for key, entry in entries.items():
                if entry["status"] == "pending":
                    entries[key] = {"status": "not run: the run was interrupted"}
    finally:
        signal.signal(signal.SIGTERM, previous)
    results["load_average_end"] = list(os.getloadavg())
    results["seconds_total"] = time.perf_counter() - started
    perf_report.summarise(results)
    paths = perf_report.write_report(results, out_dir, say)
    perf_report.print_summary(results, say)
    say(f"\nreport: {paths['report']}\nresults: {paths['json']}")
    return 0


if __name__ == "__main__":   # python -m hnae_bench.perf: the same command without hnae_bench.bench's imports
    raise SystemExit(main(sys.argv[1:]))
