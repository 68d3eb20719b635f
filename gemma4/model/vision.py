"""Image encoders: pixels -> soft tokens in the text model's width (spec 6.1, 6.4; Gemma 3's SigLIP).

Three kinds, chosen by `VisionConfig.kind`, each with the checkpoint's own module names:
- "gemma4" (E2B/E4B, 26B/31B): `vision_tower` (patch embedder, a bidirectional encoder with
  axial 2-D RoPE, 3x3 position pooling, optional standardize) then `embed_vision` (weightless
  RMSNorm, linear into the text width). E2B/E4B clamp every linear's input and output to ranges
  stored in the checkpoint (`use_clipped_linears`).
- "unified" (12B): no encoder; `vision_embedder` maps each raw 48x48 patch to one soft token
  (LayerNorms, a dense layer, a factorised position table), then `embed_vision` as above.
- "siglip" (Gemma 3): `vision_tower` (a ViT on a fixed square image) and `multi_modal_projector`
  (average pooling to mm_tokens_per_image, RMSNorm, a projection matrix).

Inputs use the reference processor's layouts: Gemma 4 and the 12B take `pixel_values`
[N, max_patches, 3*p*p] (values in [0, 1], patches row-major, each (row, col, channel)) and
`position_ids` [N, max_patches, 2] of (x = column, y = row), (-1, -1) at padding; SigLIP takes
`pixel_values` [N, 3, S, S], already normalised. Outputs drop padding: [n, D] for all N images
together, in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import RMSNorm, apply_rope, gelu, rope_cos_sin


class ClippedLinear(nn.Module):
    """A bias-free linear whose input and output are clamped to ranges stored in the checkpoint
    (`input_min` ... `output_max`, E2B/E4B); `linear` holds the weight, as the checkpoint names it."""

    def __init__(self, dim_in: int, dim_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out, bias=False)
        self.clipped = clipped
        if clipped:
            for name, value in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
                self.register_buffer(name, torch.tensor(value * float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        y = self.linear(x)
        return torch.clamp(y, self.output_min, self.output_max) if self.clipped else y


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        clip = c.use_clipped_linears
        self.gate_proj = ClippedLinear(c.hidden_size, c.intermediate_size, clip)
        self.up_proj = ClippedLinear(c.hidden_size, c.intermediate_size, clip)
        self.down_proj = ClippedLinear(c.intermediate_size, c.hidden_size, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate_proj(x)) * self.up_proj(x))


def apply_rope_2d(x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Axial RoPE on x [N, T, heads, d]: the first d/2 channels turn with the column (x), the last
    d/2 with the row (y), each half rotate-half paired. rope: (cos_x, sin_x, cos_y, sin_y) [N, T, d/2]."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([apply_rope(a, rope[0], rope[1]), apply_rope(b, rope[2], rope[3])], dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention over one image's patches; q/k RMS-normed with weights, v without; scale 1."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        d, clip = c.head_dim, c.use_clipped_linears
        self.head_dim = d
        self.q_proj = ClippedLinear(c.hidden_size, c.num_attention_heads * d, clip)
        self.k_proj = ClippedLinear(c.hidden_size, c.num_key_value_heads * d, clip)
        self.v_proj = ClippedLinear(c.hidden_size, c.num_key_value_heads * d, clip)
        self.o_proj = ClippedLinear(c.num_attention_heads * d, c.hidden_size, clip)
        self.q_norm = RMSNorm(d, c.rms_norm_eps)
        self.k_norm = RMSNorm(d, c.rms_norm_eps)
        self.v_norm = RMSNorm(d, c.rms_norm_eps, with_weight=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x: [1, T, D], the valid patches of one image: no mask, so SDPA may take its fused kernels."""
        N, T, _ = x.shape
        shape = (N, T, -1, self.head_dim)
        q = apply_rope_2d(self.q_norm(self.q_proj(x).view(shape)), rope).transpose(1, 2)
        k = apply_rope_2d(self.k_norm(self.k_proj(x).view(shape)), rope).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(shape)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(N, T, -1))


