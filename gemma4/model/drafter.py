"""The MTP drafter (`gemma4_assistant`, spec 5): a small Gemma 4 stack that reads the target's K/V.

It has no K/V projections: each of its layers puts queries, rotated at the fixed position p of
the round, against the K/V the target's store layers already hold (`kv_store_layers`). Its input
is the target's scaled embedding of the newest token t_p next to a hidden state h of width D
(the target's final-normed hidden at p-1 on a round's first step, then the drafter's own
`post_projection` output), so drafting k tokens costs k small forwards and no prefill.

Which keys it sees: positions < p only, and on sliding layers the last W+1 of them
(p-W-1 <= k < p). The reference (transformers 5.23) crops the target's K/V to len(sequence) = p+1
entries and lets sliding layers see the last W+1 of them, so after a rejected draft it also sees
the entry at p, the rejected token's K/V. The two agree whenever the cache holds nothing at p
(every first round, and every round after a fully accepted draft), and ours never depends on a
stale entry. Written as the ordinary sliding rule (q-W' < k <= q) for a query at p-1 with
W' = W+1, so `attention_mask` serves; a `KVCache` ring (W + headroom entries) holds all of them
for drafts of up to headroom - 1 tokens.

Logits: the tied head, no soft-cap (as the reference), or with `use_ordered_embeddings` the sparse
centroid head: the top clusters of `centroids(z)` name 32 x V/2048 candidate tokens scored
against their embedding rows; every other token gets the row's smallest candidate logit minus one
(the reference takes that minimum over the whole batch; here per query, so a batch matches its
rows alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DrafterConfig
from .attention import KV, attention_mask
from .decoder import DecoderLayer, _embedding
from .layers import RMSNorm, rope_cos_sin, rope_inv_freq


@dataclass
class DrafterOutput:
    """logits [B, T, V] over the target's vocabulary; hidden [B, T, D_target], the next step's h."""

    logits: torch.Tensor
    hidden: torch.Tensor


class DrafterStack(nn.Module):
    """The drafter's layers (`model.*` in its checkpoint): embeddings (the tied head), 4 layers, norm."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        text = config.text
        self.config = config
        self.embed_tokens = _embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(text, spec) for spec in config.layers)
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps, text.norm_offset)
        self.reset_buffers(torch.get_default_device())

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        for t in set(self.config.text.layer_types):
            self.register_buffer(f"inv_freq_{t}", rope_inv_freq(self.config.text.rope(t), device), persistent=False)

    def context(self, p: torch.Tensor, shared_kv: dict[str, KV], dtype: torch.dtype) -> tuple[dict, dict]:
        """(RoPE cos/sin, attention masks) by layer type for queries at p [B, T] over shared_kv: the
        same for every step of a round (k steps from one p), so a caller drafting k tokens makes them once."""
        cfg = self.config.text
        rope = {t: rope_cos_sin(getattr(self, f"inv_freq_{t}"), p, dtype) for t in set(cfg.layer_types)}
        # Keys p-W-1 <= k < p: the ordinary rule (q-W' < k <= q) at q = p-1, W' = W+1; p <= 0 sees all (inert).
        masks = {t: attention_mask(p - 1, shared_kv[t][2], cfg.sliding_window + 1 if t == "sliding_attention"
                                   else None, dtype) for t in set(cfg.layer_types)}
        return rope, masks

    def forward(self, x: torch.Tensor, p: torch.Tensor, shared_kv: dict[str, KV],
                context: tuple[dict, dict] | None = None) -> torch.Tensor:
        """x [B, T, d] (pre-projected), p [B, T] -> final-normed z [B, T, d]. `context`: `self.context(p, ...)`."""
        rope, masks = context if context is not None else self.context(p, shared_kv, x.dtype)
        masks = dict(masks)  # layers may add entries; the caller's stays as it was
        for spec, layer in zip(self.config.layers, self.layers):
            cos, sin = rope[spec.type]
            x, _ = layer(x, cos, sin, p, masks, kv=shared_kv[spec.type])
        return self.norm(x)


