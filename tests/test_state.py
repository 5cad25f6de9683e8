"""The streaming state: bounded, movable, detachable, sub-batchable; T = 0 leaves it unchanged."""

import pytest
import torch

import hnae
from conftest import random_input, tiny_model


@pytest.mark.parametrize("windows,num_layers", [((4, 4), 2), ((7, 5, 3), 3), ((100, 100), 1)])
def test_state_size_does_not_grow(windows, num_layers):
    model = tiny_model(windows, num_layers, hidden_size=8, input_size=3, num_heads=1)
    reach = model.receptive_field
    with torch.no_grad():
        _, state = model(random_input(2, reach, 3))
        sizes_at_reach = {n: t.shape for n, t in state.as_dict().items()}
        _, state = model(random_input(2, 2 * reach, 3), state)
    assert state.nbytes == model.init_state(2).nbytes
    assert {n: t.shape for n, t in state.as_dict().items()} == sizes_at_reach
    assert state.position.tolist() == [3 * reach] * 2


def test_state_select_continues_a_sub_batch_exactly():
    model = tiny_model((4, 4), 2)
    x = random_input(4, 50, 5)
    with torch.no_grad():
        whole, _ = model(x)
        _, state = model(x[:, :21])
        rows = torch.tensor([3, 1])
        continued, _ = model(x[rows, 21:], state.select(rows))
    assert (continued - whole[rows, 21:]).abs().max().item() <= 1e-5


def test_state_moves_detaches_and_round_trips_through_flat_tensors():
    model = tiny_model((4, 4), 1)
    x = random_input(2, 13, 5).requires_grad_()
    _, state = model(x)
    assert any(t.requires_grad for t in state.tensors())
    detached = state.detach()
    assert not any(t.requires_grad for t in detached.tensors())
    doubled = state.to(torch.float64)
    assert doubled.position.dtype == torch.int64
    floating = [t for name, t in doubled.as_dict().items() if not name.endswith(("written", "skipped"))]
    assert all(t.dtype == torch.float64 for t in floating[1:])
    assert all(t.dtype == torch.int64 for name, t in doubled.as_dict().items() if name.endswith("written"))
    rebuilt = hnae.HNAEState.from_tensors(state.names(), state.tensors(), state.signature)
    for a, b in zip(rebuilt.tensors(), state.tensors()):
        assert a is b


def test_empty_sequence_returns_empty_output_and_the_same_state():
    model = tiny_model((4, 4), 2)
    with torch.no_grad():
        _, state = model(random_input(2, 9, 5))
        output, same = model(torch.zeros(2, 0, 5), state)
    assert output.shape == (2, 0, 16)
    assert same is state


def test_unbatched_input_streams_with_a_batch_of_one_state():
    model = tiny_model((4, 4), 1)
    x = random_input(1, 30, 5)[0]
    with torch.no_grad():
        whole, _ = model(x)
        first, state = model(x[:17])
        second, _ = model(x[17:], state)
    assert state.batch_size == 1
    assert (torch.cat([first, second]) - whole).abs().max().item() <= 1e-5
