"""Quantize a model (a predicate picks the scheme per module), record it, save it, rebuild it on load.

`quantize(model, scheme, group_size, predicate)` visits every nn.Linear, nn.Embedding and MoE
`Experts` module, asks `predicate(name, module, scheme)` for "int8", "int4" (or ("int4", group
size)) or None (keep float), and swaps each of the module's weight parameters for a
`QuantizedTensor` of the same name. The forward code is untouched (see tensor.py). What was done
is recorded per tensor in a `quantization_config` (`quantization_config(model)`), which
`save_quantized` writes into config.json; the loader calls `prepare_quantized` to swap the same
modules in on the meta device before assigning the saved tensors, so a quantized checkpoint loads
without re-quantizing and without ever holding a float copy.

int4 needs the group size to divide the row length; where it does not, the group is halved down
to 16, and a tensor no group fits is stored int8 (the tiny test models' 24-wide experts, for
example). Every such choice is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.layers import Experts
from ..weights import save
from .tensor import INT4_GROUP_SIZES, QuantizedTensor, quantized_nbytes

SCHEMES = ("int8", "int4")
QUANT_METHOD = "gemma4"
# 1: int8/int4 tensors; 2: some are also rotated (`rotation`), which a version-1 reader would miss.
FORMAT_VERSIONS = (1, 2)
# Weights smaller than this stay in float: keeping them costs nothing worth saving.
MIN_QUANTIZED_NUMEL = 4096

# A predicate names the scheme for a module's weights: "int8", "int4" (at the requested group
# size), ("int4", group_size) for a group of its own, or None (keep float).
Predicate = Callable[[str, nn.Module, str], "str | tuple[str, int] | None"]

# The PLE table's int4 group: coarser than the default 64, since a lookup-only table is less
# sensitive than the head (see default_predicate).
LOOKUP_TABLE_GROUP = 128


def default_predicate(name: str, module: nn.Module, scheme: str) -> str | tuple[str, int] | None:
    """Quantize every linear, embedding and expert weight except the MoE router and tiny tensors.

    Norms, layer scalars and the router's scale vectors are never offered to the predicate (they
    are not Linear/Embedding/Experts weights). Under int4, the two vocabulary tables differ:
    - the embedding is also the tied LM head, where int4 error lands directly on the logits: it
      stays int8 (as llama.cpp's Q4_K_M keeps its token table at 6-8 bits). On gemma-3-270m's eval
      text (2,048 tokens), int4 on the head alone cost +5.6% perplexity, on the lookup alone +2.9%;
    - the PLE table is looked up only, never a head, so it takes int4 with groups of 128 (the
      lookup alone measured +2.6% at group 128 against +2.9% at 64: no worse), which pays for the
      int8 embedding: an E4B stays at 29.6% of its bf16 bytes (all int4 g64: 28.2%).
    Skewed columns (the embedding's) are handled by column scales, not by precision (see
    `column_scales`). A custom predicate can choose otherwise per module.
    """
    if name.endswith("router.proj"):  # routing decisions are discontinuous: keep them exact
        return None
    if sum(p.numel() for p in module.parameters(recurse=False)) < MIN_QUANTIZED_NUMEL:
        return None
    if scheme == "int4" and name.endswith("embed_tokens"):
        return "int8"
    if scheme == "int4" and name.endswith("embed_tokens_per_layer"):
        return ("int4", LOOKUP_TABLE_GROUP)
    return scheme


def _weights(module: nn.Module) -> list[str]:
    """Names of the module's parameters that quantization replaces."""
    if isinstance(module, Experts):
        return ["gate_up_proj", "down_proj"]
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return ["weight"]
    return []


def _spec(shape: torch.Size, scheme: str, group_size: int) -> dict[str, int]:
    """{bits, group_size} for a weight of this shape: int4 falls back to smaller groups, then int8."""
    if scheme == "int4":
        g = group_size
        while g >= INT4_GROUP_SIZES[0]:
            if shape[-1] % g == 0:
                return {"bits": 4, "group_size": g}
            g //= 2
    return {"bits": 8}


def plan(model: nn.Module, scheme: str = "int8", group_size: int = 64,
         predicate: Predicate = default_predicate) -> dict[str, dict[str, int]]:
    """{parameter name: {"bits": 8|4, "group_size": g}} of what `quantize` would do (works on meta)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    out = {}
    for mname, module in model.named_modules():
        names = _weights(module)
        if not names or any(isinstance(getattr(module, n), QuantizedTensor) for n in names):
            continue
        answer = predicate(mname, module, scheme)
        if answer is None:
            continue
        chosen, group = answer if isinstance(answer, tuple) and len(answer) == 2 else (answer, group_size)
        if chosen not in SCHEMES or group not in INT4_GROUP_SIZES:
            raise ValueError(f"predicate returned {answer!r} for {mname}; expected "
                             f"'int8', 'int4', ('int4', group size in {INT4_GROUP_SIZES}) or None")
        for n in names:
            out[f"{mname}.{n}"] = _spec(getattr(module, n).shape, chosen, group)
    return out


def _swap(model: nn.Module, name: str, qt: QuantizedTensor) -> None:
    mname, _, pname = name.rpartition(".")
    module = model.get_submodule(mname)
    delattr(module, pname)  # drop the Parameter; the submodule takes its name
    setattr(module, pname, qt)


def quantize(model: nn.Module, scheme: str = "int8", group_size: int = 64,
             predicate: Predicate = default_predicate, progress: bool | None = None,
             col_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Quantize `model` in place (weight-only) and return it. A meta-device model gets empty buffers.

    scheme: "int8" (symmetric, per output channel) or "int4" (asymmetric, groups of `group_size`
    along the input dim, two codes per byte). Each float weight is released as soon as its
    quantized replacement exists, so the peak is the model plus one weight's temporaries.
    col_scales: {parameter name: [K]} column scales to quantize with, e.g. activation-aware ones
    (`calibrate.activation_scales`); other weights get `column_scales(w)`.
    """
    col_scales = col_scales or {}
    todo = plan(model, scheme, group_size, predicate)
    for name, spec in tqdm(todo.items(), desc=f"quantizing to {scheme}", unit="tensor",
                           disable=None if progress is None else not progress, leave=False):
        w = model.get_parameter(name)
        if w.device.type == "meta":
            qt = QuantizedTensor(w.shape, spec["bits"], spec.get("group_size"), w.dtype, w.device)
        else:
            with torch.no_grad():
                c = col_scales.get(name)
                qt = QuantizedTensor.from_float(w.detach(), spec["bits"], spec.get("group_size"),
                                                None if c is None else c.to(w.device))
        del w
        _swap(model, name, qt)
    return model


def quantized_tensors(model: nn.Module) -> dict[str, QuantizedTensor]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedTensor)}


