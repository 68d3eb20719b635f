"""The loss path: chunked CE = full CE, token-weighted accumulation, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny

from gemma4.train import (
    CausalLMLoss,
    Example,
    LoraConfig,
    apply_lora,
    checkpoint_layers,
    chunked_cross_entropy,
    collate,
    lora_parameters,
    mark_only_lora_trainable,
    run_micro_batches,
    uncheckpoint_layers,
)
from gemma4.train.data import IGNORE


def lora_model(name="tiny-e2b", seed=3):
    model, _ = tiny(name)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    mark_only_lora_trainable(model)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_equals_full(chunk):
    """Soft-capped tied head, 50 rows: value and gradients (hidden and embedding) match the plain CE."""
    model, _ = tiny("tiny-e2b")  # final_logit_softcapping = 30
    model.model.embed_tokens.weight.requires_grad_(True)
    torch.manual_seed(0)
    hidden = torch.randn(50, 64, requires_grad=True)
    targets = torch.randint(0, 128, (50,))

    full = F.cross_entropy(model.logits(hidden).float(), targets, reduction="sum")
    full.backward()
    g_hidden, g_embed = hidden.grad.clone(), model.model.embed_tokens.weight.grad.clone()
    hidden.grad = None
    model.model.embed_tokens.weight.grad = None

    chunked = chunked_cross_entropy(model.logits, hidden, targets, chunk_size=chunk)
    chunked.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(hidden.grad, g_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, g_embed, rtol=1e-5, atol=1e-6)


def test_loss_module_counts_only_trained_tokens():
    model = lora_model()
    ex = Example(list(range(10, 22)), [False] * 6 + [True] * 6)
    b = collate([ex])
    assert b.num_targets == 6 and b.targets[0, 5] == 16  # position t predicts token t+1 where it is trained
    ce = CausalLMLoss(model)(b.ids, b.positions, b.targets)
    logits = model(b.ids)[0]
    keep = b.targets[0] != IGNORE
    torch.testing.assert_close(ce, F.cross_entropy(logits[keep], b.targets[0][keep], reduction="sum"),
                               rtol=1e-5, atol=1e-5)


def test_accumulation_one_batch_of_four_equals_four_of_one():
    """Different lengths and target counts: the step gradient is the token-weighted mean either way.
    In float64: the gradients agree to ~1e-15 (in fp32, summation order alone moved one by 2.2e-6
    on an AVX-512 Xeon)."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, trained in [(9, 3), (14, 8), (6, 2), (17, 11)]:
        ids = torch.randint(4, 128, (n,), generator=g).tolist()
        examples.append(Example(ids, [False] * (n - trained) + [True] * trained))
    total = sum(e.num_targets for e in examples)

    model = lora_model().double()
    loss_module = CausalLMLoss(model)
    one = run_micro_batches(loss_module, [collate(examples)], total) / total
    g_one = grads(model)
    model.zero_grad(set_to_none=True)
    four = run_micro_batches(loss_module, [collate([e]) for e in examples], total) / total
    g_four = grads(model)

    assert abs(one - four) < 1e-5
    assert g_one.keys() == g_four.keys() and g_one
    for k in g_one:
        assert g_one[k].dtype == torch.float64
        torch.testing.assert_close(g_four[k], g_one[k], rtol=0, atol=1e-12)
    # The naive mean of per-micro-batch means differs (that is the bug this guards against).
    naive = sum(run_micro_batches(loss_module, [collate([e])], e.num_targets) for e in examples) / 4
    assert abs(naive - one) > 1e-3


def test_activation_checkpointing_gives_the_same_gradients():
    """KV-shared layers (tiny-e2b) borrow their producer's K/V through the checkpointed layers."""
    model = lora_model("tiny-e2b")
    batch = collate([Example(list(range(5, 30)), [False] * 5 + [True] * 20)])
    loss_module = CausalLMLoss(model)
    plain = run_micro_batches(loss_module, [batch], 20)
    g_plain = grads(model)
    model.zero_grad(set_to_none=True)
    checkpoint_layers(model)
    assert "forward" in vars(model.model.layers[0])
    ckpt = run_micro_batches(loss_module, [batch], 20)
    g_ckpt = grads(model)
    uncheckpoint_layers(model)
    assert "forward" not in vars(model.model.layers[0])
    assert abs(plain - ckpt) < 1e-5
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], rtol=1e-5, atol=1e-7)
