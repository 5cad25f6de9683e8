"""The ``hnae`` command line: dispatch, ``hnae train`` end to end, SIGKILL and Ctrl-C during training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hnae as hnae_library
from hnae_bench.cli import COMMANDS, main
from hnae_bench.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["train", "--task", "copy", "--seq-len", "5", "--model", "lstm", "--batch-size", "8",
            "--eval-every", "4", "--eval-batches", "2", "--no-progress"]


def hnae(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``python [-m LAUNCHER ...] -m hnae ARGS`` from the repository root."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # tiny models; one thread each keeps parallel test workers from thrashing
    return subprocess.Popen([sys.executable, *launcher, "-m", "hnae", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert process.poll() is None, f"the run ended before {path} appeared: {process.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.005)


def final_state(out: Path) -> tuple[dict, dict]:
    """The latest checkpoint's weights and progress state."""
    checkpoint = out / (out / "latest").read_text().strip()
    return load_file(checkpoint / "model.safetensors"), json.loads((checkpoint / "state.json").read_text())


def test_help_lists_the_commands_and_train_help_its_options():
    top, train_help = hnae("--help"), hnae("train", "--help")
    code, stdout, _ = finish(top)
    assert code == 0 and all(command in stdout for command in COMMANDS)
    code, stdout, _ = finish(train_help)
    assert code == 0
    for option in ["--task", "--seq-len", "--model", "--steps", "--time-budget", "--batch-size", "--lr", "--seed",
                   "--device", "--out", "--resume", "--curriculum", "--preset"]:
        assert option in stdout


def test_an_unknown_command_exits_2_with_a_clear_message(capsys):
    code, _, stderr = finish(hnae("fly"))
    assert code == 2 and "unknown command 'fly'" in stderr and "train" in stderr
    assert main(["fly"]) == 2 and "unknown command" in capsys.readouterr().err
    assert main([]) == 2


def test_train_runs_end_to_end_and_prints_a_summary(tmp_path, capsys):
    assert main([*TINY_RUN, "--steps", "4", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert "lstm on copy: 4 steps" in stdout and "tokens/s" in stdout
    assert (tmp_path / "latest").read_text().strip() == "ckpt-000004"
    with pytest.raises(SystemExit) as exit_info:  # neither --steps nor --time-budget
        main([*TINY_RUN])
    assert exit_info.value.code == 2 and "steps or time_budget" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a task option the task refuses
        main([*TINY_RUN, "--steps", "1", "--task-option", "memory_length=0"])
    assert exit_info.value.code == 2 and "memory_length" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_reported_in_one_line_naming_the_file(tmp_path, capsys):
    assert main([*TINY_RUN, "--steps", "4", "--out", str(tmp_path)]) == 0
    weights = tmp_path / "ckpt-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main([*TINY_RUN, "--steps", "8", "--out", str(tmp_path), "--resume"]) == 1
    stderr = capsys.readouterr().err
    assert str(weights) in stderr and "truncated" in stderr and "Traceback" not in stderr


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
    steps, whole, killed = "30", tmp_path / "whole", tmp_path / "killed"
    common = [*TINY_RUN, "--steps", steps, "--checkpoint-every", "3"]
    uninterrupted = hnae(*common, "--out", str(whole))
    victim = hnae(*common, "--out", str(killed))
    wait_for(killed / "latest", victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    _, state_at_kill = final_state(killed)
    assert state_at_kill["step"] < int(steps), "the run finished before it was killed; the test proves nothing"

    code, _, stderr = finish(hnae(*common, "--out", str(killed), "--resume"))
    assert code == 0, stderr
    assert finish(uninterrupted)[0] == 0
    weights_whole, state_whole = final_state(whole)
    weights_resumed, state_resumed = final_state(killed)
    assert state_resumed["step"] == state_whole["step"] == int(steps)
    assert weights_whole.keys() == weights_resumed.keys()
    assert all(torch.equal(weights_whole[name], weights_resumed[name]) for name in weights_whole)
    assert state_resumed["last_metrics"] == state_whole["last_metrics"]
    logged = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval"]) for r in logged] == [(r["step"], r["eval"]) for r in expected]


def test_ctrl_c_writes_a_checkpoint_and_exits_130(tmp_path):
    run = hnae(*TINY_RUN, "--steps", "1000000", "--checkpoint-every", "1000000", "--out", str(tmp_path))
    wait_for(tmp_path / "metrics.jsonl", run)  # training is under way: the first evaluation is logged
    run.send_signal(signal.SIGINT)
    code, _, stderr = finish(run)
    assert code == 130 and "interrupted" in stderr and "Traceback" not in stderr
    _, state = final_state(tmp_path)
    assert state["step"] >= 4 and state["last_eval_step"] == state["step"]


def test_ddp_with_two_gloo_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU ranks: fresh, and resumed from a one-process checkpoint; both match one process."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    common = [*TINY_RUN, "--eval-every", "3", "--checkpoint-every", "3", "--steps", "6"]

    def config(steps, out=None, resume=False):
        return TrainConfig(task="copy", seq_len=5, model="lstm", batch_size=8, eval_every=3, eval_batches=2,
                           checkpoint_every=3, progress=False, steps=steps, out=out, resume=resume)

    train(config(3, out=str(tmp_path / "handover")))  # one process, 3 steps, then 2 ranks take over
    fresh = hnae(*common, "--out", str(tmp_path / "ddp"), launcher=torchrun)
    resumed = hnae(*common, "--out", str(tmp_path / "handover"), "--resume", launcher=torchrun)
    single = train(config(6))
    for run in (fresh, resumed):
        code, stdout, stderr = finish(run, timeout=240)
        assert code == 0, stderr
        assert stdout.count("lstm on copy: 6 steps") == 1  # rank 0 alone reports
    expected = single.model.state_dict()
    for out in ("ddp", "handover"):
        weights, state = final_state(tmp_path / out)
        assert state["step"] == 6 and weights.keys() == expected.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
        for metric, value in state["last_metrics"].items():
            assert abs(value - single.final_metrics[metric]) <= 1e-6
    logged = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [3, 6]  # rank 0 alone writes the log


def test_inspect_describes_a_model_from_its_windows(capsys):
    from hnae_bench import inspect_cli
    assert inspect_cli.main(["--windows", "4,4", "--hidden-size", "16", "--num-layers", "2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    model = hnae_library.HNAE(1, 16, 2, windows=(4, 4))
    assert facts["receptive_field"] == model.receptive_field
    assert facts["guaranteed_reach_per_layer"] == 16
    assert facts["state_bytes_per_stream"] == model.init_state(1).nbytes
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert inspect_cli.main(["--windows", "4,0"]) == 2