def quantization_config(model: nn.Module, scheme: str | None = None, group_size: int | None = None) -> dict[str, Any]:
    """The `quantization_config` entry of config.json that describes `model`'s quantized tensors."""
    tensors = {}
    for name, qt in quantized_tensors(model).items():
        tensors[name] = ({"bits": qt.bits} | ({"group_size": qt.group_size} if qt.bits == 4 else {})
                         | ({"rotation": qt.rotation} if qt.rotation else {}))
    if scheme is None:
        scheme = "int4" if any(t["bits"] == 4 for t in tensors.values()) else "int8"
    if group_size is None:
        groups = [t["group_size"] for t in tensors.values() if t["bits"] == 4]
        group_size = max(set(groups), key=groups.count) if groups else None
    version = 2 if any("rotation" in t for t in tensors.values()) else 1
    return {"quant_method": QUANT_METHOD, "format_version": version, "scheme": scheme,
            "group_size": group_size, "tensors": tensors}


def prepare_quantized(model: nn.Module, config: dict[str, Any], dtype: torch.dtype) -> set[str]:
    """Loader hook: swap in the recorded quantized tensors (on meta); return the state names to load
    as stored (no dtype cast). Raises ValueError naming what does not fit."""
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        method = config.get("quant_method") if isinstance(config, dict) else config
        raise ValueError(f"quantization_config has quant_method {method!r}; gemma4 reads only its own "
                         f"{QUANT_METHOD!r} format (written by `gemma4 quantize`)")
    if config.get("format_version") not in FORMAT_VERSIONS:
        raise ValueError(f"quantization format_version {config.get('format_version')!r} is not supported "
                         f"(this gemma4 reads versions {FORMAT_VERSIONS}); quantize the model again")
    keep = set()
    params = dict(model.named_parameters())
    for name, spec in (config.get("tensors") or {}).items():
        if name not in params:
            raise ValueError(f"quantization_config names {name}, which this model does not have as a weight")
        w = params[name]
        try:
            qt = QuantizedTensor(w.shape, spec["bits"], spec.get("group_size"), dtype, w.device,
                                 spec.get("rotation", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"quantization_config entry for {name} is invalid ({e})") from None
        _swap(model, name, qt)
        keep.update(f"{name}.{b}" for b in qt._buffers)
    return keep


def set_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Allow or forbid the fast CPU kernels (tests compare both paths; default: allowed)."""
    for qt in quantized_tensors(model).values():
        qt.use_kernels = enabled
    return model


# ------------------------------------------------------------------------------------------------
# Sizes


def model_nbytes(model: nn.Module) -> int:
    """Bytes of every persistent tensor of `model` (works on meta): what its safetensors file holds."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def estimate_nbytes(model: nn.Module, scheme: str, group_size: int = 64,
                    predicate: Predicate = default_predicate) -> int:
    """Bytes `model` would take quantized, from shapes alone (no quantization is run)."""
    todo = plan(model, scheme, group_size, predicate)
    total = 0
    for name, t in model.state_dict().items():
        if name not in todo:
            total += t.numel() * t.element_size()
    for name, spec in todo.items():
        total += quantized_nbytes(model.get_parameter(name).shape, spec["bits"], spec.get("group_size"))
    return total


# ------------------------------------------------------------------------------------------------
# Saving


def save_quantized(model: nn.Module, out_dir: str | Path, scheme: str | None = None, group_size: int | None = None,
                   *, tokenizer=None, chat_format=None, source: str | Path | None = None) -> Path:
    """`gemma4.weights.save` with the model's `quantization_config` in config.json (tokenizer files
    from `source` or `tokenizer` + `chat_format`, as there)."""
    qconfig = quantization_config(model, scheme, group_size)
    return save(out_dir, model, tokenizer=tokenizer, chat_format=chat_format, source=source,
                quantization_config=qconfig)
