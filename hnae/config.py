"""The validated configuration of an HNAE stack.

Names and defaults mirror ``torch.nn.LSTM``; the keyword-only tail holds what
an LSTM does not have (the windows of the hierarchy, heads, summary slots).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .write_policy import normalise_policy

SUMMARY_POOLS = ("attention", "select")  # the names of hnae.pooling.POOLS (a test keeps them in step)
POSITIONS = ("block", "relative")  # see HNAEConfig.positions


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def default_num_heads(hidden_size: int) -> int:
    """The most heads (8, 4, 2 or 1) that leave a head width of at least 16."""
    for heads in (8, 4, 2):
        if hidden_size % heads == 0 and hidden_size // heads >= 16:
            return heads
    return 1


@dataclass(frozen=True)
class HNAEConfig:
    """Everything that defines an HNAE's shape; validated on construction.

    windows: per-level window sizes ``(w_0, ..., w_{L-1})``. Level 0 attends to
        the last ``w_0`` inputs; level ``l >= 1`` to the last ``w_l`` summaries,
        each summarising ``w_0 * ... * w_{l-1}`` inputs.
    summary_slots: vectors per summary (``K``).
    summary_pool: how a block becomes its ``K`` summary vectors: ``"attention"`` (default;
        ``K`` learned queries each pool a mix of the block's items) or ``"select"`` (the
        block's ``K`` most salient items themselves, in order; needs ``K <= w_0``). See
        ``hnae.pooling``.
    ffn_multiplier: width of the feed-forward layer as a multiple of hidden_size.
    write_policy, threshold, budget: which summaries each level ``l >= 1`` writes into
        its memory (see ``hnae.write_policy``); one value for every summary level or a
        tuple of ``len(windows) - 1``. Normalised to tuples.
    place_rank: None (default) for full learned place tables (the block's place
        embedding and each pool's place keys and values), or ``r``: each table a
        product of two rank-``r`` factors (fewer parameters; see ``hnae.places``).
    positions: how a step knows where things are. ``"block"`` (default): a learned embedding
        of its place in its level-0 block is added to every layer's input. ``"relative"``: no
        place embedding; the local window's values carry the rotary phase of their step and
        each output is turned back by its own, so what a step reads from its window says how
        far back that lies and nothing says where a block starts (a model trained at one
        length then runs the same at others; the summaries keep content on the heads'
        non-rotary dims only).
    short_conv: 0 (default) or a kernel ``k >= 2``: each layer adds to its input a depthwise
        causal convolution over the last ``k`` steps (``hnae.short_conv``), so its queries say
        what came just before their step, not only what the step is. Every layer then reaches
        ``k - 1`` steps further (``receptive_field`` counts them); the state keeps ``k - 1``
        inputs per layer.
    event_counters: 0 (default) or ``G >= 1``: each layer adds to its input the features of
        ``G`` running counts of learned events (``hnae.event_count``): a gate per counter decides
        whether each step counts, so a query can ask for "the fifth data token" when the data lie
        at random steps among noise. The counts reach back to the stream's start (the one path past
        the windows); add ``HNAE.count_penalty()`` to the loss, weighted, to shut the gates of
        what the task does not need counted. The state keeps ``G`` float64 counts per layer.
    """

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    windows: tuple[int, ...] = (100, 100)
    num_heads: int | None = None
    summary_slots: int = 1
    ffn_multiplier: float = 2.0
    write_policy: str | tuple[str, ...] = "all"
    threshold: float | tuple[float, ...] | None = None
    budget: float | tuple[float, ...] | None = None
    place_rank: int | None = None
    summary_pool: str = "attention"
    positions: str = "block"
    short_conv: int = 0
    event_counters: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _require_int("input_size", self.input_size, 1)
        _require_int("hidden_size", self.hidden_size, 1)
        _require_int("num_layers", self.num_layers, 1)
        _require_int("proj_size", self.proj_size, 0)
        _require_int("summary_slots", self.summary_slots, 1)
        if self.place_rank is not None:
            _require_int("place_rank", self.place_rank, 1)
        if self.summary_pool not in SUMMARY_POOLS:
            raise ValueError(f"summary_pool must be one of {SUMMARY_POOLS}, got {self.summary_pool!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        _require_int("short_conv", self.short_conv, 0)
        if self.short_conv == 1:
            raise ValueError("short_conv must be 0 (none) or a kernel of >= 2 steps, got 1")
        _require_int("event_counters", self.event_counters, 0)
        for flag in ("bias", "batch_first", "bidirectional"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {self.dropout}")
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size ({self.hidden_size}), got {self.proj_size}"
            )
        windows = self.windows
        if isinstance(windows, int) and not isinstance(windows, bool):
            windows = (windows,)
        if not isinstance(windows, (tuple, list)) or len(windows) == 0:
            raise ValueError(f"windows must be a non-empty tuple of positive ints, got {self.windows!r}")
        for level, width in enumerate(windows):
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(
                    f"windows must hold positive ints, got {width!r} at level {level} in {tuple(windows)!r}"
                )
        object.__setattr__(self, "windows", tuple(int(w) for w in windows))
        if self.summary_pool == "select" and len(windows) > 1 and self.summary_slots > windows[0]:
            raise ValueError(f"summary_pool='select' keeps summary_slots={self.summary_slots} items of each "
                             f"level-0 block of w_0={windows[0]}: it needs summary_slots <= w_0")
        heads = self.num_heads if self.num_heads is not None else default_num_heads(self.hidden_size)
        _require_int("num_heads", heads, 1)
        if self.hidden_size % heads != 0:
            raise ValueError(f"num_heads must divide hidden_size ({self.hidden_size}), got {heads}")
        object.__setattr__(self, "num_heads", heads)
        if not isinstance(self.ffn_multiplier, (int, float)) or self.ffn_multiplier <= 0:
            raise ValueError(f"ffn_multiplier must be a positive number, got {self.ffn_multiplier!r}")
        for name, value in zip(("write_policy", "threshold", "budget"),
                               normalise_policy(self.write_policy, self.threshold, self.budget, len(windows))):
            object.__setattr__(self, name, value)
        if self.extra:
            raise ValueError(f"unknown options: {sorted(self.extra)}")

    @property
    def num_levels(self) -> int:
        return len(self.windows)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_features(self) -> int:
        return (self.proj_size or self.hidden_size) * self.num_directions

    @property
    def ffn_width(self) -> int:
        return max(1, int(round(self.hidden_size * self.ffn_multiplier)))

    @property
    def guaranteed_reach(self) -> int:
        """``w_0 * ... * w_{L-1}``: one layer always sees at least this many past inputs."""
        return math.prod(self.windows)

    def state_signature(self) -> tuple:
        """What a streaming state must agree on to be continued by this model."""
        return (self.num_layers, self.hidden_size, self.num_heads, self.windows, self.summary_slots,
                self.write_policy, self.threshold, self.short_conv, self.event_counters)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("extra")
        for name in ("windows", "write_policy", "threshold", "budget"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "HNAEConfig":
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}; known keys are {sorted(known)}")
        values = dict(data)
        for name in ("windows", "write_policy", "threshold", "budget"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)
