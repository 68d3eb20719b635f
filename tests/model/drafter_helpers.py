"""Reference (transformers 5.23) drafters for the drafter tests: tiny, random, saved as checkpoints."""

from __future__ import annotations

import contextlib

import torch

from gemma4.variants import drafter_hf_config


@contextlib.contextmanager
def kv_sharing_patched():
    """transformers 5.23 cannot build a drafter (spec 8.6): `kv_sharing_modes` refuses a stack whose
    every layer is KV-shared. Patched for the duration only: every layer then reuses."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

    saved = {cls: cls.__dict__["kv_sharing_modes"] for cls in (Gemma4TextConfig, Gemma4UnifiedTextConfig)}

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return saved[type(self)].fget(self)

    try:
        for cls in saved:
            cls.kv_sharing_modes = property(modes)
        yield
    finally:
        for cls, prop in saved.items():
            cls.kv_sharing_modes = prop


def hf_drafter(name: str, seed: int = 0):
    """A transformers drafter of a named tiny drafter variant, every weight random (norms near 1)."""
    from transformers import AutoConfig
    from transformers.models.gemma4_assistant import Gemma4AssistantConfig, Gemma4AssistantForCausalLM
    from transformers.models.gemma4_unified_assistant import (Gemma4UnifiedAssistantConfig,
                                                              Gemma4UnifiedAssistantForCausalLM)

    raw = drafter_hf_config(name)
    unified = raw.pop("model_type") == "gemma4_unified_assistant"
    cfg_cls, cls = ((Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM) if unified
                    else (Gemma4AssistantConfig, Gemma4AssistantForCausalLM))
    text = raw.pop("text_config")
    text_config = AutoConfig.for_model(text.pop("model_type"), **text)
    with kv_sharing_patched():
        config = cfg_cls(text_config=text_config, **raw)
        config.text_config._attn_implementation = "eager"
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if "embed" not in pname
                                                                else 0.3)
        for bname, b in model.named_buffers():
            if bname.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
            if bname.endswith("token_ordering"):
                b.copy_(torch.randperm(b.numel(), generator=torch.Generator().manual_seed(seed)))
    return model
