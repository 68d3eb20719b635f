"""Norm tuning: after GPTQ, fit a quantized model's float norms to the float model it came from.

Quantizing moves every linear layer's outputs a little. The RMSNorm weights that scale each
layer's inputs and outputs are few (gemma-3-270m: 55,936 of 268M parameters) and stay float in a
quantized checkpoint, so they can take up part of that error at no cost in bytes. `tune_norms`
fits them, with everything else frozen, to minimise KL(float || quantized) between the two
models' next-token distributions, on text the float model wrote itself (`sample_windows`).
Measured on gemma-3-270m int4 g64 (docs/benchmarks.md): three poor GPTQ draws (+7% to +17%) came
down to +0.5% to +9.6% on four held-out texts, tuned on prompted samples in one stream; the
default draws moved 1 point or less either way (samples from <bos> alone: +1 point worse; after
one-word prompts, one window each: 1 point better). Fitted to this repository's docs instead, it
helped one draw and hurt another at a higher learning rate.

    windows = sample_windows(model, tokenizer)          # float model: its own text, as token ids
    targets = record_targets(model, windows)            # float model: final hidden states + head
    gptq_quantize(model, calibration_ids)               # quantized in place
    tune_norms(model, windows, targets)                 # the norms fitted; weights untouched
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.decoder import soft_cap
from ..model.layers import RMSNorm
from .quantize import _swap, quantized_tensors

DEFAULT_SAMPLES = 16  # windows of the float model's own text ...
DEFAULT_WINDOW = 512  # ... of this many tokens: 8,192 in all
DEFAULT_EPOCHS = 4
DEFAULT_LR = 1e-3
DEFAULT_POSITIONS = 128  # positions per window whose distributions are compared (the vocabulary is the cost)


@dataclass
class Targets:
    """What the float model says on each window: its final hidden states [1, T, D] (after the final
    norm) and its output matrix, so its logits can be recomputed after its weights are quantized."""

    hidden: list[torch.Tensor]
    head: torch.Tensor
    softcap: float | None

    def logits(self, i: int, positions: torch.Tensor) -> torch.Tensor:
        return soft_cap(torch.nn.functional.linear(self.hidden[i][:, positions], self.head), self.softcap)


@torch.no_grad()
def sample_windows(model: nn.Module, tokenizer, samples: int = DEFAULT_SAMPLES, window: int = DEFAULT_WINDOW,
                   seed: int = 0, progress: bool | None = None) -> list[torch.Tensor]:
    """`samples` texts the model writes from <bos> alone (temperature 1, seeds from `seed`), as
    token-id windows [1, <= window] that start with <bos>."""
    from ..engine.generate import TokenGenerator
    from ..engine.sampling import SamplingParams

    bos = tokenizer.bos_id
    gen = TokenGenerator(model, [[bos]] * samples, [SamplingParams(seed=seed + i) for i in range(samples)],
                         [window - 1] * samples, set(model.config.eos_token_id))
    out: list[list[int]] = [[bos] for _ in range(samples)]
    for steps in tqdm(gen, desc="sampling tuning text", unit="tok", total=window - 1,
                      disable=None if progress is None else not progress, leave=False):
        for row, step in zip(out, steps):
            if step is not None:
                row.append(step.token)
    device = next(model.parameters()).device
    return [torch.tensor([row], device=device) for row in out if len(row) > 1]


@torch.no_grad()
def record_targets(model: nn.Module, windows: list[torch.Tensor]) -> Targets:
    """The float `model`'s final hidden states on `windows` and its head (kept, not copied: quantizing
    the model swaps the head's parameter out, and this reference keeps the float one alive)."""
    head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    if not isinstance(head, torch.Tensor) or not head.is_floating_point():
        raise ValueError("record the targets before quantizing: the model's head is not a float weight")
    hidden = [model.decode(w).hidden for w in windows]
    return Targets(hidden, head.detach(), model.config.final_logit_softcapping)


def tune_norms(model: nn.Module, windows: list[torch.Tensor], targets: Targets, epochs: int = DEFAULT_EPOCHS,
               lr: float = DEFAULT_LR, positions: int = DEFAULT_POSITIONS, seed: int = 0,
               progress: bool | None = None) -> list[float]:
    """Fit the quantized `model`'s RMSNorm weights (in place) so its next-token distributions on
    `windows` match `targets` (`record_targets` of the float model on the same windows): Adam on
    KL(float || quantized) at `positions` random positions per window, one window a step. Returns
    the mean KL of each epoch (it is measured before each step's update)."""
    if len(windows) != len(targets.hidden):
        raise ValueError(f"{len(windows)} windows but targets for {len(targets.hidden)}")
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm) and m.weight is not None]
    if not norms:
        raise ValueError("the model has no norm weights to tune")
    frozen = {p: p.requires_grad for p in model.parameters()}
    gen = torch.Generator().manual_seed(seed)
    curve = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for w in norms:
            w.requires_grad_(True)
        opt = torch.optim.Adam(norms, lr=lr)
        bar = tqdm(total=epochs * len(windows), desc="tuning norms", unit="window",
                   disable=None if progress is None else not progress, leave=False)
        with dense_weights(model), torch.enable_grad(), bar:
            for _ in range(epochs):
                total = 0.0
                for i, ids in enumerate(windows):
                    pos = torch.randperm(ids.shape[1], generator=gen)[:positions].to(ids.device)
                    with torch.no_grad():
                        target = torch.log_softmax(targets.logits(i, pos).float(), -1)
                    out = torch.log_softmax(model.logits(model.decode(ids).hidden[:, pos]).float(), -1)
                    loss = (target.exp() * (target - out)).sum(-1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item()
                    bar.update()
                    bar.set_postfix(kl=f"{loss.item():.4f}")
                curve.append(total / len(windows))
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return curve


@contextmanager
def dense_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every quantized weight is a frozen float parameter holding its dequantized
    value: the same function in plain matmuls, not dequantized on every call (gemma-3-270m, 2 cores,
    one 512-token window with full-vocabulary KL: ~20 s a step against ~35 s, measured in separate
    sessions). Costs the float model's memory while it lasts."""
    swapped = quantized_tensors(model)
    for name, qt in swapped.items():
        _swap(model, name, nn.Parameter(qt.dequantize(), requires_grad=False))
    try:
        yield
    finally:
        for name, qt in swapped.items():
            _swap(model, name, qt)


__all__ = ["Targets", "dense_weights", "record_targets", "sample_windows", "tune_norms"]
