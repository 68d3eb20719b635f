"""Projection fusion for inference: a module swap, outside the model math.

`fuse_projections(model)` gives each attention layer one matmul for q/k/v and each MLP one for
gate/up. One matmul reads the input once and costs one call, which matters where each call has a
fixed cost (tens of microseconds for a CPU fbgemm matmul, a kernel launch on a GPU). The model
computes projections through `Attention.project` and `MLP.gate_up`; the fused modules are
subclasses that override just those, so the math is the model's own. Checkpoints name the
separate linears: fuse after loading; a fused model is for inference (its state_dict differs).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.attention import Attention
from ..model.layers import MLP


class FusedAttention(Attention):
    """Attention whose q/k/v projections are one linear, `qkv_proj` (rows: q, k, v)."""

    qkv_proj: nn.Linear
    qkv_sizes: list[int]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        q, *raw = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        return q, raw


class FusedMLP(MLP):
    """An MLP whose gate and up projections are one linear, `gate_up_proj` (rows: gate, then up)."""

    gate_up_proj: nn.Linear

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj(x).chunk(2, dim=-1)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse every attention layer's q/k/v and MLP's gate/up linears (in place; returns the model).
    Layers whose linears are not all plain float nn.Linear (LoRA, quantized) are left as they are."""
    for module in model.modules():
        if type(module) is Attention:
            names = ["q_proj"] + ([] if module.spec.shares_kv else ["k_proj"] + ["v_proj"] * (module.v_proj is not None))
            sizes = [getattr(module, n).out_features for n in names]
            if len(names) > 1 and _swap(module, FusedAttention, "qkv_proj", names):
                module.qkv_sizes = sizes
        elif type(module) is MLP:
            _swap(module, FusedMLP, "gate_up_proj", ["gate_proj", "up_proj"])
    return model


def _swap(module: nn.Module, cls: type, fused_name: str, names: list[str]) -> bool:
    """Replace `module`'s linears `names` by one linear `fused_name` (rows in order) and make it a
    `cls`; False, changing nothing, unless all are plain bias-free float nn.Linear on one device."""
    parts = [getattr(module, n) for n in names]
    if any(type(m) is not nn.Linear or m.bias is not None for m in parts):
        return False
    weights = [m.weight for m in parts]
    if len({(w.device, w.dtype) for w in weights}) != 1 or not weights[0].is_floating_point():
        return False
    fused = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=False, device="meta")
    fused.weight = nn.Parameter(torch.cat(weights).detach(), requires_grad=weights[0].requires_grad)
    for n in names:
        setattr(module, n, None)
    setattr(module, fused_name, fused)
    module.__class__ = cls  # the same module, now computing its projections through `fused`
    return True
