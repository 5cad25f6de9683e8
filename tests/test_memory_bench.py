"""`hnae bench memory`: the tiny profile end to end (both tasks and the hold sweep), and its refusals."""
import json

import pytest

from hnae_bench import memory_bench
from hnae_bench.memory_report import verdicts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_profile_writes_every_section(tmp_path):
    out = tmp_path / "memory"
    code = memory_bench.main(["--profile", "tiny", "--time-budget", "0.3", "--no-progress", "--threads", "1",
                              "--out", str(out)])
    assert code == 0
    for name in ("memory-redundant_stream.png", "memory-sparse_signal.png", "memory-hold_sweep.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    results = json.loads((out / "memory-results.json").read_text())
    assert set(results["tasks"]) == {"redundant_stream", "sparse_signal"}
    sweep = results["hold_sweep"]
    assert sweep["distance"] == 8 and sweep["holds"] == [2, 5] and sweep["policies"] == ["novelty", "learned"]
    assert [(run["policy"], run["hold"]) for run in sweep["runs"]] == [
        ("novelty", 2), ("novelty", 5), ("learned", 2), ("learned", 5)]
    pairs, queries = 4, 2   # the bench's redundant_stream: P scenes of r frames, the distance, Q queries
    for run in sweep["runs"]:
        assert run["seq_len"] == 8 and run["total_length"] == pairs * run["hold"] + 8 + queries
        assert (pairs + queries + 1) / run["total_length"] <= run["new_content_fraction"]
        distractor_scenes = -(-8 // run["hold"])
        assert run["new_content_fraction"] <= (pairs + distractor_scenes + queries) / run["total_length"]
        assert run["steps"] > 0 and all(0.0 <= fraction <= 1.0 for fraction in run["written_fraction"])
    everything = [run for run in results["tasks"]["redundant_stream"]["runs"]
                  if run["policy"] == "all" and "skipped" not in run]
    assert everything and all(run["written_fraction"] == [1.0] for run in everything)
    report = (out / "memory-report.md").read_text()
    assert "## Targets" in report and "## redundant_stream: frames per scene (r) at distance 8" in report
    assert report.count("| novelty | ") == 2 + 1 + 2   # distance sweep rows run, sparse_signal, hold sweep
    assert "![hold sweep](memory-hold_sweep.png)" in report and "| new content |" in report
    assert "frames with new content" in next(line for line in verdicts(results) if "target <= 15%" in line)
    for line in verdicts(results):
        assert line in report


def test_an_interrupted_sweep_reports_the_runs_that_ended(tmp_path, monkeypatch):
    train_one = memory_bench.train_one

    def stopping(task, policy, settings, say):   # Ctrl-C during the sweep's last run
        if policy == "learned" and task.options["hold"] == 5:
            raise KeyboardInterrupt
        return train_one(task, policy, settings, say)

    monkeypatch.setattr(memory_bench, "train_one", stopping)
    out = tmp_path / "memory"
    argv = ["--profile", "tiny", "--time-budget", "0.2", "--no-progress", "--threads", "1", "--out", str(out),
            "--tasks", "redundant_stream", "--distances", "4", "--policies", "novelty,learned"]
    assert memory_bench.main(argv) == 0
    results = json.loads((out / "memory-results.json").read_text())
    assert results["interrupted"] is True
    assert [run["policy"] for run in results["tasks"]["redundant_stream"]["runs"]] == ["novelty", "learned"]
    assert [(run["policy"], run["hold"]) for run in results["hold_sweep"]["runs"]] == [
        ("novelty", 2), ("novelty", 5), ("learned", 2)]
    report = (out / "memory-report.md").read_text()
    assert "| learned | 2 | " in report and "The run was interrupted" in report


@pytest.mark.parametrize("argv", [["--no-hold-sweep"], ["--tasks", "sparse_signal"], ["--policies", "all"]])
def test_hold_sweep_left_out(tmp_path, argv):
    args = memory_bench.build_parser().parse_args(["--profile", "tiny", *argv])
    assert memory_bench.resolve_settings(args)["holds"] == []


@pytest.mark.parametrize("argv", [["--hold-distance", "-1"], ["--threshold", "1.5"], ["--budget", "0"]])
def test_bad_settings_are_refused(tmp_path, capsys, argv):
    assert memory_bench.main(["--profile", "tiny", "--out", str(tmp_path / "x"), *argv]) == 2
    assert "hnae bench memory:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_holds_must_increase():
    with pytest.raises(SystemExit):
        memory_bench.build_parser().parse_args(["--holds", "5,2"])
