"""Quality on the real gemma-3-270m: perplexity of int8 / int4 against the dequantized GGUF model.

Scored on the first N tokens of tests/data/eval/essays.txt in one window; benchmarks/quant.py
measures longer stretches and docs/benchmarks.md records them (the whole text: int8 under 1%, int4
g64 far above the issue's 8% rounded to nearest, +5% with GPTQ on the shipped calibration text: see there).
"""

import copy
from pathlib import Path

import pytest
import torch

from gemma4.api import default_model_path
from gemma4.eval import gemma_logits_fn, perplexity
from gemma4.quant.gptq import CALIBRATION_TEXT
from gemma4.quant import (
    QuantizedTensor,
    activation_scales,
    gptq_quantize,
    kernels,
    quantize,
    quantize_checkpoint,
    set_kernels,
)

pytestmark = pytest.mark.slow
TEXT = Path(__file__).parents[1] / "data" / "eval" / "essays.txt"
N = 256


@pytest.fixture(scope="module")
def scored(gemma3_270m):
    model, tokenizer, _ = gemma3_270m
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:N]
    return ids, perplexity(gemma_logits_fn(model), ids, window=N, progress=False)


def rise(result, base) -> float:
    return result.perplexity / base.perplexity - 1


def agreement(result, base) -> float:
    return (result.predictions == base.predictions).float().mean().item()


def score(label: str, model, scored) -> tuple[float, float]:
    """(perplexity rise, greedy agreement) of `model` against float32 on the scored tokens; printed."""
    ids, base = scored
    result = perplexity(gemma_logits_fn(model), ids, window=N, progress=False)
    print(f"{label}: {base.perplexity:.3f} -> {result.perplexity:.3f} ({100 * rise(result, base):+.2f}%), "
          f"agreement {100 * agreement(result, base):.1f}%")
    return rise(result, base), agreement(result, base)


def test_int8_perplexity_within_1_percent(gemma3_270m, scored):
    model = quantize(copy.deepcopy(gemma3_270m[0]), "int8")
    assert isinstance(model.model.embed_tokens.weight, QuantizedTensor)  # the tied head too
    # measured on these tokens: +0.10%, greedy agreement 93%
    up, agree = score("int8", model, scored)
    assert up <= 0.01, up
    assert agree >= 0.9, agree


def test_int4_from_the_gguf_file(scored):
    """int4 (group 64), quantized tensor by tensor straight from the GGUF file.

    Round-to-nearest int4 costs this small model far more than the issue's 8% target (see
    docs/benchmarks.md). The bounds below guard against regressions only (measured on these
    tokens: +37.5%, greedy agreement 65%; +51% and 61% when the tied head was int4 too).
    """
    ids, _ = scored
    model = quantize_checkpoint(default_model_path(), "int4", 64)
    assert model.model.embed_tokens.weight.bits == 8  # the tied head stays int8 (default_predicate)
    up, agree = score("int4 g64", model, scored)
    assert up <= 0.45, up
    assert agree >= 0.5, agree

    # Decode-sized inputs (<= KERNEL_MAX_ROWS rows) take the int4 kernel, whose activations are
    # rounded to bf16 before every matmul, so its logits drift a little from the plain path's and
    # near ties may flip. Checked on four 16-token prompts (<bos> + 15 tokens from different
    # places in the text), 64 positions: relative RMS difference <= 3% overall and <= 5% at every
    # position (measured 0.7% and at most 1.6%), the same top-1 token at >= 90% of positions
    # (measured 97%), and where it differs a near tie: the kernel's token is within 0.5 of the
    # plain path's best logit (measured <= 0.09).
    chunks = [torch.tensor([ids[:1] + ids[i:i + kernels.KERNEL_MAX_ROWS - 1]]) for i in range(1, N, 64)]
    with torch.no_grad():
        fast = torch.cat([model(c)[0] for c in chunks])
        plain = torch.cat([set_kernels(model, False)(c)[0] for c in chunks])
    assert fast.shape[0] == 4 * kernels.KERNEL_MAX_ROWS
    diff = fast - plain
    assert (diff.pow(2).mean() / plain.pow(2).mean()).sqrt() <= 0.03
    assert ((diff.pow(2).mean(-1) / plain.pow(2).mean(-1)).sqrt() <= 0.05).all()
    same = fast.argmax(-1) == plain.argmax(-1)
    assert same.float().mean() >= 0.9, same.float().mean()
    chosen = plain.gather(1, fast.argmax(-1, keepdim=True))[:, 0]
    assert (plain.amax(-1) - chosen <= 0.5).all(), (plain.amax(-1) - chosen)[~same]


def test_calibrated_int4_loses_much_less(gemma3_270m, scored):
    """Activation-aware int4 (`gemma4 quantize --calibration`), calibrated on 512 tokens of the text
    that the scored ones do not overlap: far closer to float than round to nearest (measured +13.0%,
    agreement 74.5%, against +37.5% and 65% without calibration)."""
    model, tokenizer, _ = gemma3_270m
    calibration = tokenizer.encode(TEXT.read_text(encoding="utf-8"))[1024:1536]
    scales = activation_scales(model, torch.tensor(calibration))
    model = quantize(copy.deepcopy(model), "int4", 64, col_scales=scales)
    up, agree = score("int4 g64 calibrated", model, scored)
    assert up <= 0.25, up
    assert agree >= 0.7, agree


def test_gptq_int4_group_64(gemma3_270m, scored):
    """GPTQ on Hadamard-rotated weights (`gemma4 quantize --calibration`), calibrated on the first
    2,048 tokens of the shipped calibration text (all of it, ~9,800 tokens, gives +5.0% on the whole
    eval text: docs/benchmarks.md): the closest to float of any int4 g64 here (measured +2.9%,
    agreement 81.2%; calibrated on the repository's docs instead it was +11.0% and 80.0%; round to
    nearest +37.5% and 65%). The bounds leave room for other CPUs' rounding, which acts like another
    sign draw (over eight draws, the whole text's rise spanned 4 points)."""
    model, tokenizer, _ = gemma3_270m
    calibration = tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"))[:2048]
    model = gptq_quantize(copy.deepcopy(model), calibration, 64)
    assert model.model.layers[0].mlp.down_proj.weight.rotation == 128
    up, agree = score("int4 g64 GPTQ", model, scored)
    assert up <= 0.10, up
    assert agree >= 0.77, agree


def test_int4_group_32_on_the_gguf_blocks(scored):
    """Groups of 32 coincide with the GGUF's blocks (Q5_0 / Q4_K / Q6_K / Q8_0 all quantize 32 or 16
    weights per scale), so int4 only re-rounds each block on a grid of its own. Over the whole text
    that costs +4.1% perplexity, against +98% at group 64 (docs/benchmarks.md); these first 256
    tokens, read in one window, are the hardest stretch (measured +28.2%, agreement 70%; group 64:
    +37.5%), so the bounds below guard against regressions only."""
    model = quantize_checkpoint(default_model_path(), "int4", 32)
    up, agree = score("int4 g32", model, scored)
    assert up <= 0.35, up
    assert agree >= 0.65, agree
