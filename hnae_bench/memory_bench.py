"""``hnae bench memory``: what write policies save, and how far they let a model see.

For each task (``redundant_stream``, ``sparse_signal``) and policy, a fresh
one-layer HNAE with the same windows trains on each length until it solves it
(99% of the queries right on held-out batches) or its time budget ends. Then:
accuracy, the fraction of candidates each summary level wrote, the streaming
state's bytes per stream, and the furthest length solved. A second sweep holds
the distance of ``redundant_stream`` fixed and varies how many frames each
scene is held (r): how much a policy saves, and what it reaches, as the
stream's redundancy changes.

    hnae bench memory                       # default profile, about 12 min on 2 CPU cores
    hnae bench memory --profile tiny        # seconds: checks the pipeline
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

import hnae
from hnae_bench.arguments import increasing_lengths, name_list, positive
from hnae_bench.memory_report import write_report
from hnae_bench.report import describe_machine
from hnae_bench.tasks import make_task

POLICIES = ("all", "novelty", "learned")
PROFILES = {
    # lengths: redundant_stream distances / sparse_signal noise lengths; budget: seconds per run
    "tiny": {"redundant_stream": (4, 8), "sparse_signal": (16,), "budget": 2.0, "width": 8, "window": 8,
             "batch": 8, "holds": (2, 5), "hold_distance": 8},
    "default": {"redundant_stream": (20, 100, 200, 400), "sparse_signal": (160,), "budget": 60.0, "width": 32,
                "window": 64, "batch": 32, "holds": (2, 5, 10, 20), "hold_distance": 200},
}
# the hold sweep leaves out "all": it writes every frame whatever r is, so its reach in frames does not change
HOLD_SWEEP_POLICIES = ("novelty", "learned")
THRESHOLD, BUDGET, LR = 0.9, 0.1, 3e-3
PENALTY_WEIGHT = 0.01  # small: with Adam a larger weight shuts every gate before the task can hold any open
# redundant_stream asks 2 of its 4 keys: with one query per key, the 4 query frames alone put the share of
# frames with new content at distance 20 (the one distance a 64-item "all" memory solves) at 15.6%
TASK_OPTIONS = {"redundant_stream": {"hold": 10, "num_queries": 2}, "sparse_signal": {"num_pairs": 8}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnae bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=tuple(PROFILES), default="default")
    parser.add_argument("--tasks", type=name_list(tuple(TASK_OPTIONS)), default=tuple(TASK_OPTIONS))
    parser.add_argument("--policies", type=name_list(POLICIES), default=POLICIES)
    parser.add_argument("--distances", type=increasing_lengths, help="redundant_stream distances")
    parser.add_argument("--holds", type=increasing_lengths,
                        help="redundant_stream frames per scene (r) for the hold sweep")
    parser.add_argument("--hold-distance", type=int, help="the hold sweep's distance (frames)")
    parser.add_argument("--no-hold-sweep", action="store_true", help="skip the hold sweep")
    parser.add_argument("--noise-lengths", type=increasing_lengths, help="sparse_signal stream lengths")
    parser.add_argument("--time-budget", type=positive(float), help="seconds of training per run")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="novelty threshold (cosine)")
    parser.add_argument("--budget", type=float, default=BUDGET, help="learned policy: target written fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", help="output folder (default runs/memory-<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="one line per run instead of per evaluation")
    return parser


def build_encoder(task, policy: str, settings: dict) -> hnae.HNAE:
    """One layer, level-0 window 1 (every input is a level-1 candidate), one summary level."""
    return hnae.HNAE(task.input_size, settings["width"], 1, batch_first=True, windows=(1, settings["window"]),
                     num_heads=2, write_policy=policy,
                     threshold=settings["threshold"] if policy == "novelty" else None,
                     budget=settings["budget"] if policy == "learned" else None)


@torch.no_grad()
def evaluate(encoder: hnae.HNAE, head: nn.Module, task, batch: int, seed: int) -> dict:
    encoder.eval()
    x, y = task.sample(batch, torch.Generator().manual_seed(seed))
    output, state = encoder(x)
    metrics = task.metrics(head(output), y)
    encoder.train()
    written, skipped = state.layers[0]["written"].sum(0), state.layers[0]["skipped"].sum(0)  # (levels,)
    metrics["written_fraction"] = [w / max(w + s, 1) for w, s in zip(written.tolist(), skipped.tolist())]
    return metrics


def train_one(task, policy: str, settings: dict, say) -> dict:
    torch.manual_seed(settings["seed"])
    encoder = build_encoder(task, policy, settings)
    head = nn.Linear(settings["width"], task.output_size)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=LR)
    generator = torch.Generator().manual_seed(settings["seed"] + 1)
    started, steps, history, solved_at = time.perf_counter(), 0, [], None
    metrics = evaluate(encoder, head, task, 4 * settings["batch"], settings["seed"] + 99)
    while time.perf_counter() - started < settings["seconds"]:
        x, y = task.sample(settings["batch"], generator)
        output, _ = encoder(x)
        loss = task.loss(head(output), y) + PENALTY_WEIGHT * encoder.write_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % settings["eval_every"] == 0:
            metrics = evaluate(encoder, head, task, 4 * settings["batch"], settings["seed"] + 99)
            seconds = time.perf_counter() - started
            history.append({"step": steps, "seconds": seconds, **metrics})
            if settings["progress"]:
                say(f"    {policy:8s} T={task.total_length:5d} {seconds:6.1f}s step {steps:5d} "
                    f"accuracy {metrics['accuracy']:.3f} written {metrics['written_fraction'][0]:.3f}")
            if task.is_solved(metrics):
                solved_at = seconds
                break
    final = evaluate(encoder, head, task, 8 * settings["batch"], settings["seed"] + 199)
    return {"policy": policy, "seq_len": task.seq_len, "total_length": task.total_length, "steps": steps,
            "solved": task.is_solved(final), "solved_at_seconds": solved_at, "accuracy": final["accuracy"],
            "loss": final["loss"], "written_fraction": final["written_fraction"],
            "state_bytes_per_stream": encoder.init_state(1).nbytes, "history": history,
            **({"new_content_fraction": task.new_content_fraction()} if hasattr(task, "new_content_fraction") else {})}


def describe(run: dict) -> str:
    return (f"accuracy {run['accuracy']:.3f} ({'solved' if run['solved'] else 'not solved'}), "
            f"written {run['written_fraction'][0]:.1%}, state {run['state_bytes_per_stream']:,} B/stream, "
            f"{run['steps']} steps")


def run_task(task_name: str, section: dict, settings: dict, say) -> None:
    """Trains every policy on each of the section's lengths, adding each run to the section as it ends."""
    lengths = section["lengths"]
    for policy in settings["policies"]:
        failed = False
        for length in lengths:
            task = make_task(task_name, length, **TASK_OPTIONS[task_name])
            if failed:  # a longer distance after a failure: recorded as not run, not as a pass
                section["runs"].append({"policy": policy, "seq_len": length, "skipped": "failed a shorter length"})
                continue
            run = train_one(task, policy, settings, say)
            section["runs"].append(run)
            say(f"  {task_name} {policy:8s} length {length:5d}: {describe(run)}")
            if run["solved"]:
                section["furthest_solved"][policy] = length
            failed = not run["solved"]


