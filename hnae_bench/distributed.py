"""Data-parallel training under ``torchrun``: which rank this is, and the few collectives the trainer needs.

``torchrun --nproc-per-node N -m hnae train ...`` starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. The trainer then wraps the
model in ``DistributedDataParallel`` (gloo on the CPU, nccl on CUDA).

The global batch is defined independently of the number of ranks: every rank
draws the same global batch from the same generator and trains on its own
contiguous slice of it. DDP averages the gradients, so N ranks compute the
same update as one process with the whole batch (up to float summation
order), and a checkpoint written by rank 0 resumes any number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # whether this context initialised the process group (and so tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics and checkpoints and shows the progress bar."""
        return self.rank == 0

    def batch_slice(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` rows."""
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {self.world_size}")
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Average a dict of floats over the ranks (same keys on every rank)."""
        if not self.enabled:
            return dict(values)
        names = sorted(values)
        packed = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)  # (K,)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return {name: (packed[i] / self.world_size).item() for i, name in enumerate(names)}

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on some rank (keeps stopping decisions in step)."""
        if not self.enabled:
            return flag
        packed = torch.tensor([1.0 if flag else 0.0], device=device)  # (1,)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        return bool(packed.item() > 0)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def setup(device: str) -> tuple[DistributedContext, torch.device]:
    """Read torchrun's environment, start the process group when WORLD_SIZE > 1, pick this rank's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} do not describe a valid process group")
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch.cuda.is_available() is False; use device='cpu'")
        if chosen.index is None:  # each rank takes its own GPU
            chosen = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(chosen)
    started_here = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
        started_here = True
    return DistributedContext(rank, world_size, local_rank, started_here), chosen


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (nothing when not distributed): ranks that end together tear down together,
    where one that destroyed its process group while a peer still worked (rank 0 evaluating alone)
    could abort the run at exit."""
    if context.enabled:
        dist.barrier()


def teardown(context: DistributedContext) -> None:
    if context.started_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, context: DistributedContext, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else the model itself."""
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
