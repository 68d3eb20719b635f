"""LoRA module swap: gradients, merge/unmerge, targeting, names."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny

from gemma4.train import (
    LoraConfig,
    LoRAError,
    apply_lora,
    lora_modules,
    mark_only_lora_trainable,
    merge,
    unload_lora,
    unmerge,
)
from gemma4.train.lora import LoRAExpertsMixin

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def randomize_lora(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lora_keeps_base_names_and_starts_as_identity():
    model, _ = tiny("tiny-26b-a4b")
    base_names = set(model.state_dict())
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids)
    adapted = apply_lora(model, LoraConfig(r=4, target_parameters=EXPERTS))
    assert "model.layers.0.self_attn.q_proj" in adapted and "model.layers.0.experts.gate_up_proj" in adapted
    names = set(model.state_dict())
    assert base_names <= names  # base checkpoint names unchanged
    assert all("lora_" in n for n in names - base_names)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # B = 0: no change
    trainable = mark_only_lora_trainable(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("name,params", [("tiny-26b-a4b", EXPERTS), ("tiny-e2b", ())])
def test_lora_gradients_equal_merged_weight_gradients(name, params):
    """dL/dB = s·(dL/dW)·Aᵀ and dL/dA = s·Bᵀ·(dL/dW), where W is the merged weight."""
    model, _ = tiny(name)
    model.double()  # the identity is exact; fp64 keeps rounding (fp32 norms aside) out of the way
    apply_lora(model, LoraConfig(r=3, alpha=6, target_parameters=params), dtype=torch.float64)
    randomize_lora(model)
    mark_only_lora_trainable(model)
    ids = torch.randint(0, 128, (2, 10))
    targets = torch.randint(0, 128, (2, 10))
    loss_fn = lambda m: torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), targets.flatten())
    lora_loss = loss_fn(model)
    lora_loss.backward()

    merge(model)  # same function, the adapter folded into W; now differentiate w.r.t. W
    model.requires_grad_(False)
    mods = dict(lora_modules(model))
    for m in mods.values():
        for p in (m.gate_up_proj, m.down_proj) if isinstance(m, LoRAExpertsMixin) else (m.weight,):
            p.requires_grad_(True)
            p.grad = None
    merged_loss = loss_fn(model)
    merged_loss.backward()
    torch.testing.assert_close(merged_loss, lora_loss, rtol=1e-7, atol=1e-7)
    checked = 0
    for m in mods.values():
        if isinstance(m, LoRAExpertsMixin):
            for p in m.lora_A:
                gw, s = getattr(m, p).grad, m.lora_scalings[p]
                a, b = m.lora_A[p].detach(), m.lora_B[p].detach()
                torch.testing.assert_close(m.lora_B[p].grad, s * gw @ a.transpose(1, 2), rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(m.lora_A[p].grad, s * b.transpose(1, 2) @ gw, rtol=1e-6, atol=1e-9)
                checked += 1
        else:
            gw, s = m.weight.grad, m.lora_scaling
            a, b = m.lora_A.weight.detach(), m.lora_B.weight.detach()
            torch.testing.assert_close(m.lora_B.weight.grad, s * gw @ a.T, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(m.lora_A.weight.grad, s * b.T @ gw, rtol=1e-6, atol=1e-9)
            checked += 1
    assert checked == sum(len(m.lora_A) if isinstance(m, LoRAExpertsMixin) else 1 for m in mods.values())


def test_merge_unmerge_round_trip():
    model, _ = tiny("tiny-26b-a4b")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=8, target_parameters=EXPERTS))
    randomize_lora(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        adapted = model(ids)
        merge(model)
        merged = model(ids)
        w = model.model.layers[1].self_attn.q_proj.weight
        assert not torch.equal(w, original["model.layers.1.self_attn.q_proj.weight"])
        unmerge(model)
        again = model(ids)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, adapted, rtol=1e-4, atol=1e-4)
    for k, v in original.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    # Unloading with merge leaves a plain model computing the adapted function.
    unload_lora(model)
    assert not any("lora_" in k for k in model.state_dict())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids), adapted, rtol=1e-4, atol=1e-4)


def test_targeting_follows_peft_rules():
    model, _ = tiny("tiny-12b")
    names = apply_lora(model, LoraConfig(target_modules=("q_proj", "mlp.down_proj")))
    assert names and all(n.endswith(("self_attn.q_proj", "mlp.down_proj")) for n in names)
    model, _ = tiny("tiny-12b")
    names = apply_lora(model, LoraConfig(target_modules=r"model\.layers\.[01]\.self_attn\.(q|o)_proj"))
    assert sorted(names) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "oq"]
    with pytest.raises(LoRAError, match="already has a LoRA"):
        apply_lora(model, LoraConfig(target_modules=("q_proj",)))
    with pytest.raises(LoRAError, match="no module"):
        apply_lora(tiny("tiny-12b")[0], LoraConfig(target_modules=("nothing_here",)))
    with pytest.raises(LoRAError, match="not a linear"):
        apply_lora(tiny("tiny-12b")[0], LoraConfig(target_modules=("q_norm",)))
    with pytest.raises(LoRAError, match="dropout"):
        LoraConfig(dropout=0.1, target_parameters=EXPERTS)


def test_dropout_only_in_training():
    model, _ = tiny("tiny-gemma-3-270m")
    apply_lora(model, LoraConfig(r=4, dropout=0.5))
    randomize_lora(model)
    ids = torch.randint(0, 128, (1, 8))
    model.eval()
    with torch.no_grad():
        a, b = model(ids), model(ids)
        model.train()
        c = model(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
