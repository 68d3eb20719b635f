"""The training loss: summed cross-entropy over trained tokens, never holding full-vocabulary logits.

Gemma's 262,144-entry vocabulary makes fp32 logits of a 4K-token sequence 4 GiB (and as much
again for their gradient). So the decoder's hidden states are computed once (`model.decode`),
only the rows that carry loss are kept, and logits + CE are computed `chunk_size` rows at a time,
each chunk under activation checkpointing: forward keeps only the chunk's hidden rows, backward
recomputes that chunk's logits. Peak extra memory is one chunk of logits. The last chunk is not
checkpointed: its saved logits are used as soon as backward starts, so keeping them costs no more
than the recompute of any chunk would, and a batch that fits one chunk never recomputes the head.

The loss is a *sum* over tokens; the trainer divides by the number of trained tokens of the whole
optimizer step (all micro-batches, all ranks), so accumulation weights every token equally.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE


def chunked_cross_entropy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 256,
    use_checkpoint: bool = True,
) -> torch.Tensor:
    """sum_i CE(logits_fn(hidden[i]), targets[i]) in fp32; hidden [N, D], targets [N] (no IGNORE)."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(h).float(), t, reduction="sum")

    # Starting from hidden.sum() * 0 keeps a graph even with no rows (a rank's padding micro-batch
    # must still run backward, for FSDP's collectives).
    total = hidden.float().sum() * 0.0
    n = hidden.shape[0]
    for s in range(0, n, chunk_size):
        h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        if use_checkpoint and torch.is_grad_enabled() and s + chunk_size < n:
            total = total + checkpoint(chunk_loss, h, t, use_reentrant=False)
        else:
            total = total + chunk_loss(h, t)
    return total


class CausalLMLoss(nn.Module):
    """model -> (summed CE, number of trained tokens) of a padded batch.

    Also the unit FSDP shards at the root: the decoder and the tied LM head run inside one forward,
    so the root's parameters (embedding, final norm) stay gathered for both.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.decode(ids, positions=positions).hidden  # [B, T, D], final-normed
        keep = targets != IGNORE
        return chunked_cross_entropy(self.model.logits, hidden[keep], targets[keep], self.chunk_size)
