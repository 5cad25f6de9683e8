"""``HNAE.compile_step``: the torch.compile'd streaming step gives ``forward``'s outputs and state."""

import shutil

import pytest
import torch

import hnae.model

from conftest import random_input, stream_compiled, tiny_model

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


@pytest.mark.parametrize("in_place, deferred, pool", [(False, False, "attention"), (True, False, "attention"),
                                                     (True, True, "attention"), (True, False, "select")])
def test_compiled_step_equals_parallel_forward_across_blocks(in_place, deferred, pool, monkeypatch):
    if deferred:  # the ring slot written outside the graphs, as for large windows
        monkeypatch.setattr(hnae.model, "DEFER_RING_WRITE_BYTES", 0)
    model = tiny_model(windows=(3, 2, 2), num_layers=2, write_policy=("novelty", "all"), threshold=0.5,
                       summary_pool=pool)
    x = random_input(2, 17, 5)   # 17 steps: level-1 and level-2 blocks complete along the way
    with torch.no_grad():
        expected, expected_state = model(x)
    streamed, state = stream_compiled(model, x, in_place=in_place)
    assert torch.allclose(streamed, expected, atol=1e-5)
    for got, want in zip(state.tensors(), expected_state.tensors()):
        assert torch.equal(got, want) if got.dtype == torch.int64 else torch.allclose(got, want, atol=1e-5)


def test_two_models_with_different_pools_compile_their_own_steps():
    """The graphs skip guards on the modules: another model's pool type must not reuse them."""
    x = random_input(2, 9, 5)
    for pool in ("attention", "select"):   # in one process, the second after the first
        model = tiny_model(windows=(3, 2, 2), num_layers=2, summary_pool=pool)
        with torch.no_grad():
            expected, _ = model(x)
        assert torch.allclose(stream_compiled(model, x)[0], expected, atol=1e-5), pool


def test_compiled_step_refuses_what_it_cannot_do():
    model = tiny_model()
    step = model.compile_step()
    with pytest.raises(ValueError, match="x must be a tensor"):
        step(torch.zeros(2, 3, 5))
    with pytest.raises(TypeError, match="float64"):
        step(torch.zeros(2, 5, dtype=torch.float64))
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        step(torch.zeros(2, 5))
    model.eval()
    model.layers[0][0].attention.trace = []   # set after compiling: refused, not silently ignored
    with pytest.raises(RuntimeError, match="trace"):
        step(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="bidirectional"):
        tiny_model(bidirectional=True).compile_step()


def test_compiled_step_sees_weights_updated_in_place(monkeypatch):
    """No guards on the modules: the graphs read the parameters, so an in-place update is seen."""
    monkeypatch.setattr(hnae.model, "DEFER_RING_WRITE_BYTES", 0)
    model = tiny_model(windows=(3, 2), num_layers=1)
    x = random_input(2, 4, 5)
    step = model.compile_step(in_place=True)
    with torch.no_grad():
        state = None
        for t in range(3):
            _, state = step(x[:, t], state)
        expected_before, _ = model.step(x[:, 3], state.clone())
        for parameter in model.parameters():
            parameter.mul_(1.5)
        expected_after, _ = model.step(x[:, 3], state.clone())
        output, _ = step(x[:, 3], state)
    assert not torch.allclose(expected_after, expected_before, atol=1e-3)
    assert torch.allclose(output, expected_after, atol=1e-5)


def test_compiled_training_call_equals_eager():
    """``torch.compile(model)`` in training (``hnae bench perf --compile``): the same outputs and
    gradients as eager. Windows (4, 16, 16) over 88 steps in one call: 22 query blocks see one
    level-2 item, the shape whose summary indices torch 2.13's CPU inductor miscompiled (outputs
    off by 0.06; ``hnae.windows.items_complete``)."""
    model = tiny_model(windows=(4, 16, 16)).train()
    model.time_chunk = 0   # one call over all 88 steps
    x = random_input(2, 88, 5)
    expected, _ = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()), allow_unused=True)
    got, _ = torch.compile(model, dynamic=False)(x)
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()), allow_unused=True)
    assert torch.allclose(got, expected, atol=1e-5)
    for grad, want in zip(grads, expected_grads):
        assert (grad is None) == (want is None)
        assert grad is None or torch.allclose(grad, want, atol=1e-4)
