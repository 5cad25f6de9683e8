"""Shared helpers for the tests: tiny models, deterministic inputs."""

import random

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
            if block.event_count is not None:  # gates start shut everywhere (zero logits): open some
                torch.nn.init.normal_(block.event_count.gate.weight, std=0.5)
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


def chunk_plan(name):
    """Chunk sizes by name: "1", "3" or "random" (sizes 1-11, the same every run)."""
    return {"1": [1], "3": [3], "random": [random.Random(5).randint(1, 11) for _ in range(60)]}[name]


def assert_chunked_equals_parallel(model, x, plan, tolerance=1e-5):
    """x fed in the chunks of ``chunk_plan(plan)`` gives one call's outputs and state; returns that state."""
    with torch.no_grad():
        whole, whole_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, chunk_plan(plan))
    assert (whole - chunked).abs().max().item() <= tolerance
    for name, a, b in zip(whole_state.names(), whole_state.tensors(), chunked_state.tensors()):
        assert (a.double() - b.double()).abs().max().item() <= tolerance, name
    return whole_state


def assert_padded_streams_run_alone(model, tolerance=1e-5):
    """A padded batch (lengths 30, 13, 2) gives each stream's outputs alone, zeros after its end, and a
    state that continues each stream exactly."""
    features = model.input_size
    x, more = random_input(3, 30, features), random_input(3, 7, features, seed=2)
    lengths = torch.tensor([30, 13, 2])
    with torch.no_grad():
        padded, state = model(x, lengths=lengths)
        continued, _ = model(more, state)
        for b, length in enumerate(lengths.tolist()):
            alone, _ = model(x[b:b + 1, :length])
            assert (padded[b, :length] - alone[0]).abs().max() <= tolerance
            if length < 30:
                assert padded[b, length:].abs().max() == 0
            joined, _ = model(torch.cat([x[b:b + 1, :length], more[b:b + 1]], dim=1))
            assert (continued[b] - joined[0, length:]).abs().max() <= tolerance


def assert_future_never_changes_past(model, steps=40):
    """Changing the inputs after t (by a lot) leaves the outputs up to t bit for bit, for t every 3 steps."""
    x = random_input(1, steps, model.input_size)
    with torch.no_grad():
        reference, _ = model(x)
        for t in range(0, steps - 1, 3):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 10
            assert torch.equal(model(changed)[0][:, :t + 1], reference[:, :t + 1]), t
    return x


def assert_round_trip_and_foreign_state_refused(model, plain, directory):
    """``model`` saved and loaded computes the same; a state of ``plain`` (another configuration) is
    refused by name. Returns the loaded model."""
    model.save_pretrained(directory)
    loaded = hnae.HNAE.from_pretrained(directory)
    x = random_input(1, 20, model.input_size)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
        _, state = plain(x)
        with pytest.raises(ValueError, match="another model configuration"):
            model(x, state)
    return loaded
