"""The ``hnae`` command: dispatches ``hnae <command> ...`` to the module that implements the command.

Each command module is imported only when it runs (``hnae train`` never
imports matplotlib) and exposes ``main(argv: list[str]) -> int``, which parses
its own arguments with argparse.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line description)
COMMANDS = {
    "train": ("hnae_bench.train_cli", "train one model on one long-memory task (checkpoints, resume, curriculum)"),
    "bench": ("hnae_bench.bench", "race the models on long-memory tasks (report + plots); `bench perf`: speed and memory"),
    "evaluate": ("hnae_bench.evaluate_cli", "score a hnae train checkpoint at other lengths of its task"),
    "export": ("hnae_bench.export", "export a trained model's streaming step as an ONNX graph"),
    "inspect": ("hnae_bench.inspect_cli", "describe a model or checkpoint; --plot: its memory trace"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: hnae <command> [options]",
        "",
        "Hierarchical neural attention encoder: benchmark, training and export tools.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()),
        "",
        "Run 'hnae <command> --help' for the options of a command.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``hnae`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command not in COMMANDS:
        print(f"hnae: unknown command {command!r}; choose one of: {', '.join(COMMANDS)} "
              f"(see 'hnae --help')", file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"hnae: the {command!r} command is not available in this installation ({module_name} is missing)",
              file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)