def run_hold_sweep(section: dict, settings: dict, say) -> None:
    """redundant_stream at one distance, each scene held r frames for every r of the sweep."""
    distance = section["distance"]
    for policy in section["policies"]:
        for hold in settings["holds"]:
            task = make_task("redundant_stream", distance, **{**TASK_OPTIONS["redundant_stream"], "hold": hold})
            run = {**train_one(task, policy, settings, say), "hold": hold}
            section["runs"].append(run)
            say(f"  hold {hold:3d} {policy:8s} distance {distance}: {describe(run)}")


def resolve_settings(args: argparse.Namespace) -> dict:
    profile = PROFILES[args.profile]
    if not -1.0 <= args.threshold <= 1.0 or not 0.0 < args.budget <= 1.0:
        raise ValueError("--threshold must be in [-1, 1] and --budget in (0, 1]")
    if args.hold_distance is not None and args.hold_distance < 0:
        raise ValueError(f"--hold-distance must be >= 0, got {args.hold_distance}")
    sweep_holds = (not args.no_hold_sweep and "redundant_stream" in args.tasks
                   and any(policy in HOLD_SWEEP_POLICIES for policy in args.policies))
    return {"profile": args.profile, "tasks": list(args.tasks), "policies": list(args.policies),
            "lengths": {"redundant_stream": list(args.distances or profile["redundant_stream"]),
                        "sparse_signal": list(args.noise_lengths or profile["sparse_signal"])},
            "seconds": float(args.time_budget or profile["budget"]), "width": profile["width"],
            "window": profile["window"], "batch": profile["batch"], "threshold": args.threshold,
            "budget": args.budget, "seed": args.seed, "eval_every": 25 if args.profile != "tiny" else 5,
            "progress": not args.no_progress,
            "holds": list(args.holds or profile["holds"]) if sweep_holds else [],
            "hold_distance": args.hold_distance if args.hold_distance is not None else profile["hold_distance"]}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
    except ValueError as error:
        print(f"hnae bench memory: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out or Path("runs") / datetime.datetime.now().strftime("memory-%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(message, flush=True)

    results = {"command": "hnae bench memory " + shlex.join(argv), "machine": describe_machine("cpu"),
               "settings": {k: v for k, v in settings.items() if k != "progress"}, "tasks": {}}
    say(f"hnae bench memory --profile {args.profile}: policies {', '.join(settings['policies'])}; "
        f"up to {settings['seconds']:g} s per run; writing {out_dir}")
    started = time.perf_counter()
    try:
        for task_name in settings["tasks"]:   # each section is in the results before its first run ends
            say(f"{task_name}:")
            section = results["tasks"][task_name] = {"lengths": settings["lengths"][task_name], "runs": [],
                                                     "options": TASK_OPTIONS[task_name], "furthest_solved": {}}
            run_task(task_name, section, settings, say)
        if settings["holds"]:
            say(f"redundant_stream, hold sweep at distance {settings['hold_distance']}:")
            section = results["hold_sweep"] = {
                "distance": settings["hold_distance"], "holds": settings["holds"], "runs": [],
                "policies": [policy for policy in settings["policies"] if policy in HOLD_SWEEP_POLICIES]}
            run_hold_sweep(section, settings, say)
    except KeyboardInterrupt:
        results["interrupted"] = True
        say("interrupted: writing the report of what has run so far")
    results["seconds_total"] = time.perf_counter() - started
    (out_dir / "memory-results.json").write_text(json.dumps(results, indent=2))
    report_path = write_report(results, out_dir)
    say(f"\nreport: {report_path}\nresults: {out_dir / 'memory-results.json'}")
    return 0
