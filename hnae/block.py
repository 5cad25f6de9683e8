"""One layer of the stack, one direction: hierarchical attention, then a feed-forward.

Pre-norm residual, as in most modern transformers:

    h = project_in(x) + place[t mod w_0]    # (B, C, D)  (identity when widths agree; positions="relative":
                                            #  no place term, see HNAEConfig.positions)
        + event_count(project_in(x))        # event_counters=G > 0 only: how many events so far
    h = h + short_conv(h)                   # short_conv=k > 0 only: each step mixed with its k - 1 before
    h = h + attention(norm_attention(h))    # hierarchical, causal
    h = h + feed_forward(norm_feed_forward(h))
    y = project_out(norm_output(h))         # (B, C, D) or (B, C, proj_size)
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import HierarchicalAttention
from .event_count import EventCounter
from .places import add_place_table, place_rows
from .short_conv import ShortConv


class HNAEBlock(nn.Module):
    """A causal HNAE layer mapping (B, C, in_features) to (B, C, out_features).

    ``out_features`` is ``proj_size`` when it is set, else ``hidden_size``.
    ``forward_chunk`` carries the layer's streaming state (see ``hnae.state``).
    """

    def __init__(self, in_features: int, hidden_size: int, num_heads: int, windows: tuple[int, ...],
                 summary_slots: int, ffn_width: int, proj_size: int = 0, bias: bool = True,
                 write_policy: tuple = (), thresholds: tuple = (), budgets: tuple = (),
                 place_rank: int | None = None, summary_pool: str = "attention", positions: str = "block",
                 short_conv: int = 0, event_counters: int = 0, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.project_in = (nn.Identity() if in_features == hidden_size
                           else nn.Linear(in_features, hidden_size, bias=bias, **factory))
        # positions="block": where each step sits in its level-0 block, order inside windows (copying
        # needs it). "relative": no such table; the attention's reads carry distances instead.
        self.block_places = positions == "block"
        if self.block_places:
            add_place_table(self, "place_embedding", (windows[0], hidden_size), place_rank, factory)  # (w_0, D)
        self.short_conv = ShortConv(hidden_size, short_conv, **factory) if short_conv else None
        self.event_count = EventCounter(hidden_size, event_counters, **factory) if event_counters else None
        self.norm_attention = nn.LayerNorm(hidden_size, **factory)
        self.attention = HierarchicalAttention(hidden_size, num_heads, windows, summary_slots, bias=bias,
                                               write_policy=write_policy, thresholds=thresholds,
                                               budgets=budgets, place_rank=place_rank,
                                               summary_pool=summary_pool,
                                               relative_values=positions == "relative", **factory)
        self.norm_feed_forward = nn.LayerNorm(hidden_size, **factory)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, ffn_width, bias=bias, **factory),
            nn.GELU(),
            nn.Linear(ffn_width, hidden_size, bias=bias, **factory),
        )
        self.norm_output = nn.LayerNorm(hidden_size, **factory)
        self.project_out = (nn.Linear(hidden_size, proj_size, bias=False, **factory) if proj_size
                            else nn.Identity())

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes (without the batch dimension) of this layer's state tensors (see ``hnae.state``)."""
        shapes = self.attention.state_shapes()
        if self.short_conv is not None:
            shapes["conv_tail"] = (self.short_conv.kernel - 1, self.attention.d_model)
        if self.event_count is not None:
            shapes["event_count"] = (self.event_count.counters,)  # float64 whole-number counts
        return shapes

    def forward_chunk(self, x: torch.Tensor, state: dict[str, torch.Tensor], start: int,
                      end) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, C, in_features) at positions start.. ; returns (B, C, out_features) and the state at end."""
        hidden = self.project_in(x)  # (B, C, D)
        if self.event_count is not None:  # the gates read the input alone, not its place
            counted, count = self.event_count.forward_chunk(hidden, state["event_count"], start, end)
            hidden = hidden + counted
        if self.block_places:
            places = torch.arange(start, start + x.shape[1], device=x.device) % self.attention.windows[0]
            hidden = hidden + place_rows(self, "place_embedding", places)
        if self.short_conv is not None:
            mixed, tail = self.short_conv.forward_chunk(hidden, state["conv_tail"], start, end)
            hidden = hidden + mixed
        attended, new_state = self.attention.forward_chunk(self.norm_attention(hidden), state, start, end)
        if self.short_conv is not None:
            new_state["conv_tail"] = tail
        if self.event_count is not None:
            new_state["event_count"] = count
        hidden = hidden + attended
        hidden = hidden + self.feed_forward(self.norm_feed_forward(hidden))
        return self.project_out(self.norm_output(hidden)), new_state

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], position: torch.Tensor,
             branch_free: bool = False, completes: bool | None = None,
             ring: str = "copy") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One input per stream: x (B, in_features) at positions (B,) -> (B, out_features), state.

        ``ring``: how the local window's slot is written (see ``HierarchicalAttention.step``)."""
        hidden = self.project_in(x)  # (B, D)
        if self.event_count is not None:
            counted, count = self.event_count.step(hidden, state["event_count"])
            hidden = hidden + counted
        if self.block_places:
            hidden = hidden + place_rows(self, "place_embedding", position % self.attention.windows[0])
        if self.short_conv is not None:
            mixed, tail = self.short_conv.step(hidden, state["conv_tail"])
            hidden = hidden + mixed
        attended, new_state = self.attention.step(self.norm_attention(hidden), state, position, branch_free,
                                                  completes, ring)
        if self.short_conv is not None:
            new_state["conv_tail"] = tail
        if self.event_count is not None:
            new_state["event_count"] = count
        hidden = hidden + attended
        hidden = hidden + self.feed_forward(self.norm_feed_forward(hidden))
        return self.project_out(self.norm_output(hidden)), new_state
