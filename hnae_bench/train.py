"""The training loop behind ``hnae train``: Adam, gradient clipping, evaluation, checkpoints, curriculum.

``train(TrainConfig(...))`` trains one model on one task and returns a
``TrainResult``. With ``out`` set it writes ``config.json``, ``metrics.jsonl``
(one JSON object per evaluation) and crash-safe checkpoints (see
``checkpoint.py``). A run resumed from a checkpoint ends with the same weights
and evaluation metrics as an uninterrupted one, bit for bit on the CPU with a
step budget: the checkpoint holds the data generator, torch's RNG, the
optimizer, the step, the curriculum rung and the elapsed time.

Data: training batches come from one generator seeded with ``seed``;
evaluation batches from a fresh generator per evaluation, seeded from ``seed``
and the rung's length in a range training seeds never take, so the held-out
batches are the same at every evaluation of a rung and never training data.

Under ``torchrun`` the model is wrapped in DistributedDataParallel and each
rank trains on its slice of the same global batch (see ``distributed.py``);
rank 0 alone writes files. Ctrl-C stops at the next step boundary, after a
final evaluation and checkpoint; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hnae_bench import distributed
from hnae_bench.checkpoint import (
    STATE_FILE, Checkpoint, CheckpointError, append_metrics, atomic_write_json, latest_checkpoint, load_checkpoint,
    save_checkpoint, truncate_metrics,
)
from hnae_bench.curriculum import Curriculum, build_ladder
from hnae_bench.length_generalisation import evaluate_at_length
from hnae_bench.models import build_model, count_parameters
from hnae_bench.tasks import make_task
from hnae_bench.train_config import TrainConfig, TrainResult

__all__ = ["TrainConfig", "TrainResult", "train", "eval_seed"]

GRADIENT_CLIP_NORM = 1.0
# Fields a resumed run must share with the run that wrote the checkpoint.
RESUME_MUST_MATCH = ("task", "seq_len", "model", "preset", "batch_size", "lr", "seed", "curriculum", "ladder",
                     "task_options", "length_jitter", "lr_plateau", "positions",
                     "short_conv", "event_counters", "count_penalty")
# What a checkpoint written before a field existed trained with.
MISSING_IN_OLDER_CHECKPOINTS = {"length_jitter": 0, "lr_plateau": 0, "count_penalty": TrainConfig.count_penalty}


GENERALISE_SEQUENCES = 16  # sequences per --generalise length
WRITE_PENALTY_WEIGHT = 0.01  # learned write policies: small, or Adam shuts every gate first


def eval_seed(seed: int, seq_len: int) -> int:
    """Seed of the held-out batches of one rung; training seeds stay below 2**31, these start at 2**32."""
    return (seed + 1) * 2**32 + seq_len


class _StopRequest:
    """While active, a first Ctrl-C asks the loop to stop at the next step boundary; a second one interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """One run's model, optimizer, data generator and progress; ``run()`` trains until a budget ends."""

    def __init__(self, config: TrainConfig, context: distributed.DistributedContext, device: torch.device):
        self.config, self.context, self.device = config, context, device
        self.rows = self.context.batch_slice(config.batch_size)
        self.out = None if config.out is None else Path(config.out)
        self.curriculum = Curriculum(build_ladder(config.seq_len, config.curriculum, config.ladder))
        self.task = make_task(config.task, self.curriculum.seq_len, **config.task_options)
        longest = make_task(config.task, config.seq_len, **config.task_options).total_length  # the last rung's T
        torch.manual_seed(config.seed)
        options = {"hnae_options": config.hnae_options()} if config.hnae_options() else {}
        self.model = build_model(config.model, self.task, config.preset, max_len=longest, **options).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.lr_schedule = None if config.lr_plateau == 0 else torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=0.5, patience=config.lr_plateau, min_lr=config.lr / 1024)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.step, self.seconds, self.train_seconds, self.tokens = 0, 0.0, 0.0, 0
        self.loss_sum, self.loss_count = 0.0, 0  # training loss since the last evaluation
        self.last_metrics, self.last_eval_step, self.last_eval_seq_len = {}, -1, None
        self.started_from = 0
        self._prepare_out_dir()
        self.wrapped = distributed.wrap_model(self.model, self.context, self.device)

    # ----------------------------------------------------------------- run directory and checkpoints

    def _say(self, message: str) -> None:
        if self.config.progress and self.context.is_main:
            tqdm.write(message, file=sys.stderr)

    def _prepare_out_dir(self) -> None:
        if self.out is None:
            return
        path = latest_checkpoint(self.out) if self.out.is_dir() else None
        if path is not None and not self.config.resume:
            raise CheckpointError(f"out={str(self.out)!r} already holds a checkpoint ({path.name}); "
                             f"resume it with resume=True (--resume) or choose another out")
        if path is not None:
            self._restore(path)
            self._say(f"resumed from {path} at step {self.step}")
        elif self.config.resume:
            self._say(f"no checkpoint in {self.out}; starting from step 0")
        if self.context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", self._config_record())
            truncate_metrics(self.out, self.step)

    def _config_record(self) -> dict:
        return {"train": self.config.to_json(), "model_name": getattr(self.model, "model_name", self.config.model),
                "model_config": getattr(self.model, "model_config", None)}

    def _state(self) -> dict:
        return {"step": self.step, "seconds": self.seconds, "train_seconds": self.train_seconds,
                "tokens": self.tokens, "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "last_metrics": self.last_metrics, "last_eval_step": self.last_eval_step,
                "last_eval_seq_len": self.last_eval_seq_len,
                "curriculum": self.curriculum.state_dict(),
                "lr_schedule": None if self.lr_schedule is None else self.lr_schedule.state_dict()}

    def save(self) -> None:
        if self.out is None or not self.context.is_main:
            return
        rng = {"data": self.data_generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint = Checkpoint(self.model.state_dict(), self.optimizer.state_dict(), rng, self._state(),
                                self._config_record())
        save_checkpoint(self.out, self.step, checkpoint)

    def _restore(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        saved = checkpoint.config.get("train", {})
        for name in RESUME_MUST_MATCH:
            if saved.get(name, MISSING_IN_OLDER_CHECKPOINTS.get(name)) != self.config.to_json()[name]:
                raise CheckpointError(f"cannot resume {path}: it was trained with {name}={saved.get(name)!r}, "
                                 f"this run asks for {name}={self.config.to_json()[name]!r}")
        try:
            self.model.load_state_dict(checkpoint.model_state)
        except RuntimeError as error:
            raise CheckpointError(f"{path / 'model.safetensors'}: does not fit the model ({error})") from None
        try:
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
            self.data_generator.set_state(checkpoint.rng_state["data"])
            torch.set_rng_state(checkpoint.rng_state["torch"])
            if "cuda" in checkpoint.rng_state and self.device.type == "cuda":
                torch.cuda.set_rng_state(checkpoint.rng_state["cuda"], self.device)
            state = checkpoint.state
            self.step, self.seconds, self.train_seconds = int(state["step"]), state["seconds"], state["train_seconds"]
            self.tokens, self.loss_sum, self.loss_count = state["tokens"], state["loss_sum"], state["loss_count"]
            self.last_metrics, self.last_eval_step = state["last_metrics"], state["last_eval_step"]
            self.last_eval_seq_len = state["last_eval_seq_len"]
            self.curriculum.load_state_dict(state["curriculum"])
            if self.lr_schedule is not None:
                self.lr_schedule.load_state_dict(state["lr_schedule"])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{path}: optimizer, RNG or {STATE_FILE} state is malformed "
                                  f"({type(error).__name__}: {error})") from None
        self.task = make_task(self.config.task, self.curriculum.seq_len, **self.config.task_options)
        self.started_from = self.step

    # ----------------------------------------------------------------- training and evaluation

    def _batch(self, generator: torch.Generator, task=None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (task or self.task).sample(self.config.batch_size, generator)  # x (B, T, in): the global batch
        return x[self.rows].to(self.device), y[self.rows].to(self.device)  # this rank's rows

    def _training_task(self):
        """The rung's task, or with length_jitter the task at a length drawn from [T - jitter, T]."""
        jitter = min(self.config.length_jitter, self.task.seq_len - 1)
        if jitter == 0:
            return self.task
        shorter = int(torch.randint(0, jitter + 1, (1,), generator=self.data_generator))
        return make_task(self.config.task, self.task.seq_len - shorter, **self.config.task_options)

    def train_step(self) -> torch.Tensor:
        task = self._training_task()
        x, y = self._batch(self.data_generator, task)
        output = self.wrapped(x)  # (B_rank, T, out)
        loss = task.loss(output, y) + WRITE_PENALTY_WEIGHT * self.model.write_penalty()
        if self.config.count_penalty:
            loss = loss + self.config.count_penalty * self.model.count_penalty()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRADIENT_CLIP_NORM)
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        generator = torch.Generator().manual_seed(eval_seed(self.config.seed, self.task.seq_len))
        self.model.eval()
        totals: dict[str, float] = {}
        for _ in range(self.config.eval_batches):
            x, y = self._batch(generator)
            for name, value in self.task.metrics(self.model(x), y).items():
                totals[name] = totals.get(name, 0.0) + float(value)
        self.model.train()
        return self.context.mean({k: v / self.config.eval_batches for k, v in totals.items()}, self.device)

    def evaluate_and_log(self, scheduled: bool = True) -> None:
        """Evaluate, append to metrics.jsonl and feed the curriculum; ``scheduled`` is False for the
        extra evaluation at the end of a run, which changes nothing a resumed run depends on."""
        metrics, seq_len = self.evaluate(), self.task.seq_len
        solved = bool(self.task.is_solved(metrics))
        train_loss = self.context.mean({"loss": self.loss_sum / max(self.loss_count, 1)}, self.device)["loss"]
        self.last_metrics, self.last_eval_step, self.last_eval_seq_len = metrics, self.step, seq_len
        if scheduled:
            self.loss_sum, self.loss_count = 0.0, 0
        if scheduled and self.lr_schedule is not None and seq_len == self.config.seq_len:
            self.lr_schedule.step(metrics["loss"])  # the last rung only: each rung's loss has its own scale
        record = {"step": self.step, "seconds": self.seconds, "seq_len": seq_len, "train_loss": train_loss,
                  "eval": metrics, "solved": solved, "tokens_per_second": self.tokens_per_second,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        if self.out is not None and self.context.is_main:
            append_metrics(self.out, record)
        if self.curriculum.record_evaluation(solved, self.step, self.seconds, metrics, advance=scheduled):
            self.task = make_task(self.config.task, self.curriculum.seq_len, **self.config.task_options)
            self._say(f"step {self.step}: solved T={seq_len}, moving up to T={self.task.seq_len}")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def _out_of_budget(self) -> bool:
        config = self.config
        return ((config.steps is not None and self.step >= config.steps)
                or (config.time_budget is not None and self.seconds >= config.time_budget)
                or (config.stop_when_solved and self.curriculum.finished))

    def _eta(self) -> str:
        rate = (self.seconds - self.resumed_seconds) / max(self.step - self.started_from, 1)  # seconds per step
        estimates = []
        if self.config.steps is not None:
            estimates.append((self.config.steps - self.step) * rate)
        if self.config.time_budget is not None:
            estimates.append(self.config.time_budget - self.seconds)
        remaining = max(min(estimates), 0.0)
        return f"{int(remaining // 60)}:{int(remaining % 60):02d}"

    def run(self) -> TrainResult:
        config, start = self.config, time.perf_counter()
        self.resumed_seconds = self.seconds
        bar = tqdm(total=config.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (config.progress and self.context.is_main))
        with bar, _StopRequest() as stop:
            while not self.context.any(self._out_of_budget() or stop.requested, self.device):
                step_start = time.perf_counter()
                loss = self.train_step()
                self.loss_sum, self.loss_count = self.loss_sum + loss.item(), self.loss_count + 1
                self.step += 1
                self.tokens += config.batch_size * self.task.total_length
                self.train_seconds += time.perf_counter() - step_start
                self.seconds = self.resumed_seconds + time.perf_counter() - start
                if self.step % config.eval_every == 0:
                    self.evaluate_and_log()
                if self.step % config.checkpoint_every == 0:
                    self.save()
                bar.update(1)
                shown = {"loss": f"{loss.item():.4f}", "T": self.task.seq_len,
                         "tok/s": f"{self.tokens_per_second:,.0f}", "eta": self._eta()}
                for name in ("accuracy", "mse"):
                    if name in self.last_metrics:
                        shown[name[:3]] = f"{self.last_metrics[name]:.4f}"
                bar.set_postfix(shown, refresh=False)
            if self.last_eval_step != self.step:
                self.evaluate_and_log(scheduled=False)
            self.save()
        if stop.requested:
            self._say(f"interrupted at step {self.step}; checkpoint written" if self.out else "interrupted")
            raise KeyboardInterrupt
        generalisation = self.generalise()
        return TrainResult(
            config=config, rungs=self.curriculum.rung_records(), generalisation=generalisation,
            final_metrics=dict(self.last_metrics), longest_solved=self.curriculum.longest_solved(), steps=self.step,
            seconds=self.seconds, tokens_per_second=self.tokens_per_second,
            parameters=count_parameters(self.model), model=self.model, task=self.task,
            final_seq_len=self.last_eval_seq_len)


    def generalise(self) -> list[dict]:
        """The trained model at the lengths of ``config.generalise`` (logged, rank 0 only)."""
        records = []
        if not self.context.is_main:
            return records
        for length in self.config.generalise:
            record = evaluate_at_length(self.model, self.config.task, length, sequences=GENERALISE_SEQUENCES,
                                        device=str(self.device), task_options=self.config.task_options,
                                        seed=eval_seed(self.config.seed, length))
            records.append(record)
            if self.out:
                append_metrics(self.out, {"event": "generalisation", "step": self.step, **record})
        return records


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.task``; see the module docstring."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    context, device = distributed.setup(config.device)
    try:
        result = Trainer(config, context, device).run()
        distributed.barrier(context)
        return result
    finally:
        distributed.teardown(context)
