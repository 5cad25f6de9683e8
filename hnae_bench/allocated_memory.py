"""Peak bytes that PyTorch's CPU allocator holds over a block: the CPU's ``max_memory_allocated``.

On a GPU, ``hnae bench perf`` reports ``torch.cuda.max_memory_allocated``: the
bytes of live tensors at their peak. On the CPU it reports the peak resident set
(VmHWM), which also holds memory that the C library's malloc keeps after the
tensors in it were freed (how much depends on the allocator and on the order
of allocations, not on the model alone). This module gives the CPU the GPU's
figure as well: the profiler records every allocation and free of PyTorch's
CPU allocator with its time (``profile_memory=True``), and the peak is the
largest running sum of those sizes.

What it cannot see: a free of a block allocated before the measurement began
(the profiler knows no size for it, so the figure is too high by at most those
blocks; free the previous call's gradients before measuring), and memory that
a library allocates without PyTorch's allocator (oneDNN's own scratch, if any).
"""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: the profiler's start and stop print to it from C++."""
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _allocation_sizes(profiler) -> list[tuple[int, int]]:
    """(time in ns, bytes: + allocated, - freed) of every CPU allocator event the profiler saw, in time order."""
    from torch._C._profiler import _EventType   # private, as torch.profiler's own memory profiler uses it
    events, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    return sorted(events)


@contextlib.contextmanager
def allocated_peak():
    """Yields a dict that gets 'delta': the peak bytes allocated through PyTorch's CPU allocator during
    the block above those allocated at its start (None, with 'error', where the profiler failed)."""
    record: dict = {}
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.start()
    try:
        yield record
    finally:
        with _quiet_stderr():
            profiler.stop()
    try:
        running = peak = 0
        for _, size in _allocation_sizes(profiler):
            running += size
            peak = max(peak, running)
        record["delta"] = peak
    except Exception as error:  # noqa: BLE001 - a private API of the profiler: the run goes on without this figure
        record["delta"], record["error"] = None, f"{type(error).__name__}: {error}"
