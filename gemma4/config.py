"""Typed configuration for the Gemma 3 / Gemma 4 text decoder.

One dataclass, `TextConfig`, describes both families; the handful of behaviours in which they
differ are plain fields (`norm_offset`, `attn_scale`, `v_norm`, ...), set by `from_hf_dict` from
the checkpoint's `config.json`, never guessed from file names. Everything the model needs per
layer (type, head dim, KV heads, k_eq_v, KV-sharing producer, MLP width, RoPE) is derived once,
in `layers`, so the model code reads geometry and never recomputes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# Integer fields: (smallest, largest), checked before anything is built from them. The upper bounds
# are far above any Gemma (62 layers, hidden 5376, vocab 262k, 128 experts, 262k context) yet keep a
# hostile config.json from building 1e8 layers (a hang) or a tensor whose element count overflows
# int64. Whether the sizes match the weights is the loader's check. None = absent (optional fields).
MAX_LAYERS = 1024
_TOKEN_ID = (0, (1 << 31) - 1)
_INTS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 20), "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, MAX_LAYERS), "num_attention_heads": (1, 1 << 12), "num_key_value_heads": (1, 1 << 12),
    "head_dim": (2, 1 << 16), "sliding_window": (1, 1 << 24), "max_position_embeddings": (1, 1 << 24),
    "global_head_dim": (2, 1 << 16), "num_global_key_value_heads": (1, 1 << 12),
    "hidden_size_per_layer_input": (0, 1 << 20), "vocab_size_per_layer_input": (0, 1 << 24),
    "num_kv_shared_layers": (0, MAX_LAYERS - 1), "num_experts": (0, 1 << 12), "top_k_experts": (0, 1 << 12),
    "moe_intermediate_size": (0, 1 << 20), "pad_token_id": _TOKEN_ID, "bos_token_id": _TOKEN_ID,
}
_UNIFIED_TEXT_DEFAULTS = dict(hidden_size_per_layer_input=0, sliding_window=1024, max_position_embeddings=262_144,
                              use_bidirectional_attention="vision")
_OPTIONAL = ("global_head_dim", "num_global_key_value_heads")
_FLAGS = ("attention_k_eq_v", "use_double_wide_mlp", "enable_moe_block", "tie_word_embeddings")


class ConfigError(ValueError):
    """A config.json (or GGUF metadata) that does not describe a model we can build."""


class ContextLengthError(ValueError):
    """More tokens than the context holds: the model's, a server slot's or a cache's."""

    def __init__(self, context: int, prompt: int, completion: int = 0):
        self.context, self.prompt, self.completion = context, prompt, completion
        # vLLM's wording, which LiteLLM and other clients recognise as a context overflow.
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
            "Please reduce the length of the messages or completion."
        )


def check_context(context: int, prompt: int, completion: int = 0) -> None:
    """The one context-length check: `prompt` tokens held plus `completion` more must fit in `context`."""
    if prompt + completion > context:
        raise ContextLengthError(context, prompt, completion)


