"""One place that calls ``scaled_dot_product_attention``, with the backends that are safe here.

On CUDA some fused kernels fail on the shapes a hierarchy produces (seen with torch 2.11
on an H200: the flash kernel dies with SIGFPE at head width 18 in bf16; the cuDNN kernel
returns nothing for broadcast masks; the memory-efficient backward asserts on strided
queries, and on empty inputs: no complete block to pool yet). So on CUDA the
memory-efficient kernel is used with contiguous inputs, empty inputs never reach a kernel,
and on the CPU PyTorch's own choice (the fused flash kernel) is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(E) + mask) v for q (..., L, E), k and v (..., S, E), mask broadcastable."""
    if queries.device.type != "cuda":
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
    if queries.numel() == 0 or keys.numel() == 0:  # nothing to attend to or from
        shape = torch.broadcast_shapes(queries.shape[:-1], keys.shape[:-2] + queries.shape[-2:-1])
        return queries.new_zeros(*shape, values.shape[-1])
    with sdpa_kernel(_CUDA_BACKENDS):
        return F.scaled_dot_product_attention(queries.contiguous(), keys.contiguous(), values.contiguous(),
                                              attn_mask=mask)
