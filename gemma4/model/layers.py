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
        # One fused op (a decode step runs ~100 norms, so op count matters), in fp32 throughout and
        # cast back once, as the reference does. The reference's pow(-0.5) and the fused kernel's
        # rsqrt agree to within an ULP of fp32.
        w = None if self.weight is None else self.weight.float() + self.offset if self.offset else self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), w, self.eps).type_as(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(rope: Rope, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2]; non-rotated (proportional) channels get frequency 0.

    Computed on the CPU whatever the default device, then moved: under a meta-device context the
    arithmetic would run torch's Python meta kernels, whose first use cost 0.8 s of a model load."""
    j = torch.arange(0, 2 * rope.rotated, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (rope.theta ** (j / rope.head_dim)) / rope.scale
    return torch.cat([inv, torch.zeros(rope.head_dim // 2 - rope.rotated, device="cpu")]).to(device)


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

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of x (two matmuls; gemma4.engine.fuse makes them one)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(gelu(gate) * up)


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

    Three formulations of the same sum, chosen by `impl`:
    - "loop": a pair of matmuls per expert that received rows (the reference; a host sync for the
      counts and a Python loop of up to E iterations).
    - "grouped": rows sorted by expert, then two `torch._grouped_mm` calls over the stacked
      weights: no loop, no sync, no weight copies. Traceable (torch.compile, CUDA graphs) in bf16.
    - "gather": the k chosen experts' weights gathered per row and two batched matmuls: no sync,
      any dtype, but it copies N*k expert matrices, so it suits decode-sized batches only.
    "auto" (default): "loop" for quantized expert weights (their kernels work per expert); else
    "grouped" where a one-off probe shows it works for the device and dtype (inside torch.compile:
    bf16 only, as its shape checks demand), else "gather" inside torch.compile, else "loop".
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown experts impl {impl!r}; use one of {', '.join(EXPERT_IMPLS)}")
        self.impl = impl

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x: [N, D]; weights, index: [N, k] -> [N, D]."""
        impl = self.impl if self.impl != "auto" else self._auto(x)
        if impl == "loop":
            return self.forward_loop(x, weights, index)
        N, k = index.shape
        flat = index.flatten()
        if impl == "gather":
            xs = x.repeat_interleave(k, dim=0)[:, None]  # [N*k, 1, D]
            gate, up = torch.bmm(xs, self.gate_up_proj[flat].transpose(1, 2)).chunk(2, dim=-1)
            y = torch.bmm(gelu(gate) * up, self.down_proj[flat].transpose(1, 2))[:, 0]
            return (y * weights.reshape(-1, 1)).to(x.dtype).view(N, k, -1).sum(1)
        order = flat.argsort(stable=True)  # rows grouped by expert, token order kept within a group
        token = order // k
        # Counts by scatter_add rather than bincount: a fixed shape [E], also under torch.compile.
        counts = torch.zeros(self.gate_up_proj.shape[0], dtype=torch.long, device=x.device)
        offs = counts.scatter_add_(0, flat, torch.ones_like(flat)).cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x[token], self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(gelu(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _auto(self, x: torch.Tensor) -> str:
        if type(self.gate_up_proj) not in _PLAIN or type(self.down_proj) not in _PLAIN:
            return "loop"
        # torch._grouped_mm needs rows of whole 16-byte multiples (an expert width of 6 in fp32 fails).
        E, I2, D = self.gate_up_proj.shape
        aligned = (D * x.element_size()) % 16 == 0 and (I2 // 2 * x.element_size()) % 16 == 0
        ok = aligned and _GROUPED_OK.get((x.device, x.dtype))  # a dict hit, also inside a compiled step
        if torch.compiler.is_compiling():
            return "grouped" if ok and x.dtype == torch.bfloat16 else "gather"
        return "grouped" if aligned and (ok if ok is not None else grouped_mm_works(x.device, x.dtype)) else "loop"

    def forward_loop(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The reference: loops over the experts that received tokens."""
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
            gate, up = self.expert_linear(x[rows], "gate_up_proj", e).chunk(2, dim=-1)
            y = self.expert_linear(gelu(gate) * up, "down_proj", e) * w[start : start + n, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out

    def expert_linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        """x @ W[e]ᵀ for W = gate_up_proj or down_proj: the loop's one read of an expert's weight
        (a hook: gemma4.train's LoRA adds its per-expert low-rank term here)."""
        return F.linear(x, getattr(self, name)[e])


EXPERT_IMPLS = ("auto", "loop", "grouped", "gather")
_PLAIN = (torch.Tensor, nn.Parameter)


_GROUPED_OK: dict[tuple[torch.device, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs and is right for this device and dtype (probed once)."""
    device = torch.device(device)
    if (device, dtype) not in _GROUPED_OK:
        _GROUPED_OK[(device, dtype)] = _probe_grouped_mm(device, dtype)
    return _GROUPED_OK[(device, dtype)]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 32, generator=gen), torch.randn(3, 16, 32, generator=gen)
    want = torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T])
    try:
        offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=device)
        got = torch._grouped_mm(x.to(device, dtype), w.to(device, dtype).transpose(-2, -1), offs=offs)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(torch.allclose(got.float().cpu(), want, rtol=0.02, atol=0.05))
