"""``hnae train``: train one model on one task from the command line.

    hnae train --task copy --seq-len 1000 --model hnae --curriculum --time-budget 600 --out runs/copy1000
    hnae train --task copy --seq-len 1000 --model hnae --steps 5000 --out runs/copy1000 --resume
    torchrun --nproc-per-node 2 -m hnae train --task copy --seq-len 1000 --model hnae --steps 5000 --out runs/ddp
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hnae_bench.checkpoint import CheckpointError
from hnae_bench.models import MODEL_NAMES, PRESETS, ModelUnavailable
from hnae_bench.tasks import TASK_NAMES
from hnae_bench.train import TrainConfig, train

DEFAULTS = TrainConfig(steps=1)  # the dataclass's defaults, shown in --help


def _ladder(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated lengths such as 50,100,200; got {text!r}") from None


def _task_option(text: str) -> tuple[str, int | str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, int(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hnae train", description="Train one model on one long-memory task. Give --steps or --time-budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = parser.add_argument_group("what to train")
    what.add_argument("--task", choices=TASK_NAMES, default=DEFAULTS.task)
    what.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="sequence length T (the last rung)")
    what.add_argument("--model", choices=MODEL_NAMES, default=DEFAULTS.model)
    what.add_argument("--preset", choices=PRESETS, default=DEFAULTS.preset, help="parameter budget")
    what.add_argument("--task-option", type=_task_option, action="append", default=[], metavar="KEY=VALUE",
                      help="a task option such as memory_length=10 (repeatable)")
    what.add_argument("--write-policy", choices=("all", "novelty", "learned"), default=DEFAULTS.write_policy,
                      help="hnae: which summaries each level writes into its memory")
    what.add_argument("--threshold", type=float, default=None, help="novelty: cosine similarity that skips")
    what.add_argument("--budget", type=float, default=None, help="learned: target fraction written")
    what.add_argument("--positions", choices=("block", "relative"), default=None,
                      help="hnae: a place-in-block embedding, or reads that carry distances (a model that runs "
                      "the same at lengths it was not trained at); default: the preset's")
    what.add_argument("--short-conv", type=int, default=None, metavar="K",
                      help="hnae: a causal convolution over each layer's last K inputs in front of its attention "
                      "(0: none); default: the preset's")
    what.add_argument("--event-counters", type=int, default=None, metavar="G",
                      help="hnae: G learned counts of events since the start, read by each layer (selective copy "
                      "needs them: the k-th data token among noise); 0: none; default: the preset's")
    what.add_argument("--count-penalty", type=float, default=DEFAULTS.count_penalty, metavar="W",
                      help="hnae with event counters: weight of the mean gate in the loss (shuts the gates of what "
                      "the task needs no count of)")
    how = parser.add_argument_group("how long and how")
    how.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps")
    how.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    how.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="global batch (all ranks)")
    how.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate")
    how.add_argument("--seed", type=int, default=DEFAULTS.seed)
    how.add_argument("--device", default=DEFAULTS.device, help="torch device: cpu, cuda, cuda:1, mps")
    how.add_argument("--curriculum", action="store_true", help="climb a ladder of lengths up to --seq-len")
    how.add_argument("--ladder", type=_ladder, default=None, metavar="T1,T2,...",
                     help="curriculum lengths (default 50,100,200,500,1000,2000,...; cut below --seq-len)")
    how.add_argument("--length-jitter", type=int, default=DEFAULTS.length_jitter, metavar="N",
                     help="train each batch at a length drawn from [T-N, T] (evaluate at T): the end of the "
                     "sequence then falls at every place of hnae's blocks, which longer T need")
    how.add_argument("--lr-plateau", type=int, default=DEFAULTS.lr_plateau, metavar="N",
                     help="on the last rung, halve the learning rate after N evaluations without a new best "
                     "held-out loss (0: constant rate)")
    how.add_argument("--stop-when-solved", action="store_true", help="stop once --seq-len is solved")
    files = parser.add_argument_group("evaluation, output and checkpoints")
    files.add_argument("--out", default=None, metavar="DIR", help="where metrics.jsonl and checkpoints go")
    files.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    files.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every, help="steps between evaluations")
    files.add_argument("--eval-batches", type=int, default=DEFAULTS.eval_batches, help="held-out batches per eval")
    files.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every,
                       help="steps between checkpoints")
    files.add_argument("--no-progress", action="store_true", help="no progress bar")
    files.add_argument("--generalise", type=_ladder, default=(), metavar="T1,T2,...",
                       help="after training, evaluate at these lengths too (length generalisation)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        task=args.task, seq_len=args.seq_len, model=args.model, preset=args.preset, steps=args.steps,
        time_budget=args.time_budget, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        out=args.out, resume=args.resume, curriculum=args.curriculum, ladder=args.ladder,
        eval_every=args.eval_every, eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress, task_options=dict(args.task_option), stop_when_solved=args.stop_when_solved,
        write_policy=args.write_policy, threshold=args.threshold, budget=args.budget, generalise=args.generalise,
        length_jitter=args.length_jitter, lr_plateau=args.lr_plateau, positions=args.positions,
        short_conv=args.short_conv, event_counters=args.event_counters, count_penalty=args.count_penalty)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    try:
        result = train(config)
    except KeyboardInterrupt:
        print("hnae train: interrupted" + (f"; resume with --resume --out {config.out}" if config.out else ""),
              file=sys.stderr)
        return 130
    except (CheckpointError, ModelUnavailable) as error:
        print(f"hnae train: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as error:  # e.g. a --task-option the task refuses
        print(f"hnae train: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return 0
    print(result.summary())
    for record in result.generalisation:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(record["metrics"].items()))
        print(f"generalisation at T={record['seq_len']} ({record['sequences']} sequences): {shown}; "
              f"{'solved' if record['solved'] else 'not solved'}")
    if config.out is not None:
        print(f"metrics and checkpoints in {config.out}; final metrics: {json.dumps(result.final_metrics)}")
    return 0
