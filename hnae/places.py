"""Learned place tables, full or as a product of two thin factors.

A place table holds one learned vector per place in a block: the block's place embedding
(w_0, D) added to every input, and each pool's place keys and values (H, n, E). With
``rank`` r the table is ``rows @ columns``, rows (..., n, r) and columns (..., r, F): n*r + r*F
parameters instead of n*F, which leaves more of a parameter budget to the model's width.
A full table keeps its old name, so models saved without a rank load as before.
"""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02  # of every entry of a table at initialisation, full or factored


def add_place_table(owner: nn.Module, name: str, shape: tuple[int, ...], rank: int | None,
                    factory: dict) -> None:
    """Register on ``owner`` a table of ``shape`` (..., n, F): ``name`` itself, or ``name_rows``
    and ``name_columns`` when ``rank`` is smaller than n and F."""
    *lead, places, features = shape
    if rank is None or rank >= min(places, features):
        owner.register_parameter(name, nn.Parameter(torch.randn(*shape, **factory) * INIT_STD))
        return
    # rows ~ N(0, 1), columns ~ N(0, INIT_STD^2 / r): each entry of the product has std INIT_STD
    # (the initialisation the race runs in docs/RESULTS.md measured)
    owner.register_parameter(f"{name}_rows", nn.Parameter(torch.randn(*lead, places, rank, **factory)))
    owner.register_parameter(f"{name}_columns", nn.Parameter(
        torch.randn(*lead, rank, features, **factory) * (INIT_STD / rank ** 0.5)))


def place_table(owner: nn.Module, name: str) -> torch.Tensor:
    """The table registered by ``add_place_table``: (..., n, F)."""
    full = owner._parameters.get(name)
    if full is not None:
        return full
    return torch.matmul(owner._parameters[f"{name}_rows"], owner._parameters[f"{name}_columns"])


def place_rows(owner: nn.Module, name: str, places: torch.Tensor) -> torch.Tensor:
    """Rows ``places`` (any shape of indices) of a 2-D table (n, F): (*places.shape, F).

    A factored table picks its rank-r rows first, so a streaming step multiplies B rows, not all n."""
    full = owner._parameters.get(name)
    if full is not None:
        return full[places]
    return torch.matmul(owner._parameters[f"{name}_rows"][places], owner._parameters[f"{name}_columns"])
