"""The issue's performance targets, read from a ``hnae bench perf`` result: PASS, MISS or N/A.

A MISS says by how much it falls short; an N/A says why there is no number
(not in this run, not measured, or only a bound that decides nothing). The
CPU targets apply to CPU runs, the GPU target (hnae >= 10x cuDNN nn.LSTM at
T = 4k) to CUDA runs.
"""
from __future__ import annotations

from hnae_bench.report import format_number

NOT_RUN = "not run"               # the status prefix of what an interrupted run never reached
STREAM_REFERENCE = "hnae-2x128"   # perf_models.REFERENCE_STEP_MODEL (not imported: this module reads results only)
STREAM_REFERENCE_COMPILED = "hnae-2x128-compiled"   # the same model through HNAE.compile_step


def short_number(value) -> str:
    """12,811 for large figures, 3 significant digits for small ones, '-' for missing."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"



def _target(text: str, value, threshold: float, at_least: bool, detail: str = "", unit: str = "x") -> dict:
    """PASS / MISS of ``value`` against ``threshold``, saying by how much a miss falls short; N/A without a value."""
    if value is None:
        return {"target": text, "status": "N/A", "value": None, "threshold": threshold, "detail": detail}
    passed = value >= threshold if at_least else value <= threshold
    close = abs(value / threshold - 1) < 0.01   # near the line: one more digit, so a miss never reads "by 0%"
    shown = (f"{value:.{1 if close else 0}%}" if unit == "%" else
             f"{value:.4g}{unit}" if close else f"{short_number(float(value))}{unit}")
    if not passed:
        gap = 1 - value / threshold if at_least else value / threshold - 1
        shown += f", {'short' if at_least else 'over'} by {gap:.{1 if close else 0}%}"
    return {"target": text, "status": "PASS" if passed else "MISS", "value": value, "threshold": threshold,
            "detail": f"measured {shown}" + (f" ({detail})" if detail else "")}


def _training_ratio_target(results: dict, peer: str, steps: int, threshold: float) -> dict:
    text = f"hnae training tokens/s at T={steps:,} >= {threshold:g}x {peer}"
    training = results.get("training", {})
    hnae, other = training.get("hnae", {}).get(str(steps)), training.get(peer, {}).get(str(steps))
    if hnae is None or other is None:
        return _target(text, None, threshold, True, f"hnae and {peer} at T={steps:,} are not both in this run")
    if "summary" not in hnae:   # hnae failed here (a MISS), unless the run stopped before it
        return _target(text, None if hnae["status"].startswith(NOT_RUN) else 0.0, threshold, True,
                       f"hnae: {hnae['status']}")
    fast = hnae["summary"]["train_tokens_per_second"]
    if "summary" in other:
        slow = other["summary"]["train_tokens_per_second"]
        return _target(text, fast / slow, threshold, True, f"hnae {fast:,.0f} vs {peer} {slow:,.0f} tokens/s")
    if other["status"] == "timeout" or other["status"].startswith("skipped: slower"):   # a lower bound only
        bound = fast * results["settings"]["max_seconds"] / (results["settings"]["batch_size"] * steps)
        return {"target": text, "status": "PASS" if bound >= threshold else "N/A", "value": bound,
                "threshold": threshold, "detail": f"measured >= {bound:.3g}x ({peer} {other['status']}: a lower "
                f"bound from the {results['settings']['max_seconds']:g} s cap" + (")" if bound >= threshold else
                                                                                 "; undecided, raise --max-seconds)")}
    return _target(text, None, threshold, True, f"{peer}: {other['status']}")


def needed_utilisation(results: dict, peer: str, steps: int, threshold: float) -> float | None:
    """The share of the matmul peak hnae must reach, at its FLOPs per token in this run, to train
    ``threshold`` times as many tokens/s as ``peer`` at T = ``steps``; None without the counts."""
    training = results.get("training", {})
    hnae = training.get("hnae", {}).get(str(steps), {}).get("summary", {})
    other = training.get(peer, {}).get(str(steps), {}).get("summary", {})
    peak = results.get("matmul_peak", {}).get("flops_per_second")
    if not (hnae.get("flops_per_token") and other.get("train_tokens_per_second") and peak):
        return None
    return threshold * other["train_tokens_per_second"] * hnae["flops_per_token"] / peak


def _memory_spread_target(hnae: dict, key: str, what: str) -> dict:
    """Peak training memory per token (``key`` of hnae's summaries) within 10% from T = 4k to 64k: max / min."""
    per_token = {int(t): e["summary"].get(key) for t, e in hnae.items()
                 if "summary" in e and 4096 <= int(t) <= 65_536 and e["summary"].get(key)}
    spread = max(per_token.values()) / min(per_token.values()) if {4096, 65_536} <= set(per_token) else None
    return _target(f"hnae peak training memory per token within 10% from T=4,096 to T=65,536 (max/min; {what})",
                   spread, 1.10, False, ", ".join(f"T={t:,}: {b:,.0f} B" for t, b in sorted(per_token.items()))
                   or "not measured at both ends")


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's targets for this run's device, each PASS, MISS (with the shortfall) or N/A (with why)."""
    settings, training = results["settings"], results.get("training", {})
    hnae = training.get("hnae", {})
    if settings["device"].startswith("cuda"):
        return [_training_ratio_target(results, "lstm", 4096, 10.0)]
    targets = [_training_ratio_target(results, "lstm", 4096, 1.0), _training_ratio_target(results, "tcn", 4096, 3.0),
               _training_ratio_target(results, "transformer", 16_384, 10.0)]
    needed = needed_utilisation(results, "tcn", 4096, 3.0)
    if targets[1]["status"] == "MISS" and needed is not None:   # how far the target is from what the machine allows
        targets[1]["detail"] += (f"; at hnae's FLOPs per token it needs {needed:.0%} of the matmul peak "
                                 f"(measured {results['training']['hnae']['4096']['summary']['mfu']:.0%})")
    longest = hnae.get("65536")
    undecided = longest is None or longest["status"].startswith(NOT_RUN)
    targets.append({"target": "hnae completes training at T=65,536", "threshold": None,
                    "status": "N/A" if undecided else "PASS" if longest["status"] == "ok" else "MISS",
                    "value": None if longest is None else longest["status"] == "ok",
                    "detail": "T=65,536 not in this run" if longest is None else f"status {longest['status']}"})
    at_4k = hnae.get("4096", {}).get("summary", {})
    targets.append(_target("hnae model FLOP utilisation in training at T=4,096 >= 60% of the matmul peak",
                           at_4k.get("mfu"), 0.60, True, "not measured" if at_4k.get("mfu") is None else
                           f"{format_number(at_4k['model_flops_per_second'])} FLOP/s of "
                           f"{format_number(results['matmul_peak']['flops_per_second'])}", unit="%"))
    for key, what in (("train_bytes_per_token", "resident set, VmHWM"),
                      ("train_allocated_bytes_per_token", "bytes allocated by PyTorch, as on a GPU")):
        targets.append(_memory_spread_target(hnae, key, what))
    streaming = results.get("streaming", {})
    stream = streaming.get("hnae", {}).get("summary")
    targets.append(_target(f"hnae streaming latency at t={stream['positions'][-1]:,} / at t={stream['positions'][0]:,}"
                           " <= 1.1" if stream else "hnae streaming latency at t=100,000 / at t=1,000 <= 1.1",
                           stream["latency_last_over_first"] if stream else None, 1.1, False,
                           "" if stream else "not measured"))
    # the reference model streams eagerly and through HNAE.compile_step: the faster of the two counts
    references = {name: streaming[name]["summary"] for name in (STREAM_REFERENCE, STREAM_REFERENCE_COMPILED)
                  if "summary" in streaming.get(name, {})}
    latency = {name: max(summary["latency_seconds"]) * 1e3 for name, summary in references.items()}
    targets.append(_target(f"{STREAM_REFERENCE} step at batch 1 <= 1 ms (slowest position)",
                           min(latency.values(), default=None), 1.0, False,
                           "; ".join(f"{name} {value:.2f} ms" for name, value in latency.items()) or "not measured",
                           unit=" ms"))
    rate = {name: summary["batch_tokens_per_second"] for name, summary in references.items()}
    targets.append(_target(f"{STREAM_REFERENCE} streams >= 20,000 tokens/s at batch {settings['stream_batch']}",
                           max(rate.values(), default=None), 20_000, True,
                           "; ".join(f"{name} {value:,.0f}" for name, value in rate.items()) or "not measured",
                           unit=" tokens/s"))
    return targets


def target_lines(results: dict) -> list[str]:
    """'PASS: <target>: measured ...' per target."""
    return [f"{t['status']}: {t['target']}: {t['detail']}" for t in results.get("targets", [])]
