"""Every benchmarked model behind one interface, at matched parameter budgets.

`build_model(name, task, preset, max_len)` returns a `SequenceModel`: a body
that maps features (B, T, C) to hidden vectors (B, T, D), then a linear head
to (B, T, K). The body's width D is chosen so that the whole model's
parameter count lands nearest the preset's target; depth is fixed per preset
(and, for the TCN, set by max_len so that its receptive field covers it).

Bodies here: hnae, lstm, gru, tcn (pytorch-tcn) and a small causal
transformer. The optional peers (mamba, xlstm, htransformer) live in
`hnae_bench.peers` and are imported only when asked for.

Dimension letters: B batch, T time steps, C input_size, D width, H heads,
K output_size.
"""
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hnae_bench import peers
from hnae_bench.peers import ModelUnavailable
from hnae_bench.recipe import STACK_DEPTH, BodyRecipe
from hnae_bench.tasks import Task

MODEL_NAMES = ('hnae', 'lstm', 'gru', 'tcn', 'transformer', 'mamba', 'xlstm', 'htransformer')
PEER_NAMES = ('mamba', 'xlstm', 'htransformer')
PRESETS = ('small', 'large')
PARAMETER_TARGETS = {'small': 40_000, 'large': 400_000}
RECURRENT_DEPTH = {'small': 1, 'large': 2}   # layers of nn.LSTM / nn.GRU
HNAE_DEPTH = {'small': 2, 'large': 3}        # hnae layers: large trades a layer for width (matmul-bound)
# windows of levels >= 1; levels are added to cover max_len. large: 16 keeps the summary keys of a
# block few (S = 2*64 + 16*2 per level), so attention stays a small share of the step.
# T=4k, 2-core EPYC, ~0.42M parameters, scripts/preset_ab.py, tokens/s vs nn.LSTM: 4 layers, windows
# (64, 64, 64) 0.87x; 4 layers (64, 16, 16, 16) 1.03x; 3 layers (64, 16, 16, 16) 1.07x.
HNAE_WINDOWS = {'small': 8, 'large': 16}
HNAE_FIRST_WINDOW = {'small': 128, 'large': 64}  # level 0: a wide local window learns recall fast
HNAE_SLOTS = {'small': 16, 'large': 2}       # small: copy-style recall of many symbols; large: long T
# small: rank-8 place tables. Full tables (128 places x D per layer, and per pool) took 24k of the
# 40k parameters and left width 24, which stalled on copy T = 200 in 6 of 7 race runs; rank 8 gives
# width 32 at 42k, which solved T = 200 in 3 of 4 (docs/RESULTS.md, "place tables").
HNAE_PLACE_RANK = {'small': 8, 'large': None}
# heads: small keeps the default (>= 16 wide, so slots x heads >= 10 symbols fit a block);
# large uses 2 heads of 36: the CPU's fused attention is faster on wider heads (interleaved A/B,
# T=4k, 2-core EPYC: 4 heads of 18 14.4k, 2 of 36 15.3k, 1 of 72 19.4k tokens/s; one head is a weak model)
HNAE_HEADS = {'small': None, 'large': 2}
# summary_pool (see hnae.pooling). small: "select" keeps each block's 16 most salient items as they are, so
# a block's summary holds its symbols in order from the first step; with pooled slots (8 of them) copy sat
# for thousands of steps on T = 500 with summaries that held a bag of the symbols (docs/RESULTS.md).
HNAE_POOL = {'small': 'select', 'large': 'attention'}
# positions (see hnae.HNAEConfig): "block" for both presets; `hnae train --positions relative` trades the
# place-in-block embedding for reads that carry distances, which copy at lengths never trained on
# (docs/RESULTS.md, "length generalisation").
HNAE_POSITIONS = {'small': 'block', 'large': 'block'}
HNAE_SHORT_CONV = {'small': 0, 'large': 0}  # hnae.HNAE's short_conv (`hnae train --short-conv K`)
HNAE_EVENT_COUNTERS = {'small': 0, 'large': 0}  # hnae.HNAE's event_counters (`hnae train --event-counters G`)
TCN_KERNEL_SIZE = 8                          # the TCN paper's kernel for the copy task

