"""LoRA and QLoRA on the real gemma-3-270m (the embedded Q4_K_M GGUF, dequantized) on CPU.

The shipped dataset (tests/data/train/pirate_*.jsonl) answers simple questions in a fixed pirate
style ("Arr! Paris be the capital of France, matey."). The base (pre-trained, not instruction
tuned) model never answers that way; a few LoRA steps must lower the validation loss and make
its greedy answers to held-out questions take the style.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from gemma4 import SamplingParams, batch_generate
from gemma4.train import LoraConfig, TrainConfig, finetune

DATA = Path(__file__).resolve().parents[1] / "data" / "train"
PROMPTS = ["What is the capital of Portugal?", "How many legs does a cat have?", "What color is a lemon?",
           "What do you call a baby sheep?", "What is the opposite of big?", "What do spiders spin?"]

pytestmark = pytest.mark.slow


def styled(model, tok, chat) -> float:
    """Fraction of greedy answers to held-out questions that open the way the data does ("Arr!" is
    two tokens; every generated token of the int4 model dequantizes all its weights, so keep it short)."""
    prompts = [chat.render([{"role": "user", "content": p}]) for p in PROMPTS]
    answers = batch_generate(model.eval(), tok, prompts, max_tokens=3, sampling=SamplingParams(temperature=0),
                             add_bos=False)
    return sum(a.strip().startswith("Arr!") for a in answers) / len(answers)


# 4 steps of 4 conversations: the recorded 24-step runs (docs/finetuning_runs.json) are at a
# validation loss of ~1.3-1.5 from ~7.5 after 4 steps; the test keeps CI time to ~1 min for both.
@pytest.mark.parametrize("quantize", [None, "int4"], ids=["lora", "qlora-int4"])
def test_lora_on_real_weights_learns_the_style(gemma3_270m, tmp_path, quantize, steps=4):
    model, tok, chat = copy.deepcopy(gemma3_270m[0]), *gemma3_270m[1:]  # the shared model (tests/conftest.py)
    before = styled(model, tok, chat)
    config = TrainConfig(lora=LoraConfig(r=8, alpha=16), max_steps=steps, batch_size=4, micro_batch_size=4, lr=2e-3,
                         warmup_steps=2, quantize=quantize, gradient_checkpointing=False, eval_batch_size=12,
                         progress=False)
    result = finetune(model, DATA / "pirate_train.jsonl", val=DATA / "pirate_val.jsonl", out=tmp_path,
                      tokenizer=tok, chat_format=chat, config=config)
    after = styled(model, tok, chat)
    (v0, first), (_, last) = result.val_losses[0], result.val_losses[-1]
    print(f"{quantize or 'float'}: val loss {first:.3f} -> {last:.3f}, styled answers {before:.2f} -> {after:.2f}, "
          f"{result.tokens_per_s:.0f} tok/s, peak RSS {result.peak_memory_bytes / 2**30:.2f} GiB, "
          f"train losses {[round(x, 3) for x in result.train_losses]}")
    assert v0 == 0 and last < 0.6 * first
    assert before == 0 and after >= 0.5
    assert (tmp_path / "adapter_model.safetensors").is_file()
    if quantize:
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "QuantizedTensor"
