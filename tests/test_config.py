"""Config parsing (all config.json forms) and the variant registry's exact parameter counts."""

import pytest
import torch

from gemma4.config import FULL, SLIDING, ConfigError, TextConfig
from gemma4.model import Gemma
from gemma4.variants import VARIANTS, variant, variant_hf_config

# Spec section 2 / 7: text model incl. PLE, tied head counted once (HF meta-device instantiation).
PARAMS = {
    "gemma-4-e2b": 4_628_569_344,
    "gemma-4-e4b": 7_463_013_376,
    "gemma-4-12b": 11_907_350_272,
    "gemma-4-26b-a4b": 25_233_141_760,
    "gemma-4-31b": 30_697_345_280,
    "gemma-3-270m": 268_098_176,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_real_variants_build_on_meta_with_spec_parameter_counts(name):
    config = variant(name)
    with torch.device("meta"):
        model = Gemma(config)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert config.num_parameters() == PARAMS[name]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_builds(name):
    config = variant(name)
    with torch.device("meta"):
        model = Gemma(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def test_e2b_geometry():
    c = variant("gemma-4-e2b")
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == list(range(4, 35, 5))
    producers = {s.type: s.index for s in c.layers if s.stores_kv}
    assert producers == {SLIDING: 13, FULL: 14}
    assert all(s.kv_source == producers[s.type] for s in c.layers[15:])
    assert {s.intermediate_size for s in c.layers[:15]} == {6144}
    assert {s.intermediate_size for s in c.layers[15:]} == {12288}
    full = c.layers[4]
    assert (full.head_dim, full.num_kv_heads, full.k_eq_v) == (512, 1, False)


def test_e4b_producers():
    c = variant("gemma-4-e4b")
    assert {s.type: s.index for s in c.layers if s.stores_kv} == {SLIDING: 22, FULL: 23}


def test_k_eq_v_and_global_kv_heads():
    c = variant("gemma-4-26b-a4b")
    sliding, full = c.layers[0], c.layers[5]
    assert (sliding.head_dim, sliding.num_kv_heads, sliding.k_eq_v) == (256, 8, False)
    assert (full.head_dim, full.num_kv_heads, full.k_eq_v) == (512, 2, True)


def test_proportional_rope_rotates_a_quarter():
    rope = variant("gemma-4-e2b").rope(FULL)
    assert (rope.theta, rope.head_dim, rope.rotated) == (1e6, 512, 64)


def test_multimodal_config_with_flat_global_keys():
    text = variant_hf_config("gemma-4-31b")
    raw = {"model_type": "gemma4", "text_config": text, "vision_config": {}, "eos_token_id": [1, 106]}
    c = TextConfig.from_hf_dict(raw)
    assert c.layers[5].num_kv_heads == 4 and c.eos_token_id == [1, 106]


def test_per_layer_config_form_equals_flat_form():
    flat = variant_hf_config("gemma-4-12b")
    per_layer = dict(flat)
    head_dim, kv = per_layer.pop("global_head_dim"), per_layer.pop("num_global_key_value_heads")
    per_layer["per_layer_config"] = {
        str(i): {"head_dim": head_dim, "num_key_value_heads": kv}
        for i, t in enumerate(flat["layer_types"]) if t == FULL
    }
    assert TextConfig.from_hf_dict(per_layer).layers == TextConfig.from_hf_dict(flat).layers


def test_global_kv_heads_apply_only_with_k_eq_v():
    raw = variant_hf_config("gemma-4-e4b") | {"num_global_key_value_heads": 1}
    assert TextConfig.from_hf_dict(raw).layers[5].num_kv_heads == 2


def test_gemma3_legacy_rope_keys_and_linear_scaling():
    c = variant("gemma-3-4b")
    assert c.rope(FULL).scale == 8.0 and c.rope(FULL).theta == 1e6
    assert c.rope(SLIDING).scale == 1.0 and c.rope(SLIDING).theta == 1e4
    assert c.norm_offset == 1.0 and c.attn_scale == 256**-0.5 and not c.v_norm


def test_gemma3_sliding_window_pattern_key():
    raw = variant_hf_config("gemma-3-270m")
    raw.pop("layer_types")
    raw["sliding_window_pattern"] = 6
    assert TextConfig.from_hf_dict(raw).layer_types == variant("gemma-3-270m").layer_types


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"num_hidden_layers": None}, "lacks required key 'num_hidden_layers'"),
        ({"layer_types": [SLIDING, FULL]}, "layer_types has 2 entries but num_hidden_layers is 18"),
        ({"num_key_value_heads": 3}, "not a multiple of 3 KV heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2}}, "unsupported rope_type 'yarn'"),
        # Issue 22: each of these once passed unchecked or raised a bare TypeError / ZeroDivisionError.
        ({"hidden_size": -64}, "hidden_size is -64; it must be an integer from 1 to 1048576"),
        ({"hidden_size": "64"}, "hidden_size is '64'; it must be an integer from 1 to"),
        ({"num_key_value_heads": 0}, "num_key_value_heads is 0; it must be an integer from 1 to"),
        ({"num_hidden_layers": 1e8}, r"num_hidden_layers is 100000000\.0; it must be an integer from 1 to 1024"),
        ({"head_dim": 15}, "head_dim=15 is odd"),
        ({"sliding_window_pattern": -1, "layer_types": None}, "sliding_window_pattern is -1; it must be an integer"),
        ({"rope_theta": "big"}, r"rope_parameters\['full_attention'\]\.rope_theta is 'big'; it must be a finite"),
        ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, r"\.factor is nan; it must be a finite"),
        ({"rms_norm_eps": -1e-6}, r"rms_norm_eps is -1e-06; it must be a finite number in \[0.0, inf\]"),
        ({"layer_types": "sliding_attention"}, "layer_types must be a list of"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false'; it must be true or false"),
        ({"eos_token_id": [1, None]}, "eos_token_id is None; it must be an integer"),
    ],
)
def test_bad_configs_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        TextConfig.from_hf_dict(variant_hf_config("gemma-3-270m") | change)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"per_layer_config": {"x": {"head_dim": 64}}}, "per_layer_config overrides layer 'x'"),
        ({"num_experts": 1}, "top_k_experts=2 exceeds num_experts=1"),
        ({"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 0}, "needs vocab_size_per_layer_input"),
        ({"rope_parameters": {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 2},
                              "sliding_attention": {}}}, r"partial_rotary_factor is 2; .* in \[0.0, 1.0\]"),
        ({"attention_k_eq_v": "yes"}, "attention_k_eq_v is 'yes'; it must be true or false"),
    ],
)
def test_bad_gemma4_configs_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        TextConfig.from_hf_dict(variant_hf_config("tiny-26b-a4b") | change)


def test_text_config_must_be_an_object():
    with pytest.raises(ConfigError, match="text_config is 'x'; it must be an object"):
        TextConfig.from_hf_dict({"model_type": "gemma4", "text_config": "x"})


def test_round_trip_through_hf_dict():
    for name in VARIANTS:
        c = variant(name)
        assert TextConfig.from_hf_dict(c.to_hf_dict()).layers == c.layers