class CentroidHead(nn.Module):
    """The sparse head of ordered-embedding drafters (`masked_embedding.*`)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        text = config.text
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = nn.Linear(text.hidden_size, config.num_centroids, bias=False)
        # token_ordering.view(C, V/C)[c] lists the token ids of cluster c.
        self.register_buffer("token_ordering", torch.zeros(text.vocab_size, dtype=torch.long))

    def forward(self, z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """z [B, T, d], table [V, d] -> logits [B, T, V]."""
        clusters = self.centroids(z).topk(self.top_k, dim=-1).indices  # [B, T, k]
        ids = self.token_ordering.view(self.num_centroids, -1)[clusters].flatten(-2)  # [B, T, k*V/C]
        picked = torch.einsum("btd,btnd->btn", z, table[ids])
        floor = picked.amin(-1, keepdim=True) - 1.0
        out = floor.expand(*z.shape[:-1], table.shape[0]).clone()
        return out.scatter_(-1, ids, picked)


class Drafter(nn.Module):
    """Gemma4AssistantForCausalLM: pre_projection -> stack -> (logits, post_projection).

    Checkpoint names: model.embed_tokens, model.layers.N.*, model.norm, pre_projection,
    post_projection, masked_embedding.{centroids, token_ordering}.
    """

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        d, big = config.text.hidden_size, config.backbone_hidden_size
        self.model = DrafterStack(config)
        self.pre_projection = nn.Linear(2 * big, d, bias=False)
        self.post_projection = nn.Linear(d, big, bias=False)
        self.masked_embedding = CentroidHead(config) if config.use_ordered_embeddings else None

    def run(self, embeds: torch.Tensor, h: torch.Tensor, shared_kv: dict[str, KV],
            p: torch.Tensor, context: tuple[dict, dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack for every query [B, T]: (final-normed z [B, T, d], next hidden [B, T, D]).
        `context`: `self.model.context(p, shared_kv, dtype)`, when several steps share p."""
        z = self.model(self.pre_projection(torch.cat([embeds, h], dim=-1)), p, shared_kv, context)
        return z, self.post_projection(z)

    def logits(self, z: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """The tied head, or the sparse one of ordered-embedding drafters unless `dense` (training)."""
        table = self.model.embed_tokens.weight
        if self.masked_embedding is None or dense:
            return torch.nn.functional.linear(z, table)
        return self.masked_embedding(z, table)

    def forward(self, embeds: torch.Tensor, h: torch.Tensor, shared_kv: dict[str, KV],
                p: torch.Tensor) -> DrafterOutput:
        """One draft step for every query: see `step`; here embeds, h are [B, T, D] and p is [B, T]."""
        z, hidden = self.run(embeds, h, shared_kv, p)
        return DrafterOutput(self.logits(z), hidden)

    def step(self, embeds: torch.Tensor, h: torch.Tensor, shared_kv: dict[str, KV],
             p: torch.Tensor) -> DrafterOutput:
        """One draft step for a batch of rows, each at its own position.

        embeds: [B, D] the target's scaled embedding of each row's newest token t_p
            (`target.model.embed(ids)`); h: [B, D] the target's final-normed hidden state at p-1 on
            a round's first step, else the previous step's `hidden`; p: [B] (int) each row's
            position of t_p, fixed for the round (-1 or 0: an inert row, finite garbage out).
        shared_kv: {"sliding_attention": (K, V, pos), "full_attention": (K, V, pos)}, the target's
            store layers (`kv_store_layers`): K, V [B, Hkv, S, d] and the position of every entry
            pos [B, S] (-1 = empty), in any order: the slices `KVCache` holds for rows lo..hi,
            `layer.k[lo:hi, :, :n], layer.v[lo:hi, :, :n], layer.pos[lo:hi, :n]`, or a forward's
            `DecoderOutput.shared_kv`. Entries at positions >= p are ignored, so K/V of drafts
            not yet rolled back may stay.
        Returns logits [B, V] and hidden [B, D].
        """
        out = self.forward(embeds[:, None], h[:, None], shared_kv, p[:, None])
        return DrafterOutput(out.logits[:, 0], out.hidden[:, 0])

    @torch.no_grad()
    def draft(self, embed: Callable[[torch.Tensor], torch.Tensor], token: torch.Tensor, h: torch.Tensor,
              shared_kv: dict[str, KV], p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k greedy steps from the same p: tokens [B, k] and their logits [B, k, V].

        embed: ids [B] -> the target's scaled embeddings [B, D] (`target.model.embed`)."""
        tokens, logits = [], []
        for _ in range(k):
            out = self.step(embed(token), h, shared_kv, p)
            token, h = out.logits.argmax(-1), out.hidden
            tokens.append(token)
            logits.append(out.logits)
        return torch.stack(tokens, 1), torch.stack(logits, 1)
