"""hnae train's loop: learning, determinism, exact resume, crash-safe checkpoints, curriculum."""

import json
import re

import pytest
import torch

from hnae_bench import checkpoint as checkpoint_module
from hnae_bench.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from hnae_bench.curriculum import DEFAULT_LADDER, Curriculum, build_ladder
from hnae_bench.distributed import DistributedContext
from hnae_bench.tasks import CopyTask
from hnae_bench.train import TrainConfig, eval_seed, train


def tiny(**overrides) -> TrainConfig:
    """A copy task of 5 blanks (25 steps) and the small LSTM: a step takes milliseconds."""
    values = dict(task="copy", seq_len=5, model="lstm", steps=6, batch_size=8, eval_every=2, eval_batches=2,
                  checkpoint_every=3, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- learning and determinism


def test_a_few_steps_reduce_the_loss(tmp_path):
    result = train(tiny(steps=30, eval_every=5, lr=1e-2, out=str(tmp_path)))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["eval"]["loss"] < 0.7 * records[0]["eval"]["loss"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result.final_metrics == records[-1]["eval"]
    assert result.steps == 30 and result.parameters > 0 and result.tokens_per_second > 0


def test_the_progress_bar_shows_loss_accuracy_throughput_and_eta(capsys):
    train(tiny(steps=4, progress=True))
    shown = capsys.readouterr().err
    assert "4/4" in shown and all(f"{name}=" in shown for name in ("loss", "acc", "tok/s", "eta", "T"))


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not():
    first, second, other = train(tiny()), train(tiny()), train(tiny(seed=1))
    assert_same_tensors(first.model.state_dict(), second.model.state_dict())
    assert first.final_metrics == second.final_metrics
    weights = first.model.state_dict()
    assert any(not torch.equal(weights[k], v) for k, v in other.model.state_dict().items())


def test_eval_batches_are_held_out_from_training():
    task, seed = CopyTask(5), 3
    train_x, _ = task.sample(8, torch.Generator().manual_seed(seed))
    eval_x, _ = task.sample(8, torch.Generator().manual_seed(eval_seed(seed, task.seq_len)))
    assert eval_seed(seed, 5) != eval_seed(seed, 10) and eval_seed(seed, 5) >= 2**32
    assert not torch.equal(train_x, eval_x)


def test_ranks_split_the_global_batch_into_contiguous_slices():
    rows = [DistributedContext(rank=rank, world_size=4).batch_slice(8) for rank in range(4)]
    assert [list(range(8))[r] for r in rows] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert DistributedContext().batch_slice(8) == slice(0, 8)
    with pytest.raises(ValueError, match="batch_size 6 must be divisible by the world size 4"):
        DistributedContext(rank=0, world_size=4).batch_slice(6)


# --------------------------------------------------------------------------- resume


def test_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    uninterrupted = train(tiny(steps=10, out=str(whole)))
    train(tiny(steps=5, out=str(split)))  # stops between checkpoints and evaluations
    resumed = train(tiny(steps=10, out=str(split), resume=True))

    assert resumed.steps == 10
    assert_same_tensors(uninterrupted.model.state_dict(), resumed.model.state_dict())
    assert resumed.final_metrics == uninterrupted.final_metrics
    a, b = load_checkpoint(latest_checkpoint(whole)), load_checkpoint(latest_checkpoint(split))
    assert latest_checkpoint(whole).name == latest_checkpoint(split).name == "ckpt-000010"
    assert_same_tensors(a.model_state, b.model_state)
    assert_same_tensors(a.rng_state, b.rng_state)
    assert a.optimizer_state["param_groups"] == b.optimizer_state["param_groups"]
    for index, entry in a.optimizer_state["state"].items():
        assert_same_tensors(entry, b.optimizer_state["state"][index])
    # The scheduled evaluations log the same numbers; the split run also logged its stop at step 5.
    scheduled = {r["step"]: (r["eval"], r["train_loss"]) for r in read_metrics(whole)}
    logged = {r["step"]: (r["eval"], r["train_loss"]) for r in read_metrics(split)}
    assert sorted(logged) == [2, 4, 5, 6, 8, 10]
    assert all(logged[step] == scheduled[step] for step in scheduled)


def test_resume_is_exact_for_the_hnae_model_too(tmp_path):
    settings = dict(model="hnae", seq_len=10, eval_every=2, checkpoint_every=2)
    uninterrupted = train(tiny(steps=4, **settings))
    train(tiny(steps=2, out=str(tmp_path), **settings))
    resumed = train(tiny(steps=4, out=str(tmp_path), resume=True, **settings))
    assert_same_tensors(uninterrupted.model.state_dict(), resumed.model.state_dict())
    assert resumed.final_metrics == uninterrupted.final_metrics


def test_resume_refuses_other_settings_and_fresh_runs_refuse_a_used_directory(tmp_path):
    train(tiny(steps=3, out=str(tmp_path)))
    with pytest.raises(CheckpointError, match="lr"):
        train(tiny(steps=6, lr=0.5, out=str(tmp_path), resume=True))
    with pytest.raises(CheckpointError, match="resume"):
        train(tiny(steps=6, out=str(tmp_path)))


def test_resume_without_a_checkpoint_starts_from_step_zero(tmp_path):
    fresh, resumed = train(tiny(steps=3)), train(tiny(steps=3, out=str(tmp_path / "new"), resume=True))
    assert_same_tensors(fresh.model.state_dict(), resumed.model.state_dict())


# --------------------------------------------------------------------------- crash-safe checkpoints


def test_a_writer_dying_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    real_write, written = checkpoint_module._write_file, []

    def dies_in_the_second_checkpoint(path, data):
        if path.parent.name.startswith(".ckpt-"):  # a checkpoint's file, not latest or config.json
            if len(written) == 6 + 3:  # 6 files per checkpoint: die half-way through the second
                path.write_bytes(data[: len(data) // 2])
                raise OSError("simulated crash while writing")
            written.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_file", dies_in_the_second_checkpoint)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny(steps=6, out=str(tmp_path)))
    monkeypatch.setattr(checkpoint_module, "_write_file", real_write)

    assert (tmp_path / "latest").read_text().strip() == "ckpt-000003"
    assert load_checkpoint(latest_checkpoint(tmp_path)).state["step"] == 3
    assert list(tmp_path.glob(".ckpt-000006.tmp"))  # the half-written one, never named by latest
    resumed = train(tiny(steps=6, out=str(tmp_path), resume=True))
    assert_same_tensors(train(tiny(steps=6)).model.state_dict(), resumed.model.state_dict())
    assert not list(tmp_path.glob(".ckpt-*"))  # leftovers cleaned by the next save
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000003", "ckpt-000006"]


@pytest.mark.parametrize("file_name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                       "state.json", "optimizer.json"])
def test_a_truncated_checkpoint_file_gives_an_error_naming_it(tmp_path, file_name):
    train(tiny(steps=3, out=str(tmp_path)))
    path = tmp_path / "ckpt-000003" / file_name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as caught:
        train(tiny(steps=6, out=str(tmp_path), resume=True))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no deep traceback chained


def test_a_broken_latest_pointer_gives_an_error_naming_it(tmp_path):
    train(tiny(steps=3, out=str(tmp_path)))
    (tmp_path / "latest").write_text("ckpt-000099\n")
    with pytest.raises(CheckpointError, match="latest.*ckpt-000099"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="expected a checkpoint name"):
        latest_checkpoint(tmp_path)


def test_checkpoints_keep_the_two_newest_and_write_no_pickle(tmp_path):
    train(tiny(steps=9, out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000006", "ckpt-000009"]
    names = {p.name for p in (tmp_path / "ckpt-000009").iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                     "state.json", "config.json"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["model"] == "lstm" and config["model_config"]["name"] == "lstm"


# --------------------------------------------------------------------------- metrics, budgets, curriculum


def test_metrics_lines_are_json_with_the_documented_fields(tmp_path):
    train(tiny(steps=6, out=str(tmp_path)))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert {"step", "seconds", "seq_len", "train_loss", "eval", "solved", "tokens_per_second"} <= set(record)
        assert set(record["eval"]) == {"loss", "accuracy"} and record["seq_len"] == 5


def test_a_time_budget_ends_with_a_final_evaluation_and_checkpoint(tmp_path):
    result = train(tiny(steps=None, time_budget=0.5, eval_every=10_000, checkpoint_every=10_000, out=str(tmp_path)))
    assert result.seconds >= 0.5 and result.steps >= 1
    assert latest_checkpoint(tmp_path).name == f"ckpt-{result.steps:06d}"
    assert read_metrics(tmp_path)[-1]["step"] == result.steps


def test_curriculum_moves_up_a_rung_once_solved(tmp_path, monkeypatch):
    monkeypatch.setattr(CopyTask, "is_solved", lambda self, metrics: self.seq_len < 20)
    result = train(tiny(seq_len=20, curriculum=True, ladder=(5, 10), steps=8, out=str(tmp_path)))
    assert [(r["seq_len"], r["solved"], r["step"]) for r in result.rungs] == [(5, True, 2), (10, True, 4),
                                                                               (20, False, 8)]
    assert result.longest_solved == 10 and result.task.seq_len == 20 and result.final_seq_len == 20
    assert [r["seq_len"] for r in read_metrics(tmp_path)] == [5, 10, 20, 20]
    assert result.model.model_config["max_len"] == CopyTask(20).total_length  # sized for the last rung


def test_stop_when_solved_ends_at_the_last_rung(monkeypatch):
    monkeypatch.setattr(CopyTask, "is_solved", lambda self, metrics: True)
    result = train(tiny(seq_len=10, curriculum=True, ladder=(5,), steps=100, stop_when_solved=True))
    assert result.steps == 4 and result.longest_solved == 10
    assert [r["seq_len"] for r in result.rungs] == [5, 10]


def test_build_ladder_cuts_below_seq_len_and_ends_with_it():
    assert build_ladder(1000, True) == (50, 100, 200, 500, 1000)
    assert build_ladder(30, True) == (30,)
    assert build_ladder(300, True, (10, 100, 1000)) == (10, 100, 300)
    assert build_ladder(300, False) == (300,)
    assert build_ladder(200_000, True) == DEFAULT_LADDER + (200_000,)
    for bad in [(), (100, 50), (0, 10)]:
        with pytest.raises(ValueError, match="ladder"):
            build_ladder(300, True, bad)


def test_curriculum_state_round_trips():
    curriculum = Curriculum((5, 10, 20))
    assert curriculum.record_evaluation(True, 2, 0.1, {"accuracy": 1.0})
    assert not curriculum.record_evaluation(False, 4, 0.2, {"accuracy": 0.5})
    restored = Curriculum((5, 10, 20))
    restored.load_state_dict(json.loads(json.dumps(curriculum.state_dict())))
    assert restored.seq_len == 10 and restored.rung_records() == curriculum.rung_records()
    with pytest.raises(ValueError, match="ladder"):
        Curriculum((5, 20)).load_state_dict(curriculum.state_dict())


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=None, time_budget=None), "steps or time_budget"),
    (dict(model="rnn"), "model must be one of"),
    (dict(task="sorting"), "task must be one of"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=-1.0), "lr"),
    (dict(seed=-1), "seed"),
    (dict(time_budget=float("nan")), "time_budget"),
    (dict(resume=True), "resume=True needs out"),
    (dict(ladder=(5,)), "only used with curriculum"),
    (dict(curriculum=True, ladder=(5, 2)), "strictly increasing"),
    (dict(device="gpu-please"), "device"),
    (dict(write_policy="novelty"), "apply to hnae only"),
    (dict(model="hnae", write_policy="novelty", threshold=2.0), "threshold"),
    (dict(model="hnae", write_policy="sometimes"), "write_policy"),
    (dict(generalise=(0,)), "generalise"),
    (dict(length_jitter=-1), "length_jitter"),
])
def test_config_is_validated_loudly(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


# --------------------------------------------------------------------------- write policies and generalisation


@pytest.mark.parametrize("policy, option", [("novelty", {"threshold": 0.99}), ("learned", {"budget": 0.5})])
def test_hnae_trains_with_a_write_policy_and_its_checkpoint_rebuilds_it(tmp_path, policy, option):
    from hnae_bench.export import load_source
    result = train(tiny(model="hnae", write_policy=policy, steps=3, out=str(tmp_path), **option))
    encoder = result.model.body.encoder
    assert encoder.write_policy == (policy,) * (len(encoder.windows) - 1)
    rebuilt = load_source(tmp_path).encoder  # the checkpoint's model_config carries the policy
    assert rebuilt.config == encoder.config
    x = torch.randn(2, 25, encoder.input_size)
    assert torch.equal(rebuilt.eval()(x)[0], encoder.cpu().eval()(x)[0])


def test_learned_policy_adds_its_penalty_to_the_training_loss(monkeypatch):
    from hnae_bench import train as train_module
    seen = []
    original = train_module.Trainer.train_step

    def recording(self):
        loss = original(self)
        seen.append(float(self.model.write_penalty()))
        return loss
    monkeypatch.setattr(train_module.Trainer, "train_step", recording)
    train(tiny(model="hnae", write_policy="learned", budget=0.01, steps=2, seq_len=300))  # 2 level-0 blocks
    assert len(seen) == 2 and all(value > 0.5 for value in seen)  # gates start open: ~all written, far above 1%


def test_generalise_evaluates_the_trained_model_at_other_lengths(tmp_path):
    result = train(tiny(steps=2, generalise=(10, 40), out=str(tmp_path)))
    assert [record["seq_len"] for record in result.generalisation] == [10, 40]
    assert all(0.0 <= record["metrics"]["accuracy"] <= 1.0 for record in result.generalisation)
    logged = [r for r in read_metrics(tmp_path) if r.get("event") == "generalisation"]
    assert [r["seq_len"] for r in logged] == [10, 40] and logged[1]["total_length"] == 60


def test_length_jitter_trains_each_batch_at_a_length_in_range_and_resumes_exactly(tmp_path, monkeypatch):
    from hnae_bench import train as train_module
    lengths = []
    real_make_task = train_module.make_task

    def recording_make_task(name, seq_len, **options):
        lengths.append(seq_len)
        return real_make_task(name, seq_len, **options)

    monkeypatch.setattr(train_module, "make_task", recording_make_task)
    whole = train(tiny(seq_len=12, length_jitter=4, steps=10, out=str(tmp_path / "whole")))
    drawn = lengths[2:]   # after the rung's task and the longest one, built at the start
    assert set(drawn) <= set(range(8, 13)) and len(set(drawn)) >= 3   # 10 draws from 5 lengths
    train(tiny(seq_len=12, length_jitter=4, steps=5, out=str(tmp_path / "split")))
    resumed = train(tiny(seq_len=12, length_jitter=4, steps=10, out=str(tmp_path / "split"), resume=True))
    assert_same_tensors(whole.model.state_dict(), resumed.model.state_dict())
    with pytest.raises(CheckpointError, match="length_jitter"):
        train(tiny(seq_len=12, length_jitter=2, steps=12, out=str(tmp_path / "split"), resume=True))