@dataclass(frozen=True)
class Rope:
    """RoPE of one layer type. `rotated` angles out of head_dim/2 rotate; the rest pass through."""

    theta: float
    head_dim: int
    rotated: int  # number of rotated frequency pairs (head_dim // 2 unless proportional)
    scale: float = 1.0  # linear position scaling (Gemma 3 4B+: 8) or proportional `factor`


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of one decoder layer, derived from the config."""

    index: int
    type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # no v_proj: V is the raw K projection
    kv_source: int  # the layer whose K/V this layer attends to (itself unless KV-shared)
    stores_kv: bool  # a producer whose K/V later layers reuse
    intermediate_size: int
    window: int | None  # sliding window (keys q-W < k <= q), None on full layers

    @property
    def shares_kv(self) -> bool:
        return self.kv_source != self.index


@dataclass
class TextConfig:
    """The text decoder of a Gemma 3 or Gemma 4 checkpoint (field names follow config.json)."""

    family: str  # "gemma4" or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    sliding_window: int
    rope_parameters: dict[str, dict[str, Any]]
    # Full-layer overrides: Gemma 4 uses a wider head and (with k_eq_v) fewer KV heads there.
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    # Per-layer embeddings (E2B / E4B).
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    # KV sharing (E2B / E4B): the last `num_kv_shared_layers` layers reuse earlier layers' K/V.
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    # Mixture of experts (26B-A4B): a routed expert branch beside the dense MLP on every layer.
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None  # Gemma 3 attention scale = qpas^-1/2
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: str | None = None  # "vision" on 12B/26B/31B (multimodal prefill)
    unified: bool = False  # the 12B's text config (gemma4_unified_text): its own image-block rule
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    layers: list[LayerSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        self.layers = self._derive_layers()

    # ----------------------------------------------------------------------------------------
    # Family switches (spec section 7).
    @property
    def norm_offset(self) -> float:
        """Gemma 3 stores RMSNorm weights zero-centred (x * (1 + w)); Gemma 4 stores w itself."""
        return 1.0 if self.family == "gemma3" else 0.0

    @property
    def attn_scale(self) -> float:
        """Gemma 4 q/k are RMS-normed, so scores are unscaled; Gemma 3 uses query_pre_attn_scalar^-1/2."""
        if self.family == "gemma3":
            return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5
        return 1.0

    @property
    def v_norm(self) -> bool:
        return self.family == "gemma4"

    @property
    def vision_block_types(self) -> frozenset[str]:
        """Layer types on which the tokens of one image attend to each other both ways in prefill
        (spec 1.11): Gemma 3 all; Gemma 4 with use_bidirectional_attention "vision" (12B/26B/31B)
        sliding layers only; E2B/E4B none (purely causal, as the reference)."""
        if self.family == "gemma3":
            return frozenset(LAYER_TYPES)
        if self.use_bidirectional_attention != "vision":
            return frozenset()
        # The reference gives the 12B the generic block overlay: every layer, and not bounded by the
        # window (see vision_blocks_windowed); 26B/31B: sliding layers, the window bounding the block.
        return frozenset(LAYER_TYPES) if self.unified else frozenset({SLIDING})

    @property
    def vision_blocks_windowed(self) -> bool:
        """Whether a sliding layer's window also bounds a query's view of its own image block
        (allowed = (causal | block) & window), or the block is added after it (12B:
        allowed = (causal & window) | block), as the reference's masks do."""
        return not self.unified

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def rope(self, layer_type: str) -> Rope:
        params = self.rope_parameters[layer_type]
        where = f"rope_parameters[{layer_type!r}]"
        if not isinstance(params, dict):
            raise ConfigError(f"{where} is {params!r:.100}; it must be an object such as {{'rope_type': 'default'}}")
        head_dim = self.head_dim_of(layer_type)
        kind = params.get("rope_type", "default")
        theta = _number(params.get("rope_theta", 10000.0), f"{where}.rope_theta")
        if kind == "default":
            return Rope(theta, head_dim, head_dim // 2)
        if kind == "linear":
            return Rope(theta, head_dim, head_dim // 2, _number(params.get("factor"), f"{where}.factor"))
        if kind == "proportional":
            # Only the first partial_rotary_factor * head_dim/2 frequencies rotate, and their
            # exponent keeps the *full* head_dim as denominator (spec 1.4).
            part = _number(params.get("partial_rotary_factor", 1.0), f"{where}.partial_rotary_factor", 0.0, 1.0,
                           or_equal=True)
            rotated = int(part * head_dim // 2)
            return Rope(theta, head_dim, rotated, _number(params.get("factor", 1.0), f"{where}.factor"))
        raise ConfigError(f"unsupported rope_type {kind!r:.40} for {layer_type}; "
                          "supported: default, linear, proportional")

    def head_dim_of(self, layer_type: str) -> int:
        if layer_type == FULL and self.global_head_dim:
            return self.global_head_dim
        return self.head_dim

    def kv_heads_of(self, layer_type: str) -> int:
        # The global KV-head count applies only with k_eq_v (as in the reference config).
        if layer_type == FULL and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    # ----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        """Types and ranges first, so that no later check divides by zero or loops over a huge count."""
        if self.family not in ("gemma3", "gemma4"):
            raise ConfigError(f"unknown family {self.family!r:.40}")
        for name, (lo, hi) in _INTS.items():
            if not (name in _OPTIONAL and getattr(self, name) is None):
                _check_int(name, getattr(self, name), lo, hi)
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} is {getattr(self, name)!r:.40}; it must be true or false")
        _number(self.rms_norm_eps, "rms_norm_eps", or_equal=True)
        for name in ("final_logit_softcapping", "query_pre_attn_scalar"):
            if getattr(self, name) is not None:
                _number(getattr(self, name), name)
        if not isinstance(self.eos_token_id, list) or not self.eos_token_id:
            raise ConfigError(f"eos_token_id is {self.eos_token_id!r:.100}; it must be a token id or a list of them")
        for i in self.eos_token_id:
            _check_int("eos_token_id", i, *_TOKEN_ID)
        for name in ("head_dim", "global_head_dim"):
            if (getattr(self, name) or 0) % 2:
                raise ConfigError(f"{name}={getattr(self, name)} is odd; RoPE rotates pairs, so it must be even")
        if not isinstance(self.layer_types, list) or not all(isinstance(t, str) for t in self.layer_types):
            raise ConfigError(f"layer_types must be a list of {list(LAYER_TYPES)}, found {self.layer_types!r:.200}")
        if not isinstance(self.rope_parameters, dict):
            raise ConfigError(f"rope_parameters is {self.rope_parameters!r:.200}; it must map layer types to objects")
        if self.use_bidirectional_attention is not None and not isinstance(self.use_bidirectional_attention, str):
            raise ConfigError(f"use_bidirectional_attention is {self.use_bidirectional_attention!r:.40}; expected a "
                              "string such as \"vision\", or null")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"unknown layer types {bad}; expected {list(LAYER_TYPES)}")
        for t in set(self.layer_types):
            if t not in self.rope_parameters:
                raise ConfigError(f"rope_parameters has no entry for {t}")
            self.rope(t)  # raises on an unsupported rope_type
            kv = self.kv_heads_of(t)
            if self.num_attention_heads % kv:
                raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of {kv} KV heads")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError("num_kv_shared_layers must be >= 0 and leave at least one layer computing K/V")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        if self.enable_moe_block and self.top_k_experts > self.num_experts:
            raise ConfigError(f"top_k_experts={self.top_k_experts} exceeds num_experts={self.num_experts}")
        if self.hidden_size_per_layer_input and not self.vocab_size_per_layer_input:
            raise ConfigError("hidden_size_per_layer_input needs vocab_size_per_layer_input (per-layer embeddings)")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"unsupported hidden_activation {self.hidden_activation!r:.40}")

    def _derive_layers(self) -> list[LayerSpec]:
        first_shared = self.first_shared_layer
        # The producer of each type is the last non-shared layer of that type (spec 1.5).
        producer: dict[str, int] = {}
        for i in range(first_shared):
            producer[self.layer_types[i]] = i
        if self.num_kv_shared_layers:
            missing = set(self.layer_types[first_shared:]) - set(producer)
            if missing:
                raise ConfigError(f"KV-shared layers of type {sorted(missing)} have no earlier layer to reuse K/V from")
        stores = set(producer.values()) if self.num_kv_shared_layers else set()
        specs = []
        for i, t in enumerate(self.layer_types):
            shared = i >= first_shared
            width = self.intermediate_size * (2 if shared and self.use_double_wide_mlp else 1)
            specs.append(
                LayerSpec(
                    index=i,
                    type=t,
                    head_dim=self.head_dim_of(t),
                    num_kv_heads=self.kv_heads_of(t),
                    k_eq_v=self.attention_k_eq_v and t == FULL,
                    kv_source=producer[t] if shared else i,
                    stores_kv=i in stores,
                    intermediate_size=width,
                    window=self.sliding_window if t == SLIDING else None,
                )
            )
        return specs

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> TextConfig:
        """Build from a checkpoint's config.json (multimodal or text-only Gemma 4, or Gemma 3)."""
        model_type = raw.get("model_type")
        if model_type in ("gemma4", "gemma4_unified", "gemma3") and "text_config" in raw:
            if not isinstance(raw["text_config"] or {}, dict):
                raise ConfigError(f"text_config is {raw['text_config']!r:.200}; it must be an object")
            text = dict(raw["text_config"] or {})
            text.setdefault("model_type", {"gemma4": "gemma4_text", "gemma3": "gemma3_text"}.get(model_type,
                                                                                                 "gemma4_unified_text"))
            for key in ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings"):
                if key in raw and key not in text:
                    text[key] = raw[key]
            return cls.from_hf_dict(text)
        if model_type == "gemma4_unified_text":
            # The 12B's own text config class: no PLE, and other defaults for absent keys.
            return dataclasses.replace(cls._from_gemma4(_UNIFIED_TEXT_DEFAULTS | raw), unified=True)
        if model_type == "gemma4_text":
            return cls._from_gemma4(raw)
        if model_type == "gemma3_text":
            return cls._from_gemma3(raw)
        known = "gemma4, gemma4_text, gemma4_unified, gemma4_unified_text, gemma3, gemma3_text"
        raise ConfigError(f"unsupported model_type {model_type!r} in config.json; gemma4 runs: {known}")

    @classmethod
    def _from_gemma4(cls, raw: dict[str, Any]) -> TextConfig:
        n = _req(raw, "num_hidden_layers")
        layer_types = _layer_types(raw, n, default_period=6)
        global_head_dim = raw.get("global_head_dim")
        global_kv = raw.get("num_global_key_value_heads")
        # Newer transformers serialise the full-layer geometry as per_layer_config {idx: {...}}.
        per_layer = raw.get("per_layer_config") or {}
        if not isinstance(per_layer, dict):
            raise ConfigError(f"per_layer_config is {per_layer!r:.200}; it must map layer indices to objects")
        for idx, override in per_layer.items():
            i = int(idx) if str(idx).isdecimal() and len(str(idx)) < 10 else -1
            if not 0 <= i < n or layer_types[i] != FULL or not isinstance(override, dict):
                raise ConfigError(f"per_layer_config overrides layer {idx!r:.40} with {override!r:.100}; it may only "
                                  "give objects for full-attention layers")
            global_head_dim = override.get("head_dim", global_head_dim)
            global_kv = override.get("num_key_value_heads", global_kv)
        rope = raw.get("rope_parameters") or {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
        # Absent keys mean what transformers' Gemma4TextConfig defaults say (PLE of 256 included).
        ple = raw.get("hidden_size_per_layer_input", 256) or 0
        return cls(
            family="gemma4",
            **_common(raw, layer_types, sliding_window=512),
            rope_parameters=rope,
            global_head_dim=global_head_dim if global_head_dim is not None else 512,
            num_global_key_value_heads=global_kv,
            attention_k_eq_v=raw.get("attention_k_eq_v") or False,
            hidden_size_per_layer_input=ple,
            vocab_size_per_layer_input=raw.get("vocab_size_per_layer_input", 262_144) if ple else 0,
            num_kv_shared_layers=raw.get("num_kv_shared_layers") or 0,
            use_double_wide_mlp=raw.get("use_double_wide_mlp") or False,
            enable_moe_block=raw.get("enable_moe_block") or False,
            num_experts=raw.get("num_experts") or 0,
            top_k_experts=raw.get("top_k_experts") or 0,
            moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
            final_logit_softcapping=raw.get("final_logit_softcapping"),
            use_bidirectional_attention=raw.get("use_bidirectional_attention"),
        )

    @classmethod
    def _from_gemma3(cls, raw: dict[str, Any]) -> TextConfig:
        n = _req(raw, "num_hidden_layers")
        pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
        layer_types = _layer_types(raw, n, default_period=pattern, force_last_full=False)
        if raw.get("attn_logit_softcapping") is not None:
            raise ConfigError("attn_logit_softcapping is not supported (no released Gemma 3 uses it)")
        if raw.get("use_bidirectional_attention"):
            raise ConfigError("bidirectional Gemma 3 (embedding) models are not supported")
        rope = raw.get("rope_parameters")
        if not isinstance(rope or {}, dict) or not isinstance(raw.get("rope_scaling") or {}, dict):
            raise ConfigError("rope_parameters and rope_scaling must be objects (or absent); "
                              f"found {rope!r:.100} and {raw.get('rope_scaling')!r:.100}")
        if not rope or SLIDING not in rope:
            # Legacy keys: rope_theta (full), rope_local_base_freq (sliding), rope_scaling (full only).
            full = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 1_000_000.0)}
            scaling = raw.get("rope_scaling") or (rope if rope and "rope_type" in rope else None)
            if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
                full = {"rope_type": scaling.get("rope_type", scaling.get("type")),
                        "factor": scaling.get("factor", 1.0), "rope_theta": full["rope_theta"]}
            rope = {SLIDING: {"rope_type": "default", "rope_theta": raw.get("rope_local_base_freq", 10_000.0)},
                    FULL: full}
        return cls(
            family="gemma3",
            **_common(raw, layer_types, sliding_window=4096),
            rope_parameters=rope,
            final_logit_softcapping=raw.get("final_logit_softcapping"),
            query_pre_attn_scalar=raw.get("query_pre_attn_scalar", 256),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for this model that transformers and `from_hf_dict` both read."""
        out: dict[str, Any] = {
            "model_type": "gemma4_unified_text" if self.unified else f"{self.family}_text",
            "architectures": ["Gemma4UnifiedForCausalLM" if self.unified else
                              "Gemma4ForCausalLM" if self.family == "gemma4" else "Gemma3ForCausalLM"],
        }
        for f in dataclasses.fields(self):
            if f.name in ("family", "layers", "unified"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.family == "gemma3":
            for key in ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v",
                        "hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers",
                        "use_double_wide_mlp", "enable_moe_block", "num_experts", "top_k_experts",
                        "moe_intermediate_size", "use_bidirectional_attention"):
                out.pop(key)
        else:
            out.pop("query_pre_attn_scalar")
        return out

    # ----------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters of the text model (tied head counted once), computed from the geometry."""
        d = self.hidden_size
        total = self.vocab_size * d + d  # embedding + final norm
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        p = self.hidden_size_per_layer_input
        if p:
            lp = self.num_hidden_layers * p
            total += self.vocab_size_per_layer_input * lp + lp * d + p
        for spec in self.layers:
            h = self.num_attention_heads * spec.head_dim
            total += 2 * h * d + spec.head_dim  # q_proj, o_proj, q_norm
            if not spec.shares_kv:
                kv = spec.num_kv_heads * spec.head_dim
                total += kv * d * (1 if spec.k_eq_v else 2) + spec.head_dim  # k/v proj, k_norm
            total += 3 * spec.intermediate_size * d + 4 * d  # MLP + 4 norms
            if p:
                total += 2 * p * d + d
            if self.enable_moe_block:
                e, ie = self.num_experts, self.moe_intermediate_size
                total += e * d + d + e  # router proj, scale, per_expert_scale
                total += e * 3 * ie * d + 3 * d  # experts + 3 extra norms
        return total


def _req(raw: dict[str, Any], key: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"config.json lacks required key {key!r}")
    return raw[key]


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} is {value!r:.40}; it must be an integer from {lo} to {hi}")


