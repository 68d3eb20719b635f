"""Gemma 3's image side: the SigLIP ViT (`vision_tower.*`) and `multi_modal_projector.*`.

A fixed square image [N, 3, S, S] (normalised by the processor) -> (S/p)^2 patch tokens ->
pre-LN transformer layers (biased linears, scaled dot-product attention, no mask) -> final
LayerNorm -> average pooling to mm_tokens_per_image tokens -> RMSNorm (Gemma 3's 1 + w) ->
a projection matrix into the text width. Soft tokens are not multiplied by sqrt(D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import RMSNorm, gelu


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(
            (c.image_size // c.patch_size) ** 2, c.hidden_size,
            _weight=torch.empty((c.image_size // c.patch_size) ** 2, c.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, s, s]
        return h.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = (p(x).view(N, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-1/2, every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(N, T, D))


class SiglipMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class SiglipEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c.num_hidden_layers))


class SiglipTower(nn.Module):
    """`vision_tower`: patch tokens [N, (S/p)^2, D_vision] of N images."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)


class Projector(nn.Module):
    """`multi_modal_projector`: average-pool the patch grid to mm_tokens_per_image, norm, project."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.side = c.image_size // c.patch_size
        self.kernel = self.side // int(c.mm_tokens_per_image**0.5)
        self.mm_input_projection_weight = nn.Parameter(torch.empty(c.hidden_size, c.text_hidden_size))
        self.mm_soft_emb_norm = RMSNorm(c.hidden_size, c.layer_norm_eps, offset=1.0)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        N, _, D = patches.shape
        grid = patches.transpose(1, 2).reshape(N, D, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(patches)
