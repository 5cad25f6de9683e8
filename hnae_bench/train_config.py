"""``TrainConfig``, what ``hnae train`` is asked to do, and ``TrainResult``, what it did.

Both are imported from ``hnae_bench.train`` too, where the loop lives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from hnae.config import POSITIONS
from hnae_bench.curriculum import build_ladder
from hnae_bench.models import MODEL_NAMES, PRESETS
from hnae_bench.tasks import TASK_NAMES, Task, make_task

MAX_SEED = 2**31 - 1  # training seeds stay below 2**31; evaluation seeds start at 2**32


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


@dataclass
class TrainConfig:
    task: str = "copy"
    seq_len: int = 100
    model: str = "hnae"
    preset: str = "small"
    steps: int | None = None  # stop after this many optimizer steps (None: no limit)
    time_budget: float | None = None  # stop after this many seconds of training (None: no limit)
    batch_size: int = 32  # the global batch, split evenly across DDP ranks
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    out: str | None = None  # directory for metrics.jsonl, checkpoints, config.json; None: nothing written
    resume: bool = False
    curriculum: bool = False
    ladder: tuple[int, ...] | None = None  # rungs below seq_len (default curriculum.DEFAULT_LADDER)
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 200
    progress: bool = True
    task_options: dict = field(default_factory=dict)  # passed to make_task
    stop_when_solved: bool = False  # stop once the last rung is solved
    write_policy: str = "all"  # hnae only: "all", "novelty" or "learned" at every summary level
    threshold: float | None = None  # novelty: cosine similarity at or above which a summary is skipped
    budget: float | None = None  # learned: target fraction of summaries written
    generalise: tuple[int, ...] = ()  # after training, evaluate the model at these seq_lens too
    # each training batch takes a length drawn from [T - length_jitter, T] (evaluation: T), so the end of
    # the sequence falls at every place of hnae's level-0 blocks; 0: every batch at T
    length_jitter: int = 0
    # on the last rung, halve the learning rate after this many evaluations in a row without a new best
    # held-out loss (torch's ReduceLROnPlateau); 0: a constant rate. Loss targets far below the solved
    # threshold (copy 3.5e-5, adding 5.3e-5) need the smaller steps.
    lr_plateau: int = 0
    positions: str | None = None  # hnae only: "block" or "relative" (hnae.HNAEConfig); None: the preset's
    short_conv: int | None = None  # hnae only: each layer's short convolution kernel (0: none); None: the preset's
    event_counters: int | None = None  # hnae only: each layer's learned event counters (0: none); None: the preset's
    # hnae with event counters: the weight of HNAE.count_penalty() (the mean gate) in the loss
    count_penalty: float = 0.3

    def __post_init__(self):
        for name, choices in (("task", TASK_NAMES), ("model", MODEL_NAMES), ("preset", PRESETS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        _positive_int("seq_len", self.seq_len)
        _positive_int("steps", self.steps, allow_none=True)
        if self.time_budget is not None and not (isinstance(self.time_budget, (int, float))
                                                 and math.isfinite(self.time_budget) and self.time_budget > 0):
            raise ValueError(f"time_budget must be a positive number of seconds or None, got {self.time_budget!r}")
        if self.steps is None and self.time_budget is None:
            raise ValueError("give steps or time_budget (or both): training needs a limit")
        for name in ("batch_size", "eval_every", "eval_batches", "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.length_jitter, bool) or not isinstance(self.length_jitter, int) or self.length_jitter < 0:
            raise ValueError(f"length_jitter must be an int >= 0, got {self.length_jitter!r}")
        if isinstance(self.lr_plateau, bool) or not isinstance(self.lr_plateau, int) or self.lr_plateau < 0:
            raise ValueError(f"lr_plateau must be an int >= 0 (evaluations), got {self.lr_plateau!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', "
                             f"got {self.device!r}") from None
        if self.out is not None:
            self.out = str(self.out)
        if self.resume and self.out is None:
            raise ValueError("resume=True needs out, the directory that holds the checkpoints")
        if not isinstance(self.task_options, dict):
            raise TypeError(f"task_options must be a dict, got {type(self.task_options).__name__}")
        make_task(self.task, self.seq_len, **self.task_options)  # the task refuses options it does not know
        if self.ladder is not None:
            self.ladder = tuple(self.ladder)
        build_ladder(self.seq_len, self.curriculum, self.ladder)  # validates ladder
        if self.hnae_options() and self.model != "hnae":
            raise ValueError(f"write_policy, threshold, budget, positions, short_conv and event_counters apply to "
                             f"hnae only, "
                             f"not {self.model!r}")
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} or None, got {self.positions!r}")
        if self.short_conv is not None and (isinstance(self.short_conv, bool) or not isinstance(self.short_conv, int)
                                            or self.short_conv < 0 or self.short_conv == 1):
            raise ValueError(f"short_conv must be None, 0 or a kernel >= 2, got {self.short_conv!r}")
        if self.event_counters is not None and (isinstance(self.event_counters, bool)
                                                or not isinstance(self.event_counters, int) or self.event_counters < 0):
            raise ValueError(f"event_counters must be None or an int >= 0, got {self.event_counters!r}")
        if (isinstance(self.count_penalty, bool) or not isinstance(self.count_penalty, (int, float))
                or not 0 <= self.count_penalty < math.inf):
            raise ValueError(f"count_penalty must be a finite number >= 0, got {self.count_penalty!r}")
        if self.hnae_options():
            from hnae.write_policy import normalise_policy
            normalise_policy(self.write_policy, self.threshold, self.budget, 2)  # refuses bad values by name
        self.generalise = tuple(self.generalise)
        for length in self.generalise:
            _positive_int("generalise", length)

    def hnae_options(self) -> dict:
        """hnae's write-policy, positions, short_conv and event_counters arguments, or {} when they are all
        the defaults."""
        options = {"write_policy": self.write_policy, "threshold": self.threshold, "budget": self.budget}
        if options == {"write_policy": "all", "threshold": None, "budget": None}:
            options = {}
        if self.positions is not None:
            options["positions"] = self.positions
        if self.short_conv is not None:
            options["short_conv"] = self.short_conv
        if self.event_counters is not None:
            options["event_counters"] = self.event_counters
        return options

    def to_json(self) -> dict:
        values = asdict(self)
        values["ladder"] = None if self.ladder is None else list(self.ladder)
        values["generalise"] = list(self.generalise)
        return values


@dataclass
class TrainResult:
    config: TrainConfig
    rungs: list[dict]  # one per rung trained on: {'seq_len', 'solved', 'step', 'seconds', 'metrics'}
    final_metrics: dict  # the last evaluation's metrics
    longest_solved: int | None
    steps: int
    seconds: float
    tokens_per_second: float
    parameters: int
    model: torch.nn.Module  # the trained model (in memory, unwrapped from DDP)
    task: Task  # the task of the last rung
    final_seq_len: int | None = None  # the length final_metrics were measured at (below task's after a rung change)
    generalisation: list = field(default_factory=list)  # evaluate_at_length records for config.generalise

    def summary(self) -> str:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(self.final_metrics.items()))
        solved = "none" if self.longest_solved is None else f"T={self.longest_solved}"
        return (f"{self.config.model} on {self.config.task}: {self.steps} steps in {self.seconds:.1f}s, "
                f"{self.tokens_per_second:,.0f} tokens/s, {self.parameters:,} parameters; final eval at "
                f"T={self.final_seq_len}: {shown}; longest solved: {solved}")