def _number(value: Any, name: str, lo: float = 0.0, hi: float = math.inf, *, or_equal: bool = False) -> float:
    """A finite number in (lo, hi], or in [lo, hi] `or_equal`; NaN, strings and booleans are refused."""
    try:
        v = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond float range
        v = math.inf
    if not (math.isfinite(v) and (lo <= v if or_equal else lo < v) and v <= hi):
        bounds = f"{'[' if or_equal else '('}{lo}, {hi}]"
        raise ConfigError(f"{name} is {value!r:.40}; it must be a finite number in {bounds}")
    return v


def _layer_types(raw: dict[str, Any], n: int, default_period: Any, force_last_full: bool = True) -> list[str]:
    # The count is checked before anything loops over it: 1e8 layers would otherwise hang here.
    _check_int("num_hidden_layers", n, *_INTS["num_hidden_layers"])
    types = raw.get("layer_types") or []
    if not isinstance(types, list):
        return types  # refused by TextConfig._validate
    types = list(types)
    if not types:
        _check_int("sliding_window_pattern", default_period, 1, MAX_LAYERS)
        types = [SLIDING if (i + 1) % default_period else FULL for i in range(n)]
    if force_last_full and types and types[-1] != FULL:
        types[-1] = FULL  # the reference forces the last Gemma 4 layer to be global
    return types


