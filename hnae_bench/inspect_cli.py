"""``hnae inspect``: what a model or checkpoint is: reach, hops, state size, parameters, cost.

    hnae inspect --checkpoint DIR          # a save_pretrained directory or a hnae train run/checkpoint
    hnae inspect --windows 100,100 --hidden-size 64 --num-layers 2 --input-size 40
    hnae inspect --windows 1,16 --write-policy novelty --threshold 0.9 \\
        --task redundant_stream --seq-len 60 --plot runs/inspect.png
    hnae inspect --checkpoint DIR --task sparse_signal --seq-len 160 --seed 3 --step -8 --plot runs/trace.png

With ``--plot PATH`` it also runs the model over one sample of ``--task``
(length ``--seq-len``, sample seed ``--seed``), writes the memory plot of
``hnae.trace_memory`` (``hnae_bench.inspect_plot``) for output ``--step``
(default: the last; negative counts from the end) and prints, per layer and
summary level, how many candidates were written and where the step's
attention went. A fresh model (built from ``--windows`` etc., the task's input
size replacing ``--input-size``) is initialised after ``torch.manual_seed(--seed)``.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import hnae
from hnae.reach import level_spans
from hnae.write_policy import POLICIES


def describe(encoder: hnae.HNAE) -> dict:
    """The facts about an HNAE that its configuration fixes."""
    config = encoder.config
    state = encoder.init_state(1) if not config.bidirectional else None
    keys_per_query = config.windows[0] + sum(w * config.summary_slots for w in config.windows[1:])
    return {
        "windows": list(config.windows),
        "level_spans": level_spans(config.windows) + [math.prod(config.windows)],
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "summary_slots": config.summary_slots,
        "summary_pool": config.summary_pool,
        "positions": config.positions,
        "short_conv": config.short_conv,
        "event_counters": config.event_counters,
        "bidirectional": config.bidirectional,
        "write_policy": list(config.write_policy),  # one per summary level (1 .. L-1)
        "threshold": list(config.threshold),  # None where the level's policy is not "novelty"
        "budget": list(config.budget),  # None where the level's policy is not "learned"
        "guaranteed_reach_per_layer": config.guaranteed_reach,
        "receptive_field": encoder.receptive_field,
        "attention_hops_per_layer": config.num_levels + 1,
        "keys_per_query_per_layer": keys_per_query,
        "state_bytes_per_stream": None if state is None else state.nbytes,
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }


def build_parser() -> argparse.ArgumentParser:
    from hnae_bench.tasks import TASK_NAMES
    parser = argparse.ArgumentParser(prog="hnae inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="save_pretrained directory or hnae train run/checkpoint")
    parser.add_argument("--windows", default="100,100", help="per-level windows, e.g. 100,100")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--input-size", type=int, default=None, help="default 1, or the task's input size")
    parser.add_argument("--summary-slots", type=int, default=1)
    parser.add_argument("--write-policy", choices=POLICIES, default=None, help="fresh model: default all")
    parser.add_argument("--threshold", type=float, default=None, help="novelty: cosine similarity to skip at")
    parser.add_argument("--budget", type=float, default=None, help="learned: fraction of candidates to write")
    parser.add_argument("--task", choices=TASK_NAMES, default=None, help="trace a sample of this task")
    parser.add_argument("--seq-len", type=int, default=None, help="task length (default: the task's bench length)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task sample and of a fresh model's init")
    parser.add_argument("--step", type=int, default=None, help="output step to explain (default: last; -1 = last)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="write the memory trace plot (PNG) here")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    return parser


def _refusal(args: argparse.Namespace) -> str | None:
    """Options that do not fit together (nothing is silently ignored)."""
    if args.checkpoint:
        given = [name for name in ("write_policy", "threshold", "budget")
                 if getattr(args, name) is not None]
        if given:
            return f"--{given[0].replace('_', '-')} is for a fresh model; the checkpoint fixes it"
    if args.plot is None:
        for name in ("step", "seq_len"):
            if getattr(args, name) is not None:
                return f"--{name.replace('_', '-')} only applies with --plot"
    elif args.task is None:
        return "--plot needs --task NAME: the sequence to trace"
    return None


def _build(args: argparse.Namespace, task) -> hnae.HNAE:
    if args.checkpoint:
        from .export import load_source
        encoder = load_source(args.checkpoint).encoder
        if task is not None and encoder.input_size != task.input_size:
            raise ValueError(f"the checkpoint takes input_size {encoder.input_size}, but task {task.name} "
                             f"has {task.input_size} input channels")
        return encoder
    input_size = 1 if args.input_size is None else args.input_size
    if task is not None:
        if args.input_size is not None and args.input_size != task.input_size:
            raise ValueError(f"--input-size {args.input_size} differs from task {task.name}'s "
                             f"{task.input_size} input channels (leave it out)")
        input_size = task.input_size
    windows = tuple(int(w) for w in args.windows.split(",") if w.strip())
    torch.manual_seed(args.seed)  # the initial weights, so that a test or a rerun rebuilds the same model
    return hnae.HNAE(input_size, args.hidden_size, args.num_layers, windows=windows,
                     summary_slots=args.summary_slots, write_policy=args.write_policy or "all",
                     threshold=args.threshold, budget=args.budget)


def _trace(args: argparse.Namespace, task, encoder: hnae.HNAE) -> dict:
    """Trace one task sample, write the plot; returns the summary that main prints."""
    from .inspect_plot import plot_memory_trace, summarise_trace
    x, _ = task.sample(1, torch.Generator().manual_seed(args.seed))  # (1, T, C)
    parameter = next(encoder.parameters())
    x = x[0].to(device=parameter.device, dtype=parameter.dtype)  # (T, C)
    length = x.shape[0]
    step = length - 1 if args.step is None else args.step
    if not -length <= step < length:
        raise ValueError(f"--step {args.step} is outside the sequence: {task.name} at --seq-len "
                         f"{task.seq_len} has {length} steps (use 0..{length - 1}, or -{length}..-1)")
    step %= length
    trace = hnae.trace_memory(encoder, x, step)  # ValueError for a bidirectional model
    title = (f"{task.name}, seq_len {task.seq_len} (T = {length}), seed {args.seed}: memory and the "
             f"attention of step {step}")
    path = plot_memory_trace(trace, x, args.plot, title)
    return {"task": task.name, "seq_len": task.seq_len, "seed": args.seed, "length": length, "step": step,
            "plot": str(path), "layers": summarise_trace(trace)}


def _print_trace(summary: dict) -> None:
    print(f"\ntrace of {summary['task']} seq_len {summary['seq_len']} seed {summary['seed']}: "
          f"{summary['length']} steps, output step {summary['step']}")
    for layer in summary["layers"]:
        for level in layer["levels"]:
            print(f"layer {layer['layer']} level {level['level']}: written {level['written']}/"
                  f"{level['candidates']} candidates")
        shares = ", ".join(f"{part} {mass:.3f}" for part, mass in layer["attention"].items())
        print(f"layer {layer['layer']} attention of step {summary['step']}: {shares}")
    print(f"plot written to {summary['plot']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refusal = _refusal(args)
    if refusal:
        print(f"hnae inspect: {refusal}")
        return 2
    try:
        task = None
        if args.task is not None:
            from .tasks import DEFAULT_SEQ_LENS, make_task
            task = make_task(args.task, DEFAULT_SEQ_LENS[args.task] if args.seq_len is None else args.seq_len)
        encoder = _build(args, task)
        facts = describe(encoder)
        summary = _trace(args, task, encoder) if args.plot else None
    except (ValueError, TypeError, OSError) as error:  # OSError: an unreadable checkpoint, an unwritable plot
        print(f"hnae inspect: {error}")
        return 2
    if args.json:
        print(json.dumps(facts if summary is None else {**facts, "trace": summary}))
        return 0
    width = max(len(name) for name in facts)
    for name, value in facts.items():
        print(f"{name.replace('_', ' '):<{width}}  {value}")
    if summary is not None:
        _print_trace(summary)
    return 0
