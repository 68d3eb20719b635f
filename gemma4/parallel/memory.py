"""Per-rank memory from the geometry alone, so a user can pick --tp / --ep before renting GPUs.

`rank_parameters` counts what `plan.shard_model` builds for a rank (checked against that meta
build by tests/parallel/test_tp_memory.py); `rank_kv_bytes` what the engine's KV cache holds for one
sequence of `context` tokens on a rank (its KV heads only: a KV head replicated over ranks costs
each of them).
"""

from __future__ import annotations

from ..config import TextConfig
from .layout import Layout, split
from .plan import check, kv_heads


def _n(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def rank_parameters(config: TextConfig, layout: Layout) -> int:
    """Parameters rank `layout.rank` holds (replicated ones included)."""
    check(config, layout)
    tp, r, d = layout.tp, layout.rank, config.hidden_size
    vocab = _n(split(config.vocab_size, tp, r))
    total = vocab * d * (1 if config.tie_word_embeddings else 2) + d
    p = config.hidden_size_per_layer_input
    if p:
        lp = config.num_hidden_layers * p
        total += _n(split(config.vocab_size_per_layer_input, tp, r)) * lp + lp * d + p
    heads = config.num_attention_heads // tp
    for spec in config.layers:
        hd = spec.head_dim
        total += 2 * heads * hd * d + hd  # q_proj, o_proj, q_norm
        if not spec.shares_kv:
            total += _n(kv_heads(spec.num_kv_heads, layout)) * hd * d * (1 if spec.k_eq_v else 2) + hd
        total += 3 * _n(layout.width(spec.intermediate_size, tp, r)) * d + 4 * d
        if p:
            total += 2 * p * d + d
        if config.enable_moe_block:
            e = config.num_experts
            total += e * d + d + e  # the router, replicated
            experts = _n(split(e, layout.ep, layout.ep_index))
            width = _n(layout.width(config.moe_intermediate_size, layout.etp, layout.etp_index))
            total += experts * 3 * width * d + 3 * d
    return total


def rank_kv_bytes(config: TextConfig, layout: Layout, context: int, headroom: int, dtype_bytes: int = 2) -> int:
    """K/V bytes of one sequence of `context` tokens on a rank, laid out as the engine's static
    cache: full layers `context` entries, sliding layers a ring of window + headroom, each plus
    a sink entry, and the int64 positions of each geometry."""
    check(config, layout)
    total, sizes = 0, set()
    for spec in config.layers:
        if spec.shares_kv:
            continue
        ring = spec.window is not None and spec.window + headroom < context
        size = spec.window + headroom if ring else context
        sizes.add((size, ring))
        total += 2 * _n(kv_heads(spec.num_kv_heads, layout)) * (size + 1) * spec.head_dim * dtype_bytes
    return total + sum((size + 1) * 8 for size, _ in sizes)
