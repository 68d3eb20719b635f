"""The modules a sharded model swaps in; each keeps the checkpoint's parameter names.

Only the communication is new: every product is the plain model's own op on a slice.
- `RowParallelLinear` (o_proj, down_proj): input features split, partial outputs summed (all_reduce).
- `VocabParallelEmbedding` (token and PLE tables): rows split by token id; a rank looks up the ids
  it holds, zeros elsewhere, and the all_reduce sum is exact (one non-zero term per element).
- `VocabParallelHead` (the LM head, tied or not): each rank's logits for its rows, all_gathered
  into the full vocabulary, so the soft-cap and sampling see the same logits on every rank.
- `ParallelExperts`: tokens go to the rank that holds their expert (all_to_all) and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.layers import Experts
from .layout import Layout, split


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group, dim: int) -> torch.Tensor:
    """Concatenate along `dim` each rank's x (rank i's holding sizes[i] entries of dim; padded
    to the largest for the collective, which wants equal shapes)."""
    m = max(sizes)
    if x.shape[dim] < m:
        pad = list(x.shape)
        pad[dim] = m - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_rᵀ: this rank's input features only (no bias in Gemma)."""

    def __init__(self, in_features: int, out_features: int, group):
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows [lo, hi) of a [rows, dim] table; lookups of the whole vocabulary, summed over ranks."""

    def __init__(self, rows: int, dim: int, layout: Layout):
        super().__init__()
        self.rows, self.group = rows, layout.tp_group
        self.lo, self.hi = split(rows, layout.tp, layout.rank)
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.lo) & (ids < self.hi)
        out = F.embedding((ids - self.lo) * mine, self.weight) * mine[..., None].to(self.weight.dtype)
        dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"rows {self.lo}..{self.hi} of {self.rows}"


class VocabParallelHead(nn.Module):
    """Logits [..., V] from this rank's vocabulary rows, gathered. Tied: the embedding's own rows
    (held outside the module tree, so the state dict keeps one copy)."""

    def __init__(self, layout: Layout, rows: int, dim: int, tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.group = layout.tp_group
        self.sizes = [b - a for a, b in (split(rows, layout.tp, r) for r in range(layout.tp))]
        self._tied = (tied,) if tied is not None else None
        if tied is None:
            self.weight = nn.Parameter(torch.empty(self.sizes[layout.rank], dim))

    def table(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied is not None else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _all_gather_rows(F.linear(hidden, self.table()), self.sizes, self.group, -1)


class ParallelExperts(Experts):
    """This rank's experts [lo, hi) of E, each with columns [a, b) of its hidden width.

    forward (all ranks hold the same N tokens): each of the ep ranks of this rank's ep group takes
    a 1/ep chunk of the tokens, sends every (token, expert) pair to the rank holding the expert
    (all_to_all), runs the experts it received, and gets the outputs back; the etp ranks holding
    other columns of the same experts sum their partial outputs (all_reduce); the chunks are
    gathered back into all N tokens.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, layout: Layout, impl: str = "auto"):
        self.lo, self.hi = split(num_experts, layout.ep, layout.ep_index)
        a, b = layout.width(hidden, layout.etp, layout.etp_index)
        super().__init__(self.hi - self.lo, dim, b - a, impl)
        self.num_global = num_experts
        self.owner_starts = [split(num_experts, layout.ep, e)[0] for e in range(layout.ep)]
        self.ep, self.ep_index, self.etp = layout.ep, layout.ep_index, layout.etp
        self.ep_group, self.etp_group = layout.ep_group, layout.etp_group

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        N, k = index.shape
        chunks = [split(N, self.ep, e) for e in range(self.ep)]
        lo, hi = chunks[self.ep_index]
        x, weights, index = x[lo:hi], weights[lo:hi], index[lo:hi]
        if self.ep > 1:
            y = self._routed(x, index.flatten())
            out = (y.view(hi - lo, k, -1) * weights[..., None]).to(x.dtype).sum(1)
        else:
            out = super().forward(x, weights, index)
        if self.etp > 1:
            dist.all_reduce(out, group=self.etp_group)
        if self.ep > 1:
            out = _all_gather_rows(out, [b - a for a, b in chunks], self.ep_group, 0)
        return out

    def _routed(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The experts' outputs [n*k, D] for rows x repeated k times, computed where each expert lives."""
        k = experts.numel() // max(x.shape[0], 1)
        starts = torch.tensor(self.owner_starts, device=experts.device)
        owner = torch.bucketize(experts, starts, right=True) - 1
        order = owner.argsort(stable=True)
        send = torch.bincount(owner, minlength=self.ep)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)
        send_n, recv_n = send.tolist(), recv.tolist()
        rows = x.repeat_interleave(k, 0)[order] if x.shape[0] else x.new_zeros(0, x.shape[-1])
        got_x = rows.new_empty(sum(recv_n), x.shape[-1])
        dist.all_to_all_single(got_x, rows.contiguous(), recv_n, send_n, group=self.ep_group)
        got_e = experts.new_empty(sum(recv_n))
        dist.all_to_all_single(got_e, experts[order].contiguous(), recv_n, send_n, group=self.ep_group)
        ones = torch.ones(got_x.shape[0], 1, device=x.device)
        y = super().forward(got_x, ones, (got_e - self.lo)[:, None]) if got_x.shape[0] else got_x
        back = y.new_empty(len(order), y.shape[-1])
        dist.all_to_all_single(back, y.contiguous(), send_n, recv_n, group=self.ep_group)
        return torch.empty_like(back).index_copy_(0, order, back)  # back into (token, slot) order
