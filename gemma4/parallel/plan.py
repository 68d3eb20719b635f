"""The sharding plan: what each rank holds of every parameter, and the rank-local model.

Per parameter (checkpoint names; a rank's slice of the global tensor):
    q_proj rows, o_proj columns         this rank's H/tp query heads (column / row parallel)
    k_proj, v_proj rows                 its KV heads: Hkv/tp of them when tp divides Hkv; else the one
                                        KV head its query heads read (replicated over tp/Hkv ranks)
    mlp gate/up rows, down columns      1/tp of the MLP width (column / row parallel)
    experts                             experts split over ep ranks, each one's width over tp/ep
    embed_tokens, embed_tokens_per_layer, lm_head rows   1/tp of the vocabulary (vocab parallel)
    everything else (norms, router, PLE projections, layer scalars, vision and audio towers)   replicated

The PLE table (E2B: 2.35B parameters, more than the rest of the model) is vocab-parallel like the
token table: replicating it would cost each rank more than its share of all the layers, and its
lookup costs one all_reduce of [tokens, layers * 256] per forward.

The local model is the plain `Gemma` built from a rank-local copy of the config (its heads, KV heads
and MLP widths), with the communicating modules of gemma4.parallel.modules swapped in. Its config
keeps the global vocabulary and expert count: sampling and routing see the whole model.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch

from ..config import AudioConfig, TextConfig, VisionConfig
from ..model import Gemma
from .layout import Layout, split
from .modules import ParallelExperts, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead

VOCAB = ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight", "lm_head.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp|experts)\.(\w+?)(?:\.weight)?$")


def check(config: TextConfig, layout: Layout) -> None:
    """Refuse a split that does not fit the model, saying which sizes and what would."""
    tp, H = layout.tp, config.num_attention_heads
    if H % tp:
        fits = [n for n in range(1, H + 1) if H % n == 0]
        raise ValueError(f"--tp {tp}: the model's {H} attention heads do not split evenly; use --tp in {fits}")
    for spec in config.layers:
        kv = spec.num_kv_heads
        if kv % tp and tp % kv:
            raise ValueError(f"--tp {tp}: layer {spec.index} has {kv} KV heads; tp must divide them or be a "
                             f"multiple of them")
    if config.enable_moe_block and config.num_experts < layout.ep:
        raise ValueError(f"--ep {layout.ep} exceeds the model's {config.num_experts} experts")
    if not config.enable_moe_block and layout.ep > 1:
        raise ValueError(f"--ep {layout.ep}: this model has no experts (only the 26B-A4B does); leave out --ep")


def kv_heads(num_kv: int, layout: Layout) -> tuple[int, int]:
    """[lo, hi) of the KV heads this rank holds."""
    tp = layout.tp
    if num_kv % tp == 0:
        return split(num_kv, tp, layout.rank)
    h = layout.rank // (tp // num_kv)  # its query heads all read this one KV head
    return h, h + 1


def local_config(config: TextConfig, layout: Layout) -> TextConfig:
    """The rank's geometry: H/tp heads, its KV heads and MLP columns per layer; the rest global."""
    check(config, layout)
    tp = layout.tp
    local = copy.copy(config)
    local.num_attention_heads = config.num_attention_heads // layout.tp
    local.layers = [dataclasses.replace(s, num_kv_heads=_width(kv_heads(s.num_kv_heads, layout)),
                                        intermediate_size=_width(layout.width(s.intermediate_size, tp, layout.rank)))
                    for s in config.layers]
    return local


def _width(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def shard_model(config: TextConfig, layout: Layout, vision: VisionConfig | None = None,
                audio: AudioConfig | None = None) -> Gemma:
    """The rank-local model, built on the current default device (meta for loading)."""
    local = local_config(config, layout)
    model = Gemma(local, vision, audio)
    group, D = layout.tp_group, config.hidden_size
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.o_proj = RowParallelLinear(attn.o_proj.in_features, D, group)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj.in_features, D, group)
        if layer.moe:
            layer.experts = ParallelExperts(config.num_experts, D, config.moe_intermediate_size, layout)
    text = model.model
    text.embed_tokens = VocabParallelEmbedding(config.vocab_size, D, layout)
    if config.hidden_size_per_layer_input:
        width = config.num_hidden_layers * config.hidden_size_per_layer_input
        text.embed_tokens_per_layer = VocabParallelEmbedding(config.vocab_size_per_layer_input, width, layout)
    tied = text.embed_tokens if config.tie_word_embeddings else None
    model.lm_head = VocabParallelHead(layout, config.vocab_size, D, tied)
    model.parallel = layout
    return model


def ranges(config: TextConfig, layout: Layout, name: str, shape: tuple[int, ...]) -> list[dict[int, tuple[int, int]]]:
    """This rank's slice of checkpoint tensor `name` (our name) of global `shape`: blocks
    {dim: (lo, hi)} concatenated along their last sliced dim; [] = the whole tensor."""
    tp, r = layout.tp, layout.rank
    if name in VOCAB:
        return [{0: split(shape[0], tp, r)}]
    m = _LAYER.match(name)
    if m is None:
        return []
    spec = config.layers[int(m.group(1))]
    part, proj, d = m.group(2), m.group(3), spec.head_dim
    if part == "self_attn":
        h = config.num_attention_heads // tp
        if proj == "q_proj":
            return [{0: (r * h * d, (r + 1) * h * d)}]
        if proj == "o_proj":
            return [{1: (r * h * d, (r + 1) * h * d)}]
        if proj in ("k_proj", "v_proj"):
            lo, hi = kv_heads(spec.num_kv_heads, layout)
            return [{0: (lo * d, hi * d)}]
        return []
    if part == "mlp":
        cols = layout.width(spec.intermediate_size, tp, r)
        return [{1: cols}] if proj == "down_proj" else [{0: cols}]
    experts = split(config.num_experts, layout.ep, layout.ep_index)
    I = config.moe_intermediate_size
    a, b = layout.width(I, layout.etp, layout.etp_index)
    if proj == "gate_up_proj":  # [E, 2I, D]: gate rows 0..I-1, up rows I..2I-1
        return [{0: experts, 1: (a, b)}, {0: experts, 1: (I + a, I + b)}]
    return [{0: experts, 2: (a, b)}]  # down_proj [E, D, I]


def take(t: torch.Tensor, blocks: list[dict[int, tuple[int, int]]]) -> torch.Tensor:
    """The slice `ranges` describes, of an in-memory tensor (a view when it is one block)."""
    if not blocks:
        return t
    parts = []
    for block in blocks:
        p = t
        for dim, (lo, hi) in block.items():
            p = p.narrow(dim, lo, hi - lo)
        parts.append(p)
    return parts[0] if len(parts) == 1 else torch.cat(parts, max(blocks[0]))
