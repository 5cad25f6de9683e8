"""Project GPU curriculum runs onto the 2-core CPU: steps spent on each rung times the CPU's seconds
per step on that rung (median of a reference CPU run's metrics.jsonl, evaluations included).

    python scripts/project_cpu_seconds.py REFERENCE_CPU_METRICS RUN_METRICS [RUN_METRICS ...]

Prints, per run: the step at which each rung began, where it ended, and the CPU seconds the same
steps would take (the runs train the model the reference ran; only its per-step cost is borrowed).
"""
import json
import statistics
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def seconds_per_step(rows: list[dict]) -> dict[int, float]:
    """Median seconds per step on each rung, from consecutive records on the same rung."""
    spans: dict[int, list[float]] = {}
    for before, after in zip(rows, rows[1:]):
        if before["seq_len"] == after["seq_len"]:
            spans.setdefault(after["seq_len"], []).append(
                (after["seconds"] - before["seconds"]) / (after["step"] - before["step"]))
    return {length: statistics.median(values) for length, values in spans.items()}


def project(rows: list[dict], cost: dict[int, float]) -> tuple[dict[int, int], int | None, float | None]:
    """Rung -> first step logged on it; the step and CPU seconds at which the last rung was solved
    (None, None: never). A record's seq_len is the rung trained since the record before it (the rung
    moves up after an evaluation), so each span of steps is charged at its own rung's cost."""
    first: dict[int, int] = {}
    for row in rows:
        first.setdefault(row["seq_len"], row["step"])
    seconds, previous_step = 0.0, 0
    for row in rows:
        seconds += (row["step"] - previous_step) * cost[row["seq_len"]]
        previous_step = row["step"]
        if row["seq_len"] == max(first) and row["solved"]:
            return first, row["step"], seconds
    return first, None, None


def main(reference: str, runs: list[str]) -> None:
    cost = seconds_per_step(read(Path(reference)))
    print("CPU seconds per step by rung:", {length: round(value, 3) for length, value in sorted(cost.items())})
    print("| run | rung: first step | last step | last rung, accuracy | T solved at step | CPU seconds |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        path = Path(run)
        path = path / "metrics.jsonl" if path.is_dir() else path
        rows = read(path)
        first, solved_step, seconds = project(rows, cost)
        name = path.parent.name if path.name == "metrics.jsonl" else path.name.removesuffix("-metrics.jsonl")
        print(f"| {name} | {', '.join(f'{k}: {v}' for k, v in first.items())} | {rows[-1]['step']} "
              f"| {rows[-1]['seq_len']}, {rows[-1]['eval']['accuracy']:.3f} | {'-' if solved_step is None else solved_step} "
              f"| {'-' if seconds is None else round(seconds)} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
