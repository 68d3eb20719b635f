"""Audio checkpoints load strictly (E2B-like tower and embedder, the 12B's frame projection), text_only
leaves the audio side out on purpose, the released geometry builds with the spec's shapes, and bad
audio configs are refused. Checkpoints come from transformers' save_pretrained, then are edited."""

import json
import logging

import pytest
import torch
from vision_refs import saved_layouts, write_edited

from gemma4.config import AudioConfig, ConfigError, TextConfig
from gemma4.variants import multimodal_hf_config
from gemma4.weights import CheckpointError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Audio tensors as transformers 5.23 writes them (the released names).
AUDIO = {
    "e2b": ["model.audio_tower.layers.1.self_attn.relative_k_proj.weight",
            "model.audio_tower.subsample_conv_projection.layer0.norm.weight",
            "model.audio_tower.layers.0.lconv1d.linear_start.input_max",
            "model.embed_audio.embedding_projection.weight"],
    "12b": ["model.embed_audio.embedding_projection.weight"],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_layouts(tmp_path_factory, AUDIO)


def test_released_names_are_all_used(saved):
    """Every audio tensor of the checkpoint is a parameter or buffer of ours under the same name."""
    for layout, (path, state) in saved.items():
        model = load_model(path)
        ours = {k for k in model.state_dict() if k.startswith(("audio_tower.", "embed_audio."))}
        theirs = {k.removeprefix("model.") for k in state if "audio" in k}
        assert ours == theirs and ours, layout
        assert set(AUDIO[layout]) <= {f"model.{k}" for k in ours}


@pytest.mark.parametrize("layout, name", [(lay, n) for lay, names in AUDIO.items() for n in names])
def test_missing_audio_tensor(saved, tmp_path, layout, name):
    path = write_edited(saved, layout, tmp_path, lambda s: {k: v for k, v in s.items() if k != name})
    with pytest.raises(CheckpointError, match=f"missing tensors the config requires: {name.removeprefix('model.')}"):
        load_model(path)


@pytest.mark.parametrize("layout", list(AUDIO))
def test_extra_and_misshaped_audio_tensors(saved, tmp_path, layout):
    name = AUDIO[layout][0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    extra = write_edited(saved, layout, tmp_path / "a", lambda s: s.__setitem__(name + "_surprise", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="tensors this config does not use: .*surprise"):
        load_model(extra)
    wrong = write_edited(saved, layout, tmp_path / "b", lambda s: s.__setitem__(name, torch.zeros(3, 5)))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(wrong)


def test_audio_tensors_without_an_audio_config_are_refused(saved, tmp_path):
    """A config without audio_config does not silently drop the checkpoint's audio tensors."""
    path = write_edited(saved, "e2b", tmp_path, lambda s: None)
    raw = json.loads((path / "config.json").read_text())
    raw["audio_config"] = None
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="tensors this config does not use: audio_tower"):
        load_model(path)


@pytest.mark.parametrize("layout", list(AUDIO))
def test_text_only_leaves_the_audio_side_out(saved, layout, caplog):
    path, _ = saved[layout]
    full = load_model(path)
    with caplog.at_level(logging.WARNING):
        text = load_model(path, text_only=True)
    assert caplog.text.count("text_only: skipped the") == 1 and "audio tensors" in caplog.text
    assert text.audio_config is None and full.audio_config is not None
    assert not any(k.startswith(("audio_tower.", "embed_audio.")) for k in text.state_dict())
    ids = torch.randint(1, 120, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(text(ids), full(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="takes no audio"):
        text.embed_audio(torch.zeros(1, 8, 128))


def test_save_writes_the_text_model_of_an_audio_one(saved, tmp_path):
    from gemma4.weights import save

    model = load_model(saved["e2b"][0])
    again = load_model(save(tmp_path / "out", model))
    assert again.audio_config is None
    ids = torch.randint(1, 120, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_embed_audio_is_the_method_and_the_module_stays_reachable(saved):
    """`embed_audio` names both the checkpoint's module and Gemma's method: module tools still find it."""
    model = load_model(saved["e2b"][0])
    assert callable(model.embed_audio) and not isinstance(model.embed_audio, torch.nn.Module)
    assert model.get_submodule("embed_audio.embedding_projection") is model.audio_embedder.embedding_projection
    assert model.get_parameter("embed_audio.embedding_projection.weight").shape == (64, 48)


def test_released_audio_geometry_builds_on_meta():
    """E2B/E4B: the spec's tensor shapes (section 3.3); the 12B: a 640 -> 3840 projection; 26B/31B: none."""
    from gemma4.model import Gemma

    shapes = {}
    for name in ("gemma-4-e2b", "gemma-4-e4b", "gemma-4-12b", "gemma-4-31b"):
        raw = multimodal_hf_config(name)
        text = TextConfig.from_hf_dict(raw)
        audio = AudioConfig.from_hf_dict(raw, text)
        with torch.device("meta"):
            model = Gemma(text, None, audio)
        shapes[name] = {k: tuple(v.shape) for k, v in model.state_dict().items() if "audio" in k}
    e2b = shapes["gemma-4-e2b"]
    tower = "audio_tower.subsample_conv_projection."
    assert e2b[tower + "layer0.conv.weight"] == (128, 1, 3, 3) and e2b[tower + "layer1.conv.weight"] == (32, 128, 3, 3)
    assert e2b[tower + "input_proj_linear.weight"] == (1024, 1024)
    assert e2b["audio_tower.layers.11.feed_forward2.ffw_layer_1.linear.weight"] == (4096, 1024)
    assert e2b["audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"] == (1024, 1, 5)
    assert e2b["audio_tower.layers.0.self_attn.per_dim_scale"] == (128,)
    assert e2b["audio_tower.output_proj.weight"] == (1536, 1024) and e2b["audio_tower.output_proj.bias"] == (1536,)
    assert e2b["embed_audio.embedding_projection.weight"] == (1536, 1536)
    assert shapes["gemma-4-e4b"]["embed_audio.embedding_projection.weight"] == (2560, 1536)
    assert shapes["gemma-4-12b"] == {"embed_audio.embedding_projection.weight": (3840, 640)}
    assert shapes["gemma-4-31b"] == {}


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["audio_config"].update(hidden_act="relu"), "only silu"),
    (lambda r: r["audio_config"].update(subsampling_conv_channels=[128]), "two integers"),
    (lambda r: r["audio_config"].update(num_attention_heads=5), "not a multiple of num_attention_heads"),
    (lambda r: r["audio_config"].update(num_hidden_layers=10**6), "audio_config.num_hidden_layers"),
    (lambda r: r["audio_config"].update(use_clipped_linears="yes"), "use_clipped_linears"),
    (lambda r: r["audio_config"].update(attention_logit_cap=float("nan")), "attention_logit_cap"),
    (lambda r: r.update(audio_config=[1]), "audio_config is \\[1\\]"),
    (lambda r: r.update(audio_token_id=-1), "audio_config.audio_token_id"),
])
def test_hostile_audio_configs_are_refused(edit, message):
    raw = multimodal_hf_config("tiny-e2b")
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        AudioConfig.from_hf_dict(raw, TextConfig.from_hf_dict(raw))


def test_bad_audio_config_is_a_checkpoint_error(saved, tmp_path):
    path = write_edited(saved, "e2b", tmp_path, lambda s: None)
    raw = json.loads((path / "config.json").read_text())
    raw["audio_config"]["hidden_act"] = "gelu"
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="audio_config.hidden_act"):
        load_model(path)