def _common(raw: dict[str, Any], layer_types: list[str], sliding_window: int) -> dict[str, Any]:
    """Fields shared by both families; absent optional keys take transformers' defaults."""
    eos = raw.get("eos_token_id", 1)
    return dict(
        vocab_size=_req(raw, "vocab_size"),
        hidden_size=_req(raw, "hidden_size"),
        intermediate_size=_req(raw, "intermediate_size"),
        num_hidden_layers=_req(raw, "num_hidden_layers"),
        num_attention_heads=_req(raw, "num_attention_heads"),
        num_key_value_heads=raw.get("num_key_value_heads", 4),
        head_dim=raw.get("head_dim", 256),
        layer_types=layer_types,
        sliding_window=raw.get("sliding_window") or sliding_window,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 131072),
        tie_word_embeddings=raw.get("tie_word_embeddings", True),
        hidden_activation=raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh",
        pad_token_id=raw.get("pad_token_id", 0) if raw.get("pad_token_id") is not None else 0,
        bos_token_id=raw.get("bos_token_id", 2) if raw.get("bos_token_id") is not None else 2,
        eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else [eos if eos is not None else 1],
    )



# ------------------------------------------------------------------------------------------------
# Vision (spec 6.1, 6.4; Gemma 3's SigLIP). Field names follow config.json's `vision_config`.
VISION_KINDS = ("gemma4", "unified", "siglip")  # encoder (E2B..31B), 12B patch embedder, Gemma 3 SigLIP
_VISION_INTS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18), "num_hidden_layers": (0, 256),
    "num_attention_heads": (1, 1 << 10), "num_key_value_heads": (1, 1 << 10), "head_dim": (4, 1 << 12),
    "patch_size": (1, 1 << 10), "pooling_kernel_size": (1, 64), "position_embedding_size": (1, 1 << 20),
    "image_size": (0, 1 << 16), "mm_tokens_per_image": (0, 1 << 20), "text_hidden_size": (1, 1 << 20),
    "image_token_id": _TOKEN_ID,
}


