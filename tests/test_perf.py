"""`hnae bench perf`: the quick profile end to end, FLOP counting, failures and timeouts reported
(never dropped), the skip rules, and the targets' PASS / MISS arithmetic."""
import json
import multiprocessing
import signal
import subprocess
import sys
import time

import pytest
import torch

from hnae_bench import perf, perf_isolation, perf_measure, perf_models, perf_targets
from hnae_bench.peers import ModelUnavailable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_json(tmp_path, *argv):
    """Run `hnae bench perf argv --out tmp_path/run`; the exit code, perf.json and report.md."""
    code = perf.main([*argv, "--out", str(tmp_path / "run")])
    out = tmp_path / "run" / "perf"
    return code, json.loads((out / "perf.json").read_text()), (out / "report.md").read_text()


def test_quick_profile_end_to_end(tmp_path):
    code, results, text = run_json(tmp_path, "--profile", "quick")
    assert code == 0
    out = tmp_path / "run" / "perf"
    for name in ("perf_throughput.png", "perf_memory.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert set(results["plots"].values()) == {"perf_throughput.png", "perf_memory.png"}
    assert set(results["training"]) == {"hnae", "lstm"}
    for name, by_length in results["training"].items():
        assert set(by_length) == {"256", "512"}
        for steps, entry in by_length.items():
            assert entry["status"] == "ok", entry
            summary = entry["summary"]
            assert summary["rounds"] == 2 and summary["tokens"] == 4 * int(steps)
            assert summary["train_tokens_per_second"] == pytest.approx(summary["tokens"] / summary["train_seconds"])
            assert summary["train_peak_bytes"] > 0 and summary["flops_training"] > 0 and 0 < summary["mfu"]
            # what autograd keeps alone is more than a float per token and layer; no profiler error
            assert summary["train_allocated_bytes_per_token"] > 4 * 2, summary
            ratio = entry["ratio_to_lstm"]["train_tokens_per_second"]
            lstm = results["training"]["lstm"][steps]["summary"]["train_tokens_per_second"]
            assert ratio == pytest.approx(summary["train_tokens_per_second"] / lstm)
            assert f"| {name} | {int(steps):,} | {results['models'][name]['config']['parameters']:,} | ok |" in text
    assert results["training"]["lstm"]["256"]["ratio_to_lstm"]["train_tokens_per_second"] == 1.0
    assert set(results["streaming"]) == {"hnae", "lstm", perf_models.REFERENCE_STEP_MODEL}
    for name, entry in results["streaming"].items():
        summary = entry["summary"]
        assert summary["positions"] == [100, 1000] and all(s > 0 for s in summary["latency_seconds"])
        assert len(set(summary["state_bytes"])) == 1, name   # every state here is bounded
        assert entry["ratio_to_lstm"]["batch_tokens_per_second"] > 0
    assert results["matmul_peak"]["flops_per_second"] > 0 and len(results["matmul"]) == 2
    assert [t["status"] in ("PASS", "MISS", "N/A") for t in results["targets"]] == [True] * 10
    for key in ("cpu", "torch"):
        assert results["machine"][key] in text
    assert "hnae bench perf --profile quick" in text and "(1.00x)" in text
    assert "![throughput](perf_throughput.png)" in text


def test_flop_counts_see_recurrent_gates_and_cpu_attention(monkeypatch):
    x = torch.randn(2, 64, 8)   # (B, T, C)
    hnae_model = perf_models.build_perf_model("hnae", "small", 8, 64)
    counted = perf_measure.count_flops(hnae_model, x, "cpu", "fp32")
    assert counted["training"] > counted["forward"] > 0
    assert counted["by_op"].get("aten._scaled_dot_product_flash_attention_for_cpu", 0) > 0

    lstm_model = perf_models.build_perf_model("lstm", "small", 8, 64)
    rnn = lstm_model.body.rnn
    gates = 2 * 2 * 64 * 4 * rnn.hidden_size * (rnn.input_size + rnn.hidden_size)   # 2 B T 4H (C + H), layer 1
    counted = perf_measure.count_flops(lstm_model, x, "cpu", "fp32")
    assert counted["forward"] >= gates   # with oneDNN on, only the head's matmul would be counted
    longer = torch.randn(2, 600, 8)
    extrapolated = perf_measure.count_flops(lstm_model, longer, "cpu", "fp32")
    assert extrapolated["counted_steps"] == [128, 256]
    monkeypatch.setattr(perf_measure, "RECURRENT_FLOP_STEPS", 10 ** 6)   # now counted step by step
    exact = perf_measure.count_flops(lstm_model, longer, "cpu", "fp32")
    assert exact["counted_steps"] == [600]
    for key in ("forward", "training"):
        assert extrapolated[key] == exact[key], key   # a recurrence's count is affine in T: exact


def test_model_forced_to_fail_is_reported(tmp_path, monkeypatch):
    real = perf_models.build_perf_model

    def failing(name, *args):
        if name == "hnae":
            raise RuntimeError("forced failure for the test")
        return real(name, *args)

    monkeypatch.setattr(perf_models, "build_perf_model", failing)
    code, results, text = run_json(tmp_path, "--profile", "quick", "--models", "hnae,lstm", "--seq-lens", "64",
                                   "--repeats", "1", "--no-stream")
    assert code == 0
    entry = results["training"]["hnae"]["64"]
    assert entry["status"] == "error" and "forced failure for the test" in entry["error"]
    assert results["training"]["lstm"]["64"]["status"] == "ok"
    assert "| hnae | 64 | - | error: RuntimeError: forced failure for the test" in text
    assert any(t["status"] == "N/A" for t in results["targets"])


def test_failure_inside_the_child_comes_back_as_a_result():
    context = perf_isolation.forkserver_context(["lstm"])
    job = {"kind": "train", "name": "lstm", "model_bytes": b"not a pickle", "device": "cpu", "dtype": "fp32",
           "threads": 1, "memory_limit_bytes": None}
    result = perf_isolation.run_isolated(context, job, max_seconds=30)
    assert result["status"] == "error" and "UnpicklingError" in result["error"], result
    receiver, sender = multiprocessing.Pipe(duplex=False)
    perf_isolation.child_main(sender, {"kind": "no such job", "device": "cpu"})
    kind, result, _, sent = receiver.recv()
    assert (kind, result) == ("result", {"status": "error", "error": "KeyError: 'no such job'"})
    assert 0 <= time.monotonic() - sent < 60   # stamped with the child's monotonic clock
    assert perf_isolation.classify_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory")) == "oom"
    assert perf_isolation.classify_failure(MemoryError()) == "oom"
    assert perf_isolation.classify_failure(ModelUnavailable("no package")) == "unavailable"
    assert perf_isolation.classify_failure(ValueError("bad")) == "error"


def _slow_flop_count(connection, job):
    """A stand-in child: timings done, then a FLOP count that never ends."""
    connection.send(("phase", "train", None))
    connection.send(("phase", "flops", {"train_seconds": [0.25]}))
    time.sleep(60)


def test_timeout_in_an_optional_phase_keeps_the_timings():
    context = multiprocessing.get_context("fork")   # safe here: the child runs no torch work
    result = perf_isolation.run_isolated(context, {}, max_seconds=0.5, target=_slow_flop_count)
    assert result["status"] == "ok" and result["train_seconds"] == [0.25]
    assert result["cut_short"] == "flops ran over the 0.5 s cap"


def test_timeout_is_reported_and_longer_lengths_skipped(tmp_path):
    code, results, text = run_json(tmp_path, "--profile", "quick", "--models", "lstm", "--seq-lens", "64,128",
                                   "--repeats", "1", "--no-stream", "--max-seconds", "0.001")
    assert code == 0
    first, second = results["training"]["lstm"]["64"], results["training"]["lstm"]["128"]
    assert first["status"] == "timeout" and "over the 0.001 s cap" in first["error"]
    assert second["status"] == "skipped: slower than the 0.001 s cap at T=64"
    assert results["matmul"][0]["status"] == "timeout" and results["matmul_peak"]["flops_per_second"] is None
    assert "| lstm | 64 |" in text and "timeout" in text


def test_sigterm_mid_run_still_writes_the_report(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "hnae", "bench", "perf", "--profile", "quick", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:   # wait until measuring has begun
        if line.startswith("round 1/"):
            break
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    results = json.loads((out / "perf" / "perf.json").read_text())
    assert results["interrupted"] is True and "interrupted" in (out / "perf" / "report.md").read_text()
    statuses = [entry["status"] for by_length in results["training"].values() for entry in by_length.values()]
    assert "pending" not in statuses and "not run: the run was interrupted" in statuses


def test_recurrent_streaming_falls_back_to_fp32_where_cudnn_refuses_bf16(monkeypatch):
    real = perf_measure._stream

    def refusing(streamer, job, dtype, phase):
        if dtype == "bf16":
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.")
        return real(streamer, job, dtype, phase)

    monkeypatch.setattr(perf_measure, "_stream", refusing)
    job = {"name": "lstm", "preset": "small", "input_size": 8, "max_len": 64, "device": "cpu", "dtype": "bf16",
           "seed": 0, "positions": [16, 32], "steps": 3, "warmup_steps": 1, "stream_batch": 2}
    phases = []
    result = perf_measure.measure_streaming(job, lambda name, partial=None: phases.append(name))
    assert result["precision"] == "fp32" and "CUDNN_STATUS_NOT_SUPPORTED" in result["autocast_error"]
    assert "fp32 after a bf16 failure" in phases and len(result["latency_seconds"]) == 2
    with pytest.raises(RuntimeError, match="CUDNN"):   # hnae is not retried: there it is a real failure
        perf_measure.measure_streaming({**job, "name": "hnae"}, lambda name, partial=None: None)


def test_predicted_slow_length_is_skipped_not_run():
    settings = {"max_seconds": 60.0, "prediction_margin": 1.5, "repeat_below": 15.0}
    entries = {"1024": {"status": "ok", "rounds": [{"train_seconds": [30.0, 31.0]}]},
               "4096": {"status": "pending", "rounds": []}}
    decision = perf._training_decision(entries, [1024, 4096], 1, settings)
    assert decision.startswith("skipped: slower than the cap") and ">= 120 s" in decision
    entries["1024"]["rounds"][0]["train_seconds"] = [10.0]
    assert perf._training_decision(entries, [1024, 4096], 1, settings) is None
    assert perf._training_decision(entries, [1024, 4096], 0, settings) is None   # 10 s: repeated next round
    entries["1024"]["rounds"][0]["train_seconds"] = [20.0]
    assert perf._training_decision(entries, [1024, 4096], 0, settings) == "once"


def _synthetic(hnae_rate, lstm_rate, transformer, bytes_at_64k=105.0, allocated_at_64k=82.0):
    def entry(rate, tokens=32768, per_token=100.0, allocated=80.0):
        return {"status": "ok", "summary": {"train_tokens_per_second": rate, "tokens": tokens, "mfu": None,
                                            "train_bytes_per_token": per_token,
                                            "train_allocated_bytes_per_token": allocated}}
    return {"settings": {"device": "cpu", "max_seconds": 60.0, "batch_size": 8, "stream_batch": 32},
            "matmul_peak": {"flops_per_second": 1e11},
            "training": {"hnae": {"4096": entry(hnae_rate), "16384": entry(hnae_rate, 131072),
                                  "65536": entry(hnae_rate, 524288, bytes_at_64k, allocated_at_64k)},
                         "lstm": {"4096": entry(lstm_rate)}, "transformer": {"16384": transformer}}}


def test_targets_say_pass_miss_and_bounds():
    targets = perf_targets.evaluate_targets(_synthetic(40_000, 80_000, {"status": "timeout"}))
    assert len(targets) == 10 and "x lstm" in targets[0]["target"] and "x tcn" in targets[1]["target"]
    lstm, tcn, transformer, longest, mfu, memory, allocated, latency = targets[:8]
    assert lstm["status"] == "MISS" and lstm["value"] == 0.5 and "short by 50%" in lstm["detail"]
    assert tcn["status"] == "N/A" and "not both in this run" in tcn["detail"]
    assert transformer["status"] == "PASS"   # timed out at 60 s for 131,072 tokens: a lower bound of 18.3x
    assert transformer["value"] == pytest.approx(40_000 * 60 / 131072)
    assert longest["status"] == "PASS"
    assert memory["status"] == "PASS" and memory["value"] == pytest.approx(1.05) and "VmHWM" in memory["target"]
    assert allocated["status"] == "PASS" and allocated["value"] == pytest.approx(82 / 80)
    assert "allocated by PyTorch" in allocated["target"] and "T=65,536: 82 B" in allocated["detail"]
    assert mfu["status"] == latency["status"] == "N/A" and mfu["value"] is None
    again = perf_targets.evaluate_targets(_synthetic(90_000, 80_000, {"status": "oom"}, bytes_at_64k=130.0,
                                                     allocated_at_64k=90.0))
    assert again[0]["status"] == "PASS" and again[2]["status"] == "N/A" and "oom" in again[2]["detail"]
    assert again[5]["status"] == "MISS" and "over by 18%" in again[5]["detail"]   # 1.30 against 1.10
    assert again[6]["status"] == "MISS" and "over by 2%" in again[6]["detail"]    # 1.125 against 1.10
    older = _synthetic(40_000, 80_000, {"status": "timeout"})   # a perf.json from before the allocated figure
    for entry in older["training"]["hnae"].values():
        del entry["summary"]["train_allocated_bytes_per_token"]
    older = perf_targets.evaluate_targets(older)
    assert older[5]["status"] == "PASS" and older[6]["status"] == "N/A" and "not measured" in older[6]["detail"]
    slow = perf_targets.evaluate_targets(_synthetic(10_000, 80_000, {"status": "timeout"}))[2]
    assert slow["status"] == "N/A" and "undecided" in slow["detail"]   # a bound under 10x decides nothing
    stopped = _synthetic(40_000, 80_000, {"status": "timeout"})
    stopped["training"]["hnae"]["4096"] = stopped["training"]["hnae"]["65536"] = {"status": "not run: interrupted"}
    stopped = perf_targets.evaluate_targets(stopped)
    assert stopped[0]["status"] == stopped[3]["status"] == "N/A"   # an interrupted run decides nothing there
    failed = _synthetic(40_000, 80_000, {"status": "timeout"})
    failed["training"]["hnae"]["4096"] = failed["training"]["hnae"]["65536"] = {"status": "oom"}
    failed = perf_targets.evaluate_targets(failed)
    assert failed[0]["status"] == failed[3]["status"] == "MISS"   # hnae itself failed: a miss


def test_a_near_miss_shows_its_digits_and_the_tcn_miss_its_needed_utilisation():
    results = _synthetic(36_000, 35_000, {"status": "timeout"}, bytes_at_64k=110.4)
    results["training"]["hnae"]["4096"]["summary"].update(mfu=0.34, model_flops_per_second=6.4e10,
                                                          flops_per_token=6.4e10 / 36_000)
    results["training"]["tcn"] = {"4096": {"status": "ok", "summary": {"train_tokens_per_second": 31_000}}}
    targets = perf_targets.evaluate_targets(results)
    memory = targets[5]
    assert memory["status"] == "MISS" and "measured 1.104x, over by 0.4%" in memory["detail"]
    tcn = targets[1]
    assert tcn["status"] == "MISS"
    # 3 x 31,000 tokens/s x (6.4e10 / 36,000) FLOP per token over the 1e11 peak
    needed = perf_targets.needed_utilisation(results, "tcn", 4096, 3.0)
    assert needed == pytest.approx(3 * 31_000 * 6.4e10 / 36_000 / 1e11)
    assert "it needs 165% of the matmul peak (measured 34%)" in tcn["detail"]
    del results["training"]["hnae"]["4096"]["summary"]["flops_per_token"]
    assert perf_targets.needed_utilisation(results, "tcn", 4096, 3.0) is None


def test_allocated_peak_sees_a_freed_tensor_and_not_what_malloc_keeps():
    megabyte = 2 ** 20
    retained = torch.empty(96 * megabyte, dtype=torch.uint8).fill_(1)   # freed before: malloc may keep its pages
    del retained
    kept = []
    with perf_measure.peak_memory("cpu") as memory:
        big = torch.ones(64 * megabyte, dtype=torch.uint8)   # 64 MiB held, then freed
        del big
        kept.append(torch.ones(16 * megabyte, dtype=torch.uint8))   # 16 MiB held at the end
    assert memory.get("allocated") is not None, memory
    assert 64 * megabyte <= memory["allocated"] < 64 * megabyte + megabyte   # the peak, not the end or the sum
    assert memory["delta"] >= 16 * megabyte   # the resident set saw at least what is still held


def test_a_profiler_failure_leaves_the_resident_figure_and_says_why(monkeypatch):
    from hnae_bench import allocated_memory

    def broken(profiler):
        raise AttributeError("no event tree in this torch")

    monkeypatch.setattr(allocated_memory, "_allocation_sizes", broken)
    with perf_measure.peak_memory("cpu") as memory:
        held = torch.ones(8 * 2 ** 20, dtype=torch.uint8)
    assert memory["allocated"] is None and memory["delta"] > 0 and held.numel()
    assert "allocated bytes not measured (AttributeError: no event tree in this torch)" in memory["method"]


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        perf.main(["--seq-lens", "512,256"])
    assert "--seq-lens" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert perf.main(["--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err


def _read_late(connection, job):
    """A stand-in child whose messages the parent reads 0.9 s after they were sent (as a busy parent may)."""
    sent = time.monotonic() - 0.9
    connection.send(("phase", "train", None, sent))
    connection.send(("result", {"status": "ok", "train_seconds": [0.01]}, None, sent + 0.01))


def _over_the_cap_but_quick_to_report(connection, job):
    """A stand-in child whose "train" phase took 2 s by its own clock, reported at once."""
    now = time.monotonic()
    connection.send(("phase", "train", None, now - 2.0))
    connection.send(("result", {"status": "ok", "train_seconds": [2.0]}, None, now))


@pytest.mark.parametrize("child, status", [(_read_late, "ok"), (_over_the_cap_but_quick_to_report, "timeout")])
def test_phases_are_timed_by_the_child_s_clock_not_by_when_the_parent_reads(child, status):
    context = multiprocessing.get_context("fork")   # safe here: the child runs no torch work
    result = perf_isolation.run_isolated(context, {}, max_seconds=0.5, load_seconds=2.0, target=child)
    assert result["status"] == status, result
    if status == "ok":
        assert result["train_seconds"] == [0.01] and result["phase_seconds"]["train"] == pytest.approx(0.01)
    else:
        assert result["error"] == "train ran over the 0.5 s cap"


def _compile_phase_longer_than_the_cap(connection, job):
    """A stand-in child: a compile phase longer than the timing cap, then a result."""
    connection.send(("phase", "compile", None))
    time.sleep(1.0)
    connection.send(("result", {"status": "ok"}))


def test_a_compile_phase_gets_the_load_allowance_and_a_timed_phase_does_not():
    context = multiprocessing.get_context("fork")   # safe here: the child runs no torch work
    result = perf_isolation.run_isolated(context, {}, max_seconds=0.5, load_seconds=2.0,
                                         target=_compile_phase_longer_than_the_cap)
    assert result["status"] == "ok" and result["phase_seconds"]["compile"] >= 1.0
    result = perf_isolation.run_isolated(context, {}, max_seconds=0.5, load_seconds=0.2,
                                         target=_compile_phase_longer_than_the_cap)
    assert result["status"] == "timeout" and "compile ran over" in result["error"]


def test_compile_trains_hnae_through_torch_compile_and_leaves_lstm_eager():
    pytest.importorskip("torch._inductor")
    base = {"kind": "train", "device": "cpu", "dtype": "fp32", "threads": 1, "input_size": 4, "seed": 0,
            "preset": "small", "min_seconds": 0.0, "max_calls": 1, "repeat_below": 15.0, "max_len": 64,
            "seq_len": 64, "batch_size": 2, "count_flops": False, "count_flops_below": 1.0, "compile": "default"}
    phases = []
    hnae_result = perf_measure.measure_training({**base, "name": "hnae"}, lambda *a: phases.append(a[0]))
    assert hnae_result["compiled"] is True and phases[0] == "compile" and hnae_result["train_seconds"][0] > 0
    lstm_result = perf_measure.measure_training({**base, "name": "lstm"}, lambda *a: None)
    assert lstm_result["compiled"] is False
