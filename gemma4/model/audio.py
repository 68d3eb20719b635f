"""Audio encoders: processor outputs -> soft tokens in the text model's width (spec 6.2, 6.4).

Two kinds, chosen by `AudioConfig.kind`, each with the checkpoint's own module names:
- "conformer" (E2B/E4B): `audio_tower`, a USM-style conformer over log-mel frames:
  SSCP subsampling (two stride-2 3x3 convs, 4x fewer frames: one token per 40 ms), conformer
  layers (macaron half-step FFs, chunked local self-attention with Transformer-XL relative
  positions, a causal depthwise "light" conv), `output_proj`; then `embed_audio` (weightless
  RMSNorm, linear into the text width: pre-norm, spec 8.2). Every linear of the layers is a
  clipped linear (`use_clipped_linears`).
- "unified" (12B): no tower; `embed_audio` maps each raw 640-sample frame straight to a soft token.

Padding follows the reference exactly: frames whose mask is False are zeroed before each
subsampling conv, are never attended to, and are dropped from the output, so a clip gives the
same soft tokens alone or padded in a batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioConfig
from .layers import RMSNorm
from .vision import ClippedLinear

# The reference builds the FF and layer norms with its default eps, whatever rms_norm_eps says
# (only the light conv's norms read it); released configs say 1e-6 too.
_DEFAULT_EPS = 1e-6


def _clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """The reference's `gradient_clipping` clamp (1e10: a no-op except on overflow), kept finite in x's dtype."""
    limit = min(limit, torch.finfo(x.dtype).max)
    return torch.clamp(x, -limit, limit)


class SubsampleLayer(nn.Module):
    """Conv2d 3x3 stride 2 (no bias) over (time, freq) -> LayerNorm over channels (no bias) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, bias=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, T, F], valid [B, T] -> [B, C', ceil(T/2), ceil(F/2)], valid[:, ::2]."""
        x = self.conv((x * valid[:, None, :, None]).to(self.conv.weight.dtype))
        x = torch.relu(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2).contiguous()  # channels-first again
        return x, valid[:, ::2]


class SubsampleProjection(nn.Module):
    """`subsample_conv_projection`: [B, T, mel] -> [B, ~T/4, D]; flattened (freq, channel), channel fastest."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        c0, c1 = c.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, c.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, c.rms_norm_eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, c.hidden_size, bias=False)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = self.layer0(features[:, None], valid)
        x, valid = self.layer1(x, valid)
        B, _, T, _ = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(B, T, -1)), valid


class AudioFeedForward(nn.Module):
    """Macaron half-step: x + residual_weight * post_norm(W2(silu(W1(pre_norm(x)))))."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.ffw_layer_1 = ClippedLinear(c.hidden_size, 4 * c.hidden_size, c.use_clipped_linears)
        self.ffw_layer_2 = ClippedLinear(4 * c.hidden_size, c.hidden_size, c.use_clipped_linears)
        self.pre_layer_norm = RMSNorm(c.hidden_size, _DEFAULT_EPS)
        self.post_layer_norm = RMSNorm(c.hidden_size, _DEFAULT_EPS)
        self.clip, self.scale = c.gradient_clipping, c.residual_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(_clip(x, self.clip)))))
        return x + self.post_layer_norm(_clip(h, self.clip)) * self.scale


