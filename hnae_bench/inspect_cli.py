"""``hnae inspect``: what a model or checkpoint is: reach, hops, state size, parameters, cost.

    hnae inspect --checkpoint DIR          # a save_pretrained directory or a hnae train run/checkpoint
    hnae inspect --windows 100,100 --hidden-size 64 --num-layers 2 --input-size 40
"""

from __future__ import annotations

import argparse
import json
import math

import hnae
from hnae.reach import level_spans


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
        "bidirectional": config.bidirectional,
        "guaranteed_reach_per_layer": config.guaranteed_reach,
        "receptive_field": encoder.receptive_field,
        "attention_hops_per_layer": config.num_levels + 1,
        "keys_per_query_per_layer": keys_per_query,
        "state_bytes_per_stream": None if state is None else state.nbytes,
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnae inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="save_pretrained directory or hnae train run/checkpoint")
    parser.add_argument("--windows", default="100,100", help="per-level windows, e.g. 100,100")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--input-size", type=int, default=1)
    parser.add_argument("--summary-slots", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.checkpoint:
            from .export import load_source
            encoder = load_source(args.checkpoint).encoder
        else:
            windows = tuple(int(w) for w in args.windows.split(",") if w.strip())
            encoder = hnae.HNAE(args.input_size, args.hidden_size, args.num_layers, windows=windows,
                                summary_slots=args.summary_slots)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"hnae inspect: {error}")
        return 2
    facts = describe(encoder)
    if args.json:
        print(json.dumps(facts))
        return 0
    width = max(len(name) for name in facts)
    for name, value in facts.items():
        print(f"{name.replace('_', ' '):<{width}}  {value}")
    return 0