class VisionLayer(nn.Module):
    """The text decoder's 4-norm sandwich, without layer_scalar or PLE."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        eps = c.rms_norm_eps
        self.self_attn = VisionAttention(c)
        self.mlp = VisionMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, eps)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PatchEmbedder(nn.Module):
    """input_proj(2(x - 0.5)) + T[0][col] + T[1][row] (valid patches only)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * c.patch_size**2, c.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.empty(2, c.position_embedding_size, c.hidden_size))

    def forward(self, pixels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.input_proj((2 * (pixels - 0.5)).to(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return h + table[0][pos[..., 0]] + table[1][pos[..., 1]]


class Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_hidden_layers))


class VisionTower(nn.Module):
    """The Gemma 4 encoder (`vision_tower.*`): soft tokens [n, D_vision] of N images, padding dropped."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embedder = PatchEmbedder(c)
        self.encoder = Encoder(c)
        if c.standardize:
            self.register_buffer("std_bias", torch.zeros(c.hidden_size))
            self.register_buffer("std_scale", torch.ones(c.hidden_size))

    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        c = self.config
        half = c.head_dim // 2  # channels per axis; inv_freq_j = theta^(-2j / half)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=pos.device) / half)
        return (*rope_cos_sin(inv_freq, pos[..., 0], dtype), *rope_cos_sin(inv_freq, pos[..., 1], dtype))

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, T, 3*p*p], position_ids [N, T, 2] -> soft tokens [n, D] of the N images.

        Each image runs alone on its valid patches: attending over them alone is what the
        reference's padding mask computes, and without a mask SDPA may use its fused kernels
        (with one, CUDA's math path would materialise T x T scores per head: GBs at 1120 tokens)."""
        return torch.cat([self.encode(x, pos) for x, pos in zip(pixel_values, position_ids)])

    def encode(self, pixels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c = self.config
        valid = ~(pos == -1).all(dim=-1)
        pixels, pos = pixels[valid][None], pos[valid][None]
        if pos.shape[1] == 0 or bool((pos < 0).any()) or int(pos.max()) >= c.position_embedding_size:
            raise ValueError(f"image patch positions must be in [0, {c.position_embedding_size}) with at least "
                             "one valid patch ((-1, -1) marks padding): position_ids do not fit this model")
        h = self.patch_embedder(pixels, pos)
        rope = self.rope(pos, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, rope)
        soft = pool(h[0], pos[0], c.pooling_kernel_size) * c.hidden_size**0.5  # fp32: can pass the fp16 range
        if c.standardize:
            soft = (soft - self.std_bias.float()) * self.std_scale.float()
        return soft.to(h.dtype)


def pool(h: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Average each k x k group of patches (by position) into one soft token, in fp32, groups in
    row-major order of the pooled grid (empty ones dropped). h: [T, D]; pos: [T, 2] (column, row).

    The group of a patch is x//k + (W/k) * (y//k), W = 1 + the largest column; the sum is divided
    by k*k whatever the group's count, as the reference."""
    width = int(pos[:, 0].max()) + 1
    group = pos[:, 0] // k + (width // k) * (pos[:, 1] // k)
    L = int(group.max()) + 1
    sums = torch.zeros(L, h.shape[-1], dtype=torch.float32, device=h.device).index_add_(0, group, h.float())
    counts = torch.zeros(L, dtype=torch.long, device=h.device).index_add_(0, group, torch.ones_like(group))
    return sums[counts > 0] / (k * k)


class MultimodalEmbedder(nn.Module):
    """`embed_vision`: a weightless RMSNorm, then a linear into the text width (spec 6.1: pre-norm)."""

    def __init__(self, dim: int, text_dim: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(dim, text_dim, bias=False)
        self.norm = RMSNorm(dim, eps, with_weight=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.norm(x.to(self.embedding_projection.weight.dtype)))


class UnifiedEmbedder(nn.Module):
    """The 12B's `vision_embedder`: one soft token [D] per 48x48 patch, no encoder (spec 6.4).

    LN -> dense -> LN, + pos[col, 0] + pos[row, 1], LN. The LayerNorms have biases (eps 1e-5, as
    the reference's nn.LayerNorm defaults)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        dim_in, dim = 3 * (c.patch_size * c.pooling_kernel_size) ** 2, c.hidden_size
        self.patch_ln1 = nn.LayerNorm(dim_in)
        self.patch_dense = nn.Linear(dim_in, dim)
        self.patch_ln2 = nn.LayerNorm(dim)
        self.pos_embedding = nn.Parameter(torch.empty(c.position_embedding_size, 2, dim))
        self.pos_norm = nn.LayerNorm(dim)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        pad = (position_ids == -1).all(dim=-1)
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values.to(self.patch_dense.weight.dtype))))
        p = position_ids.clamp(min=0)
        table = self.pos_embedding
        h = self.pos_norm(h + (table[p[..., 0], 0] + table[p[..., 1], 1]).masked_fill(pad[..., None], 0.0))
        return h[~pad]
