"""hnae export: the ONNX streaming step run by onnxruntime equals PyTorch streaming; its cost; the CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import hnae
from hnae_bench.export import main as export_main
from hnae_bench.onnx_step import OnnxStreamer, StreamingStep, export_step, onnx_name, step_cost
from hnae_bench.train import TrainConfig, train

from conftest import random_input, tiny_model

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def matmul_flops_per_step(config) -> int:
    """FLOPs of the matrix products of one branch-free step at batch 1, from the architecture."""
    d, heads, slots, w = config.hidden_size, config.num_heads, config.summary_slots, config.windows
    head_width = d // heads
    per_layer = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * config.ffn_width  # qkv, output, feed-forward
    keys = w[0] + sum(width * slots for width in w[1:])
    per_layer += 2 * heads * keys * 2 * head_width  # one query: scores and mixing
    summary_keys = keys - w[0]
    per_layer += 2 * heads * summary_keys * 2 * head_width  # the summaries' ages: q . age and p . age
    for level in range(1, len(w)):  # one summary pooled per level and step
        items = w[level - 1] * (1 if level == 1 else slots)
        per_layer += 2 * heads * slots * items * 2 * head_width  # pooling attention
        per_layer += 2 * slots * d * d + 2 * slots * d * 2 * d  # pool output; the summary's keys and values
    project_in = 2 * config.input_size * d if config.input_size != d else 0
    return config.num_layers * per_layer + project_in


def state_bytes_per_stream(config) -> int:
    w, head_width = config.windows, config.hidden_size // config.num_heads
    floats = 2 * config.num_heads * head_width * (w[0] + sum(width * config.summary_slots for width in w[1:]))
    counters = 2 * (len(w) - 1) * 8  # int64 written and skipped per summary level
    return 8 + config.num_layers * (floats * 4 + counters)  # int64 position + float32 keys and values


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny 2-layer model (hidden 16, windows (4, 4)) saved, then exported by the CLI with chunks of 1 and 3."""
    model = tiny_model(windows=(4, 4), num_layers=2)
    folder = tmp_path_factory.mktemp("export")
    model.save_pretrained(folder / "model")
    paths = {}
    for chunk in (1, 3):
        paths[chunk] = folder / f"step{chunk}.onnx"
        code = export_main(["--onnx", str(paths[chunk]), "--checkpoint", str(folder / "model"),
                            "--chunk-size", str(chunk), "--verify-steps", "6"])
        assert code == 0
    return model, paths


@pytest.mark.parametrize("chunk", [1, 3])
def test_onnx_matches_pytorch_streaming_over_three_receptive_fields(exported, chunk):
    model, paths = exported
    streamer = OnnxStreamer(paths[chunk])
    steps = 3 * model.receptive_field  # 108 steps: past every level boundary, far past the reach
    assert steps % chunk == 0 and streamer.chunk_size == chunk
    x = random_input(3, steps, model.input_size)  # batch 3, not the batch of 2 the graph was traced with
    state, torch_state = streamer.init_state(3), None
    sizes = {name: (array.shape, array.dtype) for name, array in state.items()}
    worst = 0.0
    for start in range(0, steps, chunk):
        piece = x[:, start:start + chunk]  # (B, C, F)
        found, state = streamer.step(piece.numpy(), state)
        with torch.no_grad():
            expected, torch_state = model(piece, torch_state)
        worst = max(worst, float(np.abs(found - expected.numpy()).max()))
        assert {name: (array.shape, array.dtype) for name, array in state.items()} == sizes  # fixed size
    assert worst <= TOLERANCE
    for name, tensor in torch_state.as_dict().items():  # the carried state itself agrees
        np.testing.assert_allclose(state[onnx_name(name)], tensor.numpy(), rtol=0, atol=TOLERANCE, err_msg=name)
    assert state["position"].tolist() == [steps] * 3
    assert sum(array.nbytes for array in state.values()) == 3 * state_bytes_per_stream(model.config)


def test_graph_names_dynamic_batch_and_metadata(exported):
    model, paths = exported
    graph_model = onnx.load(paths[3])
    graph = graph_model.graph
    names = model.init_state(1).names()
    assert [i.name for i in graph.input] == ["input", "position", *(n.replace(".", "_") for n in names[1:])]
    assert [o.name for o in graph.output] == ["output", *("new_" + n.replace(".", "_") for n in names)]
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    input_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    output_dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim[1:]]
    assert input_dims == [3, model.input_size] and output_dims == [3, model.config.output_features]
    metadata = {entry.key: entry.value for entry in graph_model.metadata_props}
    assert json.loads(metadata["hnae.state_names"]) == names
    assert OnnxStreamer(paths[3]).torch_state_names == names


