"""event_counters=G: learned counts of events since the stream began, exact in every mode."""
import pytest
import torch
import torch.nn.functional as F

import hnae
from conftest import (assert_chunked_equals_parallel, assert_future_never_changes_past,
                      assert_padded_streams_run_alone, assert_round_trip_and_foreign_state_refused, assert_steps_equal_parallel, random_input, tiny_model)
from hnae.event_count import EventCounter

TOLERANCE = 1e-5
VARIANTS = {"attention": {}, "relative-select": {"positions": "relative", "summary_pool": "select"},
            "conv-novelty": {"short_conv": 3, "summary_pool": "select", "write_policy": "novelty",
                             "threshold": 0.5}}


def counter_on_one_feature(features=4, feature=2):
    """A counter whose gate is open (1 to within 1e-9) where input feature ``feature`` is 1, else shut."""
    counter = EventCounter(features, 1).double()
    with torch.no_grad():
        counter.gate.weight.zero_()
        counter.gate.weight[0, feature] = 4.0
        counter.gate.bias.fill_(-2.0)  # logits 10 * (+-2): gates 1 - 2e-9 and 2e-9
    return counter


def test_the_count_is_the_number_of_events_so_far_whatever_the_chunks():
    events = torch.zeros(2, 40, 4, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    events[:, :, 2] = (torch.rand(2, 40, generator=generator) < 0.3).double()
    expected = events[:, :, 2].cumsum(1)  # (B, T)
    counter = counter_on_one_feature()
    for chunks in ([40], [1] * 40, [3, 11, 1, 25]):
        count, start = torch.zeros(2, 1, dtype=torch.float64), 0
        for size in chunks:
            _, count = counter.forward_chunk(events[:, start:start + size], count, start, start + size)
            start += size
            assert torch.allclose(count[:, 0], expected[:, start - 1], atol=1e-6), chunks
    count = torch.zeros(2, 1, dtype=torch.float64)
    for t in range(40):
        _, count = counter.step(events[:, t], count)
    assert torch.allclose(count[:, 0], expected[:, -1], atol=1e-6)


def test_the_count_stops_at_each_streams_end():
    counter = counter_on_one_feature()
    events = torch.zeros(3, 8, 4, dtype=torch.float64)
    events[:, :, 2] = 1.0
    start_count = torch.full((3, 1), 5.0, dtype=torch.float64)
    _, count = counter.forward_chunk(events, start_count, 10, torch.tensor([18, 13, 10]))
    assert torch.allclose(count[:, 0], torch.tensor([13.0, 8.0, 5.0], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("windows,num_layers", [((4, 4), 2), ((7, 5, 3), 2), ((5, 3), 1)])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("plan", ["1", "3", "random"])
def test_streaming_equals_parallel(windows, num_layers, variant, plan):
    model = tiny_model(windows, num_layers, event_counters=3, **VARIANTS[variant])
    state = assert_chunked_equals_parallel(model, random_input(2, 3 * model.receptive_field + 5, 5), plan, TOLERANCE)
    assert state.layers[0]["event_count"].dtype == torch.float64
    assert state.layers[0]["event_count"].max() > 0  # the gates counted something


def test_single_steps_and_compiled_steps_equal_parallel():
    model = tiny_model((4, 3, 2), 2, event_counters=2, **VARIANTS["conv-novelty"])
    assert_steps_equal_parallel(model, random_input(2, 60, 5), TOLERANCE)


def test_padded_streams_equal_each_stream_alone_and_continue_exactly():
    assert_padded_streams_run_alone(tiny_model((4, 3), 2, event_counters=2), TOLERANCE)


def test_future_inputs_never_change_past_outputs():
    assert_future_never_changes_past(tiny_model((4, 3), 2, event_counters=2))


def test_the_count_reaches_past_the_windows_only_through_an_open_gate():
    """The documented exception to the reach: an event before the receptive field moves the count
    and so the output; a step whose gate is shut there changes nothing."""
    model = tiny_model((3, 2), 1, input_size=4, event_counters=1).double()
    counter = model.layers[0][0].event_count
    with torch.no_grad():  # a gate open on feature 2 alone, among the inputs this test feeds
        kinds = F.layer_norm(model.layers[0][0].project_in(torch.eye(4, dtype=torch.float64)), (16,))  # (4, D)
        wanted = torch.tensor([-2.0, -2.0, 2.0, -2.0], dtype=torch.float64)  # logits per kind of input
        counter.gate.weight.copy_((torch.linalg.pinv(kinds) @ wanted).unsqueeze(0))
        counter.gate.bias.zero_()
    steps = 3 * model.receptive_field
    quiet = torch.zeros(1, steps, 4, dtype=torch.float64)
    quiet[:, :, 0] = 1.0  # noise: feature 0, gate shut
    event, other = quiet.clone(), quiet.clone()
    event[:, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # an event at step 1
    other[:, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # something else at step 1
    with torch.no_grad():
        base, base_state = model(quiet)
        counted, counted_state = model(event)
        ignored, _ = model(other)
    assert round((counted_state.layers[0]["event_count"] - base_state.layers[0]["event_count"]).item()) == 1
    assert (counted[:, -1] - base[:, -1]).abs().max() > 1e-3  # far past the receptive field: the count
    assert (ignored[:, -1] - base[:, -1]).abs().max() < 1e-6   # shut gate: the windows' reach holds


def test_the_penalty_is_the_mean_gate_and_its_gradient_shuts_the_gates():
    model = tiny_model((4, 3), 2, event_counters=2).train()
    x = random_input(2, 20, 5)
    model(x)
    first = model.layers[0][0]
    gates = torch.sigmoid(10 * first.event_count.gate(F.layer_norm(first.project_in(x), (16,))))  # (B, T, G)
    assert torch.allclose(first.event_count.penalty(), gates.mean(), atol=1e-6)  # the soft gates' mean
    penalty = model.count_penalty()
    layers = [directions[0].event_count.penalty() for directions in model.layers]
    assert torch.allclose(penalty, sum(layers) / 2) and 0 < penalty.item() < 1
    one_layer = tiny_model((4, 3), 1, event_counters=2).train()
    one_layer(x)
    one_layer.count_penalty().backward()
    assert (one_layer.layers[0][0].event_count.gate.bias.grad > 0).all()  # descending it lowers every gate
    model(x[:, :5])
    assert model.count_penalty().item() != penalty.item()  # each forward starts a new penalty
    assert hnae.HNAE(5, 16).count_penalty().item() == 0.0


def test_counts_are_whole_numbers_and_the_gradient_reaches_the_gates_through_them():
    model = tiny_model((4, 3), 1, event_counters=2).train()
    x = random_input(2, 30, 5)
    output, state = model(x)
    count = state.layers[0]["event_count"]
    assert torch.equal(count, count.round()) and 0 < count.min() and count.max() < 30
    output.square().sum().backward()
    assert model.layers[0][0].event_count.gate.weight.grad.abs().sum() > 0  # straight through the decisions


def test_saved_loaded_and_a_state_without_counters_refused(tmp_path):
    loaded = assert_round_trip_and_foreign_state_refused(tiny_model((4, 3), 2, event_counters=2), tiny_model((4, 3), 2),
                                                         tmp_path / "saved")
    assert loaded.config.event_counters == 2


@pytest.mark.parametrize("value, error", [(-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_counts_are_refused_by_name(value, error):
    with pytest.raises(error, match="event_counters"):
        hnae.HNAE(5, 16, event_counters=value)


def test_the_onnx_step_carries_the_counts_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from hnae_bench.export import main as export_main
    from hnae_bench.onnx_step import OnnxStreamer
    model = tiny_model((4, 4), 2, event_counters=2)
    model.save_pretrained(tmp_path / "model")
    assert export_main(["--onnx", str(tmp_path / "step.onnx"), "--checkpoint", str(tmp_path / "model"),
                        "--chunk-size", "3", "--verify-steps", "60"]) == 0
    streamer = OnnxStreamer(tmp_path / "step.onnx")
    assert "layer1_event_count" in [i.name for i in streamer.state_inputs]


def test_bidirectional_counts_each_direction_and_padding_never_leaks():
    model = tiny_model((4, 3), 2, event_counters=2, bidirectional=True)
    x = random_input(1, 40, 5)
    with torch.no_grad():
        out, _ = model(x)
        cut, _ = model(x, lengths=torch.tensor([25]))
        alone, _ = model(x[:, :25])
        later = x.clone()
        later[:, 30:] = 0.0
        changed, _ = model(later)
    assert out.shape == (1, 40, 32) and (cut[:, :25] - alone).abs().max() <= TOLERANCE
    assert (changed[:, :5, 16:] - out[:, :5, 16:]).abs().max() > 0  # the backward direction sees the future


def test_a_state_keeps_its_counts_in_float64_whatever_the_model_dtype():
    model = tiny_model((4, 3), 1, event_counters=2, dtype=torch.bfloat16)
    _, state = model(random_input(1, 12, 5, dtype=torch.bfloat16))
    assert state.layers[0]["event_count"].dtype == torch.float64
    assert state.to(torch.float32).layers[0]["event_count"].dtype == torch.float64
    assert state.layers[0]["local_keys"].dtype == torch.bfloat16
