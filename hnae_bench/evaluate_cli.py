"""``hnae evaluate``: a trained model of ``hnae train`` at lengths of its task it was not trained on.

    hnae evaluate --checkpoint runs/copy1000 --seq-lens 1000,1100,10000
    hnae evaluate --checkpoint runs/copy1000/ckpt-004000 --seq-lens 10000 --sequences 64 --json runs/gen.json

The model (any of ``hnae train``'s models: hnae from the shape its checkpoint
records, the others from the run's configuration; weights from its
safetensors) is evaluated on ``--sequences``
fresh held-out sequences per length, drawn from the same seeds as ``hnae train
--generalise`` uses, so the two agree. Sequences longer than one call holds are
streamed through hnae's state (see ``hnae_bench.length_generalisation``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from hnae_bench.arguments import increasing_lengths, positive
from hnae_bench.checkpoint import CONFIG_FILE, LATEST, MODEL_FILE, atomic_write_json, latest_checkpoint, read_json
from hnae_bench.checkpoint import read_safetensors
from hnae_bench.export import load_source
from hnae_bench.length_generalisation import evaluate_at_length
from hnae_bench.models import build_model
from hnae_bench.tasks import make_task
from hnae_bench.train import eval_seed


def load_trained(directory) -> tuple[torch.nn.Module, dict, Path]:
    """The model of a ``hnae train`` run directory (its latest checkpoint) or checkpoint, its train config, its path."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint: {path} is not a directory")
    if (path / LATEST).exists():
        path = latest_checkpoint(path)
    config = read_json(path / CONFIG_FILE)
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict):
        raise ValueError(f"{path / CONFIG_FILE}: not a hnae train checkpoint (no 'train' object); a save_pretrained "
                         f"directory holds an encoder without a task head, which this command cannot score")
    if train.get("model") == "hnae":  # from the recorded shape (policy, positions), whatever today's preset
        return load_source(path).model, train, path
    try:  # the other models have no options beyond their preset: rebuilt as hnae train built them
        task = make_task(train["task"], train["seq_len"], **(train.get("task_options") or {}))
        model = build_model(train["model"], task, train["preset"], max_len=task.total_length)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: malformed 'train' configuration ({type(error).__name__}: "
                         f"{error})") from None
    try:
        model.load_state_dict(read_safetensors(path / MODEL_FILE), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path / MODEL_FILE}: does not fit the model {path / CONFIG_FILE} describes "
                         f"({error})") from None
    return model.eval(), train, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnae evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a hnae train run directory or checkpoint")
    parser.add_argument("--seq-lens", required=True, type=increasing_lengths, metavar="T1,T2,...",
                        help="task lengths T to evaluate at (increasing)")
    parser.add_argument("--sequences", type=positive(int), default=16, help="held-out sequences per length")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the records here (JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: torch.cuda.is_available() is False; use --device cpu")
        model, train, path = load_trained(args.checkpoint)
        model.to(args.device)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"hnae evaluate: error: {error}", file=sys.stderr)
        return 1
    print(f"{train['model']} trained on {train['task']} at T={train['seq_len']} ({path}):")
    records = []
    for length in tqdm(args.seq_lens, unit="length", disable=args.no_progress, file=sys.stderr):
        record = evaluate_at_length(model, train["task"], length, sequences=args.sequences, device=args.device,
                                    task_options=train.get("task_options") or {},
                                    seed=eval_seed(train.get("seed", 0), length))
        records.append(record)
        shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(record["metrics"].items()))
        tqdm.write(f"  T={length:>7}: {shown}; {'solved' if record['solved'] else 'not solved'} "
                   f"({record['sequences']} sequences{', streamed' if record['streamed'] else ''}, "
                   f"{record['seconds']:.1f} s)", file=sys.stdout)
    if args.json:
        atomic_write_json(args.json, {"checkpoint": str(path), "train": train, "records": records})
        print(f"records written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