class SequenceModel(nn.Module):
    """body: (B, T, C) -> (B, T, D); head: (B, T, D) -> (B, T, K)."""

    def __init__(self, body: nn.Module, width: int, input_size: int, output_size: int):
        super().__init__()
        self.input_size = input_size
        self.body = body
        self.head = nn.Linear(width, output_size)
        self.model_name = ''
        self.model_config: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f'x must have shape (B, T, {self.input_size}), got {tuple(x.shape)}')
        return self.head(self.body(x))   # (B, T, K)

    def write_penalty(self) -> torch.Tensor | float:
        """hnae's learned write policies' cost beyond their budget in the last forward (0 for others)."""
        encoder = getattr(self.body, 'encoder', None)
        return encoder.write_penalty() if hasattr(encoder, 'write_penalty') else 0.0

    def count_penalty(self) -> torch.Tensor | float:
        """hnae's event counters' mean gate in the last forward (0 for other models and without counters)."""
        encoder = getattr(self.body, 'encoder', None)
        return encoder.count_penalty() if hasattr(encoder, 'count_penalty') else 0.0


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _count_built(make: Callable[[], nn.Module], on_meta: bool) -> int:
    """Parameters of make()'s module. On the meta device no memory is spent on weights or
    buffers (an xLSTM's causal mask is max_len^2); a family that cannot build there is built on the CPU."""
    if on_meta:
        try:
            with torch.device('meta'):
                return count_parameters(make())
        except (NotImplementedError, RuntimeError):
            pass
    return count_parameters(make())


def fit_width(count_at: Callable[[int], int], target: int, step: int, max_width: int = 8192,
              min_width: int = 1) -> int:
    """The multiple of `step` in [min_width, max_width] whose count_at(width) is nearest `target` (by ratio).

    count_at must grow with width. Parameter counts are close to quadratic in the width, so a
    quadratic through three probes guesses the answer; a galloping search then brackets it
    and bisection finishes: a handful of builds instead of a dozen.
    """
    counts: dict[int, int] = {}

    def count(multiple: int) -> int:
        if multiple not in counts:
            counts[multiple] = count_at(multiple * step)
        return counts[multiple]

    first = max(1, -(-min_width // step))
    limit = max(first, max_width // step)
    probes = [first, 2 * first, 4 * first]
    a, b, c = np.polyfit(probes, [count(m) for m in probes], deg=2)
    roots = [r.real for r in np.roots([a, b, c - target]) if abs(r.imag) < 1e-9 and r.real > 0]
    guess = min(limit, max(first, round(max(roots)) if roots else first))
    low, high, stride = guess, guess, 1
    while low > first and count(low) >= target:   # gallop down below the target
        low, stride = max(first, low - stride), 2 * stride
    stride = 1
    while high < limit and count(high) < target:  # gallop up to the target
        high, stride = min(limit, high + stride), 2 * stride
    while low < high:   # the first multiple whose count reaches the target
        middle = (low + high) // 2
        if count(middle) >= target:
            high = middle
        else:
            low = middle + 1
    candidates = [m for m in (low - 1, low) if m >= first]
    return step * min(candidates, key=lambda m: abs(math.log(count(m) / target)))


# --- bodies defined here ------------------------------------------------------------------------

class RecurrentBody(nn.Module):
    """nn.LSTM or nn.GRU, batch first; returns the top layer's outputs."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]   # (B, T, D)


class HNAEBody(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.receptive_field = int(encoder.receptive_field)

    def forward(self, x):
        return self.encoder(x)[0]   # (B, T, D)


class TCNBody(nn.Module):
    def __init__(self, tcn: nn.Module, receptive_field: int):
        super().__init__()
        self.tcn = tcn
        self.receptive_field = receptive_field

    def forward(self, x):
        return self.tcn(x)   # (B, T, D): the TCN was built with input_shape='NLC'


def sinusoidal_positions(length: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(T, D) sine/cosine position codes (Vaswani et al. 2017); D may be odd."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]          # (T, 1)
    frequency = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32)
                          * (-math.log(10000.0) / width))                                  # (ceil(D/2),)
    angles = position * frequency                                                          # (T, ceil(D/2))
    codes = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :width]       # (T, D)
    return codes.to(dtype or torch.float32)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h):
        batch, steps, width = h.shape
        head_width = width // self.num_heads
        q, k, v = self.qkv(h).view(batch, steps, 3, self.num_heads, head_width).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, H, T, D/H) each
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)     # (B, H, T, D/H)
        return self.out(mixed.transpose(1, 2).reshape(batch, steps, width))  # (B, T, D)


class TransformerBlock(nn.Module):
    """Pre-norm: h + attention(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, width: int, num_heads: int, mlp_multiplier: int = 4):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, num_heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_multiplier * width), nn.GELU(),
                                 nn.Linear(mlp_multiplier * width, width))

    def forward(self, h):
        h = h + self.attention(self.attention_norm(h))   # (B, T, D)
        return h + self.mlp(self.mlp_norm(h))            # (B, T, D)


class CausalTransformer(nn.Module):
    """Full causal attention with sinusoidal positions (no length limit, no position parameters)."""

    def __init__(self, input_size: int, width: int, num_layers: int, num_heads: int):
        super().__init__()
        self.input_projection = nn.Linear(input_size, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, num_heads) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width)

    def forward(self, x):
        h = self.input_projection(x)                                               # (B, T, D)
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype)   # (B, T, D)
        for block in self.blocks:
            h = block(h)                                                           # (B, T, D)
        return self.final_norm(h)                                                  # (B, T, D)


