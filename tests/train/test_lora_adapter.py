"""PEFT-format adapters: ours load into transformers + PEFT, PEFT's load into ours, same logits."""

from __future__ import annotations

import json

import peft  # a test dependency (the `test` extra), never a runtime one
import pytest
import torch
from safetensors.torch import load_file
from testing_utils import hf_model
from train_helpers import tiny_dir

from gemma4.train import LoraConfig, LoRAError, apply_adapter, apply_lora, read_adapter_config, save_adapter
from gemma4.weights import load_model

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
CASES = [
    ("tiny-e2b", ()),  # PLE, KV sharing (shared layers have no k/v_proj), double-wide MLP
    ("tiny-26b-a4b", EXPERTS),  # MoE experts via target_parameters, k_eq_v
    ("tiny-26b-a4b", ("experts.down_proj",)),  # one expert tensor: no base_layer nesting
    ("tiny-gemma-3-270m", ()),
]


def randomize_lora(named_parameters, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("name,params", CASES)
def test_our_adapter_loads_into_peft(tmp_path, name, params):
    ours = load_model(tiny_dir(name))
    config = LoraConfig(r=4, alpha=8, target_parameters=params)
    apply_lora(ours, config)
    randomize_lora(ours.named_parameters())
    save_adapter(ours, tmp_path, config)

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    if len(params) == 2:  # PEFT nests the wrappers: gate_up_proj inside, down_proj outside
        assert keys["base_model.model.model.layers.0.experts.base_layer.lora_A.weight"].shape == (8 * 4, 64)
        assert keys["base_model.model.model.layers.0.experts.lora_B.weight"].shape == (64, 4 * 8)

    ids = torch.randint(0, 128, (2, 13))
    reference = peft.PeftModel.from_pretrained(hf_model(name), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,params", CASES)
def test_peft_adapter_loads_into_ours(tmp_path, name, params):
    reference = peft.get_peft_model(hf_model(name), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        target_parameters=list(params) or None, rank_pattern={"o_proj": 2}))
    randomize_lora(reference.named_parameters())
    reference.save_pretrained(tmp_path)
    assert read_adapter_config(tmp_path).r == 3

    ours = apply_adapter(load_model(tiny_dir(name)), tmp_path)
    assert ours.model.layers[0].self_attn.o_proj.lora_A.weight.shape == (2, 64)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference.eval()(ids).logits, rtol=0, atol=1e-4)


def test_adapter_round_trip_and_merge(tmp_path):
    model = load_model(tiny_dir("tiny-12b"))
    config = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "gate_proj"), use_rslora=True)
    apply_lora(model, config)
    randomize_lora(model.named_parameters())
    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] and cfg["target_modules"] == ["gate_proj", "q_proj"]
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        expected = model(ids)
        unmerged = apply_adapter(load_model(tiny_dir("tiny-12b")), tmp_path)(ids)
        merged_model = apply_adapter(load_model(tiny_dir("tiny-12b")), tmp_path, merge=True)
        merged = merged_model(ids)
    torch.testing.assert_close(unmerged, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-4)


def test_unsupported_or_mismatched_adapters_are_refused(tmp_path):
    model = load_model(tiny_dir("tiny-12b"))
    config = LoraConfig(r=2, target_modules=("q_proj",))
    apply_lora(model, config)
    save_adapter(model, tmp_path, config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora"):
        apply_adapter(load_model(tiny_dir("tiny-12b")), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoRAError, match="names no LoRA-adapted module|does not fit|shape"):
        apply_adapter(load_model(tiny_dir("tiny-e2b")), tmp_path)  # other geometry: q_proj widths differ
