"""short_conv=k: a causal depthwise convolution over each layer's last k inputs, exact in every mode."""
import pytest
import torch

import hnae
from conftest import (assert_chunked_equals_parallel, assert_future_never_changes_past,
                      assert_padded_streams_run_alone, assert_round_trip_and_foreign_state_refused, assert_steps_equal_parallel, random_input, tiny_model)
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


@pytest.mark.parametrize("windows,num_layers", [((4, 4), 2), ((7, 5, 3), 2), ((5, 3), 1)])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("plan", ["1", "3", "random"])
def test_streaming_equals_parallel(windows, num_layers, variant, plan):
    model = tiny_model(windows, num_layers, short_conv=3, **VARIANTS[variant])
    state = assert_chunked_equals_parallel(model, random_input(2, 3 * model.receptive_field + 5, 5), plan, TOLERANCE)
    assert "layer0.conv_tail" in state.names()


@pytest.mark.parametrize("variant", ["attention", "novelty"])
def test_single_steps_and_compiled_steps_equal_parallel(variant):
    model = tiny_model((4, 3, 2), 2, short_conv=4, **VARIANTS[variant])
    assert_steps_equal_parallel(model, random_input(2, 60, 5), TOLERANCE)


def test_padded_streams_equal_each_stream_alone_and_continue_exactly():
    assert_padded_streams_run_alone(tiny_model((4, 3), 2, short_conv=5), TOLERANCE)


def test_future_inputs_never_change_past_outputs_and_bidirectional_sees_both_sides():
    x = assert_future_never_changes_past(tiny_model((4, 3), 2, short_conv=4))
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
    loaded = assert_round_trip_and_foreign_state_refused(tiny_model((4, 3), 2, short_conv=3), tiny_model((4, 3), 2),
                                                         tmp_path / "saved")
    assert loaded.config.short_conv == 3


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