# --- recipes: one per family ------------------------------------------------------------------

def hnae_windows(max_len: int, window: int = HNAE_WINDOWS['small'], first: int | None = None) -> tuple[int, ...]:
    """A level-0 window of `first` (default `window`), then levels of `window` until one layer's
    guaranteed reach covers max_len (at least two levels)."""
    windows = [first or window, window]
    while math.prod(windows) < max_len:
        windows.append(window)
    return tuple(windows)


def _recipe_hnae(task, preset, max_len, write_policy='all', threshold=None, budget=None, positions=None,
                 short_conv=None, event_counters=None):
    import hnae   # the library itself; an ImportError here is a real failure, not a missing peer

    windows = hnae_windows(max_len, HNAE_WINDOWS[preset], HNAE_FIRST_WINDOW[preset])
    layers, slots = HNAE_DEPTH[preset], HNAE_SLOTS[preset]
    policy = {'write_policy': write_policy, 'threshold': threshold, 'budget': budget,
              'positions': positions or HNAE_POSITIONS[preset],
              'short_conv': HNAE_SHORT_CONV[preset] if short_conv is None else short_conv,
              'event_counters': HNAE_EVENT_COUNTERS[preset] if event_counters is None else event_counters}

    def make(width):
        encoder = hnae.HNAE(task.input_size, width, num_layers=layers, batch_first=True, windows=windows,
                            num_heads=HNAE_HEADS[preset], summary_slots=slots, ffn_multiplier=2,
                            place_rank=HNAE_PLACE_RANK[preset], summary_pool=HNAE_POOL[preset], **policy)
        return HNAEBody(encoder)
    return BodyRecipe(make, 8, {'num_layers': layers, 'windows': list(windows), 'summary_slots': slots,
                                'num_heads': HNAE_HEADS[preset],
                                'ffn_multiplier': 2, 'place_rank': HNAE_PLACE_RANK[preset],
                                'summary_pool': HNAE_POOL[preset], 'guaranteed_reach': math.prod(windows), **policy})


def _recipe_recurrent(rnn_class):
    def recipe(task, preset, max_len):
        layers = RECURRENT_DEPTH[preset]

        def make(width):
            return RecurrentBody(rnn_class(task.input_size, width, num_layers=layers, batch_first=True))
        return BodyRecipe(make, 1, {'num_layers': layers})
    return recipe


def tcn_levels(max_len: int, kernel_size: int = TCN_KERNEL_SIZE) -> int:
    """Fewest levels (dilations 1, 2, 4, ...) whose receptive field covers max_len."""
    levels = 1
    while tcn_receptive_field(levels, kernel_size) < max_len:
        levels += 1
    return levels


def tcn_receptive_field(levels: int, kernel_size: int = TCN_KERNEL_SIZE) -> int:
    """Two causal convolutions per level: 1 + 2 (k - 1) (1 + 2 + ... + 2^(levels-1))."""
    return 1 + 2 * (kernel_size - 1) * (2 ** levels - 1)


