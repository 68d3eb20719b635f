"""Tensor- and expert-parallel inference over torch.distributed (docs/scaling.md).

A sharded model is the plain model with a rank-local geometry and a few modules swapped, applied
from outside the model math: at world size 1 nothing here runs, so the single-process path is
unchanged.

    layout.py    the ranks: --tp N ranks, experts over --ep M of them, the process groups
    plan.py      the sharding rule of every parameter, and the rank-local model built on meta
    modules.py   row-parallel linear, vocab-parallel embedding and LM head, expert-parallel experts
    load.py      each rank reads only its slices of the memory-mapped checkpoint
    memory.py    per-rank weight and KV-cache bytes (`gemma4 info --tp`)
    run.py       torchrun glue for `generate` and `serve`: rank 0 drives, the others follow
"""

from .layout import Layout
from .load import load_sharded
from .plan import shard_model

__all__ = ["Layout", "load_sharded", "shard_model"]