class LightConv(nn.Module):
    """`lconv1d`: x + linear_end(silu(conv_norm(causal_depthwise_conv(GLU(linear_start(pre_norm(x)))))))."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        D, clip = c.hidden_size, c.use_clipped_linears
        self.linear_start = ClippedLinear(D, 2 * D, clip)
        self.linear_end = ClippedLinear(D, D, clip)
        self.depthwise_conv1d = nn.Conv1d(D, D, c.conv_kernel_size, groups=D, bias=False)
        self.pre_layer_norm = RMSNorm(D, c.rms_norm_eps)
        self.conv_norm = RMSNorm(D, c.rms_norm_eps)
        self.clip = c.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1).transpose(1, 2)  # [B, D, T]
        h = self.depthwise_conv1d(F.pad(h, (self.depthwise_conv1d.kernel_size[0] - 1, 0))).transpose(1, 2)
        return x + self.linear_end(F.silu(self.conv_norm(_clip(h, self.clip))))


class AudioAttention(nn.Module):
    """Chunked local self-attention with relative positions (Transformer-XL), in fp32 (or fp64).

    Queries go in blocks of C = attention_chunk_size frames; block b sees the keys
    [bC - P, bC + C + R) with P = attention_context_left - 1 past and R = attention_context_right
    future frames. Within that context a query at distance dist = q - k >= 0 sees keys with
    dist < P (itself and P - 1 past: 11 on the released config, spec 8.3, as the reference) and,
    when R > 0, future keys with -dist < R; padding keys never.

    logits = softcap(q.k + q.rel) where rel comes from a sinusoid table through relative_k_proj.
    The table holds the positions K, K-1, ..., 0 (K = (C + P + R) // 2); the pair (query i of a
    block, context key j) reads its entry j - i (none beyond the table: 0). With the released
    C = P = 12 that is the entry of position q - k.
    """

    def __init__(self, c: AudioConfig):
        super().__init__()
        D, H, clip = c.hidden_size, c.num_attention_heads, c.use_clipped_linears
        self.heads, self.head_dim = H, D // H
        self.q_proj = ClippedLinear(D, D, clip)
        self.k_proj = ClippedLinear(D, D, clip)
        self.v_proj = ClippedLinear(D, D, clip)
        self.post = ClippedLinear(D, D, clip)
        self.relative_k_proj = nn.Linear(D, D, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.chunk, self.future = c.attention_chunk_size, c.attention_context_right
        self.past = c.attention_context_left - 1
        self.cap, self.invalid = c.attention_logit_cap, c.attention_invalid_logits_value

    def _windows(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """[B, T, ...] -> [B, blocks, C + P + R, ...]: each block's context, zeros out of range."""
        T = x.shape[1]
        pad = [0, 0] * (x.dim() - 2) + [self.past, blocks * self.chunk - T + self.future]
        x = F.pad(x, pad)
        return x.unfold(1, self.chunk + self.past + self.future, self.chunk).movedim(-1, 2)

    def forward(self, x: torch.Tensor, table: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], table [K+1, D] (sinusoids of K..0), valid [B, T] -> [B, T, D]."""
        B, T, _ = x.shape
        H, d, C = self.heads, self.head_dim, self.chunk
        blocks = -(-T // C)
        # Heads first, blocks next ([B, H, blocks, C or W, d]): batched matmuls in the reference's
        # layout and order, so fp32 results agree to the bit rather than to an ULP (which the random
        # test models amplify ~100x into the logits).
        f = torch.promote_types(x.dtype, torch.float32)  # fp32 at least
        q = self.q_proj(x).to(f).view(B, T, H, d) * (d**-0.5 / math.log(2)) * F.softplus(self.per_dim_scale.to(f))
        k = self.k_proj(x).to(f).view(B, T, H, d) * (math.log(1 + math.e) / math.log(2))
        v = self.v_proj(x).to(f).view(B, T, H, d)
        q = F.pad(q, (0, 0, 0, 0, 0, blocks * C - T)).view(B, blocks, C, H, d).permute(0, 3, 1, 2, 4)
        k, v = (self._windows(t, blocks).permute(0, 3, 1, 2, 4) for t in (k, v))  # [B, H, blocks, W, d]
        key_ok = self._windows(valid.float(), blocks) > 0  # [B, blocks, W]

        rel = self.relative_k_proj(table).to(f).view(-1, H, d).permute(1, 2, 0)  # [H, d, K+1]
        W, R = k.shape[3], rel.shape[-1]
        i = torch.arange(C, device=x.device)[:, None]
        j = torch.arange(W, device=x.device)[None, :]
        entry = j - i  # [C, W]: the table entry of (query i, context key j)
        rel_logits = (q.reshape(B, H, blocks * C, d) @ rel).view(B, H, blocks, C, R)
        rel_logits = rel_logits.gather(-1, entry.clamp(0, R - 1).expand(B, H, blocks, C, W))
        logits = q @ k.transpose(-1, -2) + rel_logits.masked_fill((entry < 0) | (entry >= R), 0.0)
        logits = torch.tanh(logits / self.cap) * self.cap

        dist = i + self.past - j  # query position - key position
        near = ((dist >= 0) & (dist < self.past)) | ((dist < 0) & (-dist < self.future))
        allowed = near & key_ok[:, None, :, None, :]  # [B, 1, blocks, C, W]
        probs = torch.softmax(logits.masked_fill(~allowed, self.invalid), dim=-1)
        out = (probs @ v).permute(0, 2, 3, 1, 4).reshape(B, blocks * C, H * d)[:, :T]
        return self.post(out.to(x.dtype))


class ConformerLayer(nn.Module):
    """FF/2 -> attention -> light conv -> FF/2 -> norm_out (spec 6.2)."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.feed_forward1 = AudioFeedForward(c)
        self.feed_forward2 = AudioFeedForward(c)
        self.self_attn = AudioAttention(c)
        self.lconv1d = LightConv(c)
        self.norm_pre_attn = RMSNorm(c.hidden_size, _DEFAULT_EPS)
        self.norm_post_attn = RMSNorm(c.hidden_size, _DEFAULT_EPS)
        self.norm_out = RMSNorm(c.hidden_size, _DEFAULT_EPS)
        self.clip = c.gradient_clipping

    def forward(self, x: torch.Tensor, table: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(_clip(x, self.clip)), table, valid)
        x = x + self.norm_post_attn(_clip(a, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip(x, self.clip))


class AudioTower(nn.Module):
    """`audio_tower`: log-mel frames [N, T, mel] and their mask [N, T] -> hidden [N, T', out], valid [N, T']."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.config = c
        self.subsample_conv_projection = SubsampleProjection(c)
        self.layers = nn.ModuleList(ConformerLayer(c) for _ in range(c.num_hidden_layers))
        self.output_proj = nn.Linear(c.hidden_size, c.output_proj_dims)

    def position_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[K+1, D]: sin || cos of the positions K..0, timescales 1..1e4 (K = context // 2)."""
        c = self.config
        n = c.hidden_size // 2
        inv = torch.exp(torch.arange(n, device=device) * -(math.log(1e4) / max(n - 1, 1)))
        K = (c.attention_chunk_size + c.attention_context_left - 1 + c.attention_context_right) // 2
        t = torch.arange(K, -1, -1, device=device)[:, None] * inv
        return torch.cat([t.sin(), t.cos()], dim=-1).to(dtype)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, valid = self.subsample_conv_projection(features, mask)
        table = self.position_table(h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, table, valid)
        return self.output_proj(h), valid