@dataclass
class VisionConfig:
    """The image side of a multimodal checkpoint: which encoder, its geometry, the placeholder ids.

    kind "gemma4": the encoder of E2B/E4B (clipped linears) and 26B/31B (standardize);
    "unified": the 12B's 48x48 patch embedder (hidden_size = mm_embed_dim,
    position_embedding_size = mm_posemb_size); "siglip": Gemma 3's tower and projector.
    """

    kind: str
    text_hidden_size: int
    image_token_id: int
    video_token_id: int | None = None
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6  # siglip's LayerNorms and the projector's RMSNorm
    image_size: int = 0  # siglip: square input side
    mm_tokens_per_image: int = 0  # siglip: soft tokens per image (a square number)
    vision_use_head: bool = False  # siglip: a pooling head Gemma 3 never uses (its tensors are ignored)

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ConfigError(f"unknown vision kind {self.kind!r:.40}; expected one of {VISION_KINDS}")
        for name, (lo, hi) in _VISION_INTS.items():
            _check_int(f"vision_config.{name}", getattr(self, name), lo, hi)
        if self.video_token_id is not None:
            _check_int("video_token_id", self.video_token_id, *_TOKEN_ID)
        for name in ("use_clipped_linears", "standardize", "vision_use_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"vision_config.{name} is {getattr(self, name)!r:.40}; it must be true or false")
        for name in ("rope_theta", "rms_norm_eps", "layer_norm_eps"):
            _number(getattr(self, name), f"vision_config.{name}")
        if self.kind == "gemma4":
            if self.head_dim % 4:
                raise ConfigError(f"vision_config.head_dim={self.head_dim} must be a multiple of 4 (2-D RoPE pairs)")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(f"vision_config.num_attention_heads={self.num_attention_heads} is not a multiple "
                                  f"of num_key_value_heads={self.num_key_value_heads}")
        if self.kind == "siglip":
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"vision_config.hidden_size={self.hidden_size} is not a multiple of "
                                  f"num_attention_heads={self.num_attention_heads}")
            side = self.image_size // self.patch_size
            per_side = math.isqrt(self.mm_tokens_per_image)
            if not (self.image_size % self.patch_size == 0 and side and per_side ** 2 == self.mm_tokens_per_image
                    and per_side and side % per_side == 0):
                raise ConfigError(f"vision_config.image_size={self.image_size}, patch_size={self.patch_size} and "
                                  f"mm_tokens_per_image={self.mm_tokens_per_image} do not pool evenly: the patch grid "
                                  "side must be a multiple of sqrt(mm_tokens_per_image)")

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """Token ids the processor writes where soft tokens go (image, then video if any)."""
        return (self.image_token_id,) + (() if self.video_token_id is None else (self.video_token_id,))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], text: TextConfig) -> VisionConfig | None:
        """The vision config of a multimodal config.json; None for a text-only checkpoint."""
        model_type = raw.get("model_type")
        vision = raw.get("vision_config")
        if model_type not in ("gemma4", "gemma4_unified", "gemma3") or vision is None:
            return None
        if not isinstance(vision, dict):
            raise ConfigError(f"vision_config is {vision!r:.200}; it must be an object")
        g = vision.get
        common = dict(text_hidden_size=text.hidden_size)
        if model_type == "gemma3":
            return cls(kind="siglip", **common, image_token_id=raw.get("image_token_index", 262_144),
                       hidden_size=g("hidden_size", 768), intermediate_size=g("intermediate_size", 3072),
                       num_hidden_layers=g("num_hidden_layers", 12), num_attention_heads=g("num_attention_heads", 12),
                       num_key_value_heads=g("num_attention_heads", 12), patch_size=g("patch_size", 16),
                       image_size=g("image_size", 224), layer_norm_eps=g("layer_norm_eps", 1e-6),
                       mm_tokens_per_image=raw.get("mm_tokens_per_image", 256),
                       vision_use_head=g("vision_use_head", True), **_activation(vision, "hidden_act"))
        ids = dict(image_token_id=raw.get("image_token_id", 258_880), video_token_id=raw.get("video_token_id", 258_884))
        if model_type == "gemma4_unified":
            width = g("mm_embed_dim", 3840)
            if g("output_proj_dims", width) != width:
                raise ConfigError(f"vision_config.output_proj_dims={g('output_proj_dims')} must equal mm_embed_dim="
                                  f"{width}: the projection reads the embedder's output")
            return cls(kind="unified", **common, **ids, hidden_size=width, num_hidden_layers=0,
                       patch_size=g("patch_size", 16), pooling_kernel_size=g("pooling_kernel_size", 3),
                       position_embedding_size=g("mm_posemb_size", 1120), rms_norm_eps=g("rms_norm_eps", 1e-6))
        rope = g("rope_parameters") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision_config.rope_parameters is {rope!r:.100}; only axial RoPE is supported")
        return cls(kind="gemma4", **common, **ids, hidden_size=g("hidden_size", 768),
                   intermediate_size=g("intermediate_size", 3072), num_hidden_layers=g("num_hidden_layers", 16),
                   num_attention_heads=g("num_attention_heads", 12), num_key_value_heads=g("num_key_value_heads", 12),
                   head_dim=g("head_dim", 64), patch_size=g("patch_size", 16),
                   pooling_kernel_size=g("pooling_kernel_size", 3),
                   position_embedding_size=g("position_embedding_size", 10240),
                   rope_theta=rope.get("rope_theta", 100.0), use_clipped_linears=g("use_clipped_linears", False),
                   standardize=g("standardize", False), rms_norm_eps=g("rms_norm_eps", 1e-6),
                   **_activation(vision, "hidden_activation"))


