"""Named variants: the released models' exact text geometry, and tiny look-alikes for tests.

The real numbers come from the spec (section 2 and 7). The tiny variants switch on the same
features as the model they stand for (PLE, KV sharing, double-wide MLP, k_eq_v, MoE, linear
RoPE scaling), small enough to run in a test in milliseconds; their windows are short so a test
sequence spans several windows.
"""

from __future__ import annotations

from typing import Any

from .config import FULL, SLIDING, TextConfig

_G4_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _pattern(n: int, period: int) -> list[str]:
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n)]


def _gemma4(layers: int, period: int, **kw: Any) -> dict[str, Any]:
    base = dict(
        model_type="gemma4_text", vocab_size=262_144, head_dim=256, global_head_dim=512,
        num_hidden_layers=layers, layer_types=_pattern(layers, period), rope_parameters=_G4_ROPE,
        final_logit_softcapping=30.0, max_position_embeddings=262_144, eos_token_id=[1, 106],
        hidden_size_per_layer_input=0,
    )
    return base | kw


def _gemma3(layers: int, **kw: Any) -> dict[str, Any]:
    base = dict(
        model_type="gemma3_text", vocab_size=262_144, head_dim=256, num_hidden_layers=layers,
        layer_types=_pattern(layers, 6), rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=256, final_logit_softcapping=None, eos_token_id=[1, 106],
    )
    return base | kw


_PLE = dict(hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144)
_LINEAR8 = dict(rope_scaling={"rope_type": "linear", "factor": 8.0})

VARIANTS: dict[str, dict[str, Any]] = {
    # ---- Gemma 4 (text decoder of the released checkpoints) ----
    "gemma-4-e2b": _gemma4(35, 5, hidden_size=1536, intermediate_size=6144, num_attention_heads=8,
                           num_key_value_heads=1, sliding_window=512, num_kv_shared_layers=20,
                           use_double_wide_mlp=True, max_position_embeddings=131_072, **_PLE),
    "gemma-4-e4b": _gemma4(42, 6, hidden_size=2560, intermediate_size=10240, num_attention_heads=8,
                           num_key_value_heads=2, sliding_window=512, num_kv_shared_layers=18,
                           max_position_embeddings=131_072, **_PLE),
    "gemma-4-12b": _gemma4(48, 6, hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                           num_key_value_heads=8, num_global_key_value_heads=1, attention_k_eq_v=True,
                           sliding_window=1024, use_bidirectional_attention="vision"),
    "gemma-4-26b-a4b": _gemma4(30, 6, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
                               num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True,
                               sliding_window=1024, enable_moe_block=True, num_experts=128, top_k_experts=8,
                               moe_intermediate_size=704, use_bidirectional_attention="vision"),
    "gemma-4-31b": _gemma4(60, 6, hidden_size=5376, intermediate_size=21504, num_attention_heads=32,
                           num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True,
                           sliding_window=1024, use_bidirectional_attention="vision"),
    # ---- Gemma 3 text ----
    "gemma-3-270m": _gemma3(18, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                            num_key_value_heads=1, sliding_window=512, max_position_embeddings=32_768),
    "gemma-3-1b": _gemma3(26, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                          num_key_value_heads=1, sliding_window=512, max_position_embeddings=32_768),
    "gemma-3-4b": _gemma3(34, vocab_size=262_208, hidden_size=2560, intermediate_size=10240,
                          num_attention_heads=8, num_key_value_heads=4, sliding_window=1024,
                          max_position_embeddings=131_072, **_LINEAR8),
    "gemma-3-12b": _gemma3(48, vocab_size=262_208, hidden_size=3840, intermediate_size=15360,
                           num_attention_heads=16, num_key_value_heads=8, sliding_window=1024,
                           max_position_embeddings=131_072, **_LINEAR8),
    "gemma-3-27b": _gemma3(62, vocab_size=262_208, hidden_size=5376, intermediate_size=21504,
                           num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                           query_pre_attn_scalar=168, sliding_window=1024, max_position_embeddings=131_072,
                           **_LINEAR8),
}

