"""The streaming state: a flat, batched, documented set of tensors.

Every tensor has the batch dimension first, so a state can be moved, detached,
sub-batched, checkpointed, or passed across an ONNX graph boundary as a plain
list of tensors (``names()`` / ``tensors()`` / ``from_tensors``).

Per layer ``i`` (``w_l`` windows, ``K`` summary slots, ``H`` heads, ``E`` head
width, ``D`` model width), named ``layer{i}.<field>``:

- ``local_keys``, ``local_values`` (B, H, w_0, E): keys and values of the last
  ``w_0`` inputs, as a ring: the input at position p sits at slot ``p mod w_0``
  (zeros before the start of the stream). A step writes one slot, not a shifted copy.
- ``memory_keys_{l}``, ``memory_values_{l}`` (B, H, w_l * K, E), ``l >= 1``:
  keys and values of the last ``w_l`` level-``l`` summaries written, oldest first.
- ``conv_tail`` (B, k - 1, D), only with ``short_conv=k``: the layer's last
  ``k - 1`` inputs to its short convolution, oldest first (``hnae.short_conv``).
- ``event_count`` (B, G) float64, only with ``event_counters=G``: each learned counter's
  running count since the stream began (``hnae.event_count``); float64 whatever the model's dtype.
- ``written``, ``skipped`` (B, L - 1) int64: per summary level, how many
  items it has written and how many candidates its write policy skipped
  (see ``hnae.write_policy``; under ``"all"`` nothing is skipped).

Local keys are stored with their rotary phase applied (it is exact and
periodic: see ``hnae.rotary``). The items of a block still being filled are
the newest entries of these windows (a block never holds more than its
window), so the summary of a block is pooled from the state when it
completes (then the ring is in order, oldest first): nothing else is kept.

Plus ``position`` (B,) int64: the number of inputs each stream has consumed.
Nothing in it grows with the position: its size is fixed by the windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def layer_state_shapes(windows: tuple[int, ...], slots: int, num_heads: int,
                       d_model: int) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of one layer's state tensors."""
    head_width = d_model // num_heads
    w0 = windows[0]
    shapes = {
        "local_keys": (num_heads, w0, head_width),
        "local_values": (num_heads, w0, head_width),
    }
    for level in range(1, len(windows)):
        shapes[f"memory_keys_{level}"] = (num_heads, windows[level] * slots, head_width)
        shapes[f"memory_values_{level}"] = (num_heads, windows[level] * slots, head_width)
    if len(windows) > 1:
        shapes["written"] = (len(windows) - 1,)  # int64: items each summary level has written
        shapes["skipped"] = (len(windows) - 1,)  # int64: candidates its write policy skipped
    return shapes


# state fields whose dtype is not the model's: the counters of written and skipped summaries, the event counts
FIXED_DTYPES = {"written": torch.int64, "skipped": torch.int64, "event_count": torch.float64}


def fresh_layer_state(shapes: dict[str, tuple[int, ...]], batch_size: int, device, dtype) -> dict:
    """An all-zero layer state: floating tensors in ``dtype``, except those of ``FIXED_DTYPES``."""
    return {name: torch.zeros(batch_size, *shape, device=device, dtype=FIXED_DTYPES.get(name, dtype))
            for name, shape in shapes.items()}


@dataclass
class HNAEState:
    """A batch of streams' state; pass it back to the model to continue them.

    position: (B,) int64. layers: one dict of tensors per layer (see module doc).
    signature: the model configuration the state belongs to.
    """

    position: torch.Tensor
    layers: list[dict[str, torch.Tensor]]
    signature: tuple

    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    @property
    def nbytes(self) -> int:
        """Total bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def names(self) -> list[str]:
        names = ["position"]
        for index, layer in enumerate(self.layers):
            names.extend(f"layer{index}.{name}" for name in layer)
        return names

    def tensors(self) -> list[torch.Tensor]:
        flat = [self.position]
        for layer in self.layers:
            flat.extend(layer.values())
        return flat

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names(), self.tensors()))

    @classmethod
    def from_tensors(cls, names: list[str], tensors: list[torch.Tensor], signature: tuple) -> "HNAEState":
        """Rebuild a state from ``names()`` and matching tensors (e.g. after ONNX)."""
        if len(names) != len(tensors) or not names or names[0] != "position":
            raise ValueError("state: names must start with 'position' and match the tensors one to one")
        layers: list[dict[str, torch.Tensor]] = []
        for name, tensor in zip(names[1:], tensors[1:]):
            prefix, field = name.split(".", 1)
            index = int(prefix.removeprefix("layer"))
            while len(layers) <= index:
                layers.append({})
            layers[index][field] = tensor
        return cls(tensors[0], layers, signature)

    def _map(self, fn) -> "HNAEState":
        return HNAEState(fn(self.position), [{k: fn(v) for k, v in layer.items()} for layer in self.layers],
                         self.signature)

    def to(self, *args, **kwargs) -> "HNAEState":
        """Like ``Tensor.to``; a dtype applies to the floating tensors only, not to ``FIXED_DTYPES``."""
        def move(tensor: torch.Tensor, fixed: torch.dtype | None = None) -> torch.Tensor:
            if tensor.is_floating_point() and fixed is None:
                return tensor.to(*args, **kwargs)
            moved = tensor.to(*args, **kwargs)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        layers = [{name: move(value, FIXED_DTYPES.get(name)) for name, value in layer.items()}
                  for layer in self.layers]
        return HNAEState(move(self.position), layers, self.signature)

    def clone(self) -> "HNAEState":
        """A copy whose tensors share nothing with this one (keep it before stepping in place)."""
        return self._map(torch.clone)

    def detach(self) -> "HNAEState":
        """The same state cut from the autograd graph (for truncated backprop)."""
        return self._map(torch.Tensor.detach)

    def select(self, index) -> "HNAEState":
        """A sub-batch: ``index`` is an int, a slice, a list or a 1-D index tensor."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, slice):
            return self._map(lambda t: t[index])
        index = torch.as_tensor(index, dtype=torch.long, device=self.position.device)
        return self._map(lambda t: t.index_select(0, index))

    @staticmethod
    def concatenate(states: list["HNAEState"]) -> "HNAEState":
        """Join states of the same model along the batch dimension."""
        first = states[0]
        if any(s.signature != first.signature for s in states):
            raise ValueError("state: cannot join states of different model configurations")
        position = torch.cat([s.position for s in states])
        layers = [{k: torch.cat([s.layers[i][k] for s in states]) for k in layer}
                  for i, layer in enumerate(first.layers)]
        return HNAEState(position, layers, first.signature)
