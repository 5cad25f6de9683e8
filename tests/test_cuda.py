"""Tests that touch CUDA (skipped where there is no GPU; scripts/gpu_check.sh runs them with `-k cuda`):
the same outputs and gradients as on the CPU, streaming = parallel, a bf16 autocast training step,
and the perf measurements' CUDA paths (peak memory, FLOP counting)."""
import copy

import pytest
import torch

from conftest import random_input, stream_compiled, tiny_model
from hnae_bench import perf_measure, perf_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 while comparing with the CPU (it rounds matmul inputs to 10 mantissa bits)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_cuda_forward_and_backward_match_cpu():
    cpu_model = tiny_model(windows=(4, 4), num_layers=2).train()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x = random_input(3, 37, 5)   # (B, T, C): not a multiple of any window
    cpu_out, cpu_state = cpu_model(x)
    cuda_out, cuda_state = cuda_model(x.cuda())
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, atol=1e-5, rtol=1e-4)
    assert cuda_state.position.device.type == "cuda" and cuda_state.position.tolist() == [37, 37, 37]
    cpu_out.pow(2).mean().backward()
    cuda_out.pow(2).mean().backward()
    for (name, cpu_parameter), cuda_parameter in zip(cpu_model.named_parameters(), cuda_model.parameters()):
        torch.testing.assert_close(cuda_parameter.grad.cpu(), cpu_parameter.grad, atol=1e-5, rtol=1e-3,
                                   msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_cuda_streaming_equals_parallel(chunk):
    model = tiny_model(windows=(4, 4), num_layers=2).cuda()
    x = random_input(2, 50, 5).cuda()   # (B, T, C): past the reach of 16 + 4
    with torch.no_grad():
        whole, _ = model(x)
        state, pieces = None, []
        for start in range(0, x.shape[1], chunk):
            piece, state = model(x[:, start:start + chunk], state)
            pieces.append(piece)
    streamed = torch.cat(pieces, dim=1)
    assert (streamed - whole).abs().max().item() <= 1e-5
    assert state.position.tolist() == [50, 50]


def test_cuda_bf16_autocast_training_step_is_finite():
    model = tiny_model(windows=(8, 8), num_layers=2, hidden_size=32).cuda().train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    x = random_input(4, 200, 5).cuda()
    seen = []
    hook = model.layers[0][0].attention.query_key_value.register_forward_hook(
        lambda module, inputs, result: seen.append(result.dtype))
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        output, _ = model(x)
    hook.remove()
    assert seen == [torch.bfloat16]  # the projections ran in bf16 (layer norms stay fp32 under autocast)
    loss = output.float().pow(2).mean()
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss).item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_cuda_perf_measures_memory_and_flops():
    with perf_measure.peak_memory("cuda") as memory:
        block = torch.empty(64 * 2 ** 20, dtype=torch.uint8, device="cuda")   # 64 MiB
    del block
    assert 64 * 2 ** 20 <= memory["delta"] < 80 * 2 ** 20 and "cuda" in memory["method"]
    model = perf_models.build_perf_model("hnae", "small", 8, 256).cuda()
    counted = perf_measure.count_flops(model, torch.randn(2, 256, 8, device="cuda"), "cuda", "bf16")
    assert counted["training"] > counted["forward"] > 0
    assert any("attention" in op or "bmm" in op for op in counted["by_op"])   # attention is counted, fused or not


@pytest.mark.parametrize("banded", [False, True])  # the policy levels' window copies, or hnae.banded
@pytest.mark.parametrize("policy", ["novelty", "learned"])
def test_cuda_write_policy_matches_cpu_and_streams_exactly(policy, banded):
    """Skipping summaries on the GPU: the same decisions and outputs as on the CPU, chunked = whole."""
    torch.manual_seed(0)
    options = {"threshold": 0.6} if policy == "novelty" else {}
    cpu_model = tiny_model(windows=(2, 3, 2), num_layers=2, write_policy=policy, **options).double()
    with torch.no_grad():  # learned gates around 1/2 (no novelty term), so some items are skipped
        for (block,) in cpu_model.layers:
            block.attention.banded = banded
            for gate in block.attention.policy.gates.values():
                gate.weight.normal_(0.0, 0.5)
                gate.bias.zero_()
            for weight in block.attention.policy.novelty_weights.values():
                weight.zero_()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x = random_input(2, 60, 5).double()
    with torch.no_grad():
        cpu_out, cpu_state = cpu_model(x)
        whole, whole_state = cuda_model(x.cuda())
        state, pieces = None, []
        for start in range(0, x.shape[1], 7):
            piece, state = cuda_model(x[:, start:start + 7].cuda(), state)
            pieces.append(piece)
    torch.testing.assert_close(whole.cpu(), cpu_out, atol=1e-6, rtol=0)  # CUDA float64 SDPA: ~5e-9 seen
    assert (torch.cat(pieces, dim=1) - whole).abs().max().item() <= 1e-6
    for layer in range(2):
        for name in ("written", "skipped"):
            assert whole_state.layers[layer][name].cpu().tolist() == cpu_state.layers[layer][name].tolist()
            assert state.layers[layer][name].cpu().tolist() == cpu_state.layers[layer][name].tolist()


def test_cuda_training_step_inside_one_block():
    """A sequence shorter than the level-0 window (one query block): the backward runs."""
    model = tiny_model(windows=(128, 8), num_layers=1, hidden_size=32, summary_slots=8).cuda().train()
    x = random_input(4, 70, 5).cuda()
    output, _ = model(x)
    output.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cuda_compiled_step_equals_parallel_forward():
    model = tiny_model(windows=(3, 2), num_layers=2).cuda()
    x = random_input(2, 11, 5).cuda()   # (B, T, C): level-0 and level-1 blocks complete along the way
    with torch.no_grad():
        expected, _ = model(x)
    torch.testing.assert_close(stream_compiled(model, x)[0], expected, atol=1e-5, rtol=1e-4)


def test_cuda_compiled_training_call_equals_cpu_eager():
    """``torch.compile(model)`` on CUDA (the GPU figures of ``--compile``) against the CPU's eager
    call, on the shape whose indices the CPU inductor of torch 2.13 miscompiled."""
    cpu_model = tiny_model(windows=(4, 16, 16)).train()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x = random_input(2, 88, 5)
    expected, _ = cpu_model(x)
    got, _ = torch.compile(cuda_model, dynamic=False)(x.cuda())
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-4)
    expected.square().sum().backward()
    got.square().sum().backward()
    for cpu_param, cuda_param in zip(cpu_model.parameters(), cuda_model.parameters()):
        assert (cpu_param.grad is None) == (cuda_param.grad is None)
        if cpu_param.grad is not None:
            torch.testing.assert_close(cuda_param.grad.cpu(), cpu_param.grad, atol=1e-4, rtol=1e-3)
