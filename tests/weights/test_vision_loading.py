"""Multimodal checkpoints load strictly, towers included, in every released layout; text_only
skips the vision side on purpose. Checkpoints come from transformers' save_pretrained (tiny
random layouts of tests/vision_refs.py) and are then edited."""

import logging

import pytest
import torch
from vision_refs import LAYOUTS, saved_layouts, write_edited

from gemma4.weights import CheckpointError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a busy machine

# One tower tensor per layout, as transformers 5.23 writes it.
TOWER = {
    "e2b": "model.vision_tower.encoder.layers.1.self_attn.k_proj.input_max",
    "31b": "model.vision_tower.std_scale",
    "12b": "model.vision_embedder.patch_dense.weight",
    "gemma3": "vision_tower.encoder.layers.0.mlp.fc1.bias",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_layouts(tmp_path_factory, LAYOUTS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_missing_tower_tensor(saved, tmp_path, layout):
    path = write_edited(saved, layout, tmp_path, lambda s: {k: v for k, v in s.items() if k != TOWER[layout]})
    with pytest.raises(CheckpointError, match="missing tensors the config requires"):
        load_model(path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_extra_tower_tensor(saved, tmp_path, layout):
    name = TOWER[layout].rsplit(".", 1)[0] + ".surprise"
    path = write_edited(saved, layout, tmp_path, lambda s: s.__setitem__(name, torch.zeros(2)))
    with pytest.raises(CheckpointError, match="tensors this config does not use: .*surprise"):
        load_model(path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_misshaped_tower_tensor(saved, tmp_path, layout):
    def edit(s):
        s[TOWER[layout]] = torch.zeros(*(d + 1 for d in s[TOWER[layout]].shape), 1)
    path = write_edited(saved, layout, tmp_path, edit)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_text_only_skips_the_vision_side(saved, tmp_path, layout, caplog):
    path = write_edited(saved, layout, tmp_path, lambda s: None)
    full = load_model(path)
    with caplog.at_level(logging.WARNING):
        text = load_model(path, text_only=True)
    assert caplog.text.count("text_only: skipped the") == 1
    assert text.vision_config is None and full.vision_config is not None
    assert not any(n.startswith(("vision_", "embed_vision", "multi_modal")) for n in text.state_dict())
    ids = torch.randint(1, 120, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(text(ids), full(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no vision tower"):
        text.embed_media(torch.zeros(1, 9, 768))


def test_released_layouts_of_older_writers(saved, tmp_path):
    """Gemma 3 as released (language_model.model.*, vision_tower.vision_model.*) and the 12B under
    transformers' in-memory names (embed_vision.patch_ln1, embed_vision.multimodal_embedder.*)."""
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in saved["gemma3"][1].items()}
    (tmp_path / "g3").mkdir()
    g3 = write_edited(saved, "gemma3", tmp_path / "g3", lambda s: renamed)
    assert load_model(g3).vision_config.kind == "siglip"

    def hf_names(s):
        out = {k.replace("model.vision_embedder.", "model.embed_vision."): v for k, v in s.items()}
        out["model.embed_vision.multimodal_embedder.embedding_projection.weight"] = out.pop(
            "model.embed_vision.embedding_projection.weight")
        return out
    (tmp_path / "u").mkdir()
    unified = write_edited(saved, "12b", tmp_path / "u", hf_names)
    assert load_model(unified).vision_config.kind == "unified"


def test_bad_vision_config_is_a_checkpoint_error(saved, tmp_path):
    import json

    path = write_edited(saved, "31b", tmp_path, lambda s: None)
    raw = json.loads((path / "config.json").read_text())
    raw["vision_config"]["head_dim"] = 10**9
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="vision_config.head_dim"):
        load_model(path)


def test_save_writes_the_text_model_of_a_multimodal_one(saved, tmp_path):
    """config.json of a saved model describes the text model, so the vision side is left out."""
    from gemma4.weights import save

    (tmp_path / "in").mkdir()
    model = load_model(write_edited(saved, "31b", tmp_path / "in", lambda s: None))
    out = save(tmp_path / "out", model)
    again = load_model(out)
    ids = torch.randint(1, 120, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["vision_config"].update(num_hidden_layers=10**6), "vision_config.num_hidden_layers"),
    (lambda r: r["vision_config"].update(use_clipped_linears="yes"), "vision_config.use_clipped_linears"),
    (lambda r: r["vision_config"].update(rope_parameters={"rope_type": "default"}), "only axial RoPE"),
    (lambda r: r["vision_config"].update(head_dim=18), "multiple of 4"),
    (lambda r: r["vision_config"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda r: r["vision_config"].update(hidden_activation="relu"), "only gelu_pytorch_tanh"),
    (lambda r: r.update(vision_config=[1]), "vision_config is \\[1\\]"),
    (lambda r: r.update(image_token_id=-1), "vision_config.image_token_id"),
])
def test_hostile_vision_configs_are_refused(edit, message):
    from gemma4.config import ConfigError, TextConfig, VisionConfig
    from gemma4.variants import multimodal_hf_config

    raw = multimodal_hf_config("tiny-31b")
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        VisionConfig.from_hf_dict(raw, TextConfig.from_hf_dict(raw))


@pytest.mark.parametrize("name, edit, message", [
    ("tiny-12b", lambda v: v.update(output_proj_dims=7), "must equal mm_embed_dim"),
    ("tiny-gemma-3-4b", lambda v: v.update(image_size=60), "do not pool evenly"),
])
def test_inconsistent_vision_geometry_is_refused(name, edit, message):
    from gemma4.config import ConfigError, TextConfig, VisionConfig
    from gemma4.variants import multimodal_hf_config

    raw = multimodal_hf_config(name)
    edit(raw["vision_config"])
    with pytest.raises(ConfigError, match=message):
        VisionConfig.from_hf_dict(raw, TextConfig.from_hf_dict(raw))


def test_released_vision_geometry_builds_on_meta():
    """Every released multimodal variant builds with its image side (names and shapes, no memory)."""
    from gemma4.config import TextConfig, VisionConfig
    from gemma4.model import Gemma
    from gemma4.variants import MULTIMODAL, multimodal_hf_config

    for name in (n for n in MULTIMODAL if not n.startswith("tiny")):
        raw = multimodal_hf_config(name)
        text = TextConfig.from_hf_dict(raw)
        with torch.device("meta"):
            model = Gemma(text, VisionConfig.from_hf_dict(raw, text))
        tower = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.", "lm_head")))
        assert tower > 1e8 or name == "gemma-4-12b", (name, tower)
