"""Helpers shared by the test folders (tests/ is on sys.path via pyproject's pytest `pythonpath`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gemma4.variants import variant_hf_config


def hf_model(name: str, seed: int = 0, dtype=torch.float32):
    """A transformers model of a named tiny variant, with random weights that exercise every part.

    Norm weights, layer scalars and router scales are randomised too, so that a wrong offset,
    a skipped scale or a swapped norm changes the logits.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma4ForCausalLM, Gemma4TextConfig

    raw = variant_hf_config(name)
    model_type = raw.pop("model_type")
    cls, cfg_cls = {"gemma4_text": (Gemma4ForCausalLM, Gemma4TextConfig),
                    "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig)}[model_type]
    config = cfg_cls(**raw)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    gemma3 = model_type == "gemma3_text"
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:  # norms and scales
                (p.uniform_(-0.5, 0.5) if gemma3 and pname.endswith("norm.weight") else p.uniform_(0.5, 1.5))
            else:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if "embed" not in pname else 0.3)
        for bname, b in model.named_buffers():
            if bname.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model.to(dtype)


def save_hf(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def rewrite_config(directory: Path, fn) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def random_model(name: str, embed_std: float = 0.3, **overrides):
    """A tiny variant with seeded random weights (norm weights in [0.5, 1.5]); a small `embed_std`
    lets the layers, not a copy of the input token, decide greedy continuations. `overrides`
    change its config.json fields (e.g. sliding_window=48)."""
    from gemma4.config import TextConfig
    from gemma4.model import Gemma
    from gemma4.variants import variant

    torch.manual_seed(0)
    config = TextConfig.from_hf_dict(variant_hf_config(name) | overrides) if overrides else variant(name)
    model = Gemma(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, embed_std if "embed" in n else p.shape[-1] ** -0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def random_drafter(target, name=None, seed=0):
    """A drafter with random weights for `target`: a named tiny variant, or (a Gemma 3 target) one
    shaped after the target's store layers."""
    from gemma4.config import DrafterConfig, kv_store_layers
    from gemma4.model.drafter import Drafter
    from gemma4.variants import drafter_hf_config

    raw = drafter_hf_config(name or "tiny-31b-assistant")
    raw["text_config"]["vocab_size"] = target.config.vocab_size
    if name is None:
        store = kv_store_layers(target.config)
        s, f = store["sliding_attention"], store["full_attention"]
        raw["text_config"] |= dict(head_dim=s.head_dim, global_head_dim=f.head_dim, num_key_value_heads=s.num_kv_heads,
                                   num_global_key_value_heads=f.num_kv_heads, attention_k_eq_v=False,
                                   num_attention_heads=4)
        raw["backbone_hidden_size"] = target.config.hidden_size
    torch.manual_seed(seed)
    model = Drafter(DrafterConfig.from_hf_dict(raw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.3 if "embed" in n else p.shape[-1] ** -0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        if model.masked_embedding is not None:
            ordering = model.masked_embedding.token_ordering
            ordering.copy_(torch.randperm(ordering.numel(), generator=torch.Generator().manual_seed(seed)))
    return model.to(next(target.parameters()).dtype)