def test_summary_json_reports_state_bytes_and_flops(exported):
    model, paths = exported
    summary = json.loads(paths[1].with_suffix(".json").read_text())
    assert summary["state_bytes_per_stream"] == model.init_state(1).nbytes == state_bytes_per_stream(model.config)
    assert summary["flops_per_step"] == matmul_flops_per_step(model.config)
    assert summary["chunk_size"] == 1 and summary["receptive_field"] == model.receptive_field
    assert summary["source_kind"] == "save_pretrained" and summary["model_config"] == model.config.to_dict()
    assert summary["verified_max_abs_difference"] <= TOLERANCE and summary["verified_steps"] == 6


def test_step_cost_counts_every_level_and_stays_fixed():
    model = tiny_model(windows=(3, 2, 2), num_layers=1, hidden_size=16, num_heads=4, summary_slots=3)
    cost = step_cost(model)
    assert cost["flops_per_step"] == matmul_flops_per_step(model.config)
    assert cost["state_bytes_per_stream"] == state_bytes_per_stream(model.config)


def test_export_of_a_train_checkpoint_includes_the_head(tmp_path):
    result = train(TrainConfig(task="copy", seq_len=5, model="hnae", steps=1, batch_size=4, eval_every=1,
                               eval_batches=1, progress=False, out=str(tmp_path / "run")))
    out = tmp_path / "copy.onnx"
    assert export_main(["--onnx", str(out), "--checkpoint", str(tmp_path / "run"), "--chunk-size", "2",
                        "--no-verify"]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["source_kind"] == "hnae train checkpoint"
    assert summary["output_features"] == result.task.output_size
    model = result.model.eval()  # the benchmark's SequenceModel: HNAE body, then a linear head
    x = random_input(2, 70, result.task.input_size)  # past the first 32-step block
    found, _ = OnnxStreamer(out).stream(x.numpy())
    with torch.no_grad():
        expected = model(x)  # (B, T, K), one parallel call
    assert found.shape == tuple(expected.shape)
    assert np.abs(found - expected.numpy()).max() <= TOLERANCE


def test_cli_errors_name_the_problem(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert export_main(["--onnx", str(out), "--checkpoint", str(tmp_path / "missing")]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err

    tiny_model().save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert export_main(["--onnx", str(out), "--checkpoint", str(tmp_path / "model")]) == 1
    error = capsys.readouterr().err
    assert str(weights) in error and "truncated" in error and "Traceback" not in error

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"anything": 1}')
    assert export_main(["--onnx", str(out), "--checkpoint", str(tmp_path / "other")]) == 1
    assert "neither" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        export_main(["--onnx", str(out), "--checkpoint", str(tmp_path / "model"), "--chunk-size", "0"])


def test_export_refuses_models_without_a_float32_streaming_step(tmp_path):
    with pytest.raises(ValueError, match="bidirectional"):
        StreamingStep(tiny_model(bidirectional=True))
    with pytest.raises(ValueError, match="float32"):
        export_step(tiny_model(dtype=torch.float64), tmp_path / "step.onnx")
    with pytest.raises(ValueError, match="chunk_size"):
        StreamingStep(tiny_model(), chunk_size=0)
    with pytest.raises(ValueError, match="opset"):
        export_step(tiny_model(), tmp_path / "step.onnx", opset=13)
    assert not (tmp_path / "step.onnx").exists()


def test_runner_checks_what_it_is_given(exported):
    _, paths = exported
    streamer = OnnxStreamer(paths[3])
    state = streamer.init_state(2)
    with pytest.raises(ValueError, match="shape"):
        streamer.step(np.zeros((2, 1, 5), np.float32), state)
    with pytest.raises(TypeError, match="float32"):
        streamer.step(np.zeros((2, 3, 5)), state)
    with pytest.raises(ValueError, match="keys"):
        streamer.step(np.zeros((2, 3, 5), np.float32), {"position": state["position"]})
    with pytest.raises(ValueError, match="batch size"):
        streamer.step(np.zeros((3, 3, 5), np.float32), state)
    with pytest.raises(ValueError, match="multiple"):
        streamer.stream(np.zeros((2, 4, 5), np.float32))


def test_the_example_streams_through_onnxruntime():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "examples/onnx_stream.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    difference = float(re.search(r"max \|onnxruntime - PyTorch\| = (\S+)", result.stdout).group(1))
    assert difference <= TOLERANCE
    config = hnae.HNAEConfig(3, 32, num_layers=2, windows=(8, 8), summary_slots=2)  # the example's model
    assert f"state: {state_bytes_per_stream(config):,} bytes per stream" in result.stdout
    assert f"FLOPs per step: {matmul_flops_per_step(config):,}" in result.stdout
