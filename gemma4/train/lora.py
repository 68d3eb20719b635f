"""LoRA as a module swap on a plain model: linears (float or quantized) and stacked MoE experts.

A targeted module keeps its identity, its class's forward and its parameter names: we give the
instance a subclass that adds the low-rank path (as `torch.nn.utils.parametrize` and FSDP2's
`fully_shard` do), so `model.layers.0.self_attn.q_proj.weight` is still the base weight, loads
from the base checkpoint unchanged, and may be any module computing `y = x Wᵀ` (an int4/int8
linear included: that is QLoRA). The adapter adds

    y += scaling · B(A(dropout(x))),   A: [r, in], B: [out, r], scaling = alpha / r (or alpha / √r)

with A uniform in ±1/√in and B zero (PEFT's default), so a fresh adapter leaves the model unchanged.

MoE experts are stacked tensors (`gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`), so their
adapter is stacked too: per expert A `[E, r, in]` and B `[E, out, r]`, applied inside the expert
loop to the tokens routed to that expert (never a merged [E, out, in] delta per forward).
`merge()` folds B·A into float base weights and `unmerge()` takes it out again.

Targets follow PEFT's rules: `target_modules` is a regex (full match on the module name) or a list
of names matched exactly or as a dotted suffix; `target_parameters` (PEFT's name for adapting a
bare 3-D parameter) names expert tensors, e.g. `("experts.gate_up_proj", "experts.down_proj")`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Experts

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAError(ValueError):
    """A LoRA configuration or adapter that cannot be applied to this model."""


@dataclass
class LoraConfig:
    """Which modules get an adapter and how it is scaled (names and meaning as in PEFT's LoraConfig)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = DEFAULT_TARGETS
    target_parameters: Sequence[str] = ()
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    # Per-module overrides, keyed by a regex matched against the end of the module name (PEFT's).
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise LoRAError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_parameters and self.dropout:
            # x cannot be factored out of B·A·dropout(x) inside a merged expert weight; PEFT refuses
            # this combination, and an adapter it cannot load would defeat the format.
            raise LoRAError("LoRA dropout is not supported on target_parameters (MoE experts), as in PEFT")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        self.target_parameters = tuple(self.target_parameters)

    def targets_module(self, name: str) -> bool:
        return _matches(name, self.target_modules)

    def targets_parameter(self, name: str) -> bool:
        return _matches(name, self.target_parameters)

    def rank_and_scaling(self, name: str) -> tuple[int, float]:
        r = _pattern_value(self.rank_pattern, name, self.r)
        alpha = _pattern_value(self.alpha_pattern, name, self.alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ------------------------------------------------------------------------------------------------
# The swapped-in classes


class LoRALinearMixin(nn.Module):
    """Adds `scaling · B(A(dropout(x)))` to the output of the base module's own forward."""

    lora_A: nn.Linear
    lora_B: nn.Linear

    def _init_lora(self, r: int, scaling: float, dropout: float, dtype: torch.dtype) -> None:
        in_f, out_f = linear_features(self)
        device = _device_of(self)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)
        nn.init.uniform_(self.lora_A.weight, -(in_f**-0.5), in_f**-0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_scaling = scaling
        self.lora_merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = super().forward(x, *args, **kwargs)
        if self.lora_merged:
            return y
        a, b = self.lora_A.weight, self.lora_B.weight
        # The adapter's weights stay fp32 (optimizer master copy); the matmuls run in the activation dtype.
        delta = F.linear(F.linear(self.lora_dropout(x), a.to(x.dtype)), b.to(x.dtype))
        return y + (delta * self.lora_scaling).to(y.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B @ A, [out, in]."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.lora_scaling

    def merge(self) -> None:
        if self.lora_merged:
            return
        w = _float_weight(self)
        with torch.no_grad():
            dt = _merge_dtype(w)
            w.copy_((w.to(dt) + self.delta_weight(dt)).to(w.dtype))
        self.lora_merged = True

    def unmerge(self) -> None:
        if not self.lora_merged:
            return
        w = _float_weight(self)
        with torch.no_grad():
            dt = _merge_dtype(w)
            w.copy_((w.to(dt) - self.delta_weight(dt)).to(w.dtype))
        self.lora_merged = False

    def _lora_remove(self) -> None:
        del self.lora_A, self.lora_B, self.lora_dropout, self.lora_scaling, self.lora_merged


class LoRAExpertsMixin(nn.Module):
    """Per-expert adapters on the stacked expert tensors, applied inside the model's expert loop.

    lora_A[name]: [E, r, in]; lora_B[name]: [E, out, r], for name in gate_up_proj / down_proj.
    `Experts.forward_loop` reads each expert's weight through `expert_linear`; overriding that
    hook adds the low-rank term, so the loop itself is the model's (no copy to keep in step).
    """

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict

    def _init_lora(self, params: dict[str, tuple[int, float]], dtype: torch.dtype) -> None:
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_scalings: dict[str, float] = {}
        for name, (r, scaling) in params.items():
            E, out_f, in_f = getattr(self, name).shape
            device = getattr(self, name).device
            a = torch.empty(E, r, in_f, device=device, dtype=dtype).uniform_(-(in_f**-0.5), in_f**-0.5)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(E, out_f, r, device=device, dtype=dtype))
            self.lora_scalings[name] = scaling
        self.lora_merged = False

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # Unmerged, the adapter lives in the per-expert hook of the model's own loop; merged, the
        # base runs whichever formulation (`impl`) it would pick.
        if self.lora_merged:
            return super().forward(x, weights, index)
        return self.forward_loop(x, weights, index)

    def expert_linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        y = super().expert_linear(x, name, e)
        if self.lora_merged or name not in self.lora_A:
            return y
        a, b = self.lora_A[name][e].to(x.dtype), self.lora_B[name][e].to(x.dtype)
        return y + (F.linear(F.linear(x, a), b) * self.lora_scalings[name]).to(y.dtype)

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B[e] @ A[e] for every expert, [E, out, in]."""
        return torch.bmm(self.lora_B[name].to(dtype), self.lora_A[name].to(dtype)) * self.lora_scalings[name]

    def merge(self) -> None:
        self._fold(+1.0, merged=True)

    def unmerge(self) -> None:
        self._fold(-1.0, merged=False)

    def _fold(self, sign: float, merged: bool) -> None:
        if self.lora_merged == merged:
            return
        with torch.no_grad():
            for name in self.lora_A:
                w = getattr(self, name)
                if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                    raise LoRAError(f"cannot merge LoRA into the quantized expert tensor {name}; "
                                    "apply the adapter to the float model to merge")
                dt = _merge_dtype(w)
                w.copy_((w.to(dt) + sign * self.delta_weight(name, dt)).to(w.dtype))
        self.lora_merged = merged

    def _lora_remove(self) -> None:
        del self.lora_A, self.lora_B, self.lora_scalings, self.lora_merged


_SWAPPED: dict[tuple[type, type], type] = {}


def _swap_in(module: nn.Module, mixin: type) -> None:
    """Give `module` a subclass of its own class with `mixin` in front (cached per class pair)."""
    base = type(module)
    cls = _SWAPPED.get((mixin, base))
    if cls is None:
        cls = type(f"LoRA{base.__name__}", (mixin, base), {"_lora_base_class": base})
        _SWAPPED[(mixin, base)] = cls
    module.__class__ = cls


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, (LoRALinearMixin, LoRAExpertsMixin))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a module computing x Wᵀ: nn.Linear, or a quantized linear that says so."""
    if isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return int(module.in_features), int(module.out_features)
    raise LoRAError(f"{type(module).__name__} is not a linear layer (no in_features/out_features); "
                    "LoRA wraps modules computing y = x Wᵀ and the MoE experts (via target_parameters)")


def _device_of(module: nn.Module) -> torch.device:
    # recurse: a quantized weight is a submodule holding buffers (gemma4.quant)
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _merge_dtype(w: torch.Tensor) -> torch.dtype:
    """Merges add in fp32 at least (bf16 weights), in fp64 for fp64 weights."""
    return torch.promote_types(w.dtype, torch.float32)


def _float_weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or tuple(w.shape) != linear_features(module)[::-1]:
        raise LoRAError(f"cannot merge LoRA into {type(module)._lora_base_class.__name__}: its weight is not a "
                        "float [out, in] matrix (a quantized base?). Apply the adapter to the float model to merge.")
    return w


# ------------------------------------------------------------------------------------------------
# Model-level operations


def apply_lora(model: nn.Module, config: LoraConfig, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Swap LoRA into every targeted module; returns the adapted names ("...q_proj", "...experts.down_proj").

    Freezes nothing: see `mark_only_lora_trainable`. Raises if a target matches nothing or
    matches a module that is not a linear.
    """
    adapted: list[str] = []
    for name, module in list(model.named_modules()):
        if is_lora(module):
            raise LoRAError(f"{name} already has a LoRA adapter; remove it first (unload_lora)")
        if config.target_modules and config.targets_module(name):
            linear_features(module)  # raises for a non-linear target
            r, scaling = config.rank_and_scaling(name)
            _swap_in(module, LoRALinearMixin)
            module._init_lora(r, scaling, config.dropout, dtype)
            adapted.append(name)
        elif isinstance(module, Experts) and config.target_parameters:
            params = {p: config.rank_and_scaling(f"{name}.{p}") for p, _ in module.named_parameters(recurse=False)
                      if config.targets_parameter(f"{name}.{p}")}
            if params:
                _swap_in(module, LoRAExpertsMixin)
                module._init_lora(params, dtype)
                adapted.extend(f"{name}.{p}" for p in params)
    if not adapted:
        raise LoRAError(f"no module of the model matches target_modules={config.target_modules!r} / "
                        f"target_parameters={list(config.target_parameters)!r}")
    return adapted


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_lora(module):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze everything but the adapters; returns the number of trainable parameters."""
    model.requires_grad_(False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def merge(model: nn.Module) -> None:
    """Fold every adapter into its (float) base weight; the adapters stay, inactive, for `unmerge`."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def unload_lora(model: nn.Module, *, merge_weights: bool = True) -> nn.Module:
    """Remove every adapter (merging it first unless told not to): back to the plain model."""
    for _, m in list(lora_modules(model)):
        if merge_weights:
            m.merge()
        elif m.lora_merged:
            m.unmerge()
        m._lora_remove()
        m.__class__ = type(m)._lora_base_class
    return model
