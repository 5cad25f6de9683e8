"""short_conv=k: a causal depthwise convolution over each layer's last k inputs, exact in every mode."""
import random

import pytest
import torch

import hnae
from conftest import assert_steps_equal_parallel, random_input, run_in_chunks, tiny_model
from hnae.short_conv import ShortConv

TOLERANCE = 1e-5
VARIANTS = {"attention": {}, "relative-select": {"positions": "relative", "summary_pool": "select"},
            "novelty": {"summary_pool": "select", "write_policy": "novelty", "threshold": 0.5},
            "learned": {"write_policy": "learned", "budget": 0.5}}


def test_the_convolution_is_the_written_out_rule_across_chunks():
    """out[t] = sum_i w[:, i] h[t - (k-1) + i], zeros before the start, whatever the chunks."""
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    torch.nn.init.normal_(conv.weight)
    h = torch.randn(2, 23, 6, dtype=torch.float64)
    padded = torch.cat([torch.zeros(2, 3, 6, dtype=torch.float64), h], dim=1)
    expected = torch.stack([sum(conv.weight[:, i] * padded[:, t + i] for i in range(4)) for t in range(23)], dim=1)
    for chunks in ([23], [1] * 23, [2, 7, 1, 13]):
        tail, start, pieces = torch.zeros(2, 3, 6, dtype=torch.float64), 0, []
        for size in chunks:
            out, tail = conv.forward_chunk(h[:, start:start + size], tail, start, start + size)
            pieces.append(out)
            start += size
        assert torch.allclose(torch.cat(pieces, dim=1), expected), chunks
        assert torch.equal(tail, h[:, -3:])
    tail, stepped = torch.zeros(2, 3, 6, dtype=torch.float64), []
    for t in range(23):
        out, tail = conv.step(h[:, t], tail)
        stepped.append(out)
    assert torch.allclose(torch.stack(stepped, dim=1), expected)


def test_the_tail_stops_at_each_streams_end():
    conv = ShortConv(3, 3)
    h = torch.randn(3, 8, 3)
    _, tail = conv.forward_chunk(h, torch.zeros(3, 2, 3), 10, torch.tensor([18, 15, 11]))
    assert torch.equal(tail[0], h[0, 6:8]) and torch.equal(tail[1], h[1, 3:5])
    assert torch.equal(tail[2, 1], h[2, 0])  # one step in: the newest is its first input


def chunk_plan(name):
    return {"1": [1], "3": [3], "random": [random.Random(5).randint(1, 11) for _ in range(60)]}[name]


@pytest.mark.parametrize("windows,num_layers", [((4, 4), 2), ((7, 5, 3), 2), ((5, 3), 1)])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("plan", ["1", "3", "random"])
def test_streaming_equals_parallel(windows, num_layers, variant, plan):
    model = tiny_model(windows, num_layers, short_conv=3, **VARIANTS[variant])
    x = random_input(2, 3 * model.receptive_field + 5, 5)
    with torch.no_grad():
        whole, whole_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, chunk_plan(plan))
    assert (whole - chunked).abs().max().item() <= TOLERANCE
    for name, a, b in zip(whole_state.names(), whole_state.tensors(), chunked_state.tensors()):
        assert (a.double() - b.double()).abs().max().item() <= TOLERANCE, name
    assert "layer0.conv_tail" in whole_state.names()


@pytest.mark.parametrize("variant", ["attention", "novelty"])
def test_single_steps_and_compiled_steps_equal_parallel(variant):
    model = tiny_model((4, 3, 2), 2, short_conv=4, **VARIANTS[variant])
    assert_steps_equal_parallel(model, random_input(2, 60, 5), TOLERANCE)


def test_padded_streams_equal_each_stream_alone_and_continue_exactly():
    model = tiny_model((4, 3), 2, short_conv=5)
    x, more = random_input(3, 30, 5), random_input(3, 7, 5, seed=2)
    lengths = torch.tensor([30, 13, 2])
    with torch.no_grad():
        padded, state = model(x, lengths=lengths)
        continued, _ = model(more, state)
        for b, length in enumerate(lengths.tolist()):
            alone, _ = model(x[b:b + 1, :length])
            assert (padded[b, :length] - alone[0]).abs().max() <= TOLERANCE
            if length < 30:
                assert padded[b, length:].abs().max() == 0
            joined, _ = model(torch.cat([x[b:b + 1, :length], more[b:b + 1]], dim=1))
            assert (continued[b] - joined[0, length:]).abs().max() <= TOLERANCE


def test_future_inputs_never_change_past_outputs_and_bidirectional_sees_both_sides():
    model = tiny_model((4, 3), 2, short_conv=4)
    x = random_input(1, 40, 5)
    with torch.no_grad():
        reference, _ = model(x)
        for t in range(0, 39, 3):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 10
            assert torch.equal(model(changed)[0][:, :t + 1], reference[:, :t + 1]), t
    both = tiny_model((4, 3), 2, short_conv=4, bidirectional=True)
    with torch.no_grad():
        out, _ = both(x)
        lengths = torch.tensor([25])
        cut, _ = both(x, lengths=lengths)
        alone, _ = both(x[:, :25])
    assert out.shape == (1, 40, 32) and (cut[:, :25] - alone).abs().max() <= TOLERANCE


def test_it_starts_as_the_model_without_it():
    """Zero weights: the same outputs as a model without the convolution, and the same parameters otherwise."""
    torch.manual_seed(3)
    plain = hnae.HNAE(5, 16, 2, batch_first=True, windows=(4, 3), num_heads=2)
    torch.manual_seed(3)
    convolved = hnae.HNAE(5, 16, 2, batch_first=True, windows=(4, 3), num_heads=2, short_conv=3)
    extra = {name for name, _ in convolved.named_parameters()} - {name for name, _ in plain.named_parameters()}
    assert extra == {"layers.0.0.short_conv.weight", "layers.1.0.short_conv.weight"}
    convolved.load_state_dict(plain.state_dict(), strict=False)
    x = random_input(2, 25, 5)
    with torch.no_grad():
        assert torch.equal(plain(x)[0], convolved(x)[0])
    assert convolved.receptive_field == hnae.receptive_field((4, 3), 2, short_conv=3) > plain.receptive_field


def test_saved_loaded_and_a_state_of_another_kernel_refused(tmp_path):
    model = tiny_model((4, 3), 2, short_conv=3)
    model.save_pretrained(tmp_path / "saved")
    loaded = hnae.HNAE.from_pretrained(tmp_path / "saved")
    assert loaded.config.short_conv == 3
    x = random_input(1, 20, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
        _, state = tiny_model((4, 3), 2)(x)
        with pytest.raises(ValueError, match="another model configuration"):
            model(x, state)


@pytest.mark.parametrize("value, error", [(1, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_kernels_are_refused_by_name(value, error):
    with pytest.raises(error, match="short_conv"):
        hnae.HNAE(5, 16, short_conv=value)


def test_the_onnx_step_streams_like_pytorch(tmp_path):
    """`hnae export` checks onnxruntime against PyTorch over --verify-steps and fails past 1e-4."""
    pytest.importorskip("onnxruntime")
    from hnae_bench.export import main as export_main
    tiny_model((4, 3), 2, short_conv=3, positions="relative").save_pretrained(tmp_path / "model")
    assert export_main(["--onnx", str(tmp_path / "step.onnx"), "--checkpoint", str(tmp_path / "model"),
                        "--verify-steps", "40"]) == 0
