"""Attention of a few query rows, and RoPE, in one C call each, for eager CPU decoding (`speed_up`
puts them on each attention module; the model keeps `model.attention.attend` and `apply_rope`).

A decode step's attention is 4-8 torch ops per layer, two of them batched matmuls of a few query
rows over the cache, which cost 30-60 us each on a CPU whatever their size: on gemma-3-270m at a
context of ~150, ~2.9 ms of a ~26 ms one-thread step. kernels/cpu_kernels.c (`attend_few`) does the
same arithmetic (scores, additive mask, softmax, weighted values, fp32) in one call, reading K/V
in place from the cache's views. Under torch.compile, for many rows (prefill), half precision or
gradients, the model's own `attend` runs. RoPE (rotate-half, 6 torch ops, twice a layer) is one
`rope` call likewise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.attention import FEW_ROWS, Attention, attend
from ..model.layers import apply_rope
from .kernels import library


def fast_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`model.attention.attend` (same arguments, same result up to fp32 summation order)."""
    if torch.compiler.is_compiling():  # first: a trace must not reach the ctypes library
        return attend(q, k, v, mask, scale)
    lib = library()
    B, H, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if (lib is None or T > FEW_ROWS or q.requires_grad or q.device.type != "cpu"
            or not all(t.dtype == torch.float32 for t in (q, k, v, mask)) or k.stride(-1) != 1 or v.stride(-1) != 1
            or H % Hkv or v.shape[-1] != d or mask.dim() != 4 or mask.shape[1] != 1):
        return attend(q, k, v, mask, scale)
    q = q.contiguous()
    mask = mask.expand(B, 1, T, S)  # broadcast dims get stride 0
    out = torch.empty(B, H, T, d)
    work = torch.empty(max(S, 1))
    lib.attend_few(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), work.data_ptr(),
                   B, H, Hkv, T, S, d, scale, *k.stride()[:3], *v.stride()[:3], mask.stride(0), mask.stride(2),
                   mask.stride(3))
    return out


def fast_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`model.layers.apply_rope` (x [B, T, heads, d]; cos, sin [B, T, d]): the same arithmetic."""
    if torch.compiler.is_compiling():
        return apply_rope(x, cos, sin)
    lib = library()
    B, T, heads, d = x.shape
    if (lib is None or x.requires_grad or x.device.type != "cpu" or d % 2 or cos.shape != (B, T, d)
            or sin.shape != (B, T, d) or not all(t.dtype == torch.float32 for t in (x, cos, sin))):
        return apply_rope(x, cos, sin)
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    lib.rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), B * T, heads, d)
    return out


def swap_attention(model: nn.Module) -> int:
    """Give every attention module of a model the one-call kernels (in place); the count swapped
    (0 where the kernels cannot be built)."""
    if library() is None:
        return 0
    count = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.attend, m.rope = fast_attend, fast_rope
            count += 1
    return count
