"""Checks of what a caller passes to ``HNAE.forward``: clear errors, nothing ignored."""

from __future__ import annotations

import torch

from .config import HNAEConfig
from .state import HNAEState


def check_input(input, config: HNAEConfig, parameter_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Validate ``input`` and return it batch-first (B, T, F) and whether it was unbatched."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor or PackedSequence, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    if input.dtype != parameter_dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(f"input has dtype {input.dtype} but the model's parameters are {parameter_dtype}; "
                        f"convert one of them (e.g. model.to({input.dtype}))")
    layout = "(B, T, input_size)" if config.batch_first else "(T, B, input_size)"
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be 2-D (T, input_size) or 3-D {layout}, got shape {tuple(input.shape)}")
    if input.shape[-1] != config.input_size:
        raise ValueError(f"input has {input.shape[-1]} features in its last dimension, expected "
                         f"input_size={config.input_size} (shape {tuple(input.shape)})")
    if input.dim() == 2:
        return input.unsqueeze(0), True  # (1, T, F)
    return (input if config.batch_first else input.transpose(0, 1)), False


def check_lengths(lengths, batch: int, steps: int, device: torch.device) -> torch.Tensor | None:
    """Validate ``lengths`` (one per sequence, each in [0, T]) and return an int64 tensor on ``device``."""
    if lengths is None:
        return None
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        values = lengths.to(device=device, dtype=torch.int64)
    else:
        try:
            values = torch.as_tensor(list(lengths), dtype=torch.int64, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"lengths must be a sequence of ints or an integer tensor, got {lengths!r}") from error
    if values.dim() != 1 or values.shape[0] != batch:
        raise ValueError(f"lengths must be 1-D with one entry per sequence ({batch}), "
                         f"got shape {tuple(values.shape)}")
    if batch and (int(values.min()) < 0 or int(values.max()) > steps):
        raise ValueError(f"lengths must lie in [0, {steps}] (the input's time steps), got {values.tolist()}")
    return values


def check_state(state, config: HNAEConfig, batch: int, device: torch.device) -> None:
    """Validate a state passed back in: same model configuration, batch size and device."""
    if state is None:
        return
    if config.bidirectional:
        raise ValueError("state: streaming a bidirectional HNAE is refused: its outputs need the future "
                         "inputs; pass state=None and the whole sequence, or use bidirectional=False")
    if not isinstance(state, HNAEState):
        raise TypeError(f"state must be an HNAEState (returned by the model) or None, got {type(state).__name__}")
    if state.signature != config.state_signature():
        raise ValueError(f"state belongs to another model configuration: {state.signature} "
                         f"(num_layers, hidden_size, num_heads, windows, summary_slots, write_policy, threshold), "
                         f"expected {config.state_signature()}")
    if state.batch_size != batch:
        raise ValueError(f"state has batch size {state.batch_size}, but the input has batch size {batch}")
    if state.position.device != device:
        raise ValueError(f"state is on {state.position.device} but the input is on {device}; "
                         f"move it with state.to(device)")
