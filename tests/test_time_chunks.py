"""Long causal calls run in time chunks carrying the state: same outputs, state and gradients."""

import pytest
import torch

import hnae
from conftest import random_input, tiny_model


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("policy", ["all", "novelty"])
def test_chunked_call_equals_one_chunk_in_outputs_state_and_gradients(chunk, policy):
    options = {"write_policy": policy, "threshold": 0.5} if policy == "novelty" else {}
    model = tiny_model(windows=(4, 2, 2), num_layers=2, **options).train()
    x = random_input(3, 37, 5).requires_grad_(True)

    model.time_chunk = 0
    whole, whole_state = model(x)
    whole.square().mean().backward()
    whole_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(set_to_none=True)
    x.grad = None

    model.time_chunk = chunk
    chunked, chunked_state = model(x)
    chunked.square().mean().backward()
    chunked_grads = [p.grad for p in model.parameters()] + [x.grad]

    assert torch.allclose(chunked, whole, atol=1e-5)
    for got, want in zip(chunked_state.tensors(), whole_state.tensors()):
        assert torch.equal(got, want) if got.dtype == torch.int64 else torch.allclose(got, want, atol=1e-5)
    for got, want in zip(chunked_grads, whole_grads):
        assert torch.allclose(got, want, atol=1e-5)


def test_automatic_chunks_on_the_cpu_are_whole_first_windows_of_bounded_size():
    model = hnae.HNAE(4, 32, windows=(8, 8), batch_first=True)
    x = torch.zeros(2, 100_000, 4)
    chunk = model._chunk_length(x)
    assert chunk % 8 == 0 and 2 * chunk * 32 <= hnae.model.CPU_CHUNK_ELEMENTS < 2 * (chunk + 8) * 32
    assert model._chunk_length(torch.zeros(10_000, 3, 4)) == 8   # never below one level-0 window
    model.time_chunk = 0
    assert model._chunk_length(x) == 100_000
    model.time_chunk = -1
    with pytest.raises(ValueError, match="time_chunk"):
        model(x[:, :10])
