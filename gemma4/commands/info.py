"""`gemma4 info`: what a model is, how big it is and how much memory it needs."""

from __future__ import annotations

from collections import Counter

from ..config import TextConfig

BYTES = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5}


def describe(config: TextConfig) -> list[str]:
    n = config.num_parameters()
    types = Counter(s.type for s in config.layers)
    lines = [
        f"family             {config.family}",
        f"layers             {config.num_hidden_layers} ({types['sliding_attention']} sliding, "
        f"{types['full_attention']} full; window {config.sliding_window})",
        f"hidden size        {config.hidden_size}; heads {config.num_attention_heads}",
        f"head dim / KV heads sliding {config.head_dim_of('sliding_attention')} / "
        f"{config.kv_heads_of('sliding_attention')}, full {config.head_dim_of('full_attention')} / "
        f"{config.kv_heads_of('full_attention')}" + (" (k_eq_v)" if config.attention_k_eq_v else ""),
        f"vocabulary         {config.vocab_size}",
        f"context            {config.max_position_embeddings} tokens",
    ]
    if config.hidden_size_per_layer_input:
        ple = config.vocab_size_per_layer_input * config.num_hidden_layers * config.hidden_size_per_layer_input
        lines.append(f"per-layer embeds   {config.hidden_size_per_layer_input} per layer ({ple / 1e9:.2f} B params)")
    if config.num_kv_shared_layers:
        producers = ", ".join(f"{s.index} ({s.type.split('_')[0]})" for s in config.layers if s.stores_kv)
        lines.append(f"KV sharing         last {config.num_kv_shared_layers} layers reuse layers {producers}")
    if config.enable_moe_block:
        lines.append(f"experts            {config.num_experts}, top-{config.top_k_experts}, "
                     f"width {config.moe_intermediate_size} (plus a dense MLP of {config.intermediate_size})")
    lines.append(f"parameters         {n:,} (tied head counted once)")
    lines.append("weights memory     " + ", ".join(f"{k} {n * b / 2**30:.2f} GiB" for k, b in BYTES.items()))
    kv = sum(2 * s.num_kv_heads * s.head_dim for s in config.layers if not s.shares_kv and s.window is None)
    lines.append(f"KV cache (bf16)    {kv * 2 / 2**10:.1f} KiB per token on full layers, plus the sliding windows")
    return lines


def run(args) -> int:
    from ..variants import RELEASED, variant

    if args.list:
        print("\n".join(RELEASED))
        return 0
    if args.variant:
        config, chat = variant(args.variant), None
    else:
        from ..api import default_model_path
        from ..weights.hub import resolve

        source = resolve(args.model) if args.model else default_model_path()
        config, chat = _checkpoint_config(source)
    print("\n".join(describe(config)))
    if chat:
        print(f"chat format        {chat}")
    if args.tp > 1 or args.ep > 1 or args.context:
        print("\n".join(per_rank(config, args.tp, args.ep, args.context or config.max_position_embeddings)))
    return 0


def per_rank(config: TextConfig, tp: int, ep: int = 1, context: int = 8192) -> list[str]:
    """The largest rank's weights and KV cache at --tp / --ep (gemma4.parallel.memory)."""
    from ..engine.cache import DEFAULT_HEADROOM
    from ..parallel.layout import Layout
    from ..parallel.memory import rank_kv_bytes, rank_parameters

    if context > config.max_position_embeddings:
        raise ValueError(f"--context {context} exceeds the model's {config.max_position_embeddings} tokens")
    ranks = [Layout(tp, ep, r) for r in range(tp)]
    n = max(rank_parameters(config, r) for r in ranks)
    kv = max(rank_kv_bytes(config, r, context, DEFAULT_HEADROOM) for r in ranks)
    split = f"tp {tp}" + (f", ep {ep}" if ep > 1 else "")
    return [
        f"per rank ({split})   {n:,} parameters: "
        + ", ".join(f"{k} {n * b / 2**30:.2f} GiB" for k, b in BYTES.items() if k in ("float32", "bfloat16")),
        f"KV cache per rank  {kv / 2**30:.2f} GiB for one sequence of {context} tokens (bf16)",
    ]


def _checkpoint_config(source):
    from ..chat import load_chat_template
    from ..weights.gguf import GGUFFile
    from ..weights.safetensors import read_config

    if source.suffix == ".gguf":
        with GGUFFile(source) as f:
            config = TextConfig.from_hf_dict(f.config)
            has_template = "tokenizer.chat_template" in f.metadata
    else:
        config = TextConfig.from_hf_dict(read_config(source))
        has_template = load_chat_template(source) is not None
    where = "the checkpoint's chat template" if has_template else "built-in renderer (no chat template shipped)"
    return config, f"{config.family} ({where})"