def _recipe_tcn(task, preset, max_len):
    try:
        from pytorch_tcn import TCN
    except ImportError as error:
        raise ModelUnavailable(f"tcn needs the 'pytorch-tcn' package (pip install 'hnae[bench]'): {error}") from error
    levels = tcn_levels(max_len)
    receptive_field = tcn_receptive_field(levels)

    def make(width):
        tcn = TCN(task.input_size, [width] * levels, kernel_size=TCN_KERNEL_SIZE, dropout=0.0, causal=True,
                  use_norm='weight_norm', input_shape='NLC')
        return TCNBody(tcn, receptive_field)
    # count_on_meta=False: pytorch-tcn's weight norm builds over 10x slower on the meta device than on the CPU
    return BodyRecipe(make, 1, {'levels': levels, 'kernel_size': TCN_KERNEL_SIZE, 'use_norm': 'weight_norm'},
                      count_on_meta=False)


def _recipe_transformer(task, preset, max_len):
    layers, heads = STACK_DEPTH[preset], 4

    def make(width):
        return CausalTransformer(task.input_size, width, layers, heads)
    return BodyRecipe(make, 2 * heads, {'num_layers': layers, 'num_heads': heads, 'positions': 'sinusoidal'})


_RECIPES = {
    'hnae': _recipe_hnae,
    'lstm': _recipe_recurrent(nn.LSTM),
    'gru': _recipe_recurrent(nn.GRU),
    'tcn': _recipe_tcn,
    'transformer': _recipe_transformer,
    'mamba': peers.recipe_mamba,
    'xlstm': peers.recipe_xlstm,
    'htransformer': peers.recipe_htransformer,
}


def build_model(name: str, task: Task, preset: str = 'small', max_len: int | None = None,
                hnae_options: dict | None = None) -> SequenceModel:
    """A model whose forward(x (B, T, input_size)) returns (B, T, output_size).

    max_len: the longest T it will see (default: task.total_length). The TCN
    sizes its receptive field and hnae its windows to cover it; xlstm and
    htransformer refuse longer inputs. Raises ModelUnavailable when a peer
    package is missing. hnae_options (hnae only): write_policy, threshold, budget, positions, short_conv,
    event_counters.
    """
    if name not in _RECIPES:
        raise ValueError(f'unknown model name {name!r}; choose one of {MODEL_NAMES}')
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; choose one of {PRESETS}')
    if not isinstance(task, Task):
        raise TypeError(f'task must be a hnae_bench.tasks.Task, got {type(task).__name__}')
    if max_len is None:
        max_len = task.total_length
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f'max_len must be a positive int or None, got {max_len!r}')

    if hnae_options and name != 'hnae':
        raise ValueError(f'hnae_options (write policies, positions, short_conv, event_counters) apply to hnae only, '
                         f'not {name!r}')
    recipe = _RECIPES[name](task, preset, max_len, **(hnae_options or {}))

    def assemble(width):
        return SequenceModel(recipe.make(width), width, task.input_size, task.output_size)

    target = PARAMETER_TARGETS[preset]
    width = fit_width(lambda w: _count_built(lambda: assemble(w), recipe.count_on_meta), target,
                      recipe.width_step, min_width=recipe.min_width)
    model = assemble(width)
    model.model_name = name
    model.model_config = {
        'name': name, 'preset': preset, 'width': width, 'max_len': max_len,
        'input_size': task.input_size, 'output_size': task.output_size,
        'parameters': count_parameters(model), 'parameter_target': target,
        # None: no fixed limit (recurrent state, full attention)
        'receptive_field': getattr(model.body, 'receptive_field', None),
        **recipe.config,
    }
    return model


def probe_model(model: nn.Module, task: Task, device: str | torch.device = 'cpu') -> None:
    """Run one tiny forward and backward on `device`; a peer that fails there raises ModelUnavailable."""
    steps = min(task.total_length, model.model_config.get('max_len', task.total_length), 64)
    x = torch.zeros(1, steps, task.input_size, device=device)   # (1, T, C)
    try:
        model.to(device)(x).sum().backward()
    except Exception as error:   # noqa: BLE001 - any failure means the model cannot run here
        if model.model_name not in PEER_NAMES:
            raise
        raise ModelUnavailable(f'{model.model_name} cannot run on {device}: '
                               f'{type(error).__name__}: {error}') from error
    finally:
        model.zero_grad(set_to_none=True)