# Tiny look-alikes: same features, toy sizes (vocab 128, D 64, head dims 16 / 32, window 4).
_TINY = dict(vocab_size=128, hidden_size=64, head_dim=16, max_position_embeddings=512, sliding_window=4)
_TINY_PLE = dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=128)
VARIANTS |= {
    "tiny-e2b": _gemma4(10, 5, **_TINY, global_head_dim=32, intermediate_size=96, num_attention_heads=4,
                        num_key_value_heads=1, num_kv_shared_layers=4, use_double_wide_mlp=True, **_TINY_PLE),
    "tiny-e4b": _gemma4(12, 6, **_TINY, global_head_dim=32, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, num_kv_shared_layers=5, **_TINY_PLE),
    "tiny-12b": _gemma4(6, 6, **_TINY, global_head_dim=32, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True),
    "tiny-26b-a4b": _gemma4(6, 6, **_TINY, global_head_dim=32, intermediate_size=48, num_attention_heads=4,
                            num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True,
                            enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24),
    "tiny-31b": _gemma4(12, 6, **_TINY, global_head_dim=32, intermediate_size=128, num_attention_heads=8,
                        num_key_value_heads=4, num_global_key_value_heads=2, attention_k_eq_v=True),
    "tiny-gemma-3-270m": _gemma3(6, **_TINY, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                 query_pre_attn_scalar=16),
    "tiny-gemma-3-4b": _gemma3(6, **_TINY, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               query_pre_attn_scalar=16, **_LINEAR8),
}


class UnknownVariantError(KeyError, ValueError):
    """A variant name that matches none (a ValueError too, so the CLI reports it as a message)."""

    def __str__(self) -> str:
        return str(self.args[0])


RELEASED = [name for name in VARIANTS if not name.startswith("tiny-")]  # what `gemma4 info --list` shows


def variant_hf_config(name: str) -> dict[str, Any]:
    """The config.json dict of a named variant (a copy; safe to modify). Names match case-insensitively."""
    raw = VARIANTS.get(name) or VARIANTS.get(name.lower())
    if raw is None:
        import difflib

        close = difflib.get_close_matches(name.lower(), list(VARIANTS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UnknownVariantError(f"unknown variant {name!r}; {hint}known: {', '.join(RELEASED)} "
                                  "(`gemma4 info --list`)")
    return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}


def variant(name: str) -> TextConfig:
    return TextConfig.from_hf_dict(variant_hf_config(name))


# ---- Multimodal: a text variant plus its image side, as a whole config.json -----------------------
# Real vision geometry from the spec (6.1, 6.4; Gemma 3's SigLIP so400m); the tiny ones switch on the
# same features (clipped linears, GQA in the tower, standardize, the 12B embedder, SigLIP pooling) and
# move the placeholder ids into the tiny vocabulary (127 image, 126 video, 125 BOI, 124 EOI, 123 audio,
# 122 BOA, 121 EOA).
_G4_IDS = dict(image_token_id=258_880, video_token_id=258_884, audio_token_id=258_881, boi_token_id=255_999,
               eoi_token_id=258_882, boa_token_id=256_000, eoa_token_index=258_883)
_TINY_IDS = dict(image_token_id=127, video_token_id=126, audio_token_id=123, boi_token_id=125, eoi_token_id=124,
                 boa_token_id=122, eoa_token_index=121)
_G3_IDS = dict(image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000, mm_tokens_per_image=256)
_AXIAL = {"rope_type": "axial", "rope_theta": 100.0}
_G4_SMALL = dict(model_type="gemma4_vision", hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
                 num_attention_heads=12, num_key_value_heads=12, head_dim=64, use_clipped_linears=True,
                 rope_parameters=_AXIAL)
_G4_LARGE = dict(model_type="gemma4_vision", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=72, standardize=True, rope_parameters=_AXIAL)
_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
               num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)
