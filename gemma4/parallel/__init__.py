"""Tensor- and expert-parallel inference over torch.distributed (docs/scaling.md).

A sharded model is the plain model with a rank-local geometry and a few modules swapped, applied
from outside the model math: at world size 1 nothing here runs, so the single-process path is
unchanged. Import the submodules themselves (this package imports nothing, so that `args` stays
light for the CLI's parser):

    args.py      the --tp / --ep flags, shared by `generate`, `chat` and `serve`
    layout.py    the ranks: --tp N ranks, experts over --ep M of them, the process groups
    plan.py      the sharding rule of every parameter, and the rank-local model built on meta
    modules.py   row-parallel linear, vocab-parallel embedding and LM head, expert-parallel experts
    load.py      each rank reads only its slices of the checkpoint
    memory.py    per-rank weight and KV-cache bytes (`gemma4 info --tp`)
    run.py       torchrun glue: join the group, a shared seed, rank 0 speaks (and reads the terminal)
The engine side (rank 0 leads the engine's steps, the others follow) is gemma4.engine.replica.
"""
