"""Sliding-window perplexity of a token sequence under any causal LM.

The model is a callable `logits_fn(ids [1, L], n) -> logits [1, n, V]` for the last n positions of
`ids` (`gemma_logits_fn` adapts our `Gemma`; for another model, e.g. transformers:
`lambda ids, n: hf(ids).logits[:, -n:]`). Asking only for the scored positions lets a model skip
the LM head elsewhere, which for a 262k vocabulary is most of the work.

Windows of `window` tokens start every `stride` tokens (the Hugging Face recipe). Each token is
scored once, in the first window that reaches it, with the rest of that window as its context:
so with stride < window every token after the first window sees at least window - stride tokens
of context. Token 0 is never scored (nothing predicts it), nor, when stride == window, the first
token of each window (its context would be empty); `tokens` counts what was scored. Log-probabilities are computed in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class PerplexityResult:
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # number of scored tokens
    predictions: torch.Tensor  # argmax prediction for each scored token (ids[1:] order), for agreement checks

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def gemma_logits_fn(model) -> LogitsFn:
    """Adapt a gemma4 `Gemma` (keeps only the needed logits; no grad)."""

    device = next(model.parameters()).device

    def fn(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids.to(device), logits_to_keep=n)

    return fn


def perplexity(
    logits_fn: LogitsFn,
    ids: Sequence[int] | torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of `ids` (1-d) with windows of `window` tokens every `stride` (default window // 2)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    stride = window // 2 if stride is None else stride
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window}, stride={stride}")
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    T = ids.numel()
    total, count, preds = 0.0, 0, []
    scored_to = 1  # targets ids[1:scored_to] are done
    bar = tqdm(total=T - 1, desc="perplexity", unit="tok", disable=None if progress is None else not progress,
               leave=False)
    for begin in range(0, T - 1, stride):
        end = min(begin + window, T)
        # Position p predicts token p + 1, so the window scores ids[begin + 1 : end] at most, from
        # inputs ids[begin : end - 1]; of those, only the targets no earlier window has scored.
        n = end - max(scored_to, begin + 1)
        if n > 0:
            logits = logits_fn(ids[None, begin:end - 1], n)
            if logits.shape[-2] != n:
                raise ValueError(f"logits_fn returned {logits.shape[-2]} positions, asked for {n}")
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            targets = ids[end - n:end].to(lp.device)
            total -= lp.gather(1, targets[:, None]).sum().item()
            preds.append(lp.argmax(-1).cpu())
            count += n
            bar.update(n)
        scored_to = end
        if end == T:
            break
    bar.close()
    return PerplexityResult(total / count, count, torch.cat(preds))
