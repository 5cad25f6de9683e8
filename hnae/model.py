"""``hnae.HNAE``: the drop-in replacement for ``torch.nn.LSTM``.

    model = hnae.HNAE(input_size, hidden_size, num_layers, batch_first=True)
    output, state = model(x)               # parallel over time
    output, state = model(x_next, state)   # continues the stream exactly

Input forms, as nn.LSTM: unbatched (T, input_size); batched (T, B, input_size)
or (B, T, input_size) per ``batch_first``; a ``PackedSequence`` (the output is
one too); or padded input with ``lengths``. The state is an ``HNAEState``
(batched; an unbatched input gets a state of batch size 1).
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .windows import ring_write
from .block import HNAEBlock
from .config import HNAEConfig
from .reach import first_visible_stack, receptive_field
from .state import HNAEState, fresh_layer_state
from .validation import check_input, check_lengths, check_state


# Elements (B x steps x hidden_size) per time chunk of a long call on the CPU: at 2**20 (4 MiB in fp32)
# a training call at T = 16k, batch 8, width 88 ran 1.6x faster than in one chunk (2-core EPYC).
CPU_CHUNK_ELEMENTS = 1 << 20
# compile_step: no Dynamo guards on the model's modules (where this torch has the filter)
SKIP_MODULE_GUARDS = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
# compile_step(in_place=True) writes the ring slot outside its graphs from this window size on
DEFER_RING_WRITE_BYTES = 1 << 19


class HNAE(nn.Module):
    """Hierarchical neural attention encoder with nn.LSTM's constructor and call.

    Args (as nn.LSTM): input_size, hidden_size, num_layers, bias, batch_first,
        dropout (between layers), bidirectional, proj_size, device, dtype.
    Keyword-only: windows (per-level window sizes, default (100, 100): one
        layer sees at least 10,000 past steps), num_heads (default: the most
        of 8/4/2/1 leaving 16-wide heads), summary_slots (vectors per block
        summary), ffn_multiplier (feed-forward width / hidden_size),
        write_policy / threshold / budget (which summaries each level stores:
        "all", "novelty" or "learned"; see ``hnae.write_policy``), place_rank
        (None: full place tables; r: each a rank-r product, fewer parameters),
        summary_pool ("attention": learned queries pool each block; "select":
        each block keeps its summary_slots most salient items; see ``hnae.pooling``),
        positions ("block": a place-in-block embedding; "relative": reads that say how far
        back they lie and nothing tied to where a block starts, so the model runs the same at
        lengths it was not trained at; see ``HNAEConfig``), short_conv (0, or k >= 2: a causal
        convolution over each layer's last k inputs in front of its attention; see ``hnae.short_conv``),
        event_counters (0, or G >= 1: learned counts of events since the stream began, read by each
        layer; see ``hnae.event_count`` and ``count_penalty``).

    forward(input, state=None, lengths=None) -> (output, state). Output
    features: ``(proj_size or hidden_size) * num_directions``. Padded steps
    (beyond ``lengths``) come out as zeros. Bidirectional models return
    ``state=None`` and refuse a state: they cannot stream.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, windows=(100, 100), num_heads=None,
                 summary_slots: int = 1, ffn_multiplier: float = 2.0, write_policy="all", threshold=None,
                 budget=None, place_rank: int | None = None, summary_pool: str = "attention",
                 positions: str = "block", short_conv: int = 0, event_counters: int = 0) -> None:
        super().__init__()
        self.config = HNAEConfig(
            input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, bias=bias,
            batch_first=batch_first, dropout=dropout, bidirectional=bidirectional, proj_size=proj_size,
            windows=windows, num_heads=num_heads, summary_slots=summary_slots, ffn_multiplier=ffn_multiplier,
            write_policy=write_policy, threshold=threshold, budget=budget, place_rank=place_rank,
            summary_pool=summary_pool, positions=positions, short_conv=short_conv, event_counters=event_counters)
        config = self.config
        for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size", "windows", "num_heads", "summary_slots", "write_policy",
                     "threshold", "budget", "place_rank", "summary_pool", "positions", "short_conv",
                     "event_counters"):
            setattr(self, name, getattr(config, name))
        per_direction = proj_size or hidden_size
        self.layers = nn.ModuleList(
            nn.ModuleList(
                HNAEBlock(input_size if index == 0 else per_direction * config.num_directions, hidden_size,
                          config.num_heads, config.windows, summary_slots, config.ffn_width, proj_size, bias,
                          config.write_policy, config.threshold, config.budget, config.place_rank,
                          config.summary_pool, config.positions, config.short_conv, config.event_counters,
                          device=device, dtype=dtype)
                for _ in range(config.num_directions))
            for index in range(num_layers))
        self.between_layers = nn.Dropout(float(dropout))
        # Time chunks of a long causal call (exact: a chunk continues the state of the last).
        # None: on the CPU, chunks of about CPU_CHUNK_ELEMENTS / (B * hidden_size) steps, so that
        # intermediates stay small enough for the allocator to reuse them instead of mapping and
        # faulting in fresh pages each call; elsewhere one chunk. 0: one chunk; n > 0: n steps.
        self.time_chunk: int | None = None

    # ----------------------------------------------------------------- reach
    @property
    def receptive_field(self) -> int:
        """The most input steps (the current one included) one output depends on.

        Every output of one layer sees at least the last prod(windows) inputs;
        this is the maximum over positions for the whole stack (one side, for
        bidirectional models). Event counters (``event_counters``) are the exception:
        a count moves with every event since the stream began; this is the reach of
        everything else.
        """
        return receptive_field(self.windows, self.num_layers, self.short_conv)

    def first_visible(self, t: torch.Tensor) -> torch.Tensor:
        """Oldest input index the causal output at positions ``t`` depends on (exact)."""
        return first_visible_stack(torch.as_tensor(t, dtype=torch.int64), self.windows, self.num_layers,
                                   self.short_conv)

    # ----------------------------------------------------------------- state
    def init_state(self, batch_size: int, device=None, dtype=None) -> HNAEState:
        """A fresh state for ``batch_size`` streams (all zeros, position 0)."""
        if self.bidirectional:
            raise ValueError("state: a bidirectional HNAE has no streaming state (it needs the future)")
        reference = next(self.parameters())
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype
        layers = [fresh_layer_state(directions[0].state_shapes(), batch_size, device, dtype)
                  for directions in self.layers]
        position = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return HNAEState(position, layers, self.config.state_signature())

    def write_penalty(self) -> torch.Tensor:
        """The learned write policies' cost of writing beyond their budgets in the last training
        forward (0 without any; ``step`` calls add to it until the next forward): add it,
        weighted, to the loss."""
        terms = [term for directions in self.layers for block in directions
                 if (term := block.attention.policy.penalty()) is not None]
        return sum(terms) if terms else torch.zeros((), device=next(self.parameters()).device)

    def count_penalty(self) -> torch.Tensor:
        """The event counters' mean soft gate in the last training forward (0 without any; ``step``
        calls add to it until the next forward): add it, weighted, to the loss (``hnae.event_count``)."""
        terms = [term for directions in self.layers for block in directions
                 if block.event_count is not None and (term := block.event_count.penalty()) is not None]
        return sum(terms) / len(terms) if terms else torch.zeros((), device=next(self.parameters()).device)

    def flatten_parameters(self) -> None:
        """No-op, for code written for nn.LSTM."""

    # ------------------------------------------------------------ save, load
    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` and ``model.safetensors`` (needs the safetensors package)."""
        from .pretrained import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "HNAE":
        """Load a model written by ``save_pretrained``; never unpickles anything."""
        from .pretrained import load_pretrained
        return load_pretrained(cls, directory, device=device, dtype=dtype)

    # --------------------------------------------------------------- forward
    def forward(self, input, state: HNAEState | None = None, lengths=None):
        for directions in self.layers:  # write_penalty() and count_penalty() cover this forward only
            for block in directions:
                block.attention.policy.forget()
                if block.event_count is not None:
                    block.event_count.forget()
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths: a PackedSequence carries its own lengths; pass lengths=None")
            x, lengths = pad_packed_sequence(input, batch_first=True)  # (B, T, F), (B,)
            unbatched = False
        else:
            x, unbatched = check_input(input, self.config, self._parameter_dtype())
        batch, steps = x.shape[0], x.shape[1]
        lengths = check_lengths(lengths, batch, steps, x.device)
        check_state(state, self.config, batch, x.device)
        if lengths is not None:
            valid = torch.arange(steps, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
            x = x.masked_fill(~valid.unsqueeze(-1), 0.0)

        if self.bidirectional:
            output, new_state = self._bidirectional(x, lengths), None
        else:
            if state is None:
                state = self.init_state(batch, device=x.device, dtype=x.dtype)
            if steps == 0:
                output, new_state = x.new_zeros(batch, 0, self.config.output_features), state
            else:
                output, new_state = self._causal(x, state, lengths)
        if lengths is not None:
            output = output.masked_fill(~valid.unsqueeze(-1), 0.0)
        return self._format_output(output, input, packed, unbatched, lengths), new_state

    def _parameter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def step(self, x: torch.Tensor, state: HNAEState | None = None, branch_free: bool = False,
             in_place: bool = False):
        """One time step for every stream: x (B, input_size) -> output (B, out_features), state.

        Equivalent to ``forward`` on a chunk of length 1 (which uses it), for streams at
        any positions. ``branch_free=True`` avoids data-dependent Python branches (export).
        ``in_place=True`` writes the step into the given state's local-window tensors instead
        of copies (faster at large batches; the old state is then gone: keep the returned one).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a 2-D tensor (B, input_size), got {getattr(x, 'shape', type(x))}")
        batched, _ = check_input(x.unsqueeze(1), self.config.__class__(**{**self.config.to_dict(),
                                                                           "batch_first": True}),
                                 self._parameter_dtype())
        check_state(state, self.config, x.shape[0], x.device)
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        return self._step(batched[:, 0], state, branch_free, ring="in_place" if in_place else "copy")

    def compile_step(self, in_place: bool = False, **compile_options):
        """``step`` through ``torch.compile``, for fast streaming inference.

        Returns ``step(x, state=None) -> (output, state)``: the same results as
        ``self.step``, from two compiled graphs: one for the steps where some
        stream completes a level-0 block (its summaries are pooled), one for
        the rest. The first call of each at each batch size, device and dtype
        compiles: tens of seconds on a CPU, which needs a C++ compiler.
        Calls check shapes and the state's configuration only. For inference:
        the model must be in eval mode, with no memory trace set. ``in_place``: as in ``step``
        (for small windows, under 512 KB a tensor, the graphs copy instead: cheaper there).
        ``compile_options`` go to ``torch.compile`` (``dynamic=False`` unless given; without
        ``mode`` or ``options``, no guards on the model's modules: compile again after
        replacing a submodule or a parameter object; in-place weight updates are seen).
        """
        if self.bidirectional:
            raise ValueError("compile_step: a bidirectional HNAE cannot stream (it needs the future)")
        self._refuse_a_trace()
        options = {"dynamic": False, **compile_options}
        if SKIP_MODULE_GUARDS is not None and "mode" not in options and "options" not in options:
            # no guard checks on the model's modules (a large share of a CPU step's overhead);
            # compile again after replacing a submodule or a parameter object
            options["options"] = {"guard_filter_fn": SKIP_MODULE_GUARDS}
        # Two graphs: a step where some stream completes a level-0 block (summaries pooled, then
        # kept per stream) and the far more common step where none does (no pooling at all).
        # In place with large windows, the graphs leave the local ring's slot to be written here:
        # inside a graph, a write into an input is compiled as a copy of the whole buffer, which
        # costs less than the eager writes only while the windows are small (batch 1).
        own_step = self._own_step()
        graphs = {(completes, ring): torch.compile(functools.partial(own_step, completes=completes, ring=ring),
                                                   **options)
                  for completes in (True, False) for ring in ("copy", "defer")}
        dtype, first_window = self._parameter_dtype(), self.config.windows[0]

        def step(x: torch.Tensor, state: HNAEState | None = None):
            if self.training:
                raise RuntimeError("compile_step streams for inference: call model.eval() first")
            self._refuse_a_trace()  # the graphs do not guard on the modules, so they would not see one
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.config.input_size:
                raise ValueError(f"x must be a tensor (B, {self.config.input_size}), got {getattr(x, 'shape', x)!r}")
            if x.dtype != dtype:
                raise TypeError(f"x is {x.dtype} but the model is {dtype}; convert one of them")
            check_state(state, self.config, x.shape[0], x.device)
            if state is None:
                state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
            completes = bool(((state.position + 1) % first_window == 0).any())
            defer = in_place and state.layers[0]["local_keys"].nbytes >= DEFER_RING_WRITE_BYTES
            output, new_state = graphs[completes, "defer" if defer else "copy"](x, state)
            if defer:
                slot = state.position % first_window  # (B,)
                for old, new in zip(state.layers, new_state.layers):
                    for name in ("local_keys", "local_values"):  # new: the step's (B, H, 1, E) item
                        new[name] = ring_write(old[name], slot, new[name], in_place=True)
            return output, new_state
        return step

    def _refuse_a_trace(self) -> None:
        if any(getattr(block.attention, "trace", None) is not None for (block, *_) in self.layers):
            raise RuntimeError("compile_step: a memory trace is set (hnae.trace_memory); trace with step()")

    def _own_step(self):
        """``self._step`` on a copy of its code object. Dynamo keeps compiled graphs on the code
        object, and without guards on the modules it would hand one model's graphs to another
        (another pool type, say) that calls the same code: a copy per compile_step keeps them apart."""
        function = HNAE._step
        copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                                  function.__defaults__, function.__closure__)
        copy.__kwdefaults__ = function.__kwdefaults__
        return types.MethodType(copy, self)

    def _step(self, x: torch.Tensor, state: HNAEState, branch_free: bool = False, completes: bool | None = None,
              ring: str = "copy"):
        hidden, new_layers = x, []
        for index, (block,) in enumerate(self.layers):
            hidden, layer_state = block.step(hidden, state.layers[index], state.position, branch_free,
                                             completes, ring)
            new_layers.append(layer_state)
            if index < self.num_layers - 1:
                hidden = self.between_layers(hidden)
        return hidden, HNAEState(state.position + 1, new_layers, state.signature)

    def _causal(self, x: torch.Tensor, state: HNAEState, lengths) -> tuple[torch.Tensor, HNAEState]:
        """Run the causal stack over x (B, T, F) from ``state``; split by position if they differ."""
        if x.shape[1] == 1 and (lengths is None or bool((lengths == 1).all())):
            output, new_state = self._step(x[:, 0], state)  # one step: the fixed-size path
            return output.unsqueeze(1), new_state
        positions = state.position
        if bool((positions != positions[0]).any()):
            return self._causal_by_position(x, state, lengths)
        chunk = self._chunk_length(x)
        if lengths is None and chunk < x.shape[1]:
            outputs = []
            for begin in range(0, x.shape[1], chunk):
                output, state = self._causal_chunk(x[:, begin:begin + chunk], state, None)
                outputs.append(output)
            return torch.cat(outputs, dim=1), state
        return self._causal_chunk(x, state, lengths)

    def _chunk_length(self, x: torch.Tensor) -> int:
        """Steps per chunk of a causal call over x (B, T, F): see ``time_chunk``."""
        if self.time_chunk is not None:
            if isinstance(self.time_chunk, bool) or not isinstance(self.time_chunk, int) or self.time_chunk < 0:
                raise ValueError(f"time_chunk must be None or an int >= 0, got {self.time_chunk!r}")
            return self.time_chunk or x.shape[1]
        tracing = any(block.attention.trace is not None for (block, *_) in self.layers)
        if x.device.type != "cpu" or tracing:
            return x.shape[1]
        first_window = self.config.windows[0]
        steps = CPU_CHUNK_ELEMENTS // (x.shape[0] * self.config.hidden_size)
        return max(first_window, steps // first_window * first_window)

    def _causal_chunk(self, x: torch.Tensor, state: HNAEState, lengths) -> tuple[torch.Tensor, HNAEState]:
        """One causal call of the stack over x (B, T, F), every stream at the same position."""
        positions = state.position
        steps = x.shape[1]
        start = int(positions[0])
        end = start + steps if lengths is None else positions + lengths  # int, or (B,) per stream
        hidden, new_layers = x, []
        for index, (block,) in enumerate(self.layers):
            hidden, layer_state = block.forward_chunk(hidden, state.layers[index], start, end)
            new_layers.append(layer_state)
            if index < self.num_layers - 1:
                hidden = self.between_layers(hidden)
        new_position = positions + steps if lengths is None else end
        return hidden, HNAEState(new_position, new_layers, state.signature)

    def _causal_by_position(self, x, state, lengths):
        """Streams at different positions: run each group of equal positions on its own."""
        outputs = x.new_zeros(x.shape[0], x.shape[1], self.config.output_features)
        parts, order = [], []
        for position in torch.unique(state.position):
            index = torch.nonzero(state.position == position).flatten()
            sub_lengths = None if lengths is None else lengths[index]
            out, sub_state = self._causal(x[index], state.select(index), sub_lengths)
            outputs[index] = out
            parts.append(sub_state)
            order.append(index)
        joined = HNAEState.concatenate(parts)
        inverse = torch.argsort(torch.cat(order))
        return outputs, joined.select(inverse)

    def _bidirectional(self, x: torch.Tensor, lengths) -> torch.Tensor:
        """Forward and backward causal stacks, each layer reading both directions of the last."""
        batch, steps = x.shape[0], x.shape[1]
        if steps == 0:
            return x.new_zeros(batch, 0, self.config.output_features)
        lengths_or_full = lengths if lengths is not None else torch.full((batch,), steps, device=x.device)
        time = torch.arange(steps, device=x.device).unsqueeze(0)  # (1, T)
        reverse = torch.where(time < lengths_or_full.unsqueeze(1), lengths_or_full.unsqueeze(1) - 1 - time,
                              time)  # (B, T): each sequence reversed within its length
        end = steps if lengths is None else lengths  # the state is not kept: an int avoids gathers
        fresh = self._fresh_layer_states(batch, x)

        def flip(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, reverse.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        hidden = x
        for index, (forward_block, backward_block) in enumerate(self.layers):
            ahead, _ = forward_block.forward_chunk(hidden, fresh[index], 0, end)
            behind, _ = backward_block.forward_chunk(flip(hidden), fresh[index], 0, end)
            hidden = torch.cat([ahead, flip(behind)], dim=-1)  # (B, T, 2 * out)
            if index < self.num_layers - 1:
                hidden = self.between_layers(hidden)
        return hidden

    def _fresh_layer_states(self, batch: int, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [fresh_layer_state(directions[0].state_shapes(), batch, x.device, x.dtype)
                for directions in self.layers]

    def _format_output(self, output, input, packed, unbatched, lengths):
        if packed:
            order = input.sorted_indices
            padded = output if order is None else output.index_select(0, order)
            sorted_lengths = lengths if order is None else lengths.index_select(0, order.to(lengths.device))
            data = pack_padded_sequence(padded, sorted_lengths.cpu(), batch_first=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        if unbatched:
            return output.squeeze(0)  # (T, out)
        return output if self.batch_first else output.transpose(0, 1)