_TINY_G4 = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, position_embedding_size=10240,
                rope_parameters=_AXIAL)

# name -> (text variant, config.json model_type, vision_config, top-level ids, text_config overrides)
MULTIMODAL: dict[str, tuple[str, str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "gemma-4-e2b": ("gemma-4-e2b", "gemma4", _G4_SMALL, _G4_IDS, {}),
    "gemma-4-e4b": ("gemma-4-e4b", "gemma4", _G4_SMALL, _G4_IDS, {}),
    "gemma-4-12b": ("gemma-4-12b", "gemma4_unified", dict(model_type="gemma4_unified_vision", mm_embed_dim=3840,
                                                          mm_posemb_size=1120, output_proj_dims=3840),
                    _G4_IDS, {"model_type": "gemma4_unified_text"}),
    "gemma-4-26b-a4b": ("gemma-4-26b-a4b", "gemma4", _G4_LARGE, _G4_IDS, {}),
    "gemma-4-31b": ("gemma-4-31b", "gemma4", _G4_LARGE, _G4_IDS, {}),
    "gemma-3-4b": ("gemma-3-4b", "gemma3", _SIGLIP, _G3_IDS, {}),
    "gemma-3-12b": ("gemma-3-12b", "gemma3", _SIGLIP, _G3_IDS, {}),
    "gemma-3-27b": ("gemma-3-27b", "gemma3", _SIGLIP, _G3_IDS, {}),
    "tiny-e2b": ("tiny-e2b", "gemma4", dict(_TINY_G4, use_clipped_linears=True), _TINY_IDS, {}),
    "tiny-31b": ("tiny-31b", "gemma4", dict(_TINY_G4, standardize=True), _TINY_IDS,
                 {"use_bidirectional_attention": "vision"}),
    "tiny-12b": ("tiny-12b", "gemma4_unified", dict(model_type="gemma4_unified_vision", mm_embed_dim=48,
                                                    mm_posemb_size=1120, output_proj_dims=48), _TINY_IDS,
                 {"model_type": "gemma4_unified_text", "use_bidirectional_attention": "vision"}),
    "tiny-gemma-3-4b": ("tiny-gemma-3-4b", "gemma3", dict(_SIGLIP, hidden_size=32, intermediate_size=48,
                                                          num_hidden_layers=2, num_attention_heads=2, image_size=56),
                        dict(image_token_index=127, boi_token_index=125, eoi_token_index=124, mm_tokens_per_image=4),
                        {}),
}


# Audio (spec 6.2, 6.4): E2B/E4B's conformer (transformers' defaults are the released geometry), the 12B's
# raw 640-sample frames; 26B/31B and Gemma 3 take no audio. The tiny conformer keeps the released
# attention geometry (chunks of 12, 12 frames of context) and the 128 mel bins of the real processor
# (subsampling_conv_channels[0] = 128), and shrinks everything else.
_CONFORMER = dict(model_type="gemma4_audio")
_TINY_CONFORMER = dict(model_type="gemma4_audio", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       subsampling_conv_channels=[128, 8], output_proj_dims=48)
_FRAMES = dict(model_type="gemma4_unified_audio", audio_embed_dim=640)
AUDIO: dict[str, dict[str, Any]] = {
    "gemma-4-e2b": _CONFORMER, "gemma-4-e4b": _CONFORMER, "gemma-4-12b": _FRAMES,
    "tiny-e2b": _TINY_CONFORMER, "tiny-12b": _FRAMES,
}


def multimodal_hf_config(name: str) -> dict[str, Any]:
    """The whole config.json dict of a named multimodal variant: text_config, vision_config,
    audio_config (null where the released model takes no audio) and the placeholder ids."""
    try:
        text_name, model_type, vision, ids, text_overrides = MULTIMODAL[name]
    except KeyError:
        raise KeyError(f"unknown multimodal variant {name!r}; known: {', '.join(MULTIMODAL)}") from None
    text = variant_hf_config(text_name) | text_overrides
    out = {"model_type": model_type, "text_config": text, "vision_config": dict(vision), **ids,
           "tie_word_embeddings": True}
    if model_type != "gemma3":
        out["audio_config"] = dict(AUDIO[name]) if name in AUDIO else None
    return out


# ---- MTP drafters (spec 5): 3 sliding + 1 full layer, all reading the target's K/V ----
def _drafter(backbone: int, ordered: bool, unified: bool = False, centroids: int = 2048, top_k: int = 32,
             **text: Any) -> dict[str, Any]:
    text = _gemma4(4, 4, layer_types=[SLIDING, SLIDING, SLIDING, FULL], num_kv_shared_layers=4, **text)
    text.pop("final_logit_softcapping")  # the drafter's head is never soft-capped
    if unified:
        text["model_type"] = "gemma4_unified_text"
        text.pop("hidden_size_per_layer_input")  # not a field of the unified text config
    else:
        text["vocab_size_per_layer_input"] = 0
    return dict(model_type="gemma4_unified_assistant" if unified else "gemma4_assistant", text_config=text,
                backbone_hidden_size=backbone, use_ordered_embeddings=ordered, num_centroids=centroids,
                centroid_intermediate_top_k=top_k, tie_word_embeddings=True)


_D_SMALL = dict(hidden_size=256, intermediate_size=2048, num_attention_heads=4, sliding_window=512)
_D_BIG = dict(hidden_size=1024, intermediate_size=8192, sliding_window=1024, attention_k_eq_v=True)
_TINY_D = dict(vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=16, global_head_dim=32,
               max_position_embeddings=512, sliding_window=4)
DRAFTER_VARIANTS: dict[str, dict[str, Any]] = {
    "gemma-4-e2b-assistant": _drafter(1536, True, **_D_SMALL, num_key_value_heads=1),
    "gemma-4-e4b-assistant": _drafter(2560, True, **_D_SMALL, num_key_value_heads=2),
    "gemma-4-12b-assistant": _drafter(3840, False, True, **_D_BIG, num_attention_heads=16, num_key_value_heads=8,
                                      num_global_key_value_heads=1),
    "gemma-4-26b-a4b-assistant": _drafter(2816, False, **_D_BIG, num_attention_heads=16, num_key_value_heads=8,
                                          num_global_key_value_heads=2),
    "gemma-4-31b-assistant": _drafter(5376, False, **_D_BIG, num_attention_heads=32, num_key_value_heads=16,
                                      num_global_key_value_heads=4),
    # Tiny look-alikes of the drafters of tiny-e2b (sparse head: 8 clusters of 16), tiny-12b, tiny-31b.
    "tiny-e2b-assistant": _drafter(64, True, centroids=8, top_k=2, **_TINY_D, num_attention_heads=4,
                                   num_key_value_heads=1),
    "tiny-12b-assistant": _drafter(64, False, True, **_TINY_D, num_attention_heads=4, num_key_value_heads=2,
                                   num_global_key_value_heads=1, attention_k_eq_v=True),
    "tiny-31b-assistant": _drafter(64, False, **_TINY_D, num_attention_heads=8, num_key_value_heads=4,
                                   num_global_key_value_heads=2, attention_k_eq_v=True),
}


def drafter_hf_config(name: str) -> dict[str, Any]:
    """The config.json dict of a named drafter variant (a deep copy)."""
    import copy

    if name not in DRAFTER_VARIANTS:
        raise KeyError(f"unknown drafter variant {name!r}; known: {', '.join(DRAFTER_VARIANTS)}")
    return copy.deepcopy(DRAFTER_VARIANTS[name])
