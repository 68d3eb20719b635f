"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are those PEFT writes for transformers' `Gemma4ForCausalLM` / `Gemma3ForCausalLM`:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

MoE experts follow PEFT's `target_parameters` (`lora.ParamWrapper`) layout. PEFT wraps each
targeted parameter of a module in turn, in the module's parameter order (gate_up_proj, then
down_proj), each wrapper around the previous one, so the *last* targeted parameter is outermost:
with both targeted, gate_up_proj's tensors are `experts.base_layer.lora_A.weight` and down_proj's
`experts.lora_A.weight`. The E per-expert factors are concatenated: A `[E·r, in]` expert-major
(rows e·r..e·r+r-1 are expert e) and B `[out, r·E]` rank-major (column k·E+e is rank k of
expert e). We hold them as A `[E, r, in]`, B `[E, out, r]` and convert on save and load.

Loading also accepts the multimodal layout (`model.language_model.layers...`, from
`Gemma4ForConditionalGeneration`) and PEFT's in-memory `.default.` names.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .lora import LoraConfig, LoRAError, LoRAExpertsMixin, apply_lora, lora_modules

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TMP_PREFIX = ".tmp-"  # a file or checkpoint being written, renamed when whole (a killed run's go at its next start)
PREFIX = "base_model.model."

