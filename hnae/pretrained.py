"""Safe, portable models: ``config.json`` + ``model.safetensors``, never a pickle.

    model.save_pretrained("my-model")              # writes the two files below
    model = hnae.HNAE.from_pretrained("my-model")  # the same model, bit for bit

Layout of a saved directory:

    config.json         the ``HNAEConfig`` as a JSON object, plus
                        ``"hnae_format_version": 1`` (the layout of this directory)
    model.safetensors   the ``state_dict`` tensors, by name, in the model's dtype

Loading reads JSON and safetensors only (no ``pickle``, no ``torch.load``), so
a file from anywhere can at worst fail to load; it cannot run code. Every
problem raises ``ValueError`` naming the file and what is wrong with it: bad
JSON, an unknown or missing key, a value of the wrong type, a truncated or
corrupt weights file, tensors missing or left over, or a tensor whose shape
does not fit the configuration (e.g. ``windows`` edited after saving).
A missing file or directory raises ``FileNotFoundError`` naming it.

The ``safetensors`` package is imported only here and only when needed: it is
not a dependency of the ``hnae`` library (``pip install 'hnae[bench]'``
provides it, or ``pip install safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .config import HNAEConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_KEY = "hnae_format_version"
FORMAT_VERSION = 1


def _safetensors_torch():
    """The ``safetensors.torch`` module, or an ImportError that says how to install it."""
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError("save_pretrained/from_pretrained need the 'safetensors' package, which the hnae library "
                          "does not install by itself: pip install 'hnae[bench]' (or pip install safetensors)"
                          ) from error
    return safetensors.torch


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def save_pretrained(model, directory) -> None:
    """Write ``model`` (an ``hnae.HNAE``) to ``directory`` as config.json and model.safetensors.

    The directory is created if needed; existing files of these names are replaced.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, HNAEConfig):
        raise TypeError(f"model must be an hnae.HNAE (with an HNAEConfig in .config), got {type(model).__name__}")
    save = _safetensors_torch().save
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    # CPU copies that share no storage: safetensors refuses tensors that alias each other.
    tensors = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in model.state_dict().items()}
    record = {FORMAT_KEY: FORMAT_VERSION, **config.to_dict()}
    _write_atomically(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    _write_atomically(directory / CONFIG_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def read_config(path) -> HNAEConfig:
    """Parse and validate a saved ``config.json``; any problem raises ValueError naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file is missing (save_pretrained writes it)") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    if FORMAT_KEY not in data:
        raise ValueError(f"{path}: key {FORMAT_KEY!r} is missing; this is not a directory written by "
                         f"hnae's save_pretrained")
    version = data.pop(FORMAT_KEY)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: key {FORMAT_KEY!r} must be an int, got {version!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: key {FORMAT_KEY!r} is {version}, but this hnae reads version {FORMAT_VERSION} "
                         f"only (a newer hnae may have written it)")
    fields = [f for f in dataclasses.fields(HNAEConfig) if f.name != "extra"]
    known = {f.name for f in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known keys are {sorted(known | {FORMAT_KEY})}")
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{path}: required key(s) {missing} are missing")
    if "windows" in data and not isinstance(data["windows"], list):
        raise ValueError(f"{path}: key 'windows' must be a list of positive ints, got {data['windows']!r}")
    try:
        return HNAEConfig.from_dict(data)
    except (TypeError, ValueError) as error:  # the config names the key and the value it refuses
        raise ValueError(f"{path}: malformed configuration: {error}") from None


def read_weights(path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file raises ValueError naming it."""
    load = _safetensors_torch().load
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file is missing (save_pretrained writes it)") from None
    try:
        return load(data)
    except Exception as error:  # safetensors raises SafetensorError, and others on some malformed headers
        raise ValueError(f"{path}: not a valid safetensors file, it is truncated or corrupt "
                         f"({type(error).__name__}: {error})") from None


def _weights_dtype(tensors: dict[str, torch.Tensor], path: Path) -> torch.dtype:
    """The one floating dtype the saved weights share."""
    dtypes = {name: tensor.dtype for name, tensor in tensors.items() if tensor.is_floating_point()}
    if not dtypes:
        raise ValueError(f"{path}: holds no floating-point tensors; expected the model's weights")
    first_name, first = next(iter(dtypes.items()))
    for name, dtype in dtypes.items():
        if dtype != first:
            raise ValueError(f"{path}: tensors disagree on dtype: {first_name!r} is {first}, {name!r} is {dtype}")
    return first


def _check_fit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], weights_path: Path,
               config_path: Path) -> None:
    """Same tensor names, shapes and dtypes as the model the config builds; else name them all."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name in sorted(set(expected) & set(found)):
        want, got = expected[name], found[name]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{name!r} has shape {tuple(got.shape)}, the configuration needs {tuple(want.shape)}")
        elif want.dtype != got.dtype:
            problems.append(f"{name!r} has dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise ValueError(f"{weights_path}: does not fit the model described by {config_path}: "
                         + "; ".join(problems))


def load_pretrained(cls, directory, device=None, dtype=None):
    """Build ``cls`` (``hnae.HNAE`` or a subclass) from a ``save_pretrained`` directory.

    The weights keep their saved dtype unless ``dtype`` is given; ``device``
    moves the model. The model is returned in eval mode (dropout off), ready
    for inference; call ``.train()`` to fine-tune it.
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"directory: {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"directory: {directory} is not a directory (expected one written by save_pretrained)")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    config = read_config(config_path)
    tensors = read_weights(weights_path)
    saved_dtype = _weights_dtype(tensors, weights_path)
    options = {name: getattr(config, name) for name in config.to_dict()}  # the constructor's argument names
    model = cls(**options, dtype=saved_dtype)
    _check_fit(model.state_dict(), tensors, weights_path, config_path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:  # _check_fit catches what this can raise; kept as a clear last guard
        raise ValueError(f"{weights_path}: does not fit the model described by {config_path} ({error})") from None
    model.to(device=device, dtype=dtype)
    return model.eval()
