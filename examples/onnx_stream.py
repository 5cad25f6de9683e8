"""Export a small HNAE's streaming step to ONNX, then stream a sequence through onnxruntime.

    python examples/onnx_stream.py

Needs ``pip install 'hnae[export]'`` (onnx, onnxruntime). The same export from
the command line, for a model saved with ``save_pretrained``:

    hnae export --onnx model.onnx --checkpoint my-model --chunk-size 4

The graph takes a chunk (B, 4, 3) and the state tensors and returns the output
(B, 4, 32) and the new state; here the state is carried across chunks as
numpy arrays, for three times the model's receptive field, and the outputs
are compared with PyTorch streaming the same sequence.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

import hnae
from hnae_bench.onnx_step import OnnxStreamer, export_step

CHUNK = 4


def main() -> float:
    torch.manual_seed(0)
    model = hnae.HNAE(3, 32, num_layers=2, batch_first=True, windows=(8, 8), summary_slots=2).eval()
    steps = CHUNK * -(-3 * model.receptive_field // CHUNK)  # 3x the reach, whole chunks
    x = torch.randn(2, steps, 3)  # (B, T, input_size)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "hnae_step.onnx"
        description = export_step(model, path, chunk_size=CHUNK)
        streamer = OnnxStreamer(path)
        state = streamer.init_state(batch_size=2)  # {'position': (2,), 'layer0_local_keys': (2, H, 8, E), ...}
        onnx_pieces = []
        for start in range(0, steps, CHUNK):  # what a device would do as inputs arrive
            piece, state = streamer.step(x[:, start:start + CHUNK].numpy(), state)
            onnx_pieces.append(piece)
    onnx_output = np.concatenate(onnx_pieces, axis=1)  # (B, T, 32)

    torch_state, torch_pieces = None, []
    with torch.no_grad():
        for start in range(0, steps, CHUNK):
            piece, torch_state = model(x[:, start:start + CHUNK], torch_state)
            torch_pieces.append(piece)
    torch_output = torch.cat(torch_pieces, dim=1).numpy()  # (B, T, 32)

    difference = float(np.abs(onnx_output - torch_output).max())
    print(f"streamed {steps} steps (3x the receptive field of {model.receptive_field}) in chunks of {CHUNK}")
    print(f"state: {description['state_bytes_per_stream']:,} bytes per stream, "
          f"{sum(a.nbytes for a in state.values()):,} for both streams after the last chunk")
    print(f"FLOPs per step: {description['flops_per_step']:,}")
    print(f"positions: {state['position'].tolist()}")
    print(f"max |onnxruntime - PyTorch| = {difference:.3g}")
    return difference


if __name__ == "__main__":
    main()
