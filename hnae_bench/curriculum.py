"""The ladder of sequence lengths a curriculum climbs.

Long copy tasks sit at the chance loss for a long time when trained at full
length from the start; a model that first solves short lengths and then moves
up a rung at a time gets there much sooner. A rung is one sequence length; the
trainer moves up once the evaluation metrics of the current rung meet the
task's ``is_solved``.
"""

from __future__ import annotations

DEFAULT_LADDER = (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def build_ladder(seq_len: int, curriculum: bool, ladder: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The lengths to train on, in order, ending with ``seq_len``.

    Without a curriculum the ladder is ``(seq_len,)``. With one, the rungs of
    ``ladder`` (``DEFAULT_LADDER`` when None) shorter than ``seq_len`` come
    first and ``seq_len`` is always the last rung.

    >>> build_ladder(1000, curriculum=True)
    (50, 100, 200, 500, 1000)
    >>> build_ladder(300, curriculum=True, ladder=(10, 100, 1000))
    (10, 100, 300)
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if ladder is not None:
        ladder = tuple(ladder)
        if not ladder:
            raise ValueError("ladder must name at least one length, got ()")
        for length in ladder:
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ValueError(f"ladder lengths must be positive ints, got {length!r} in {ladder!r}")
        if any(b <= a for a, b in zip(ladder, ladder[1:])):
            raise ValueError(f"ladder must be strictly increasing, got {ladder!r}")
    if not curriculum:
        if ladder is not None:
            raise ValueError("ladder is only used with curriculum=True; pass curriculum=True or drop ladder")
        return (seq_len,)
    rungs = DEFAULT_LADDER if ladder is None else ladder
    return tuple(length for length in rungs if length < seq_len) + (seq_len,)


class Curriculum:
    """Which rung the trainer is on, and what each finished rung achieved.

    ``solved`` holds one record per rung solved so far:
    ``{'seq_len', 'solved': True, 'step', 'seconds', 'metrics'}``; ``current``
    the latest evaluation of the current rung while it is unsolved. The state
    is plain values so that a checkpoint stores it as JSON.
    """

    def __init__(self, ladder: tuple[int, ...]):
        self.ladder = tuple(ladder)
        self.rung_index = 0
        self.solved: list[dict] = []
        self.current: dict | None = None  # the latest evaluation of the current rung while it is unsolved

    @property
    def seq_len(self) -> int:
        return self.ladder[self.rung_index]

    @property
    def on_last_rung(self) -> bool:
        return self.rung_index == len(self.ladder) - 1

    @property
    def finished(self) -> bool:
        """True once the last rung is solved."""
        return any(record["seq_len"] == self.ladder[-1] for record in self.solved)

    def record_evaluation(self, solved: bool, step: int, seconds: float, metrics: dict, advance: bool = True) -> bool:
        """Note an evaluation of the current rung; return True when the trainer moved up a rung.

        A rung's first solved evaluation is its record. Only evaluations with
        ``advance`` move up (the trainer's scheduled ones): the extra one at
        the end of a run reports a solved rung without changing what a resumed
        run trains on, so that stopping and resuming never changes training.
        """
        record = {"seq_len": self.seq_len, "solved": solved, "step": step, "seconds": seconds, "metrics": dict(metrics)}
        already_solved = any(r["seq_len"] == self.seq_len for r in self.solved)
        if not solved:
            if not already_solved:
                self.current = record
            return False
        if not already_solved:
            self.solved.append(record)
            self.current = None
        if not advance or self.on_last_rung:
            return False
        self.rung_index += 1
        return True

    def rung_records(self) -> list[dict]:
        """One record per rung evaluated: the solved ones, then the current one's latest evaluation if unsolved."""
        records = [dict(record) for record in self.solved]
        if self.current is not None:
            records.append(dict(self.current))
        return records

    def longest_solved(self) -> int | None:
        return max((record["seq_len"] for record in self.solved), default=None)

    def state_dict(self) -> dict:
        return {"ladder": list(self.ladder), "rung_index": self.rung_index, "solved": [dict(r) for r in self.solved],
                "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        ladder = tuple(state["ladder"])
        if ladder != self.ladder:
            raise ValueError(f"checkpoint ladder {ladder!r} differs from this run's ladder {self.ladder!r}")
        rung_index = state["rung_index"]
        if not isinstance(rung_index, int) or not 0 <= rung_index < len(self.ladder):
            raise ValueError(f"checkpoint rung_index {rung_index!r} is outside the ladder {self.ladder!r}")
        self.rung_index = rung_index
        self.solved = [dict(record) for record in state["solved"]]
        self.current = None if state["current"] is None else dict(state["current"])