def _activation(vision: dict[str, Any], key: str) -> dict[str, Any]:
    """Every released tower uses gelu-tanh; anything else is refused rather than silently replaced."""
    act = vision.get(key) or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"vision_config.{key} is {act!r:.40}; only gelu_pytorch_tanh is supported")
    return {}


# ------------------------------------------------------------------------------------------------
# Audio (spec 6.2, 6.4). Field names follow config.json's `audio_config`.
AUDIO_KINDS = ("conformer", "unified")  # E2B/E4B's USM-style encoder; the 12B's raw 40 ms frames
_AUDIO_INTS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 1 << 16), "num_hidden_layers": (0, 256), "num_attention_heads": (1, 1 << 10),
    "conv_kernel_size": (1, 256), "attention_chunk_size": (1, 1 << 12), "attention_context_left": (1, 1 << 12),
    "attention_context_right": (0, 1 << 12), "output_proj_dims": (1, 1 << 16), "text_hidden_size": (1, 1 << 20),
    "audio_token_id": _TOKEN_ID,
}


@dataclass
class AudioConfig:
    """The audio side of a multimodal checkpoint (`audio_config`; None when absent: 26B, 31B, Gemma 3).

    kind "conformer" (E2B/E4B): `audio_tower` (SSCP subsampling, conformer layers, output_proj) then
    `embed_audio`; the tower reads log-mel frames of 4 * (subsampling_conv_channels[0] // 4) = 128
    bins. "unified" (12B): no tower; `embed_audio` maps each raw frame of `output_proj_dims` (= the
    checkpoint's audio_embed_dim, 640 samples: 40 ms at 16 kHz) to one soft token.
    boa/eoa: the ids around an audio clip's placeholders (for the processor; the model needs none).
    """

    kind: str
    text_hidden_size: int
    audio_token_id: int
    boa_token_id: int | None = None
    eoa_token_id: int | None = None
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1e9
    use_clipped_linears: bool = True
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in AUDIO_KINDS:
            raise ConfigError(f"unknown audio kind {self.kind!r:.40}; expected one of {AUDIO_KINDS}")
        for name, (lo, hi) in _AUDIO_INTS.items():
            _check_int(f"audio_config.{name}", getattr(self, name), lo, hi)
        for name in ("boa_token_id", "eoa_token_id"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), *_TOKEN_ID)
        if not isinstance(self.use_clipped_linears, bool):
            raise ConfigError(f"audio_config.use_clipped_linears is {self.use_clipped_linears!r:.40}; "
                              "it must be true or false")
        for name in ("residual_weight", "attention_logit_cap", "gradient_clipping", "rms_norm_eps"):
            _number(getattr(self, name), f"audio_config.{name}")
        _number(self.attention_invalid_logits_value, "audio_config.attention_invalid_logits_value", -math.inf)
        channels = self.subsampling_conv_channels
        if not (isinstance(channels, (list, tuple)) and len(channels) == 2):
            raise ConfigError(f"audio_config.subsampling_conv_channels is {channels!r:.60}; it must be two integers")
        for c in channels:
            _check_int("audio_config.subsampling_conv_channels[i]", c, 4, 1 << 12)
        self.subsampling_conv_channels = tuple(channels)
        if self.kind == "conformer" and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"audio_config.hidden_size={self.hidden_size} is not a multiple of "
                              f"num_attention_heads={self.num_attention_heads}")

    @property
    def mel_bins(self) -> int:
        """Log-mel bins per input frame that the subsampling's projection fits (128 when released)."""
        return 4 * (self.subsampling_conv_channels[0] // 4)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], text: TextConfig) -> AudioConfig | None:
        """The audio config of a multimodal config.json; None without one (an empty object means the
        reference's defaults, as transformers reads it)."""
        model_type = raw.get("model_type")
        audio = raw.get("audio_config")
        if model_type not in ("gemma4", "gemma4_unified") or audio is None:
            return None
        if not isinstance(audio, dict):
            raise ConfigError(f"audio_config is {audio!r:.200}; it must be an object")
        g = audio.get
        # transformers' field is eoa_token_index (default 258883); some files also say eoa_token_id.
        eoa = next((raw[k] for k in ("eoa_token_id", "eoa_token_index") if raw.get(k) is not None),
                   None if "eoa_token_index" in raw else 258_883)
        common = dict(text_hidden_size=text.hidden_size, audio_token_id=raw.get("audio_token_id", 258_881),
                      boa_token_id=raw.get("boa_token_id", 256_000), eoa_token_id=eoa,
                      rms_norm_eps=g("rms_norm_eps", 1e-6))
        if model_type == "gemma4_unified":
            width = g("audio_embed_dim", 640)
            return cls(kind="unified", **common, hidden_size=width, output_proj_dims=width, num_hidden_layers=0)
        act = g("hidden_act") or "silu"
        if act not in ("silu", "swish"):
            raise ConfigError(f"audio_config.hidden_act is {act!r:.40}; only silu is supported")
        names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "subsampling_conv_channels",
                 "conv_kernel_size", "residual_weight", "attention_chunk_size", "attention_context_left",
                 "attention_context_right", "attention_logit_cap", "attention_invalid_logits_value",
                 "use_clipped_linears", "gradient_clipping", "output_proj_dims")
        return cls(kind="conformer", **common, **{n: audio[n] for n in names if audio.get(n) is not None})


