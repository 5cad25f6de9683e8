"""Streaming equals parallel: chunked calls with the state carried give the one-call output."""

import random

import pytest
import torch

from conftest import random_input, run_in_chunks, tiny_model

TOLERANCE = 1e-5  # fp32 max abs difference allowed by DESIGN.md


def assert_states_close(first, second):
    assert first.names() == second.names()
    assert torch.equal(first.position, second.position)
    for name, a, b in zip(first.names(), first.tensors(), second.tensors()):
        assert (a - b).abs().max().item() <= TOLERANCE, name


def chunk_plans(w0):
    rng = random.Random(w0)
    return {"1": [1], "3": [3], "w0-1": [max(1, w0 - 1)], "w0": [w0], "w0+1": [w0 + 1],
            "random": [rng.randint(1, 2 * w0 + 3) for _ in range(50)]}


@pytest.mark.parametrize("windows", [(4, 4), (7, 5, 3)])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("plan", ["1", "3", "w0-1", "w0", "w0+1", "random"])
@pytest.mark.parametrize("pool", ["attention", "select"])
def test_chunked_equals_parallel(windows, num_layers, plan, pool):
    model = tiny_model(windows, num_layers, summary_pool=pool)
    steps = 3 * model.receptive_field + 5  # far past the reach, across every level boundary
    x = random_input(2, steps, 5)
    with torch.no_grad():
        whole, whole_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, chunk_plans(windows[0])[plan])
    assert (whole - chunked).abs().max().item() <= TOLERANCE
    assert_states_close(whole_state, chunked_state)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_chunked_equals_parallel_windows_100_100(num_layers):
    """The design's two levels of 100: 3x the receptive field, chunks of every kind.

    Single steps and chunks of 3 are fed across the stretches around top-level
    boundaries far past the reach; the rest goes in chunks of w0-1, w0, w0+1
    and random sizes.
    """
    model = tiny_model((100, 100), num_layers, hidden_size=8, input_size=3, summary_slots=1, num_heads=1)
    steps = 3 * model.receptive_field
    x = random_input(2, steps, 3)
    rng = random.Random(7)
    sizes = []
    while sum(sizes) < steps:
        position = sum(sizes)
        near_boundary = position % 10_000 > 10_000 - 150 or position % 10_000 < 150
        if near_boundary and position > model.receptive_field:
            sizes.append(rng.choice([1, 3]))
        else:
            sizes.append(rng.choice([99, 100, 101, rng.randint(1, 700)]))
    with torch.no_grad():
        whole, whole_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, sizes)
    assert (whole - chunked).abs().max().item() <= TOLERANCE
    assert_states_close(whole_state, chunked_state)


def test_streams_at_different_positions_continue_exactly():
    """A batch whose streams stopped at different lengths continues each one exactly."""
    model = tiny_model((4, 3), 2)
    x = random_input(3, 60, 5)
    lengths = torch.tensor([17, 30, 5])
    with torch.no_grad():
        _, state = model(x[:, :30], lengths=lengths)
        following = torch.stack([x[row, length:length + 20] for row, length in enumerate(lengths.tolist())])
        continued, _ = model(following, state)
        for row, length in enumerate(lengths.tolist()):
            alone, _ = model(x[row:row + 1, : length + 20])
            reference = alone[0, length:length + 20]
            assert (continued[row] - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("policy", ["all", "novelty"])
def test_in_place_step_equals_copying_step_and_reuses_the_state(policy):
    """``step(in_place=True)`` writes the ring slot into the state it is given; nothing else changes."""
    options = {"threshold": 0.5} if policy == "novelty" else {}
    model = tiny_model((4, 3), 2, write_policy=policy, **options)
    x = random_input(3, 40, 5)
    with torch.no_grad():
        _, start = model(x[:, :13], lengths=torch.tensor([13, 6, 9]))  # streams at different positions
        copied, in_place = start, start.clone()
        for t in range(13, 40):  # crosses level-1 and level-2 block completions
            expected, copied = model.step(x[:, t], copied)
            before = in_place.layers[0]["local_keys"].data_ptr()
            output, in_place = model.step(x[:, t], in_place, in_place=True)
            assert in_place.layers[0]["local_keys"].data_ptr() == before
            assert torch.equal(output, expected)
    for name, a, b in zip(copied.names(), copied.tensors(), in_place.tensors()):
        assert torch.equal(a, b), name


def test_local_window_is_a_ring_one_slot_per_step():
    """A step changes only slot ``position mod w0`` of the local window (no shifted copy)."""
    model = tiny_model((4, 3), 1)
    x = random_input(2, 11, 5)
    with torch.no_grad():
        _, before = model(x[:, :10])
        _, after = model.step(x[:, 10], before)
    changed = (after.layers[0]["local_keys"] != before.layers[0]["local_keys"]).any(dim=(0, 1, 3))  # (w0,)
    assert changed.tolist() == [slot == 10 % 4 for slot in range(4)]


@pytest.mark.parametrize("in_place", [False, True])
def test_streaming_under_bf16_autocast_keeps_the_state_dtype(in_place):
    """Under autocast the projections give bf16 keys while the state is float32: the step must write
    them into the float32 rings (scatter refuses mixed dtypes), and stay close to the fp32 stream."""
    model = tiny_model((4, 3), 2)
    x = random_input(2, 30, 5)
    with torch.no_grad():
        _, exact_state = model(x[:, :9])
        _, state = model(x[:, :9])
        for t in range(9, 30):  # crosses level-1 and level-2 block completions
            expected, exact_state = model.step(x[:, t], exact_state)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output, state = model.step(x[:, t], state, in_place=in_place)
            assert all(tensor.dtype == torch.float32 for tensor in state.tensors() if tensor.is_floating_point())
            assert (output.float() - expected).abs().max().item() < 0.1  # bf16 keeps ~3 significant digits
