"""`hnae bench`: the tiny profile end to end, the gradient-path measurement, the
hops table, length evaluation (streamed == parallel), and the report's verdict."""
import json
import sys

import pytest
import torch
from torch import nn

from hnae_bench import bench, report
from hnae_bench import models as model_zoo
from hnae_bench.gradient_paths import gradient_norms, hnae_hops, log_spaced_distances, sequential_hops, tcn_hops
from hnae_bench.length_generalisation import evaluate_curve, forward_long, streaming_step
from hnae_bench.tasks import make_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_profile_end_to_end(tmp_path):
    """One run (about 10 s) checked from every side: files, JSON, report text."""
    out = tmp_path / "run"
    code = bench.main(["--profile", "tiny", "--out", str(out), "--no-progress", "--time-budget", "2"])
    assert code == 0
    for name in ("report.md", "results.json", "copy_race.png", "copy_curve.png", "gradient_paths.png"):
        assert (out / name).is_file(), name
    for name in ("copy_race.png", "copy_curve.png", "gradient_paths.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out / "results.json").read_text())
    for key in ("machine", "command", "settings", "races", "gradient_paths", "length_generalisation", "verdict",
                "plots", "seconds_total"):
        assert key in results, key
    race = results["races"]["copy"]
    assert race["ladder"] == [10, 20]
    assert set(race["models"]) == {"hnae", "lstm"}
    for name, entry in race["models"].items():
        assert entry["status"] == "ok", entry
        assert entry["parameters"] == entry["model_config"]["parameters"] > 0
        assert 0 < entry["seconds"] < 30
        assert [point["seq_len"] for point in entry["curve"]] == [10, 20]
        assert entry["rungs"] and entry["rungs"][0]["seq_len"] == 10
    assert race["chance_accuracy"] == pytest.approx(1 / 8)
    gradients = results["gradient_paths"]
    assert set(gradients["models"]) == {"hnae", "lstm"}
    assert gradients["distances"][0] == 0 and gradients["distances"][-1] == gradients["total_length"] - 1 == 39
    for entry in gradients["models"].values():
        assert entry["initial"][0] > 0 and entry["trained"][0] > 0
        assert len(entry["sequential_hops"]["hops"]) == len(gradients["distances"])
    hnae_lengths = results["length_generalisation"]["models"]["hnae"]
    assert [e["multiplier"] for e in hnae_lengths["evaluations"]] == [1, 10, 100]
    assert [e["seq_len"] for e in hnae_lengths["evaluations"]] == [hnae_lengths["train_length"] * m
                                                                   for m in (1, 10, 100)]
    assert set(results["plots"].values()) == {"copy_race.png", "copy_curve.png", "gradient_paths.png"}
    streaming = results["streaming"]  # the trained hnae, streamed in chunks, equals one call
    assert streaming["equal"] and streaming["max_abs_difference"] <= 1e-5 and streaming["chunks"] >= 5
    assert streaming["seq_len"] in (10, 20) and streaming["total_length"] == streaming["seq_len"] + 20

    speed = results["speed"]   # hnae and nn.LSTM measured by `hnae bench perf`, its report beside this one
    [row] = speed["rows"]
    assert row["seq_len"] == 64 and row["hnae"] > 0 and row["lstm"] > 0
    assert row["ratio"] == pytest.approx(row["hnae"] / row["lstm"])
    assert (out / "perf" / "report.md").is_file() and speed["command"].startswith("hnae bench perf --models hnae,lstm")

    text = (out / "report.md").read_text()
    assert "## Speed: training tokens/s against nn.LSTM" in text and f"{row['ratio']:.2f}x" in text
    assert "## Streaming equals parallel" in text and f"{streaming['max_abs_difference']:.2e}" in text
    for name, entry in results["races"]["copy"]["models"].items():
        assert f"| {name} | ok | {entry['parameters']:,} |" in text
    assert results["machine"]["cpu"] in text and results["machine"]["torch"] in text
    assert "hnae bench --profile tiny" in text
    assert "one-hot" in text
    assert "](copy_race.png)" in text and "](gradient_paths.png)" in text
    assert results["verdict"] in text


def test_unavailable_and_crashing_models_are_reported_not_dropped(tmp_path, monkeypatch):
    real_build = model_zoo.build_model

    def build(name, task, preset="small", max_len=None):
        if name == "lstm":
            raise model_zoo.ModelUnavailable("lstm is switched off for this test")
        if name == "gru":
            raise RuntimeError("gru exploded")
        return real_build(name, task, preset, max_len)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("hnae_bench") and hasattr(module, "build_model"):
            monkeypatch.setattr(module, "build_model", build)
    out = tmp_path / "run"
    code = bench.main(["--profile", "tiny", "--models", "hnae,lstm,gru", "--out", str(out), "--no-progress",
                       "--time-budget", "1"])
    assert code == 0
    models = json.loads((out / "results.json").read_text())["races"]["copy"]["models"]
    assert models["hnae"]["status"] == "ok"
    assert models["lstm"] == {"status": "unavailable", "error": "lstm is switched off for this test"}
    assert models["gru"]["status"] == "error" and "gru exploded" in models["gru"]["error"]
    text = (out / "report.md").read_text()
    assert "| lstm | unavailable: lstm is switched off for this test |" in text
    assert "`gru` on `copy`: error: RuntimeError: gru exploded" in text


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--models", "hnae,nope"])
    with pytest.raises(SystemExit):
        bench.main(["--seq-lens", "100,50"])


# ---- gradient paths -------------------------------------------------------------

class TinyLSTM(nn.Module):
    def __init__(self, input_size=3, hidden_size=8, output_size=4):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.head(self.rnn(x)[0])  # (B, T, K)


def test_gradient_norms_on_a_tiny_lstm():
    x = torch.randn(2, 12, 3)
    norms = gradient_norms(TinyLSTM(), x, [0, 1, 5, 11, 12, 50], output_size=4)
    assert sorted(norms) == [0, 1, 5, 11]  # d >= T has no input: absent, not zero
    assert norms[0] > 0 and norms[11] > 0
    assert norms[11] < norms[0]  # an untrained LSTM forgets


def test_gradient_norm_of_a_per_step_linear_map_is_its_weight_norm():
    torch.manual_seed(0)
    linear = nn.Linear(3, 4)  # y[t] depends on x[t] only, with Jacobian W
    norms = gradient_norms(linear, torch.randn(2, 6, 3), [0, 1, 5], output_size=4)
    assert norms[0] == pytest.approx(float(linear.weight.detach().norm()), rel=1e-5)
    assert norms[1] == 0 and norms[5] == 0


def test_log_spaced_distances():
    distances = log_spaced_distances(1000, 8)
    assert distances[0] == 0 and distances[1] == 1 and distances[-1] == 1000
    assert distances == sorted(set(distances))


def test_hops_follow_each_architecture():
    windows, t = (4, 4), 1000
    assert [hnae_hops(d, t, windows, 1) for d in (0, 3)] == [1, 1]
    assert hnae_hops(10, t, windows, 1) == 2  # one pooling hop + one attention hop
    assert hnae_hops(16, t, windows, 1) == 2  # one layer reaches w_0 * w_1 = 16 back here
    assert hnae_hops(30, t, windows, 1) is None  # beyond one layer's reach
    assert hnae_hops(30, t, windows, 2) == 4  # two layers, at most L hops each
    assert hnae_hops(40, t, windows, 2) is None  # beyond the stack's reach
    convolutions = nn.Sequential(*(nn.Conv1d(2, 2, kernel_size=2, dilation=r) for r in (1, 2, 4)))
    assert [tcn_hops(d, convolutions) for d in (0, 1, 2, 3, 4, 7, 8)] == [0, 1, 2, 2, 3, 3, None]
    lstm = model_zoo.build_model("lstm", make_task("copy", 10))
    assert sequential_hops("lstm", lstm, [0, 5, 300], t)["hops"] == [0, 5, 300]


# ---- length evaluation ------------------------------------------------------------

def test_streamed_evaluation_equals_one_parallel_call():
    task = make_task("copy", 10)
    model = model_zoo.build_model("hnae", task, max_len=200).eval()
    assert streaming_step(model) is not None
    x = torch.randn(2, 150, task.input_size)
    with torch.no_grad():
        parallel = model(x)  # (2, 150, K)
        streamed = forward_long(model, x, tokens_per_call=2 * 37)  # chunks of 37 steps
    assert (parallel - streamed).abs().max() <= 1e-5


def test_curve_skips_lengths_beyond_the_budget_with_a_reason():
    points = evaluate_curve(nn.Linear(10, 10), "copy", [10, 20], seconds=0.0, sequences=4)
    assert [point["seq_len"] for point in points] == [10, 20]
    assert all("exceeds" in point["skipped"] for point in points)


# ---- verdict ------------------------------------------------------------------------

def _results(**longest):
    models = {name: {"status": "ok", "longest_solved": best} for name, best in longest.items()}
    return {"races": {"copy": {"ladder": [50, 100, 200, 500, 1000], "models": models}}}


def test_verdict_states_ratios_and_shortfalls():
    met = report.verdict(_results(hnae=1000, lstm=100, gru=200))
    assert "hnae/lstm = 10.0x" in met and "hnae/gru = 5.0x" in met and "met." in met and "NOT" not in met
    short = report.verdict(_results(hnae=500, lstm=200, gru=100))
    assert "hnae/lstm = 2.5x" in short and "NOT met" in short
    none = report.verdict(_results(hnae=500, lstm=None, gru=None))
    assert "lstm solved no rung (lowest T = 50), so hnae/lstm > 10.0x" in none and "NOT" not in none


def test_verdict_names_the_models_that_climbed_further():
    behind = report.verdict(_results(hnae=200, lstm=None, gru=1000, tcn=2000, transformer=200))
    assert behind.endswith("Further than hnae in this race: tcn (T = 2,000), gru (T = 1,000).")
    ahead = report.verdict(_results(hnae=1000, lstm=100, gru=200, tcn=500))
    assert ahead.endswith("No model of this race solved a longer T than hnae.")


def test_streaming_check_detects_a_model_whose_streaming_differs():
    """The section compares real outputs: a model whose streamed output is off is reported as unequal."""
    from hnae_bench.models import build_model
    from hnae_bench.streaming_check import streaming_check
    from hnae_bench.tasks import make_task
    torch.manual_seed(0)
    model = build_model("hnae", make_task("copy", 30), "small")
    good = streaming_check(model, "copy", 30)
    assert good["equal"] and good["max_abs_difference"] <= 1e-5 and good["step_ms"] > 0
    encoder = model.body.encoder

    class Drifting(torch.nn.Module):  # streams with a state (no hnae body), but adds 1e-3 to every chunk
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return model(x)

        def forward_streaming(self, chunk, state):
            hidden, state = encoder(chunk, state)
            return model.head(hidden) + 1e-3, state
    bad = streaming_check(Drifting(), "copy", 30)
    assert not bad["equal"] and bad["max_abs_difference"] == pytest.approx(1e-3, rel=1e-3)
    assert streaming_check(build_model("lstm", make_task("copy", 30), "small"), "copy", 30) == {
        "skipped": "the model cannot stream"}


def test_the_race_gives_hnae_event_counters_on_selective_copy_and_no_other_model(monkeypatch, tmp_path):
    configs = []

    def record(config):
        configs.append(config)
        raise RuntimeError("not trained in this test")

    monkeypatch.setattr(bench, "train", record)
    settings = {"ladders": {"selective_copy": [32], "copy": [10]}, "task_options": {}, "models": ["hnae", "lstm"],
                "time_budget": 1.0, "preset": "small", "steps": None, "batch_size": 4, "lr": 1e-3, "seed": 0,
                "device": "cpu", "eval_every": 1, "eval_batches": 1, "progress": False}
    for task in ("selective_copy", "copy"):
        race = {"models": {}}
        bench.run_race(task, settings, tmp_path, lambda text: None, race, {})
        assert race["models"]["hnae"]["status"] == "error"  # the stand-in's, reported and gone past
    assert [(c.task, c.model, c.event_counters) for c in configs] == [
        ("selective_copy", "hnae", 4), ("selective_copy", "lstm", None), ("copy", "hnae", None), ("copy", "lstm", None)]
