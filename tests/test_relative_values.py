"""positions="relative": a local read says how far back it lies; summaries keep off the turned dims."""
import random

import pytest
import torch

import hnae
from conftest import assert_steps_equal_parallel, random_input, run_in_chunks, tiny_model
from hnae.attention import HierarchicalAttention
from hnae.state import fresh_layer_state, layer_state_shapes

TOLERANCE = 1e-5


def reference_local_attention(layer: HierarchicalAttention, x: torch.Tensor) -> torch.Tensor:
    """A one-level layer written out step by step: out_t = sum_j p_tj R(phase_j - phase_t) v_j (B, T, D)."""
    batch, steps, d_model = x.shape
    heads, width, w0 = layer.num_heads, layer.head_width, layer.windows[0]
    queries, keys, values = layer.query_key_value(x).chunk(3, dim=-1)  # (B, T, D) each
    split = lambda t: t.view(batch, steps, heads, width).transpose(1, 2)  # (B, H, T, E)
    queries, keys, values = split(queries), split(keys), split(values)
    rows = []
    for t in range(steps):
        seen = range(max(0, t - w0 + 1), t + 1)
        turn_t = layer.rotary.phases(torch.tensor([t]), x.dtype)
        query = layer.rotary.rotate(queries[:, :, t:t + 1], *turn_t)  # (B, H, 1, E)
        scores, reads = [], []
        for j in seen:
            turn_j = layer.rotary.phases(torch.tensor([j]), x.dtype)
            key = layer.rotary.rotate(keys[:, :, j:j + 1], *turn_j)
            scores.append((query * key).sum(-1) * width ** -0.5)  # (B, H, 1)
            # the value turned by its own phase, then back by the query's: the distance t - j alone
            turned = layer.rotary.rotate(values[:, :, j:j + 1], *turn_j)
            reads.append(layer.rotary.rotate(turned, turn_t[0], -turn_t[1]))
        weights = torch.stack(scores, -1).softmax(-1)  # (B, H, 1, n)
        rows.append(sum(weights[..., i:i + 1] * reads[i] for i in range(len(reads))))  # (B, H, 1, E)
    attended = torch.cat(rows, dim=2).transpose(1, 2).reshape(batch, steps, d_model)
    return layer.output(attended)


@pytest.mark.parametrize("chunks", [[23], [1], [3, 5, 2]])
def test_a_local_layer_computes_the_written_out_rule(chunks):
    torch.manual_seed(0)
    layer = HierarchicalAttention(16, 2, (6,), relative_values=True).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    expected = reference_local_attention(layer, x)
    state, outputs, start, index = layer_state(layer, 2, x.dtype), [], 0, 0
    while start < x.shape[1]:
        chunk = x[:, start:start + chunks[index % len(chunks)]]
        output, state = layer.forward_chunk(chunk, state, start, start + chunk.shape[1])
        outputs.append(output)
        start, index = start + chunk.shape[1], index + 1
    assert torch.allclose(torch.cat(outputs, dim=1), expected, atol=1e-10)


def layer_state(layer, batch, dtype):
    shapes = layer_state_shapes(layer.windows, layer.slots, layer.num_heads, layer.d_model)
    return fresh_layer_state(shapes, batch, "cpu", dtype)


def test_the_reads_depend_on_the_distance_not_on_where_the_block_starts():
    """One local layer, no place table: the same inputs a whole block later give the same outputs,
    and so does a shift by any other number of steps: turning a value by its step's phase and the
    read back by the query's would not cancel if either were wrong."""
    torch.manual_seed(0)
    layer = HierarchicalAttention(16, 2, (6,), relative_values=True).double()
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    base = layer.forward_chunk(x, layer_state(layer, 1, x.dtype), 0, 40)[0]
    for shift in (1, 5, 6, 13):
        padded = torch.cat([torch.randn(1, shift, 16, dtype=torch.float64), x], dim=1)
        shifted = layer.forward_chunk(padded, layer_state(layer, 1, x.dtype), 0, 40 + shift)[0][:, shift:]
        # full windows on both sides; 1e-6: the rotary angles are computed in float32 (see hnae.rotary)
        assert torch.allclose(shifted[:, 6:], base[:, 6:], atol=1e-6), shift


def test_without_it_the_turned_dims_carry_no_distance():
    """The same layer without relative_values reads plain values: a query that puts all its weight
    on one key gets that value whatever the distance; with it, the read turns with the distance."""
    torch.manual_seed(0)
    plain = HierarchicalAttention(16, 2, (6,)).double()
    relative = HierarchicalAttention(16, 2, (6,), relative_values=True).double()
    relative.load_state_dict(plain.state_dict())
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    a = plain.forward_chunk(x, layer_state(plain, 1, x.dtype), 0, 12)[0]
    b = relative.forward_chunk(x, layer_state(relative, 1, x.dtype), 0, 12)[0]
    assert not torch.allclose(a, b)


