"""Which rank holds what: `tp` ranks split attention heads, MLP columns and the vocabulary; the
experts are split over `ep` of them, each expert's width over the other tp / ep.

Rank r of the tp group sits at (ep index r // etp, etp index r % etp), etp = tp / ep:
- the ep group (same etp index, `ep` ranks) exchanges tokens with all_to_all;
- the etp group (same ep index, `etp` ranks) sums partial expert outputs with all_reduce.
ep = 1: experts tensor-parallel like the dense MLP; ep = tp: whole experts per rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective that waits longer than this means a peer died or hung: the group stops with an error.
DEFAULT_TIMEOUT = timedelta(minutes=5)


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    """[lo, hi) of part i when n items are cut into `parts` (the first n % parts get one more)."""
    base, extra = divmod(n, parts)
    lo = i * base + min(i, extra)
    return lo, lo + base + (1 if i < extra else 0)


@dataclass
class Layout:
    """This rank's place. Groups are None for a planning layout (meta builds, `gemma4 info`)."""

    tp: int
    ep: int = 1
    rank: int = 0
    # MLP and expert widths are cut in multiples of this many columns where it divides them: an int4
    # checkpoint's group, so that each rank's input columns of down_proj are whole groups.
    unit: int = 1
    tp_group: object = field(default=None, repr=False)
    ep_group: object = field(default=None, repr=False)
    etp_group: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise ValueError(f"--tp and --ep must be at least 1, got tp={self.tp} ep={self.ep}")
        if self.tp % self.ep:
            raise ValueError(f"--ep {self.ep} must divide --tp {self.tp} (experts are split over ep of the tp ranks)")
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} is outside the {self.tp} tensor-parallel ranks")

    def width(self, n: int, parts: int, i: int) -> tuple[int, int]:
        """[lo, hi) of part i of an MLP width of n columns, in whole units where the unit divides n."""
        u = self.unit if n % self.unit == 0 else 1
        lo, hi = split(n // u, parts, i)
        return lo * u, hi * u

    @property
    def etp(self) -> int:
        return self.tp // self.ep

    @property
    def ep_index(self) -> int:
        return self.rank // self.etp

    @property
    def etp_index(self) -> int:
        return self.rank % self.etp


def join(tp: int, ep: int = 1, timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[Layout, torch.device]:
    """Join (or reuse) the process group torchrun set up and make this rank's groups.

    NCCL when CUDA is present (one GPU per local rank), else gloo. The whole world is one tp group:
    data-parallel replicas are not supported, so WORLD_SIZE must equal tp.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(f"--tp {tp} needs one process per rank: start with "
                             f"`torchrun --nproc-per-node {tp} -m gemma4 ...`")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp:
        raise ValueError(f"--tp {tp} but {world} processes were started; give torchrun --nproc-per-node "
                         f"(times --nnodes) equal to --tp")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return make_groups(tp, ep, timeout=timeout), device


def make_groups(tp: int, ep: int = 1, first: int = 0, timeout: timedelta = DEFAULT_TIMEOUT) -> Layout | None:
    """The Layout of ranks [first, first + tp) of the world, with its process groups; None on a
    rank outside them. Collective: every rank of the world calls it (new_group demands it).
    Each group gets `timeout` (torch's own default for a new group is 30 minutes on gloo, 10 on NCCL)."""
    rank = dist.get_rank()
    mine = first <= rank < first + tp
    layout = Layout(tp, ep, rank - first if mine else 0)
    etp = layout.etp
    whole = list(range(first, first + tp))
    group = dist.new_group(whole, timeout=timeout) if tp < dist.get_world_size() else dist.group.WORLD
    for j in range(etp):  # every rank creates every group, in the same order
        g = dist.new_group([first + e * etp + j for e in range(ep)], timeout=timeout)
        if mine and j == layout.etp_index:
            layout.ep_group = g
    for e in range(ep):
        g = dist.new_group([first + e * etp + j for j in range(etp)], timeout=timeout)
        if mine and e == layout.ep_index:
            layout.etp_group = g
    if not mine:
        return None
    layout.tp_group = group
    return layout
