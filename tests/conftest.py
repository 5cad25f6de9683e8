"""Shared helpers for the tests: tiny models, deterministic inputs."""

import pytest
import torch

import hnae

torch.set_num_threads(1)


def tiny_model(windows=(4, 4), num_layers=1, hidden_size=16, input_size=5, dtype=torch.float32, **options):
    torch.manual_seed(0)
    options.setdefault("summary_slots", 2)
    options.setdefault("num_heads", 2)
    model = hnae.HNAE(input_size, hidden_size, num_layers, batch_first=True, windows=windows, **options)
    for directions in model.layers:  # short convolutions start at zero: give them something to do
        for block in directions:
            if block.short_conv is not None:
                torch.nn.init.normal_(block.short_conv.weight, std=0.5)
            if block.event_count is not None:  # gates start half open everywhere: make them differ
                torch.nn.init.normal_(block.event_count.gate.weight, std=0.1)
    return model.to(dtype).eval()


def random_input(batch, steps, features, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, features, generator=generator, dtype=dtype)


@pytest.fixture
def make_model():
    return tiny_model


def run_in_chunks(model, x, sizes, state=None):
    """Feed x (B, T, F) in chunks of the given sizes (cycled), carrying the state."""
    outputs, start, index = [], 0, 0
    while start < x.shape[1]:
        size = sizes[index % len(sizes)]
        output, state = model(x[:, start:start + size], state)
        outputs.append(output)
        start, index = start + size, index + 1
    return torch.cat(outputs, dim=1), state


def stream_compiled(model, x, **options):
    """x (B, T, F) fed one step at a time through ``model.compile_step(**options)``: outputs (B, T, O), state."""
    step, state, outputs = model.compile_step(**options), None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            output, state = step(x[:, t], state)
            outputs.append(output)
    return torch.stack(outputs, dim=1), state


def assert_steps_equal_parallel(model, x, tolerance=1e-5):
    """x (B, T, F) one step at a time through ``model.step``, then through ``compile_step``: both give
    the outputs of one parallel call within ``tolerance``."""
    with torch.no_grad():
        whole, _ = model(x)
        stepped, state = [], None
        for t in range(x.shape[1]):
            output, state = model.step(x[:, t], state)
            stepped.append(output)
    assert (torch.stack(stepped, dim=1) - whole).abs().max().item() <= tolerance
    compiled, _ = stream_compiled(model, x)
    assert (compiled - whole).abs().max().item() <= tolerance
