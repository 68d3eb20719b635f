"""Self-attention of one decoder layer, with its own head dim, KV heads and window.

Masks are built from token *positions* rather than indices: every key carries the position of
the token it came from (-1 for an empty cache slot or a padding token). That one rule serves
plain forwards, left-padded batches, the sliding ring-buffer cache (whose slots are not in
position order) and the K/V that KV-shared layers borrow from their producer.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerSpec, TextConfig
from .layers import RMSNorm, apply_rope
from .merge import BLOCKS

KV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values [B, Hkv, S, d]; key positions [B, S]


class LayerCache(Protocol):
    """What attention needs of a per-layer KV cache (implementations live in gemma4.engine.cache)."""

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> KV:
        """Store new keys/values at positions `pos`; return every key/value the new queries may see."""
        ...


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dtype: torch.dtype,
                   blocks: torch.Tensor | None = None, blocks_windowed: bool = True) -> torch.Tensor:
    """Additive mask [B, 1, Tq, S] (0 or -inf): a key is visible iff it exists, is not in the
    future, and is in the window. Additive rather than boolean: PyTorch's CPU attention takes a
    much slower path for boolean masks with grouped KV heads.

    Sliding layers see W keys including the query itself: q - W < k <= q. Padding queries
    (position -1) see every key, so their (unused) rows stay finite.
    blocks [2, B, Tq] (gemma4.model.merge.block_bounds): a query also sees the future keys of its
    image block, positions lo..hi. `blocks_windowed`: the window bounds the block too (on the
    left only, as the reference: (causal | block) & window); else (causal & window) | block.
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = (k >= 0) & (k <= q)
    block = None if blocks is None else (k >= blocks[0][:, :, None]) & (k <= blocks[1][:, :, None])
    if block is not None and blocks_windowed:
        allowed |= block
    if window is not None:
        allowed &= k > q - window
    if block is not None and not blocks_windowed:
        allowed |= block
    allowed |= q < 0
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))[:, None]


# Largest folded mask (elements) worth materialising to avoid grouped-query attention (see attend).
FOLD_MAX_MASK = 1 << 22
# Query rows up to which CPU attention is two matmuls and a softmax rather than SDPA (see attend).
FEW_ROWS = 16


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of q [B, H, T, d] over k, v [B, Hkv, S, d] with an additive mask [B, 1, T, S].

    With grouped KV heads (H = g * Hkv), the g query heads of a KV head are folded into the query
    length, [B, Hkv, g*T, d], so SDPA sees plain multi-head attention. On CUDA this matters: with a
    mask, `enable_gqa` leaves only the math backend, which repeats K/V g times (a copy of the whole
    cache per decode step) and materialises fp32 scores; folded, SDPA takes its memory-efficient
    kernel, which accepts the mask and head_dim 512 (flash takes neither). On CPU, SDPA's flash
    kernel does GQA itself; folded, it reads each K/V block once for all g heads. Folding costs a
    copy of q and of the mask (g*T*S elements): small for decode; long prefill chunks use SDPA's GQA.

    A few query rows on a CPU (T <= FEW_ROWS: a decode step, a verify step of k drafted tokens)
    skip SDPA: for a few query rows over a few hundred keys, in gemma-3-270m's compiled step its
    flash kernel took ~220 us a call, two matmuls and a softmax ~150 us; the step was 0.3-2.7 ms
    faster in 5 of 5 A/B pairs (eager: no difference measured). One path for both also makes a
    k-token verify step sum in the order of k single steps. Not when gradients flow: a training
    forward keeps SDPA's kernel (and its backward) whatever its length.
    """
    B, H, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    few_on_cpu = T <= FEW_ROWS and q.device.type == "cpu" and not q.requires_grad
    if g == 1 and not few_on_cpu:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if g * T * S > FOLD_MAX_MASK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    qf = q.reshape(B, Hkv, g * T, d)  # head j*g+i -> row i*T+t of KV head j (repeat_interleave order)
    mf = mask.expand(B, g, T, S).reshape(B, 1, g * T, S)  # a view (stride 0) when T == 1
    if few_on_cpu:
        scores = torch.matmul(qf, k.transpose(-1, -2)) * scale + mf
        return torch.matmul(scores.softmax(-1), v).view(B, H, T, d)
    return F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, scale=scale).view(B, H, T, d)


class Attention(nn.Module):
    # The same math by other kernels may replace these (gemma4.engine.attend).
    attend = staticmethod(attend)
    rope = staticmethod(apply_rope)

    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        d, heads, dim = spec.head_dim, config.num_attention_heads, config.hidden_size
        self.spec = spec
        self.scale = config.attn_scale
        self.vision_blocks = spec.type in config.vision_block_types  # image tokens attend both ways in prefill
        self.blocks_windowed = config.vision_blocks_windowed
        self.q_proj = nn.Linear(dim, heads * d, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)
        if not spec.shares_kv:  # KV-shared layers read their producer's K/V: no k/v weights at all
            self.k_proj = nn.Linear(dim, spec.num_kv_heads * d, bias=False)
            # k_eq_v (full layers of 12B/26B/31B): V is the raw K projection, so there is no v_proj.
            self.v_proj = None if spec.k_eq_v else nn.Linear(dim, spec.num_kv_heads * d, bias=False)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)
            self.v_norm = RMSNorm(d, config.rms_norm_eps, with_weight=False) if config.v_norm else None
        self.o_proj = nn.Linear(heads * d, dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """q and the raw k (and v, unless k_eq_v) projections of x; no k/v on KV-shared layers.
        Separate matmuls here; gemma4.engine.fuse makes them one."""
        if self.spec.shares_kv:
            return self.q_proj(x), []
        return self.q_proj(x), [self.k_proj(x)] + ([] if self.v_proj is None else [self.v_proj(x)])

    def project_kv(self, raw: list[torch.Tensor], cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New keys (normed, rotated) and values (normed) [B, Hkv, T, d] from the raw k (and v)
        projections [B, T, Hkv * d]."""
        shape = (*raw[0].shape[:-1], self.spec.num_kv_heads, self.spec.head_dim)
        k_raw = raw[0].view(shape)
        v = k_raw if len(raw) == 1 else raw[1].view(shape)  # k_eq_v: V is the raw K projection
        k = self.rope(self.k_norm(k_raw), cos, sin)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_pos: torch.Tensor,
        masks: dict[str, torch.Tensor],
        kv: KV | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x: [B, T, D] (already input-normed); q_pos: [B, T]. Returns the output and the K/V used.

        Layers that compute K/V may write them to `cache`; KV-shared layers are handed `kv`.
        `masks` holds one mask per layer type for this forward: layers of a type see the same
        key positions, so the first one builds it and the rest reuse it. Its BLOCKS entry, when
        present, holds the image-block bounds of the queries (gemma4.model.merge).
        """
        B, T, _ = x.shape
        q, raw = self.project(x)
        q = self.rope(self.q_norm(q.view(B, T, -1, self.spec.head_dim)), cos, sin).transpose(1, 2)
        if kv is None:
            k, v = self.project_kv(raw, cos, sin)
            kv = (k, v, q_pos) if cache is None else cache.update(k, v, q_pos)
        mask = masks.get(self.spec.type)
        if mask is None:
            blocks = masks.get(BLOCKS) if self.vision_blocks else None
            mask = masks[self.spec.type] = attention_mask(q_pos, kv[2], self.spec.window, q.dtype, blocks,
                                                          self.blocks_windowed)
        out = self.attend(q, kv[0], kv[1], mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), kv
