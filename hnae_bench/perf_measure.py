"""What ``hnae bench perf`` measures: the jobs a measurement's child process runs.

``hnae_bench.perf_isolation`` runs ``JOBS[job["kind"]](job, phase)`` in a fresh
process; a job calls ``phase(name[, results so far])`` as it enters each timed
phase (so that each call's time can be capped) and returns one result dict.

- ``measure_training``: forward + backward of a mean-square loss at (B, T) and its
  peak memory, a no-grad forward and its peak memory, the model FLOPs.
- ``measure_streaming``: one ``step``'s latency at stream positions (each state
  prefilled in one parallel call), and at a large batch.
- ``measure_matmul_peak``: FLOP/s of a large square matmul, the yardstick of MFU.

Dimension letters: B batch, T time steps, C input features, D width, K outputs.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import resource
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from hnae_bench.allocated_memory import allocated_peak
from hnae_bench.perf_models import load_job_model

WARMUP_STEPS = 256                    # the warm-up call's T: kernels and allocator warmed, memory peak not reached
DTYPES = {"fp32": None, "bf16": torch.bfloat16}   # None: no autocast


# ---- timing, memory and precision ------------------------------------------------------------

def autocast(device: str, dtype: str):
    """bf16 autocast on ``device``'s type, or nothing for fp32."""
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: str) -> float:
    """Seconds of one call of ``function()``, the device's queue drained on both sides."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def timed_calls(function, device: str, min_seconds: float, max_calls: int, times=()) -> list[float]:
    """Seconds of each call, ``times`` (calls made already) and more until ``min_seconds`` or ``max_calls``."""
    times = list(times)
    while not times or (len(times) < max_calls and sum(times) < min_seconds):
        times.append(timed(function, device))
    return times


def status_kilobytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Give freed heap memory back to the system, so that the resident set is what is in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: str):
    """Yields a dict that gets 'delta' (peak bytes during the block above those held at its start),
    'allocated' (the same for bytes of PyTorch's allocator alone) and 'method'.

    CUDA: both are ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU:
    'delta' is the peak resident set (VmHWM, reset through /proc/self/clear_refs)
    minus the resident set at entry, freed memory given back first (where the peak
    cannot be reset, the process's ``ru_maxrss``: right for the first large call of
    a fresh process); 'allocated' comes from the profiler's memory records
    (``hnae_bench.allocated_memory``), so it leaves out what malloc keeps after a free.
    """
    record: dict = {}
    synchronize(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base, record["method"] = torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated - before"
        allocated = contextlib.nullcontext({})
    else:
        _release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")   # 5: reset the peak resident set to the current one
            record["method"] = "VmHWM (reset by /proc/self/clear_refs) - VmRSS before"
        except OSError:
            record["method"] = "ru_maxrss (fresh process) - VmRSS before"
        base = (status_kilobytes("VmRSS") or 0) * 1024
        allocated = allocated_peak()
    with allocated as tensors:
        yield record
        synchronize(device)
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif record["method"].startswith("VmHWM"):
        peak = (status_kilobytes("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: kilobytes
    record["delta"] = max(0, peak - base)
    record["allocated"] = record["delta"] if torch.device(device).type == "cuda" else tensors.get("delta")
    if tensors.get("error"):   # the profiler failed: the resident figure stands alone, and says why
        record["method"] += f"; allocated bytes not measured ({tensors['error']})"


# ---- FLOPs --------------------------------------------------------------------------------------

def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels; the CPU flash kernel gets the same formula
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


RECURRENT_FLOP_STEPS = 256   # nn.LSTM / nn.GRU longer than this: counted at 128 and 256 steps, extrapolated


def _count(model: nn.Module, x: torch.Tensor, device: str, dtype: str) -> dict:
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the mkldnn flags context warns about a deprecated TF32 switch
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False), counter:
            with autocast(device, dtype):
                output = model(x)   # (B, T, K)
            forward = counter.get_total_flops()
            output.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    return {"forward": forward, "training": counter.get_total_flops(), "by_op": by_op}


def count_flops(model: nn.Module, x: torch.Tensor, device: str, dtype: str) -> dict:
    """Model FLOPs of one forward and one forward + backward on x (B, T, C): matmuls, convolutions
    and attention (elementwise work is not counted), oneDNN and cuDNN off so that recurrent gates
    run as matmuls the counter sees. A recurrence's count is affine in T, so nn.LSTM and nn.GRU
    over 256 steps are counted at 128 and 256 steps and extrapolated (step by step takes minutes)."""
    steps = x.shape[1]
    recurrent = isinstance(getattr(getattr(model, "body", None), "rnn", None), nn.RNNBase)
    if not recurrent or steps <= RECURRENT_FLOP_STEPS:
        return {**_count(model, x, device, dtype), "counted_steps": [steps]}
    short, long = RECURRENT_FLOP_STEPS // 2, RECURRENT_FLOP_STEPS
    low, high = _count(model, x[:, :short], device, dtype), _count(model, x[:, :long], device, dtype)

    def at_length(a: int, b: int) -> int:
        return round(a + (b - a) * (steps - short) / (long - short))
    return {"forward": at_length(low["forward"], high["forward"]),
            "training": at_length(low["training"], high["training"]),
            "by_op": {op: at_length(low["by_op"].get(op, 0), flops) for op, flops in high["by_op"].items()},
            "counted_steps": [short, long]}


# ---- the jobs -----------------------------------------------------------------------------------

def measure_training(job: dict, phase) -> dict:
    """Training (forward + backward) and parallel inference of one model at (B, T) = (batch_size, seq_len)."""
    device, dtype = job["device"], job["dtype"]
    model = load_job_model(job)
    batch, steps = job["batch_size"], job["seq_len"]
    generator = torch.Generator().manual_seed(job["seed"])
    x = torch.randn(batch, steps, job["input_size"], generator=generator).to(device)   # (B, T, C)

    # --compile: training calls go through torch.compile (one graph at this T); inference and the
    # FLOP count stay eager. nn.LSTM / nn.GRU keep their fused oneDNN / cuDNN kernels.
    compiled = job.get("compile") and getattr(getattr(model, "body", None), "rnn", None) is None
    trained = torch.compile(model, dynamic=False, mode=job["compile"]) if compiled else model

    def train_call(inputs: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            output = trained(inputs)   # (B, T, K)
        output.float().pow(2).mean().backward()

    def inference_call(inputs: torch.Tensor) -> None:
        with torch.no_grad(), autocast(device, dtype):
            model(inputs)

    if compiled:   # one graph, at the full T: the warm-up call compiles it
        phase("compile")
        timed(lambda: train_call(x), device)
    phase("warmup")
    warm = x[:, :min(steps, WARMUP_STEPS)]   # (B, <=256, C)
    if not compiled:
        timed(lambda: train_call(warm), device)
    timed(lambda: inference_call(warm), device)
    result = {"tokens": batch * steps, "threads": torch.get_num_threads(), "compiled": bool(compiled)}
    for kind, call in (("train", train_call), ("inference", inference_call)):
        model.train(kind == "train")
        phase(kind)
        model.zero_grad(set_to_none=True)   # the warm-up's gradients go before, not during, the measurement
        with peak_memory(device) as memory:   # the first full-size call: nothing larger ran before it
            first = timed(functools.partial(call, x), device)
        # The first full-size call also pays for the process's first touch of its memory (page faults
        # in proportion to its footprint); a training loop pays that once. Time the calls after it,
        # unless it took so long that it is the only measurement.
        result[f"{kind}_first_seconds"] = first
        earlier = [first] if first > job["repeat_below"] else []
        result[f"{kind}_seconds"] = timed_calls(functools.partial(call, x), device, job["min_seconds"],
                                                job["max_calls"], earlier)
        result[f"{kind}_peak_bytes"], result["memory_method"] = memory["delta"], memory["method"]
        result[f"{kind}_peak_allocated_bytes"] = memory["allocated"]
        model.zero_grad(set_to_none=True)
    if job["count_flops"] and min(result["train_seconds"]) > job["count_flops_below"]:
        result["flops_skipped"] = f"not counted: a call took over {job['count_flops_below']:g} s"
    elif job["count_flops"]:   # one more forward + backward, slower under the counter
        phase("flops", dict(result))   # over the cap, the count is lost but not the timings
        model.train()
        result["flops"] = count_flops(model, x, device, dtype)
    return result


class Streamer:
    """One step at a time for hnae (``HNAE.step``) and nn.LSTM / nn.GRU (their (h, c) or h state)."""

    def __init__(self, model: nn.Module):
        body = getattr(model, "body", model)
        self.head = getattr(model, "head", nn.Identity())
        self.recurrent = getattr(body, "rnn", None)
        self.encoder = getattr(body, "encoder", body if hasattr(body, "step") else None)
        if self.recurrent is None and self.encoder is None:
            raise ValueError(f"model: {type(body).__name__} has no streaming step (hnae, lstm and gru have)")
        self.compiled = bool(getattr(model, "model_config", {}).get("compiled_step"))
        # hnae steps write into the state they are given (in_place): each timed state is stepped
        # on and never reused, so a copy per step would measure nothing but the copy
        if self.compiled:
            self.encoder_step = self.encoder.compile_step(in_place=True)
        elif self.encoder is not None:
            self.encoder_step = functools.partial(self.encoder.step, in_place=True)
        else:
            self.encoder_step = None

    def prefill(self, x: torch.Tensor, state):
        """x (B, t, C): the state after the stream went through x, in one parallel call."""
        if self.recurrent is not None:
            return self.recurrent(x, state)[1]
        return self.encoder(x, state)[1]

    def step(self, x_t: torch.Tensor, state):
        """x_t (B, C) -> output (B, K), state."""
        if self.recurrent is not None:
            output, state = self.recurrent(x_t.unsqueeze(1), state)   # (B, 1, D)
            return self.head(output[:, 0]), state
        output, state = self.encoder_step(x_t, state)   # (B, D)
        return self.head(output), state

    def warm(self, x_t: torch.Tensor, state) -> None:
        """Steps from a copy of ``state`` until a level-0 block completes: compiles both graphs."""
        state = state.clone()  # the steps write in place
        for _ in range(self.encoder.config.windows[0]):
            _, state = self.step(x_t, state)

    @staticmethod
    def nbytes(state) -> int:
        if hasattr(state, "nbytes") and not isinstance(state, torch.Tensor):
            return int(state.nbytes)
        tensors = state if isinstance(state, tuple) else (state,)
        return sum(t.numel() * t.element_size() for t in tensors)


def measure_streaming(job: dict, phase) -> dict:
    """Median step latency at each stream position (batch 1) and at a large batch.

    Where cuDNN refuses an nn.LSTM / nn.GRU under bf16 autocast, that model streams
    in fp32 instead, and the result says so (``precision``, ``autocast_error``).
    """
    device, dtype = job["device"], job["dtype"]
    streamer = Streamer(load_job_model(job).eval())
    try:
        return {"precision": dtype, **_stream(streamer, job, dtype, phase)}
    except RuntimeError as error:
        if dtype == "fp32" or streamer.recurrent is None or "cudnn" not in str(error).lower():
            raise
        phase("fp32 after a bf16 failure")
        return {"precision": "fp32", "autocast_error": str(error)[:300], **_stream(streamer, job, "fp32", phase)}


def _stream(streamer: Streamer, job: dict, dtype: str, phase) -> dict:
    device, positions = job["device"], job["positions"]
    generator = torch.Generator().manual_seed(job["seed"])

    def features(batch: int, steps: int) -> torch.Tensor:
        return torch.randn(batch, steps, job["input_size"], generator=generator).to(device)   # (B, t, C)

    with torch.no_grad(), autocast(device, dtype):
        states, state, reached = [], None, 0
        for position in positions:   # the stream carried from one position to the next
            phase(f"prefill to {position}")
            state = streamer.prefill(features(1, position - reached), state)
            states.append(state)
            reached = position
        if streamer.compiled:   # compiling is not a step: done once per batch size, before timing
            phase("compile at batch 1")
            streamer.warm(features(1, 1)[:, 0], states[0])
        phase("steps at batch 1")
        latencies = _time_steps(streamer, states, features(1, 1)[:, 0], job, device)   # x_t (1, C)
        batch = job["stream_batch"]
        phase(f"prefill batch {batch}")
        wide = [streamer.prefill(features(batch, positions[0]), None)]
        if streamer.compiled:
            phase(f"compile at batch {batch}")
            streamer.warm(features(batch, 1)[:, 0], wide[0])
        phase(f"steps at batch {batch}")
        [wide_seconds] = _time_steps(streamer, wide, features(batch, 1)[:, 0], job, device)   # x_t (batch, C)
    return {"positions": list(positions), "latency_seconds": latencies, "stream_batch": batch,
            "state_bytes": [streamer.nbytes(s) for s in states], "batch_step_seconds": wide_seconds,
            "batch_state_bytes": streamer.nbytes(wide[0]), "steps_timed": job["steps"],
            "threads": torch.get_num_threads()}


def _time_steps(streamer: Streamer, states: list, x_t: torch.Tensor, job: dict, device: str) -> list[float]:
    """Median seconds of one step of each state (advanced in place), the states taking turns."""
    seconds: list[list[float]] = [[] for _ in states]
    for index in range(job["warmup_steps"] + job["steps"]):
        for slot in range(len(states)):
            started = time.perf_counter()
            _, states[slot] = streamer.step(x_t, states[slot])
            synchronize(device)
            if index >= job["warmup_steps"]:
                seconds[slot].append(time.perf_counter() - started)
    return [statistics.median(s) for s in seconds]


def measure_matmul_peak(job: dict, phase) -> dict:
    """FLOP/s of (n, n) @ (n, n) in the run's precision: the best call and the median call."""
    device, size = job["device"], job["size"]
    element = DTYPES[job["dtype"]] or torch.float32
    a = torch.randn(size, size, device=device, dtype=element)   # (n, n)
    b = torch.randn(size, size, device=device, dtype=element)   # (n, n)
    phase("warmup")
    timed_calls(lambda: a @ b, device, float("inf"), 2)
    phase("matmul")
    seconds = timed_calls(lambda: a @ b, device, job["min_seconds"], job["max_calls"])
    flops = 2 * size ** 3
    tf32 = (torch.backends.cuda.matmul.allow_tf32 if torch.device(device).type == "cuda" else None)
    return {"size": size, "dtype": str(element).removeprefix("torch."), "calls": len(seconds),
            "best_flops_per_second": flops / min(seconds),
            "median_flops_per_second": flops / statistics.median(seconds),
            "cuda_tf32": tf32, "threads": torch.get_num_threads()}


JOBS = {"train": measure_training, "stream": measure_streaming, "matmul": measure_matmul_peak}   # by job["kind"]