# The MTP drafter (spec 5): a small Gemma 4 stack whose every layer reads the target's stored K/V.

DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


def kv_store_layers(config: TextConfig) -> dict[str, LayerSpec]:
    """The layer of each type whose K/V a drafter attends to: the last non-KV-shared layer of that
    type (spec 1.5; the store layers of E2B/E4B, the last sliding and full layers of the others and
    of Gemma 3). The same layers `DecoderOutput.shared_kv` holds after a forward."""
    out: dict[str, LayerSpec] = {}
    for spec in config.layers[: config.first_shared_layer]:
        out[spec.type] = spec
    return out


@dataclass
class DrafterConfig:
    """A `gemma4_assistant` (or `gemma4_unified_assistant`) config.json.

    `text` is the drafter's own stack. It is built with num_kv_shared_layers=0 (TextConfig refuses
    a stack with no K/V-computing layer); `layers` is where every layer becomes a reader of the
    target's K/V. `to_hf_dict` writes num_kv_shared_layers = num_hidden_layers, as released.
    """

    text: TextConfig
    backbone_hidden_size: int  # the target's hidden size D
    use_ordered_embeddings: bool = False  # the sparse centroid head (E2B/E4B drafters)
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    model_type: str = "gemma4_assistant"
    layers: list[LayerSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        t = self.text
        _check_int("backbone_hidden_size", self.backbone_hidden_size, 1, 1 << 20)
        if not isinstance(self.use_ordered_embeddings, bool):
            raise ConfigError(f"use_ordered_embeddings is {self.use_ordered_embeddings!r:.40}; "
                              "it must be true or false")
        if self.model_type not in DRAFTER_TYPES:
            raise ConfigError(f"unknown drafter model_type {self.model_type!r:.40}; "
                              f"expected {' or '.join(DRAFTER_TYPES)}")
        if t.hidden_size_per_layer_input or t.enable_moe_block or t.use_double_wide_mlp:
            raise ConfigError("a drafter's text_config must not use per-layer embeddings, MoE or double-wide MLPs "
                              "(hidden_size_per_layer_input 0, enable_moe_block and use_double_wide_mlp false)")
        if not t.tie_word_embeddings:
            raise ConfigError("a drafter's LM head is tied to its embeddings; tie_word_embeddings must be true")
        if self.use_ordered_embeddings:
            _check_int("num_centroids", self.num_centroids, 1, t.vocab_size)
            _check_int("centroid_intermediate_top_k", self.centroid_intermediate_top_k, 1, self.num_centroids)
            if t.vocab_size % self.num_centroids:
                raise ConfigError(f"vocab_size {t.vocab_size} is not a multiple of num_centroids {self.num_centroids}; "
                                  "the sparse head splits the vocabulary into equal clusters")
        self.layers = [dataclasses.replace(s, kv_source=-1, stores_kv=False) for s in t.layers]

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> DrafterConfig:
        model_type = raw.get("model_type")
        if model_type not in DRAFTER_TYPES:
            raise ConfigError(f"model_type {model_type!r:.40} is not an MTP drafter; expected "
                              f"{' or '.join(DRAFTER_TYPES)} (an '-it-assistant' checkpoint)")
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"a drafter config.json needs a text_config object, found {text!r:.100}")
        text = dict(text)
        if text.get("model_type", "gemma4_text") not in ("gemma4_text", "gemma4_unified_text"):
            raise ConfigError(f"drafter text_config.model_type is {text.get('model_type')!r:.40}; expected gemma4_text")
        n = _req(text, "num_hidden_layers")
        shared = text.get("num_kv_shared_layers") or n  # the reference fills in n when absent or 0
        if shared != n:
            raise ConfigError(f"every drafter layer reads the target's K/V: num_kv_shared_layers must equal "
                              f"num_hidden_layers ({n}), found {shared!r:.40}")
        # The unified text config has no PLE key; absent means none here (the drafter has none).
        text |= {"model_type": "gemma4_text", "num_kv_shared_layers": 0,
                 "hidden_size_per_layer_input": text.get("hidden_size_per_layer_input") or 0}
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        return cls(
            text=TextConfig.from_hf_dict(text),
            backbone_hidden_size=_req(raw, "backbone_hidden_size"),
            use_ordered_embeddings=raw.get("use_ordered_embeddings", False),
            num_centroids=raw.get("num_centroids", 2048),
            centroid_intermediate_top_k=raw.get("centroid_intermediate_top_k", 32),
            model_type=model_type,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        text = self.text.to_hf_dict()
        text.pop("architectures")
        text["num_kv_shared_layers"] = self.text.num_hidden_layers
        if self.model_type == "gemma4_unified_assistant":
            text["model_type"] = "gemma4_unified_text"
        arch = "Gemma4UnifiedAssistantForCausalLM" if self.model_type != "gemma4_assistant" else \
            "Gemma4AssistantForCausalLM"
        return {"model_type": self.model_type, "architectures": [arch], "text_config": text,
                "backbone_hidden_size": self.backbone_hidden_size,
                "use_ordered_embeddings": self.use_ordered_embeddings, "num_centroids": self.num_centroids,
                "centroid_intermediate_top_k": self.centroid_intermediate_top_k, "tie_word_embeddings": True}

    def mismatches(self, target: TextConfig) -> list[str]:
        """What keeps this drafter from reading `target`'s cache, one line each (empty: it fits).

        The drafter's queries meet the target's stored keys, so head dims and KV-head counts per
        layer type must be equal; its input is the target's embedding and hidden state (width D);
        its tokens are the target's (same vocabulary size)."""
        t, out = self.text, []
        if self.backbone_hidden_size != target.hidden_size:
            out.append(f"backbone_hidden_size {self.backbone_hidden_size} != target hidden_size {target.hidden_size}")
        if t.vocab_size != target.vocab_size:
            out.append(f"vocab_size {t.vocab_size} != target vocab_size {target.vocab_size} (another tokenizer)")
        store = kv_store_layers(target)
        for layer_type in sorted(set(t.layer_types)):
            if layer_type not in store:
                out.append(f"the target has no {layer_type} layer to read K/V from")
                continue
            theirs, ours = store[layer_type], next(s for s in self.layers if s.type == layer_type)
            if ours.head_dim != theirs.head_dim:
                out.append(f"{layer_type} head_dim {ours.head_dim} != target's {theirs.head_dim}")
            if ours.num_kv_heads != theirs.num_kv_heads:
                out.append(f"{layer_type} KV heads {ours.num_kv_heads} != target's {theirs.num_kv_heads}")
            if t.num_attention_heads % theirs.num_kv_heads:
                out.append(f"{t.num_attention_heads} query heads are not a multiple of the target's "
                           f"{theirs.num_kv_heads} {layer_type} KV heads")
        return out
