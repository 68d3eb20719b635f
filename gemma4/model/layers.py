"""Building blocks of the decoder: RMSNorm, RoPE, the gated MLP and the mixture-of-experts branch.

Numerics follow the reference: norms compute in fp32 and cast back; RoPE angles are computed
in fp32 and cast to the activation dtype; the MoE router's softmax is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Rope


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + w). Gemma 4: offset 0; Gemma 3: offset 1 (zero-centred weights).

    `with_weight=False` is the weightless norm of the v-projection and the MoE router.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0, with_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        # pow(-0.5) rather than rsqrt, as the reference does to agree with JAX.
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * (self.weight.float() + self.offset)
        return h.type_as(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(rope: Rope) -> torch.Tensor:
    """Inverse frequencies [head_dim/2]; non-rotated (proportional) channels get frequency 0."""
    j = torch.arange(0, 2 * rope.rotated, 2, dtype=torch.int64).float()
    inv = 1.0 / (rope.theta ** (j / rope.head_dim)) / rope.scale
    return torch.cat([inv, torch.zeros(rope.head_dim // 2 - rope.rotated)])


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T] (rotate-half layout)."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, d]; cos/sin: [B, T, d]. Channel i pairs with i + d/2."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MLP(nn.Module):
    """down(gelu(gate(x)) * up(x)); no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k expert choice from the raw residual stream (spec 1.7)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.norm = RMSNorm(dim, eps, with_weight=False)
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(dim))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (weights [N, k], expert indices [N, k])."""
        z = self.norm(x) * self.scale * x.shape[-1] ** -0.5
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """Expert MLPs stored as stacked tensors, as in the checkpoint.

    gate_up_proj: [E, 2*I, D] (rows 0..I-1 gate, I..2I-1 up); down_proj: [E, D, I].
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x: [N, D]; weights, index: [N, k]. Loops over the experts that received tokens."""
        out = torch.zeros_like(x)
        flat = index.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token = order // index.shape[1]
        w = weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token[start : start + n]
            gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(gelu(gate) * up, self.down_proj[e]) * w[start : start + n, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out
