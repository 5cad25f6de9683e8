"""``hnae export``: the streaming step of a saved model as an ONNX graph, for onnxruntime on the edge.

    hnae export --onnx model.onnx --checkpoint my-model            # a save_pretrained directory
    hnae export --onnx model.onnx --checkpoint runs/copy1000       # a hnae train run (its latest checkpoint)
    hnae export --onnx model.onnx --checkpoint runs/copy1000/ckpt-000200 --chunk-size 4

``--checkpoint`` takes a directory written by ``HNAE.save_pretrained`` (the
graph outputs the HNAE's features), a ``hnae train`` checkpoint of an
``hnae`` model, or the run directory holding it (the graph then includes the
benchmark's linear head and outputs its logits). The graph takes a chunk
``(B, --chunk-size, input_size)`` and the state, and returns the output and
the new state (names in ``hnae_bench.onnx_step``). The command prints the
state size per stream and the FLOPs of one step and writes them, with the
graph's inputs and outputs, to a JSON file next to the graph
(``model.onnx`` -> ``model.json``). It then streams random inputs through
onnxruntime and PyTorch and reports the largest difference (``--no-verify``
skips this).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hnae
from hnae.pretrained import FORMAT_KEY
from hnae_bench.checkpoint import CONFIG_FILE, LATEST, MODEL_FILE, latest_checkpoint, read_json, read_safetensors
from hnae_bench.models import HNAEBody, SequenceModel
from hnae_bench.onnx_step import ONNX_OPSET, OnnxStreamer, export_step, torch_stream

VERIFY_TOLERANCE = 1e-4  # fp32 (the graph's dtype): onnxruntime and PyTorch order their sums differently
TRAIN_MODEL_KEYS = ("width", "input_size", "output_size", "num_layers", "windows", "summary_slots", "ffn_multiplier")


@dataclass
class ExportSource:
    """What ``--checkpoint`` held: the encoder, the head after it (None for save_pretrained), where from."""

    encoder: hnae.HNAE
    head: nn.Module | None
    kind: str  # "save_pretrained" or "hnae train checkpoint"
    path: Path
    model: nn.Module | None = None  # a train checkpoint's whole SequenceModel (body and head)


def _tuple(value):
    """JSON gives lists where the configuration held tuples."""
    return tuple(value) if isinstance(value, list) else value


def _from_train_checkpoint(path: Path, config: dict) -> ExportSource:
    """Rebuild the benchmark's SequenceModel (HNAE body + linear head) of a ``hnae train`` checkpoint."""
    config_path = path / CONFIG_FILE
    model_config = config.get("model_config")
    if not isinstance(model_config, dict):
        raise ValueError(f"{config_path}: 'model_config' must be an object, got {model_config!r}")
    if model_config.get("name") != "hnae":
        raise ValueError(f"{config_path}: the checkpoint holds a {model_config.get('name')!r} model; "
                         f"hnae export exports hnae models only")
    missing = [key for key in TRAIN_MODEL_KEYS if key not in model_config]
    if missing:
        raise ValueError(f"{config_path}: 'model_config' lacks {missing}")
    try:  # the arguments hnae_bench.models builds its hnae body with
        encoder = hnae.HNAE(model_config["input_size"], model_config["width"], num_layers=model_config["num_layers"],
                            batch_first=True, windows=tuple(model_config["windows"]),
                            summary_slots=model_config["summary_slots"], num_heads=model_config.get("num_heads"),
                            ffn_multiplier=model_config["ffn_multiplier"],
                            write_policy=_tuple(model_config.get("write_policy", "all")),
                            threshold=_tuple(model_config.get("threshold")), budget=_tuple(model_config.get("budget")),
                            place_rank=model_config.get("place_rank"),  # absent in older checkpoints: full tables
                            summary_pool=model_config.get("summary_pool", "attention"),  # absent: the pool before
                            positions=model_config.get("positions", "block"),  # absent: block places
                            short_conv=model_config.get("short_conv", 0),  # absent: none
                            event_counters=model_config.get("event_counters", 0))  # absent: none
        model = SequenceModel(HNAEBody(encoder), model_config["width"], model_config["input_size"],
                              model_config["output_size"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: malformed 'model_config' ({error})") from None
    weights_path = path / MODEL_FILE
    try:
        model.load_state_dict(read_safetensors(weights_path), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights_path}: does not fit the model described by {config_path} ({error})") from None
    return ExportSource(encoder.eval(), model.head.eval(), "hnae train checkpoint", path, model.eval())


def load_source(directory) -> ExportSource:
    """Open a save_pretrained directory, a train checkpoint, or a run directory (its ``latest`` checkpoint)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint: {path} is not a directory")
    if (path / LATEST).exists():  # a hnae train run directory
        path = latest_checkpoint(path)
    config = read_json(path / CONFIG_FILE)  # CheckpointError (a ValueError) names a bad file
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
    if FORMAT_KEY in config:
        return ExportSource(hnae.HNAE.from_pretrained(path, device="cpu"), None, "save_pretrained", path)
    if "model_config" in config:
        return _from_train_checkpoint(path, config)
    raise ValueError(f"{path / CONFIG_FILE}: neither a save_pretrained directory (no {FORMAT_KEY!r} key) nor a "
                     f"hnae train checkpoint (no 'model_config' key)")


def verify(path: Path, source: ExportSource, chunk_size: int, steps: int, seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| over ``steps`` (rounded up to whole chunks) of 2 random streams."""
    streamer = OnnxStreamer(path)
    chunks = max(1, -(-steps // chunk_size))
    parameter = next(source.encoder.parameters())
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, chunks * chunk_size, source.encoder.input_size, generator=generator).to(parameter.dtype)
    expected, _ = torch_stream(source.encoder, x, chunk_size, source.head)  # (2, T, K)
    found, _ = streamer.stream(x.numpy())
    return float(np.abs(found.astype(np.float64) - expected.double().numpy()).max())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hnae export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Export the streaming step of a saved hnae model (a chunk and the state in, the output and "
                    "the new state out) as an ONNX graph; print its state size and per-step FLOPs.")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the graph")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a save_pretrained directory, a hnae train checkpoint, or a hnae train run directory")
    parser.add_argument("--chunk-size", type=_positive_int, default=1, help="time steps per graph call")
    parser.add_argument("--opset", type=_positive_int, default=ONNX_OPSET, help="ONNX opset version")
    parser.add_argument("--verify-steps", type=_positive_int, default=64,
                        help="steps streamed through onnxruntime and PyTorch to compare them")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.onnx)
    sidecar = out.with_suffix(".json")
    if sidecar == out:
        print(f"hnae export: error: --onnx {out} ends in .json, which is where the cost summary goes; "
              f"name the graph *.onnx", file=sys.stderr)
        return 2
    try:
        source = load_source(args.checkpoint)
        saved_dtype = next(source.encoder.parameters()).dtype
        if saved_dtype != torch.float32:
            print(f"note: the model was saved in {saved_dtype}; the graph is float32", file=sys.stderr)
            source.encoder.float()
            if source.head is not None:
                source.head.float()
        description = export_step(source.encoder, out, args.chunk_size, source.head, args.opset)
        difference = None
        if not args.no_verify:
            difference = verify(out, source, args.chunk_size, args.verify_steps)
    except (ValueError, OSError, ImportError) as error:
        print(f"hnae export: error: {error}", file=sys.stderr)
        return 1
    summary = {"onnx": str(out), "source": str(source.path), "source_kind": source.kind,
               "model_config": source.encoder.config.to_dict(), **description,
               "verified_steps": None if difference is None else -(-args.verify_steps // args.chunk_size)
               * args.chunk_size,
               "verified_max_abs_difference": difference}
    sidecar.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"exported the streaming step of {source.path} ({source.kind}) to {out}: chunk {args.chunk_size} "
          f"x {description['input_size']} features in, {description['output_features']} out, opset {args.opset}")
    print(f"state: {description['state_bytes_per_stream']:,} bytes per stream "
          f"({description['state_tensors']} tensors, fixed size)")
    print(f"FLOPs per step: {description['flops_per_step']:,} (batch 1, matrix products, FlopCounterMode)")
    print(f"summary written to {sidecar}")
    if difference is not None:
        print(f"onnxruntime vs PyTorch over {summary['verified_steps']} steps: max |difference| = {difference:.3g}")
        if not difference <= VERIFY_TOLERANCE:
            print(f"hnae export: error: onnxruntime's outputs differ from PyTorch's by more than "
                  f"{VERIFY_TOLERANCE}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
