"""Strict drafter loading: the released layout round-trips; wrong tensors, a drafter made for another
target and a broken config are refused with errors that name what differs."""

import json

import pytest
import torch

from gemma4.config import ConfigError, DrafterConfig, TextConfig
from gemma4.model.drafter import Drafter
from gemma4.variants import drafter_hf_config, variant, variant_hf_config
from gemma4.weights import CheckpointError
from gemma4.weights.drafter import load_drafter, save_drafter
from gemma4.weights.save import write_safetensors


def _random(name: str) -> Drafter:
    torch.manual_seed(0)
    model = Drafter(DrafterConfig.from_hf_dict(drafter_hf_config(name)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        if model.masked_embedding is not None:
            model.masked_embedding.token_ordering.copy_(torch.randperm(model.config.text.vocab_size))
    return model


@pytest.fixture
def saved(tmp_path):
    model = _random("tiny-e2b-assistant")
    return model, save_drafter(tmp_path / "drafter", model)


def _edit_tensors(path, fn):
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    fn(state)
    (path / "model.safetensors").unlink()
    write_safetensors(state, path / "model.safetensors")


def test_round_trip(saved):
    model, path = saved
    loaded = load_drafter(path, variant("tiny-e2b"))
    assert json.loads((path / "config.json").read_text())["text_config"]["num_kv_shared_layers"] == 4
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert loaded.masked_embedding.token_ordering.dtype == torch.long


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("post_projection.weight"), ["missing", "post_projection.weight"]),
    (lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 32)),
     ["does not use", "model.layers.0.self_attn.k_proj.weight"]),
    (lambda s: s.__setitem__("pre_projection.weight", torch.zeros(32, 100)), ["wrong shape", "pre_projection"]),
    (lambda s: s["masked_embedding.token_ordering"].fill_(3), ["token_ordering", "permutation"]),
])
def test_bad_tensors_are_named(saved, edit, words):
    _, path = saved
    _edit_tensors(path, edit)
    with pytest.raises(CheckpointError) as e:
        load_drafter(path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_lm_head_copy_is_ignored(saved):
    """Some exporters write the tied head; it is the embedding table, so it is dropped."""
    _, path = saved
    _edit_tensors(path, lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"].clone()))
    load_drafter(path, variant("tiny-e2b"))


@pytest.mark.parametrize("target, words", [
    (variant("tiny-31b"), ["KV heads 1 != target's 4", "KV heads 1 != target's 2"]),
    (TextConfig.from_hf_dict(variant_hf_config("tiny-e2b") | {"hidden_size": 96}),
     ["backbone_hidden_size 64 != target hidden_size 96"]),
    (TextConfig.from_hf_dict(variant_hf_config("tiny-e2b") | {"vocab_size": 256, "vocab_size_per_layer_input": 256}),
     ["vocab_size 128 != target vocab_size 256"]),
    (TextConfig.from_hf_dict(variant_hf_config("tiny-e2b") | {"global_head_dim": 64}),
     ["full_attention head_dim 32 != target's 64"]),
])
def test_drafter_for_another_target_is_refused(saved, target, words):
    _, path = saved
    with pytest.raises(CheckpointError) as e:
        load_drafter(path, target)
    assert "was not made for this target" in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_store_layers_of_a_gemma3_target():
    """A Gemma 3 target has no KV sharing: the drafter reads the last layer of each type."""
    from gemma4.config import kv_store_layers

    store = kv_store_layers(variant("tiny-gemma-3-270m"))
    assert {t: s.index for t, s in store.items()} == {"sliding_attention": 4, "full_attention": 5}
    e2b = variant("tiny-e2b")  # KV sharing: the store layers are its producers
    assert {t: s.index for t, s in kv_store_layers(e2b).items()} == {s.type: s.index for s in e2b.layers if s.stores_kv}


@pytest.mark.parametrize("change, words", [
    (lambda c: c.__setitem__("model_type", "gemma4_text"), ["not an MTP drafter"]),
    (lambda c: c["text_config"].__setitem__("num_kv_shared_layers", 2), ["num_kv_shared_layers must equal"]),
    (lambda c: c["text_config"].__setitem__("use_double_wide_mlp", True), ["double-wide"]),
    (lambda c: c.__setitem__("num_centroids", 7), ["not a multiple of num_centroids"]),
    (lambda c: c.pop("backbone_hidden_size"), ["backbone_hidden_size"]),
])
def test_bad_config(saved, change, words):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    change(config)
    with pytest.raises(ConfigError) as direct:
        DrafterConfig.from_hf_dict(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_drafter(path)
    assert all(w in str(e.value) and w in str(direct.value) for w in words), str(e.value)
