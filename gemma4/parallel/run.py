"""torchrun glue: every rank runs the same command; rank 0 speaks, the others stay silent.

`gemma4 generate --tp N` runs the same program on every rank (SPMD): the same prompt, the same
engine steps, and logits gathered identically on every rank, so each rank samples the same token
as long as they share a seed: without --seed, rank 0 draws one and broadcasts it. Only rank 0
writes to stdout. A rank that dies ends the group: torchrun stops the others (its summary names
the rank that failed first), a collective with a dead peer fails at once (its connection closes)
and one waiting on a hung peer after the process group's timeout; the rank then says so and exits
(`lost_group`), never a silent hang.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from .layout import Layout, join

_RAISED = (EOFError, KeyboardInterrupt)
T = TypeVar("T")


def start(args) -> Layout | None:
    """Join the group for `--tp N [--ep M]` (None when tp is 1) and set the options every rank shares."""
    tp, ep = getattr(args, "tp", 1) or 1, getattr(args, "ep", 1) or 1
    if tp == 1:
        if ep != 1:
            raise ValueError(f"--ep {ep} needs --tp: experts are split over the tensor-parallel ranks "
                             f"(e.g. --tp {ep} --ep {ep})")
        return None
    for flag in ("adapter", "quantize", "draft_model", "speculative"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} with --tp is not supported yet; leave one of them out")
    if getattr(args, "compile", False):
        raise ValueError("--compile with --tp is not supported yet (the step's collectives are not traced); "
                         "leave out --compile")
    layout, device = join(tp, ep)
    if layout.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    args.device, args.exact = str(device), True  # one device per rank; no CPU repacking of sharded weights
    if getattr(args, "seed", 0) is None:
        seed = torch.tensor([secrets.randbits(62) if layout.rank == 0 else 0], device=device)
        dist.broadcast(seed, 0)
        args.seed = int(seed.item())
    return layout


def finish(layout: Layout | None) -> None:
    if layout is not None and dist.is_initialized():
        dist.destroy_process_group()



def lost_group(layout: Layout | None, error: BaseException, command: str) -> bool:
    """When `error` is a collective of the --tp group failing (a peer died, hung or left), say so
    on stderr and return True: the caller exits non-zero instead of printing a traceback."""
    text = str(error)
    if layout is None or not (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text):
        return False
    print(f"gemma4 {command}: rank {layout.rank}: the tensor-parallel group broke (another rank died or hung; "
          f"torchrun's summary names it); stopping. {text.splitlines()[0] if text else ''}", file=sys.stderr)
    return True


def shared_input(layout: Layout | None, read: Callable[[], T]) -> Callable[[], T]:
    """`read` for an interactive command under --tp: rank 0 reads (the terminal), every rank gets
    what it read, or the EOFError / KeyboardInterrupt it raised, so all act on the same input."""
    if layout is None:
        return read

    def shared() -> T:
        box = [None]
        if layout.rank == 0:
            try:
                box = [(True, read())]
            except _RAISED as error:
                box = [(False, _RAISED.index(type(error)))]
        dist.broadcast_object_list(box, src=0, group=layout.tp_group)
        ok, value = box[0]
        if not ok:
            raise _RAISED[value]()
        return value

    return shared
