"""The streaming step of an HNAE as an ONNX graph, and an onnxruntime runner for it.

The graph runs ``C`` steps (the chunk size, fixed at export) of every stream:

    inputs:  input (B, C, input_size), then the state tensors
    outputs: output (B, C, out_features), then the new state tensors

State names are ``HNAEState.names()`` with dots replaced by underscores:
``position`` (B,) int64, ``layer{i}_local_keys``, ``layer{i}_local_values``,
``layer{i}_memory_keys_{l}``, ``layer{i}_memory_values_{l}`` (see
``hnae.state``); each output is the input's name prefixed with ``new_``
(``new_position``, ``new_layer0_local_keys``, ...). Only the batch axis is
dynamic. The graph's metadata ``hnae.state_names`` keeps the dotted names, so
``HNAEState.from_tensors`` rebuilds a PyTorch state from the arrays.

Inside, the ``C`` steps are unrolled calls of ``HNAE._step(..., branch_free=True)``:
no data-dependent branches, a summary pooled at every step and kept only where
its block completes (``torch.where``). The export uses PyTorch's TorchScript
exporter (``dynamo=False``), which needs no package beyond ``onnx``. The graph
is float32 (``hnae export`` converts a model saved in another dtype).

Dimension letters: B batch (streams), C chunk size, F input_size, K output features.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hnae

ONNX_OPSET = 17  # LayerNormalization is a single op from 17 on
MIN_OPSET = 14  # scaled_dot_product_attention has an ONNX form from 14 on
STATE_NAMES_KEY = "hnae.state_names"
CHUNK_SIZE_KEY = "hnae.chunk_size"
CONFIG_KEY = "hnae.config"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64}


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"ONNX export and its runner need the '{module}' package: "
                          f"pip install 'hnae[export]'") from error


def onnx_name(state_name: str) -> str:
    """ONNX name of a state tensor: ``layer0.local_keys`` -> ``layer0_local_keys``."""
    return state_name.replace(".", "_")


class StreamingStep(nn.Module):
    """``C`` streaming steps of ``encoder`` (then ``head``, if given, on each output), state in and out.

    forward(chunk (B, C, F), *state_tensors) -> (output (B, C, K), *new_state_tensors),
    the state tensors in ``HNAEState.names()`` order.
    """

    def __init__(self, encoder: hnae.HNAE, chunk_size: int = 1, head: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(encoder, hnae.HNAE):
            raise TypeError(f"encoder must be an hnae.HNAE, got {type(encoder).__name__}")
        if encoder.bidirectional:
            raise ValueError("encoder: a bidirectional HNAE cannot stream (it needs the future), so it has no "
                             "streaming step to export")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.encoder, self.chunk_size = encoder, chunk_size
        self.head = head if head is not None else nn.Identity()
        template = encoder.init_state(1)
        self.state_names, self.signature = template.names(), template.signature

    @property
    def input_names(self) -> list[str]:
        return ["input", *(onnx_name(name) for name in self.state_names)]

    @property
    def output_names(self) -> list[str]:
        return ["output", *(f"new_{onnx_name(name)}" for name in self.state_names)]

    def forward(self, chunk: torch.Tensor, *state_tensors: torch.Tensor):
        state = hnae.HNAEState.from_tensors(self.state_names, list(state_tensors), self.signature)
        outputs = []
        for index in range(self.chunk_size):  # unrolled in the graph: C is fixed at export
            hidden, state = self.encoder._step(chunk[:, index], state, branch_free=True)  # (B, out)
            outputs.append(self.head(hidden))  # (B, K)
        return (torch.stack(outputs, dim=1), *state.tensors())  # (B, C, K), new state


# --------------------------------------------------------------------------- cost


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Scores (Q K^T) and mixing (P V), 2 FLOPs per multiply-add, as torch's formula for the GPU kernels."""
    *batch, queries, width = query_shape
    keys, value_width = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * queries * keys * (width + value_width)