# PEFT features that change the math or add tensors we do not have: refuse rather than ignore.
_UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
    "layers_to_transform": None, "layer_replication": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None,
}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a (possibly FSDP-sharded DTensor) parameter; collective when sharded."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (fp32, contiguous, on CPU).

    Under FSDP every rank must call this (it gathers the shards).
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model):
        if isinstance(module, LoRAExpertsMixin):
            order = [p for p, _ in module.named_parameters(recurse=False)]
            targeted = [p for p in order if p in module.lora_A]
            for depth, pname in enumerate(reversed(targeted)):
                key = f"{PREFIX}{name}{'.base_layer' * depth}"
                a, b = _full(module.lora_A[pname]).float(), _full(module.lora_B[pname]).float()
                E, r, in_f = a.shape
                out[f"{key}.lora_A.weight"] = a.reshape(E * r, in_f).cpu().contiguous()
                out[f"{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * E).cpu().contiguous()
        else:
            out[f"{PREFIX}{name}.lora_A.weight"] = _full(module.lora_A.weight).float().cpu().contiguous()
            out[f"{PREFIX}{name}.lora_B.weight"] = _full(module.lora_B.weight).float().cpu().contiguous()
    return out


def adapter_config_dict(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "target_parameters": list(config.target_parameters) or None,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        **_UNSUPPORTED,
    }


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (pass `state` if already gathered)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    # Each file is written under a temporary name and renamed: a crash never leaves half a file.
    tmp = directory / (TMP_PREFIX + WEIGHTS_FILE)
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_FILE)
    tmp = directory / (TMP_PREFIX + CONFIG_FILE)
    tmp.write_text(json.dumps(adapter_config_dict(config, base_model_name_or_path), indent=2) + "\n")
    tmp.replace(directory / CONFIG_FILE)
    return directory


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig of a PEFT LoRA adapter directory; refuses features we do not implement."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise LoRAError(f"{directory} has no {CONFIG_FILE}; is it a PEFT adapter directory?")
    raw = json.loads(path.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key, default in _UNSUPPORTED.items():
        value = raw.get(key, default)
        if value not in (default, None, False, [], {}):
            raise LoRAError(f"{path}: {key}={value!r} is not supported by gemma4's LoRA")
    if raw.get("bias", "none") != "none":
        raise LoRAError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules") or ()
    return LoraConfig(
        r=int(raw.get("r", 8)),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=0.0 if raw.get("target_parameters") else float(raw.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        target_parameters=tuple(raw.get("target_parameters") or ()),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
    )


_KEY = re.compile(r"^(?P<module>.+?)(?P<wrap>(?:\.base_layer)*)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def _canonical(key: str) -> str:
    key = key.removeprefix(PREFIX)
    if key.startswith("model.language_model."):  # Gemma4ForConditionalGeneration layout
        key = "model." + key[len("model.language_model."):]
    return key


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapter file's tensors into the model's (already applied) LoRA modules, strictly."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise LoRAError(f"{directory} has no {WEIGHTS_FILE}")
    tensors = load_file(str(path))
    modules = dict(lora_modules(model))
    filled: set[tuple[str, str, str]] = set()
    for key, t in tensors.items():
        m = _KEY.match(_canonical(key))
        if m is None or m["module"] not in modules:
            raise LoRAError(f"{path}: tensor {key} names no LoRA-adapted module of this model")
        module, ab, depth = modules[m["module"]], m["ab"], m["wrap"].count(".base_layer")
        if isinstance(module, LoRAExpertsMixin):
            targeted = [p for p, _ in module.named_parameters(recurse=False) if p in module.lora_A]
            if depth >= len(targeted):
                raise LoRAError(f"{path}: {key} nests deeper than the {len(targeted)} targeted expert tensors")
            pname = targeted[len(targeted) - 1 - depth]
            dest = (module.lora_A if ab == "A" else module.lora_B)[pname]
            E, rows, cols = dest.shape  # A: [E, r, in]; B: [E, out, r]
            if ab == "A":
                t = t.reshape(E, rows, cols) if t.shape == (E * rows, cols) else None
            else:
                t = t.reshape(rows, cols, E).permute(2, 0, 1) if t.shape == (rows, cols * E) else None
            if t is None:
                raise LoRAError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, which does not fit "
                                f"{E} experts of {tuple(dest.shape[1:])}")
            filled.add((m["module"], pname, ab))
        else:
            if depth:
                raise LoRAError(f"{path}: {key} has a base_layer nesting, but {m['module']} is a linear")
            dest = (module.lora_A if ab == "A" else module.lora_B).weight
            if t.shape != dest.shape:
                raise LoRAError(f"{path}: {key} has shape {tuple(t.shape)}, expected {tuple(dest.shape)}")
            filled.add((m["module"], "", ab))
        with torch.no_grad():
            dest.copy_(t.to(dest.dtype))
    expected = {(n, p, ab) for n, mod in modules.items() for ab in "AB"
                for p in (list(mod.lora_A) if isinstance(mod, LoRAExpertsMixin) else [""])}
    missing = sorted(expected - filled)
    if missing:
        raise LoRAError(f"{path} lacks tensors for {len(missing)} adapted modules, e.g. "
                        + ", ".join(f"{n}{'.' + p if p else ''}.lora_{ab}" for n, p, ab in missing[:3]))


def adapted_config(config: LoraConfig, directory: str | Path) -> LoraConfig:
    """The config narrowed to the modules the file holds, ranks read from the tensor shapes.

    PEFT's target list may match modules that have no tensors in the file (e.g. a k_proj pattern on
    KV-shared Gemma 4 layers, which have no k_proj); the file is what says what was trained.
    """
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    modules: set[str] = set()
    ranks: dict[str, int] = {}
    for key, t in tensors.items():
        m = _KEY.match(_canonical(key))
        if m is None:
            raise LoRAError(f"{directory}: {key} is not a LoRA tensor name (…lora_A.weight / …lora_B.weight)")
        modules.add(m["module"])
        if m["ab"] == "A" and not m["module"].endswith("experts"):
            ranks[re.escape(m["module"])] = t.shape[0]  # a linear's rank is its A's row count
    # An exact alternation of the adapted module names; experts stay with target_parameters.
    linear = sorted(n for n in modules if not n.endswith("experts"))
    pattern = "|".join(re.escape(n) for n in linear) if linear else "(?!)"
    return LoraConfig(
        r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=f"(?:{pattern})",
        target_parameters=config.target_parameters, use_rslora=config.use_rslora,
        rank_pattern={**{k: v for k, v in ranks.items() if v != config.r}, **config.rank_pattern},
        alpha_pattern=dict(config.alpha_pattern),
    )


def apply_adapter(model: nn.Module, adapter_dir: str | Path, *, merge: bool = False) -> nn.Module:
    """Apply a saved (ours or PEFT's) LoRA adapter to a plain model for inference, unmerged by default.

    The base weights are untouched unless `merge=True`, which folds the adapter in (float bases only).
    """
    config = read_adapter_config(adapter_dir)
    narrowed = adapted_config(config, adapter_dir)
    param = next(iter(model.parameters()))
    apply_lora(model, narrowed, dtype=param.dtype if param.is_floating_point() else torch.float32)
    load_adapter_weights(model, adapter_dir)
    if merge:
        from .lora import merge as merge_all

        merge_all(model)
    return model