VARIANTS = {"attention": {}, "select": {"summary_pool": "select"},
            "novelty": {"summary_pool": "select", "write_policy": "novelty", "threshold": 0.5},
            "learned": {"write_policy": "learned", "budget": 0.5}}


def chunk_plan(w0, name):
    rng = random.Random(w0)
    return {"1": [1], "w0+1": [w0 + 1], "random": [rng.randint(1, 2 * w0 + 3) for _ in range(50)]}[name]


@pytest.mark.parametrize("windows,num_layers", [((4, 4), 2), ((7, 5, 3), 2)])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("plan", ["1", "random"])
def test_streaming_equals_parallel(windows, num_layers, variant, plan):
    model = tiny_model(windows, num_layers, positions="relative", **VARIANTS[variant])
    x = random_input(2, 3 * model.receptive_field + 5, 5)
    with torch.no_grad():
        whole, whole_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, chunk_plan(windows[0], plan))
    assert (whole - chunked).abs().max().item() <= TOLERANCE
    for name, a, b in zip(whole_state.names(), whole_state.tensors(), chunked_state.tensors()):
        assert (a.double() - b.double()).abs().max().item() <= TOLERANCE, name


@pytest.mark.parametrize("variant", ["attention", "novelty"])
def test_single_steps_and_compiled_steps_equal_parallel(variant):
    model = tiny_model((4, 3, 2), 2, positions="relative", **VARIANTS[variant])
    assert_steps_equal_parallel(model, random_input(2, 60, 5), TOLERANCE)


@pytest.mark.parametrize("pool", ["attention", "select"])
def test_future_inputs_never_change_past_outputs(pool):
    model = tiny_model((4, 3), 2, positions="relative", summary_pool=pool)
    x = random_input(1, 2 * model.receptive_field, 5)
    with torch.no_grad():
        reference, _ = model(x)
        for t in range(0, x.shape[1] - 1, 3):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 10
            assert torch.equal(model(changed)[0][:, :t + 1], reference[:, :t + 1]), t


def test_summaries_and_their_ages_hold_nothing_on_the_turned_dims():
    model = tiny_model((4, 3), 1, positions="relative")
    _, state = model(random_input(1, 30, 5))
    attention = model.layers[0][0].attention
    rotary_dims = ~attention.content_mask.bool()
    assert rotary_dims.any()
    memory = state.layers[0]["memory_values_1"]  # (B, H, w_1*K, E)
    assert memory.abs().sum() > 0 and memory[..., rotary_dims].abs().max() == 0
    assert attention.age_value_table(1)[..., rotary_dims].abs().max() == 0


def test_it_has_no_place_table_is_saved_and_refused_by_name(tmp_path):
    model = tiny_model((4, 3), 2, positions="relative")
    assert not any("place_embedding" in name for name, _ in model.named_parameters())
    assert any("place_embedding" in name for name, _ in tiny_model((4, 3), 2).named_parameters())
    model.save_pretrained(tmp_path / "saved")
    loaded = hnae.HNAE.from_pretrained(tmp_path / "saved")
    assert loaded.config.positions == "relative"
    x = random_input(1, 20, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="positions"):
        hnae.HNAE(5, 16, positions="absolute")


def test_a_whole_model_runs_the_same_wherever_its_input_starts_in_a_block():
    """No place table and relative reads: a one-level model's outputs do not depend on where the
    input starts relative to the level-0 blocks (once its window is full); with block places they do."""
    x = random_input(1, 30, 5, dtype=torch.float64)
    for positions, same in (("relative", True), ("block", False)):
        model = tiny_model((6,), 2, dtype=torch.float64, positions=positions)
        with torch.no_grad():
            base = model(x)[0]
            shifted = model(torch.cat([random_input(1, 4, 5, dtype=torch.float64, seed=9), x], dim=1))[0][:, 4:]
        # 2 layers of window 6: outputs from step 10 on see only x; 1e-6: float32 rotary angles
        assert torch.allclose(shifted[:, 10:], base[:, 10:], atol=1e-6) is same, positions


def test_the_onnx_step_streams_like_pytorch(tmp_path):
    """`hnae export` checks onnxruntime against PyTorch over --verify-steps and fails past 1e-4."""
    pytest.importorskip("onnxruntime")
    from hnae_bench.export import main as export_main
    tiny_model((4, 3), 2, positions="relative", summary_pool="select").save_pretrained(tmp_path / "model")
    assert export_main(["--onnx", str(tmp_path / "step.onnx"), "--checkpoint", str(tmp_path / "model"),
                        "--verify-steps", "40"]) == 0
