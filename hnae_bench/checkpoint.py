"""Crash-safe training checkpoints: safetensors for tensors, JSON for the rest.

Layout of a run directory ``out/``::

    out/config.json         the run's configuration
    out/metrics.jsonl       one JSON object per evaluation
    out/latest              one line: the name of the newest complete checkpoint
    out/ckpt-000200/        one checkpoint, complete before ``latest`` names it
        model.safetensors       the model's state_dict
        optimizer.safetensors   the optimizer's per-parameter tensors (Adam moments, step)
        optimizer.json          the optimizer's param_groups and non-tensor state
        rng.safetensors         generator states (training data, torch CPU, CUDA)
        state.json              progress: step, seconds, curriculum rung, metrics so far
        config.json             the training and model configuration

Writing never leaves an unloadable latest checkpoint, whenever the process
dies: every file goes to a temporary directory ``.ckpt-000200.tmp`` and is
fsynced, the directory is renamed to ``ckpt-000200``, and only then is
``latest`` replaced atomically (temporary file, fsync, ``os.replace``). The
previous checkpoint is deleted only after ``latest`` names the new one.
Nothing here loads a pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

LATEST = "latest"
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)$")
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed; the message names the file."""


@dataclass
class Checkpoint:
    """Everything a run needs to continue exactly where it stopped."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict  # as torch.optim.Optimizer.state_dict() returns it
    rng_state: dict[str, torch.Tensor]  # name -> uint8 state tensor
    state: dict  # JSON-able progress
    config: dict  # JSON-able configuration


# --------------------------------------------------------------------------- atomic files


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the file is not yet visible as a checkpoint)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(temporary, data)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_directory(path.parent)


def atomic_write_json(path: str | os.PathLike, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike):
    """Parse a JSON file; a missing or malformed file raises CheckpointError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON, the file is truncated or corrupt ({error})") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file raises CheckpointError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    try:
        return safetensors_load(data)
    except Exception as error:  # safetensors raises its own SafetensorError and sometimes others
        raise CheckpointError(f"{path}: not a valid safetensors file, it is truncated or corrupt ({error})") from None


# --------------------------------------------------------------------------- metrics log


def append_metrics(out_dir: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to ``out_dir/metrics.jsonl``."""
    with open(Path(out_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(out_dir: str | os.PathLike, step: int) -> None:
    """Keep the records up to ``step``: a killed run may have logged past its last checkpoint."""
    path, kept = Path(out_dir) / METRICS_FILE, []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line, torn by the kill
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


# --------------------------------------------------------------------------- optimizer state


def _tensors_for_saving(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies that share no storage (safetensors refuses shared or tied tensors)."""
    return {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in tensors.items()}


def split_optimizer_state(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (``'<param>.<key>'``) and JSON-able values."""
    tensors, scalars = {}, {}
    for parameter_index, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{parameter_index}.{key}"] = value
            else:
                scalars.setdefault(str(parameter_index), {})[key] = value
    return _tensors_for_saving(tensors), {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], json_part: dict, source: Path) -> dict:
    """Inverse of ``split_optimizer_state``; ``source`` names the file in errors."""
    if not isinstance(json_part, dict) or not isinstance(json_part.get("param_groups"), list):
        raise CheckpointError(f"{source}: expected an object with a 'param_groups' list")
    state: dict[int, dict] = {}
    try:
        for name, tensor in tensors.items():
            parameter_index, key = name.split(".", 1)
            state.setdefault(int(parameter_index), {})[key] = tensor
        for parameter_index, entry in json_part.get("scalars", {}).items():
            state.setdefault(int(parameter_index), {}).update(entry)
    except (ValueError, AttributeError) as error:
        raise CheckpointError(f"{source}: malformed optimizer state ({error})") from None
    return {"state": state, "param_groups": json_part["param_groups"]}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``out_dir/latest`` names, or None when there is no pointer yet."""
    pointer = Path(out_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not CHECKPOINT_NAME.match(name):
        raise CheckpointError(f"{pointer}: expected a checkpoint name like 'ckpt-000200', got {name!r}")
    path = pointer.parent / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {name!r}, but {path} does not exist")
    return path


def save_checkpoint(out_dir: str | os.PathLike, step: int, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write ``checkpoint`` as ``out_dir/ckpt-<step>`` and point ``latest`` at it.

    Keeps the ``keep`` newest checkpoints up to ``step``. Saving again at the step ``latest``
    already names leaves that checkpoint as it is (training state at a given
    step is the same), so ``latest`` never points at a half-replaced directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = out_dir / name
    current = latest_checkpoint(out_dir)
    if current is not None and current.name == name:
        return final
    for leftover in out_dir.glob(".ckpt-*.tmp"):  # an earlier writer died mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = out_dir / f".{name}.tmp"
    temporary.mkdir()

    optimizer_tensors, optimizer_json = split_optimizer_state(checkpoint.optimizer_state)
    files = {
        MODEL_FILE: safetensors_save(_tensors_for_saving(checkpoint.model_state)),
        OPTIMIZER_TENSORS_FILE: safetensors_save(optimizer_tensors),
        OPTIMIZER_JSON_FILE: json.dumps(optimizer_json, indent=1).encode(),
        RNG_FILE: safetensors_save(_tensors_for_saving(checkpoint.rng_state)),
        STATE_FILE: json.dumps(checkpoint.state, indent=1).encode(),
        CONFIG_FILE: json.dumps(checkpoint.config, indent=2, sort_keys=True, default=str).encode(),
    }
    for file_name, data in files.items():
        _write_file(temporary / file_name, data)
    _fsync_directory(temporary)
    if final.exists():  # a stale copy that ``latest`` never named (the writer died after the rename)
        shutil.rmtree(final)
    os.rename(temporary, final)
    _fsync_directory(out_dir)
    atomic_write_bytes(out_dir / LATEST, (name + "\n").encode())

    # Older ones beyond ``keep`` go; newer ones are leftovers of a run that died and was resumed earlier.
    kept = [path for path in list_checkpoints(out_dir) if int(CHECKPOINT_NAME.match(path.name).group(1)) <= step]
    for old in set(list_checkpoints(out_dir)) - set(kept[-keep:]):
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory; any bad file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    optimizer_json_path = path / OPTIMIZER_JSON_FILE
    optimizer_state = join_optimizer_state(
        read_safetensors(path / OPTIMIZER_TENSORS_FILE), read_json(optimizer_json_path), optimizer_json_path
    )
    state, config = read_json(path / STATE_FILE), read_json(path / CONFIG_FILE)
    for file_name, value in ((STATE_FILE, state), (CONFIG_FILE, config)):
        if not isinstance(value, dict):
            raise CheckpointError(f"{path / file_name}: expected a JSON object, got {type(value).__name__}")
    return Checkpoint(
        model_state=read_safetensors(path / MODEL_FILE),
        optimizer_state=optimizer_state,
        rng_state=read_safetensors(path / RNG_FILE),
        state=state,
        config=config,
    )
