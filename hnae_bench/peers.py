"""Optional peer models (`pip install 'hnae[peers]'`), each imported only when asked for.

Each recipe returns a `hnae_bench.recipe.BodyRecipe` whose body maps features
(B, T, C) to (B, T, D); `build_model` adds the head and fits the width D.
A missing package raises ModelUnavailable with the reason, so a benchmark
can say so and go on.

- mamba: `mambapy` (pure PyTorch parallel scan), in-projection, Mamba stack, final norm.
- xlstm: the `xlstm` package, mLSTM blocks only, through its pure-PyTorch
  parallel backend (quadratic in T; its sLSTM block would loop over time).
- htransformer: `h-transformer-1d` with causal=True; the body pads the length up
  to a power-of-two multiple of the block size and crops the output.

Dimension letters: B batch, T time steps, C input_size, D width.
"""
import importlib
import math

import torch.nn.functional as F
from torch import nn

from hnae_bench.recipe import STACK_DEPTH, BodyRecipe


class ModelUnavailable(RuntimeError):
    """A peer package is missing or cannot run on this device."""


def import_peer(model_name: str, module: str, package: str):
    """import_module(module), or ModelUnavailable naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModelUnavailable(f"{model_name} needs the '{package}' package "
                               f"(pip install 'hnae[peers]'): {error}") from error


def _check_length(model_name: str, steps: int, max_len: int) -> None:
    if steps > max_len:
        raise ValueError(f'{model_name} was built for max_len={max_len} steps, got an input of {steps}; '
                         'build it with a larger max_len')


# --- mamba ------------------------------------------------------------------------------------

class MambaBody(nn.Module):
    def __init__(self, mamba_module, input_size: int, width: int, num_layers: int):
        super().__init__()
        self.input_projection = nn.Linear(input_size, width)
        self.mamba = mamba_module.Mamba(mamba_module.MambaConfig(d_model=width, n_layers=num_layers))
        self.final_norm = nn.LayerNorm(width)   # mambapy's stack ends on a residual sum, unnormalised

    def forward(self, x):
        return self.final_norm(self.mamba(self.input_projection(x)))   # (B, T, D)


def recipe_mamba(task, preset, max_len):
    mamba_module = import_peer('mamba', 'mambapy.mamba', 'mambapy')
    layers = STACK_DEPTH[preset]

    def make(width):
        return MambaBody(mamba_module, task.input_size, width, layers)
    return BodyRecipe(make, 8, {'num_layers': layers, 'd_state': 16, 'expand_factor': 2, 'scan': 'mambapy pscan'})


# --- xlstm ------------------------------------------------------------------------------------

class XLSTMBody(nn.Module):
    def __init__(self, xlstm_module, input_size: int, width: int, num_layers: int, num_heads: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        layer = xlstm_module.mLSTMLayerConfig(num_heads=num_heads, conv1d_kernel_size=4, qkv_proj_blocksize=4,
                                              proj_factor=2.0, round_proj_up_to_multiple_of=8)
        config = xlstm_module.xLSTMBlockStackConfig(
            mlstm_block=xlstm_module.mLSTMBlockConfig(mlstm=layer), context_length=max_len,
            num_blocks=num_layers, embedding_dim=width)
        self.input_projection = nn.Linear(input_size, width)
        self.stack = xlstm_module.xLSTMBlockStack(config)   # ends with its own LayerNorm

    def forward(self, x):
        _check_length('xlstm', x.shape[1], self.max_len)
        return self.stack(self.input_projection(x))   # (B, T, D)


XLSTM_MAX_LEN = 16_384   # its parallel form holds (T, T) matrices per head: 1 GiB each at this length


def recipe_xlstm(task, preset, max_len):
    xlstm_module = import_peer('xlstm', 'xlstm', 'xlstm')
    if max_len > XLSTM_MAX_LEN:
        raise ModelUnavailable(f'xlstm runs its mLSTM in the quadratic parallel form, which needs '
                               f'(T, T) matrices; max_len={max_len} is over the {XLSTM_MAX_LEN} this benchmark allows')
    layers, heads = STACK_DEPTH[preset], 4

    def make(width):
        return XLSTMBody(xlstm_module, task.input_size, width, layers, heads, max_len)
    return BodyRecipe(make, 8, {'num_layers': layers, 'num_heads': heads, 'blocks': 'mLSTM',
                             'backend': 'parallel_stabilized_simple (pure PyTorch)'})


# --- h-transformer-1d -------------------------------------------------------------------------

HTRANSFORMER_BLOCK_SIZE = 16


def padded_length(steps: int, block_size: int = HTRANSFORMER_BLOCK_SIZE) -> int:
    """The length h-transformer-1d can run: a power of two, at least two blocks."""
    return max(2 ** math.ceil(math.log2(max(steps, 1))), 2 * block_size)


class HTransformerBody(nn.Module):
    """The attention/feed-forward stack of an HTransformer1D (rotary positions inside),
    between our own linear in-projection and final LayerNorm; its token embedding and
    logit layer are left out (its forward only takes token ids)."""

    def __init__(self, htransformer_module, input_size: int, width: int, num_layers: int, num_heads: int,
                 max_len: int):
        super().__init__()
        self.max_len = max_len
        net = htransformer_module.HTransformer1D(
            num_tokens=1, dim=width, depth=num_layers, max_seq_len=padded_length(max_len), causal=True,
            heads=num_heads, dim_head=width // num_heads, block_size=HTRANSFORMER_BLOCK_SIZE)
        self.input_projection = nn.Linear(input_size, width)
        self.layers = net.layers
        self.final_norm = nn.LayerNorm(width)

    def forward(self, x):
        steps = x.shape[1]
        _check_length('htransformer', steps, self.max_len)
        padded = F.pad(x, (0, 0, 0, padded_length(steps) - steps))   # (B, T', C), zeros after the end
        hidden = self.layers(self.input_projection(padded))            # (B, T', D)
        return self.final_norm(hidden[:, :steps])                       # (B, T, D)


def recipe_htransformer(task, preset, max_len):
    module = import_peer('htransformer', 'h_transformer_1d', 'h-transformer-1d')
    layers, heads = STACK_DEPTH[preset], 4

    def make(width):
        return HTransformerBody(module, task.input_size, width, layers, heads, max_len)
    # min_width: its rotary embedding needs a head width above 2
    return BodyRecipe(make, 2 * heads, {'num_layers': layers, 'num_heads': heads,
                                     'block_size': HTRANSFORMER_BLOCK_SIZE, 'causal': True},
                   min_width=4 * heads)
