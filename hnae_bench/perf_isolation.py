"""One ``hnae bench perf`` measurement in its own process: both sides of the protocol.

The parent (``run_isolated``) starts a child from a forkserver, watches the
phases it reports and kills it when one phase runs over the cap; the child
(``child_main``) runs ``perf_measure.JOBS[job["kind"]]`` and sends back
('phase', name, partial) messages, then one ('result', dict). A crash, a
timeout or an out-of-memory thus becomes one measurement's status, and no
measurement sees the memory or threads of another. A phase may carry the
results so far (``partial``): a later optional phase that runs over the cap
(the FLOP count) then loses only itself.

Why a forkserver: forking a process after OpenMP ran in it can hang the child;
the server imports torch and the models but never runs torch work.
"""
from __future__ import annotations

import multiprocessing
import resource
import time

import torch

from hnae_bench import perf_measure
from hnae_bench.peers import ModelUnavailable

PEER_MODULES = {"tcn": "pytorch_tcn", "mamba": "mambapy.mamba", "xlstm": "xlstm", "htransformer": "h_transformer_1d"}
LOAD_SECONDS = 120.0   # a child's allowance to start and build its model, before its first timed phase
LATE_MESSAGE_SECONDS = 0.05   # past a deadline, how long the parent still waits for a message already sent


# ---- the parent side ---------------------------------------------------------------------------

def forkserver_context(models) -> multiprocessing.context.BaseContext:
    """The forkserver context, preloading torch, hnae, the measurements and the run's peer packages."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "hnae", "hnae_bench.perf_isolation"]
                                   + [PEER_MODULES[name] for name in models if name in PEER_MODULES])
    return context


def run_isolated(context, job: dict, max_seconds: float, load_seconds: float = LOAD_SECONDS, target=None) -> dict:
    """Run ``job`` in a child process: its result dict, or status 'timeout' / 'oom' / 'error' with an error text.

    Each phase the child reports (warm-up, the timed calls, ...) may take
    ``max_seconds``; starting and building the model, and a phase named
    "compile...", may take ``load_seconds`` more. The result's ``phase_seconds`` gives the wall-clock time of each phase.
    A timeout after a phase that carried partial results returns those, status
    'ok', with ``cut_short`` naming the phase that ran over. ``target``: the
    child's entry, ``child_main`` unless a test stands in for it.
    """
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=target or child_main, args=(sender, job), daemon=True)
    process.start()
    sender.close()

    def allowance(name: str) -> float:   # starting up and compiling get the load allowance on top
        return max_seconds + (load_seconds if name == "start" or name.startswith("compile") else 0)

    phase, result, partial, timed_out, phases = "start", None, None, False, {}
    phase_started = time.monotonic()
    try:
        while result is None:
            remaining = phase_started + allowance(phase) - time.monotonic()
            over = remaining <= 0
            # past the deadline, what is on its way is still read: its time stamp decides
            if receiver.poll(min(remaining, 0.5) if remaining > 0 else LATE_MESSAGE_SECONDS):
                try:
                    message = receiver.recv()
                except EOFError:   # the child died without a result
                    break
                # judged by the child's clock (CLOCK_MONOTONIC is system-wide), so that a busy parent reading
                # late neither cuts a phase that kept to the cap nor passes one that did not
                sent = message[3] if len(message) > 3 else time.monotonic()
                over = sent - phase_started > allowance(phase)
                if not over and message[0] == "phase":
                    phases[phase] = sent - phase_started
                    phase, phase_started, partial = message[1], sent, message[2] or partial
                elif not over:
                    result, phase_ended = message[1], sent
            elif not over and not process.is_alive() and not receiver.poll(0):
                break
            if over:
                timed_out, phase_ended = True, time.monotonic()
                cut = f"{phase} ran over the {max_seconds:g} s cap"
                result = {"status": "timeout", "error": cut} if partial is None else {
                    "status": "ok", **partial, "cut_short": cut}
    finally:   # a timeout or an interrupt ends the child at once; a finished one exits by itself
        process.join(timeout=0 if timed_out or result is None else 5)
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
    phases[phase] = (phase_ended if result is not None else time.monotonic()) - phase_started
    if result is None:
        if process.exitcode == -9:
            result = {"status": "oom", "error": f"killed by SIGKILL during {phase} (most likely the kernel's "
                                                "out-of-memory killer)"}
        else:
            result = {"status": "error", "error": f"the measurement process exited with code {process.exitcode} "
                                                  f"during {phase}"}
    return {**result, "phase_seconds": phases}


# ---- the child side ----------------------------------------------------------------------------

def classify_failure(error: BaseException) -> str:
    """'oom', 'unavailable' or 'error' for an exception raised by a measurement."""
    text = str(error).lower()
    if isinstance(error, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
            isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)):
        return "oom"
    if isinstance(error, ModelUnavailable):
        return "unavailable"
    return "error"


def limit_memory(limit_bytes: int | None, device: str) -> None:
    """Cap this process's address space at its size now plus ``limit_bytes`` (CPU runs only), so that
    running out of memory raises in the measurement instead of waking the kernel's OOM killer."""
    if not limit_bytes or torch.device(device).type != "cpu":
        return   # CUDA reserves huge virtual ranges: no address-space cap there
    wanted = (perf_measure.status_kilobytes("VmSize") or 0) * 1024 + limit_bytes
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def child_main(connection, job: dict) -> None:
    """Entry of the child process: run the job, send ('phase', name, partial)... then ('result', dict)."""
    try:
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        limit_memory(job.get("memory_limit_bytes"), job["device"])
        def phase(name: str, partial: dict | None = None) -> None:
            connection.send(("phase", name, partial, time.monotonic()))
        result = {"status": "ok", **perf_measure.JOBS[job["kind"]](job, phase)}
    except BaseException as error:   # noqa: BLE001 - every failure goes back to the parent as a result
        result = {"status": classify_failure(error), "error": f"{type(error).__name__}: {error}".strip()[:2000]}
    try:
        connection.send(("result", result, None, time.monotonic()))
    finally:
        connection.close()
