"""Options of `hnae train`: `lr_plateau` (the rate halves when the last rung stops improving), `positions`,
`short_conv` and `event_counters`."""
import json

import pytest
import torch

from hnae_bench.checkpoint import latest_checkpoint, load_checkpoint
from hnae_bench.train import TrainConfig, Trainer, train


def tiny(**overrides) -> TrainConfig:
    values = dict(task="copy", seq_len=5, model="lstm", steps=12, batch_size=8, eval_every=1, eval_batches=1,
                  checkpoint_every=3, progress=False, lr=0.01)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def flat_loss(monkeypatch):
    """Every evaluation reports the same loss, never solved: a plateau from the second evaluation on."""
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"loss": 1.0, "accuracy": 0.0})


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_rates(out):
    return [record["lr"] for record in read_metrics(out)]


def test_the_rate_halves_after_patience_evaluations_without_a_new_best(tmp_path, flat_loss):
    train(tiny(steps=6, lr_plateau=1, out=str(tmp_path)))
    # evaluation 1 sets the best; 2 is one bad evaluation (= patience); 3 is past it: halve and count again
    assert logged_rates(tmp_path) == [0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025]


def test_rungs_below_the_last_keep_the_rate(tmp_path, flat_loss):
    train(tiny(steps=6, lr_plateau=1, curriculum=True, ladder=(2,), out=str(tmp_path)))
    assert {record["seq_len"] for record in read_metrics(tmp_path)} == {2}  # never solved: stays on T = 2
    assert logged_rates(tmp_path) == [0.01] * 6


def test_zero_keeps_a_constant_rate(tmp_path, flat_loss):
    train(tiny(steps=4, out=str(tmp_path)))
    assert logged_rates(tmp_path) == [0.01] * 4


def test_a_resumed_run_continues_the_schedule_exactly(tmp_path):
    settings = dict(lr_plateau=1, lr=0.05)
    whole = train(tiny(out=str(tmp_path / "whole"), **settings))
    train(tiny(steps=7, out=str(tmp_path / "split"), **settings))  # stops between checkpoints
    resumed = train(tiny(out=str(tmp_path / "split"), resume=True, **settings))
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    rates = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "whole")}
    assert len(set(rates.values())) > 1, "the run should have halved its rate at least once"
    assert {r["step"]: r["lr"] for r in read_metrics(tmp_path / "split")} == rates
    saved = load_checkpoint(latest_checkpoint(tmp_path / "split")).state["lr_schedule"]
    assert saved["num_bad_epochs"] == load_checkpoint(latest_checkpoint(tmp_path / "whole")).state[
        "lr_schedule"]["num_bad_epochs"]


def test_resume_refuses_another_patience(tmp_path):
    from hnae_bench.checkpoint import CheckpointError
    train(tiny(steps=3, out=str(tmp_path)))
    with pytest.raises(CheckpointError, match="lr_plateau"):
        train(tiny(steps=6, lr_plateau=2, out=str(tmp_path), resume=True))


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_patience_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="lr_plateau"):
        tiny(lr_plateau=bad)


def test_positions_reach_the_hnae_model_and_resume_must_match(tmp_path):
    """`--positions relative` (in this file for its tiny configs): no place table in the model, the
    choice recorded, and a resume that asks for the other refused."""
    from hnae_bench.checkpoint import CheckpointError
    settings = dict(model="hnae", steps=2, out=str(tmp_path), checkpoint_every=2)
    result = train(tiny(positions="relative", **settings))
    assert result.model.model_config["positions"] == "relative"
    assert not any("place_embedding" in name for name, _ in result.model.named_parameters())
    with pytest.raises(CheckpointError, match="positions"):
        train(tiny(positions="block", resume=True, **{**settings, "steps": 4}))
    with pytest.raises(ValueError, match="positions"):
        tiny(positions="absolute")
    with pytest.raises(ValueError, match="hnae only"):
        tiny(positions="relative")  # the tiny config's model is the LSTM


def test_short_conv_reaches_the_hnae_model_is_rebuilt_and_resume_must_match(tmp_path):
    """`--short-conv K`: every layer gets a K-tap convolution, the checkpoint records it and rebuilds
    the same model (hnae evaluate and export read it back), and a resume that asks for another is refused."""
    from hnae_bench.checkpoint import CheckpointError
    from hnae_bench.export import load_source
    settings = dict(model="hnae", steps=2, out=str(tmp_path), checkpoint_every=2)
    result = train(tiny(short_conv=4, **settings))
    assert result.model.model_config["short_conv"] == 4
    convs = [name for name, _ in result.model.named_parameters() if name.endswith("short_conv.weight")]
    assert len(convs) == result.model.model_config["num_layers"]
    rebuilt = load_source(tmp_path).model
    x = torch.randn(2, 25, rebuilt.body.encoder.input_size)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))
    with pytest.raises(CheckpointError, match="short_conv"):
        train(tiny(short_conv=0, resume=True, **{**settings, "steps": 4}))
    for bad in (1, -1, True):
        with pytest.raises(ValueError, match="short_conv"):
            tiny(model="hnae", short_conv=bad)
    with pytest.raises(ValueError, match="hnae only"):
        tiny(short_conv=4)  # the tiny config's model is the LSTM


def test_event_counters_reach_the_hnae_model_train_their_gates_and_resume_must_match(tmp_path):
    """`--event-counters G`: every layer gets G counters, the loss carries --count-penalty times the mean
    gate (which moves the gates' biases down), the checkpoint rebuilds the same model, and a resume that
    asks for another count or penalty is refused."""
    from hnae_bench.checkpoint import CheckpointError
    from hnae_bench.export import load_source
    settings = dict(model="hnae", steps=2, out=str(tmp_path), checkpoint_every=2)
    result = train(tiny(event_counters=3, count_penalty=5.0, **settings))
    assert result.model.model_config["event_counters"] == 3
    biases = [p for name, p in result.model.named_parameters() if name.endswith("event_count.gate.bias")]
    assert len(biases) == result.model.model_config["num_layers"] and all(b.shape == (3,) for b in biases)
    assert all((b < 0).all() for b in biases)  # from zero: the penalty shut the gates a little
    rebuilt = load_source(tmp_path).model
    x = torch.randn(2, 25, rebuilt.body.encoder.input_size)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))
    with pytest.raises(CheckpointError, match="event_counters"):
        train(tiny(event_counters=0, count_penalty=5.0, resume=True, **{**settings, "steps": 4}))
    with pytest.raises(CheckpointError, match="count_penalty"):
        train(tiny(event_counters=3, resume=True, **{**settings, "steps": 4}))
    for bad, name in ((-1, "event_counters"), (True, "event_counters")):
        with pytest.raises(ValueError, match=name):
            tiny(model="hnae", event_counters=bad)
    with pytest.raises(ValueError, match="count_penalty"):
        tiny(model="hnae", count_penalty=-1.0)
    with pytest.raises(ValueError, match="hnae only"):
        tiny(event_counters=2)  # the tiny config's model is the LSTM