def step_cost(encoder: hnae.HNAE, head: nn.Module | None = None) -> dict:
    """State bytes per stream and FLOPs of one exported step (``_step`` at batch 1, branch-free).

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix
    products (linear layers, attention scores and mixing, summary pooling),
    not elementwise work. The branch-free step pools a summary at every step,
    as the exported graph does.
    """
    step = StreamingStep(encoder, 1, head)
    parameter = next(encoder.parameters())
    state = encoder.init_state(1)
    x = torch.zeros(1, encoder.input_size, dtype=parameter.dtype, device=parameter.device)  # (1, F)
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):  # not in torch's own table
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step.head(encoder._step(x, state, branch_free=True)[0])
    return {"state_bytes_per_stream": state.nbytes, "state_tensors": len(state.names()),
            "flops_per_step": int(counter.get_total_flops())}


# --------------------------------------------------------------------------- export


def _normalise_transposes(model) -> None:
    """Make negative Transpose permutations positive, in place.

    PyTorch's TorchScript symbolic for ``movedim`` with a negative source
    (``hnae`` moves the heads with ``movedim(-2, 1)``) writes e.g. perm
    ``[0, -2, 1, 3]``, which ONNX forbids; ``-2`` means ``rank - 2``.
    """
    for node in model.graph.node:
        if node.op_type != "Transpose":
            continue
        for attribute in node.attribute:
            if attribute.name == "perm" and any(p < 0 for p in attribute.ints):
                rank = len(attribute.ints)
                fixed = [p + rank if p < 0 else p for p in attribute.ints]
                del attribute.ints[:]
                attribute.ints.extend(fixed)


def export_step(encoder: hnae.HNAE, path, chunk_size: int = 1, head: nn.Module | None = None,
                opset: int = ONNX_OPSET) -> dict:
    """Write the streaming step of ``encoder`` (and ``head``) to ``path`` as an ONNX graph.

    Returns a description: chunk size, opset, names, shapes and dtypes of the
    inputs and outputs, and ``step_cost``. The modules' train/eval modes are
    restored afterwards (the graph is traced in eval mode: no dropout).
    """
    onnx = _import("onnx")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (attention is exported from opset 14 on), "
                         f"got {opset!r}")
    path = Path(path)
    step = StreamingStep(encoder, chunk_size, head)
    parameter = next(encoder.parameters())
    if any(p.dtype != torch.float32 for p in step.parameters()):
        raise ValueError(f"encoder: the exported step is float32 only (PyTorch's exporter mixes float32 constants "
                         f"into other dtypes), got {parameter.dtype} parameters; convert with .float()")
    example_batch = 2  # not 1, so that no size-1 axis is mistaken for a broadcast
    chunk = torch.zeros(example_batch, chunk_size, encoder.input_size, dtype=parameter.dtype,
                        device=parameter.device)  # (B, C, F)
    state = encoder.init_state(example_batch)
    modes = {module: module.training for module in step.modules()}
    names = step.input_names + step.output_names
    buffer = io.BytesIO()
    try:
        step.eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            # The pooling checks its block size (a fixed shape) with a Python comparison.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(step, (chunk, *state.tensors()), buffer, input_names=step.input_names,
                              output_names=step.output_names, dynamic_axes={name: {0: "batch"} for name in names},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        for module, training in modes.items():
            module.train(training)
    model = onnx.load_from_string(buffer.getvalue())
    _normalise_transposes(model)
    metadata = {STATE_NAMES_KEY: json.dumps(step.state_names), CHUNK_SIZE_KEY: str(chunk_size),
                CONFIG_KEY: json.dumps(encoder.config.to_dict())}
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(model.SerializeToString())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()

    with torch.no_grad():
        output = step(chunk, *state.tensors())
    described = [("input", chunk), *zip(step.input_names[1:], state.tensors())]
    described += list(zip(step.output_names, output))
    tensors = [{"name": name, "shape": ["batch", *tensor.shape[1:]], "dtype": str(tensor.dtype).removeprefix("torch.")}
               for name, tensor in described]
    return {"chunk_size": chunk_size, "opset": opset, "input_size": encoder.input_size,
            "output_features": int(output[0].shape[-1]), "receptive_field": encoder.receptive_field,
            "inputs": tensors[:len(step.input_names)], "outputs": tensors[len(step.input_names):],
            "state_names": dict(zip(step.input_names[1:], step.state_names)), **step_cost(encoder, head)}


# --------------------------------------------------------------------------- running it


