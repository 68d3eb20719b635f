"""The arithmetic of one optimizer step and of a validation pass, which trainer.py drives (its
docstring says how micro-batches are weighted and dealt to the ranks)."""

from __future__ import annotations

import math
import resource

import torch

from .data import Batch, Example, collate
from .parallel import all_reduce_sum


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rank_share(examples: list[Example], indices: list[int], size: int, rank: int, world: int,
               pad_id: int) -> list[tuple[Batch, float]]:
    """This rank's (batch, weight) micro-batches of a step: the step's micro-batches are dealt to
    the ranks in turn, and weight-0 stand-ins even out their number."""
    chosen = sorted((examples[i] for i in indices), key=len)  # similar lengths share a micro-batch
    micro = [chosen[i : i + size] for i in range(0, len(chosen), size)]
    mine = [(collate(m, pad_id), 1.0) for m in micro[rank::world]]
    filler = mine[0][0] if mine else collate(micro[0], pad_id)
    return mine + [(filler, 0.0)] * (math.ceil(len(micro) / world) - len(mine))


def run_micro_batches(
    loss_module: torch.nn.Module,
    micro: list[Batch | tuple[Batch, float]],
    total_targets: int,
    *,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> float:
    """Forward + backward over micro-batches; gradients = d(sum of token CE / total_targets).

    Returns this process's summed CE. `scale` multiplies the loss before backward (the world size
    under FSDP, which averages gradients over ranks). A micro-batch may come as (batch, weight):
    weight 0 is a stand-in that only keeps a rank's collectives in step with the others.
    """
    local = 0.0
    for item in micro:
        batch, weight = item if isinstance(item, tuple) else (item, 1.0)
        b = batch.to(device)
        ce = loss_module(b.ids, b.positions, b.targets)
        (ce * (weight * scale / total_targets)).backward()
        local += float(ce.detach()) * weight
    return local


def evaluate(loss_module, examples: list[Example], micro_batch_size: int, *, rank: int = 0, world: int = 1,
             device: torch.device | str = "cpu", pad_id: int = 0) -> float:
    """Mean CE per trained token over `examples` (split across ranks)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [collate([examples[i] for i in order[s : s + micro_batch_size]], pad_id)
               for s in range(0, len(order), micro_batch_size)]
    total = 0.0
    was_training = loss_module.training
    loss_module.eval()
    with torch.no_grad():
        for k in range(math.ceil(len(batches) / world)):
            j = k * world + rank
            b = batches[min(j, len(batches) - 1)].to(device)
            ce = float(loss_module(b.ids, b.positions, b.targets))
            total += ce if j < len(batches) else 0.0
    loss_module.train(was_training)
    targets = sum(e.num_targets for e in examples)
    return all_reduce_sum([total], world, torch.device(device))[0] / targets


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
