"""Loading real checkpoint layouts, and a clear error for each way a checkpoint can be wrong."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4.weights import CheckpointError, load_model
from gemma4.weights.loader import ignored_keys
from limits import LOAD_MB, bounded
from testing_utils import rewrite_config


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


IDS = torch.arange(1, 15).view(1, 14)


def test_sharded_checkpoint_loads(tiny_checkpoint):
    ref, path = tiny_checkpoint("tiny-e2b", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(load_model(path), IDS), ref(IDS).logits, rtol=0, atol=1e-4)


def test_weights_are_memory_mapped_not_copied(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    model = load_model(path, dtype=torch.float32)
    size = (path / "model.safetensors").stat().st_size
    assert model.model.embed_tokens.weight.untyped_storage().nbytes() == size  # a view of the whole file


def test_released_multimodal_layout(tiny_checkpoint, caplog):
    """model.language_model.* prefix, the vision and audio sides skipped on purpose by text_only (one
    line), flat global keys, and the unused K/V tensors that released checkpoints ship for KV-shared
    layers."""
    ref, path = tiny_checkpoint("tiny-e2b")
    state = load_file(path / "model.safetensors")
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    renamed["model.vision_tower.patch_embedder.input_proj.weight"] = torch.zeros(4, 4)
    renamed["model.embed_audio.embedding_projection.weight"] = torch.zeros(4, 4)
    for spec in load_model(path).config.layers:
        if spec.shares_kv:
            renamed[f"model.language_model.layers.{spec.index}.self_attn.k_proj.weight"] = torch.zeros(16, 64)
            renamed[f"model.language_model.layers.{spec.index}.self_attn.k_norm.weight"] = torch.zeros(16)
    (path / "model.safetensors").unlink()
    save_file(renamed, path / "model.safetensors")

    def to_multimodal(text):
        text = dict(text)
        per_layer = text.pop("per_layer_config")
        text["global_head_dim"] = next(iter(per_layer.values()))["head_dim"]
        text["num_global_key_value_heads"] = None
        return {"model_type": "gemma4", "text_config": text, "vision_config": {}, "audio_config": {}}

    rewrite_config(path, to_multimodal)
    with caplog.at_level(logging.WARNING):
        model = load_model(path, text_only=True)
    assert caplog.text.count("text_only: skipped the 1 vision tensors and the 1 audio tensors") == 1
    assert model.vision_config is None
    torch.testing.assert_close(logits(model, IDS), ref(IDS).logits, rtol=0, atol=1e-4)


def test_ignore_list_is_exactly_the_shared_layers_kv():
    from gemma4.variants import variant

    keys = ignored_keys(variant("gemma-4-e2b"))
    assert len(keys) == 20 * 4 + 1
    assert "model.layers.15.self_attn.k_proj.weight" in keys
    assert "model.layers.14.self_attn.k_proj.weight" not in keys


# ------------------------------------------------------------------------------------------------
# Errors: each names the problem and the fix.


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; give a checkpoint directory"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path)


def test_config_not_json(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(path)


def test_unknown_model_type(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    rewrite_config(path, lambda c: c | {"model_type": "mistral"})
    with pytest.raises(CheckpointError, match="unsupported model_type 'mistral'"):
        load_model(path)


def test_no_weights(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no .safetensors weights.*pickles"):
        load_model(path)


def _edit_weights(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


def test_missing_tensor_is_named(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    _edit_weights(path, lambda s: s.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(path)


def test_unexpected_tensor_is_named(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    _edit_weights(path, lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.0\.extra\.weight"):
        load_model(path)


def test_wrong_shape_is_named(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    _edit_weights(path, lambda s: s.update({"model.norm.weight": torch.zeros(63)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.norm\.weight \(63,\) \(expected \(64,\)\)"):
        load_model(path)


def test_config_from_another_model(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    rewrite_config(path, lambda c: c | {"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 128})
    with pytest.raises(CheckpointError, match="Is config.json the one that belongs to these weights"):
        load_model(path)


@pytest.mark.parametrize("layers, message", [
    (10**8, r"num_hidden_layers is 100000000; it must be an integer from 1 to 1024"),
    (1000, r"num_hidden_layers=1000, but the weights hold no tensors for layers 6, 7, 8, 9, 10 \(and 989 more\)"),
])
def test_layer_count_beyond_the_weights_fails_fast(tiny_checkpoint, layers, message):
    """Issue 22: num_hidden_layers = 1e8 (no layer_types) once hung, growing ~60 MB/s; 1,000 layers
    were built on meta before the missing tensors were noticed. Now a clear error naming the field."""
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    rewrite_config(path, lambda c: {k: v for k, v in c.items() if k != "layer_types"} | {"num_hidden_layers": layers})
    with bounded(seconds=5, memory_mb=LOAD_MB), pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_truncated_safetensors(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*truncated or corrupt"):
        load_model(path)


def test_corrupt_safetensors_header(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(path)


def test_index_names_missing_shard(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-e2b", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shards that are missing: {victim}"):
        load_model(path)


def test_hub_id_unreachable_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_model("google/gemma-4-E2B-it")


def test_bad_dtype_name(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-12b")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(path, dtype="float8")