class OnnxStreamer:
    """Runs an exported step with onnxruntime; the state is a dict of numpy arrays, passed in and returned.

        streamer = OnnxStreamer("model.onnx")
        state = streamer.init_state(batch)
        output, state = streamer.step(chunk, state)    # chunk (B, C, F) -> output (B, C, K)
    """

    def __init__(self, path, providers=("CPUExecutionProvider",)) -> None:
        ort = _import("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX file is missing")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(f"{self.path}: onnxruntime cannot load it ({error})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected_outputs = ["output", *(f"new_{i.name}" for i in inputs[1:])]
        if not inputs or inputs[0].name != "input" or [o.name for o in outputs] != expected_outputs:
            raise ValueError(f"{self.path}: not an hnae streaming step (inputs 'input' + state, outputs "
                             f"'output' + 'new_<state>'), got inputs {[i.name for i in inputs]}")
        unsupported = [f"{i.name}: {i.type}" for i in inputs if i.type not in _NUMPY_TYPES]
        if unsupported:
            raise ValueError(f"{self.path}: inputs of types numpy cannot hold: {unsupported}")
        self.chunk_size, self.input_size = int(inputs[0].shape[1]), int(inputs[0].shape[2])
        self.input_dtype = _NUMPY_TYPES[inputs[0].type]
        self.state_inputs = inputs[1:]
        self.state_names = [i.name for i in self.state_inputs]  # ONNX names
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.torch_state_names = json.loads(metadata.get(STATE_NAMES_KEY, "null"))  # dotted names, or None

    def init_state(self, batch_size: int) -> dict[str, np.ndarray]:
        """A fresh state for ``batch_size`` streams: zeros, position 0 (as ``HNAE.init_state``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return {i.name: np.zeros((batch_size, *i.shape[1:]), dtype=_NUMPY_TYPES[i.type]) for i in self.state_inputs}

    def step(self, chunk: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """chunk (B, C, F) and the state -> output (B, C, K) and the new state."""
        expected = ("B", self.chunk_size, self.input_size)
        if not isinstance(chunk, np.ndarray) or chunk.ndim != 3 or chunk.shape[1:] != expected[1:]:
            raise ValueError(f"chunk must be a numpy array of shape {expected}, got "
                             f"{getattr(chunk, 'shape', type(chunk).__name__)}")
        if chunk.dtype != self.input_dtype:
            raise TypeError(f"chunk has dtype {chunk.dtype}, the graph takes {np.dtype(self.input_dtype)}")
        if not isinstance(state, dict) or sorted(state) != sorted(self.state_names):
            raise ValueError(f"state must be a dict with the keys {self.state_names} (see init_state)")
        for name, array in state.items():
            if array.shape[0] != chunk.shape[0]:
                raise ValueError(f"state[{name!r}] has batch size {array.shape[0]}, the chunk {chunk.shape[0]}")
        results = self.session.run(None, {"input": chunk, **state})
        return results[0], dict(zip(self.state_names, results[1:]))

    def stream(self, x: np.ndarray, state: dict[str, np.ndarray] | None = None):
        """x (B, T, F), T a multiple of the chunk size -> output (B, T, K), the state after it."""
        if not isinstance(x, np.ndarray) or x.ndim != 3:
            raise ValueError(f"x must be a numpy array (B, T, F), got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] % self.chunk_size:
            raise ValueError(f"x has {x.shape[1]} steps, not a multiple of the graph's chunk size {self.chunk_size}")
        state = self.init_state(x.shape[0]) if state is None else state
        pieces = []
        for start in range(0, x.shape[1], self.chunk_size):
            piece, state = self.step(x[:, start:start + self.chunk_size], state)
            pieces.append(piece)
        return np.concatenate(pieces, axis=1), state


def torch_stream(encoder: hnae.HNAE, x: torch.Tensor, chunk_size: int, head: nn.Module | None = None):
    """The PyTorch reference: x (B, T, F) fed to ``encoder`` in chunks with the state carried.

    Returns output (B, T, K) and the final ``HNAEState``; uses the public forward (any layout).
    """
    head = head if head is not None else nn.Identity()
    state, pieces = None, []
    with torch.no_grad():
        for start in range(0, x.shape[1], chunk_size):
            piece = x[:, start:start + chunk_size]  # (B, c, F)
            piece = piece if encoder.batch_first else piece.transpose(0, 1)
            output, state = encoder(piece, state)
            pieces.append(head(output if encoder.batch_first else output.transpose(0, 1)))
    return torch.cat(pieces, dim=1), state
