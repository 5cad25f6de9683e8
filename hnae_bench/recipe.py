"""What every model family gives `hnae_bench.models.build_model`: a `BodyRecipe`.

Its own module so that the optional peers (`hnae_bench.peers`) and the built-in
families (`hnae_bench.models`) both build on it without importing each other.
Dimension letters: B batch, T time steps, C input_size, D width.
"""
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

STACK_DEPTH = {'small': 2, 'large': 4}   # layers of attention / state-space / xLSTM stacks, per preset


@dataclass
class BodyRecipe:
    """How one family makes its body at a given width D, and what it records."""

    make: Callable[[int], nn.Module]   # width -> module mapping (B, T, C) to (B, T, D)
    width_step: int                    # widths tried are multiples of this
    config: dict = field(default_factory=dict)
    count_on_meta: bool = True         # build on the meta device to count parameters (no memory)
    min_width: int = 1
