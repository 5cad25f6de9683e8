"""Argument types shared by the `hnae` subcommands: argparse names the option in each error."""

from __future__ import annotations

import argparse


def name_list(choices):
    """'a,b' -> ('a', 'b'), each one of ``choices``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names
    return parse


def increasing_lengths(text: str) -> tuple[int, ...]:
    """'1024,4096' -> (1024, 4096): increasing positive integers."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"must be increasing positive comma-separated integers, got {text!r}")
    return values


def positive(kind):
    """A number of type ``kind`` that is > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse
