"""The --tp / --ep flags of `generate`, `chat` and `serve` (no torch import: the CLI's parser reads them)."""

from __future__ import annotations


def add_parallel_arguments(p) -> None:
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: run under `torchrun --nproc-per-node N` with --tp N; each rank "
                        "holds 1/N of the attention heads, MLP columns and vocabulary (docs/scaling.md)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks (the 26B-A4B; a divisor of --tp): the experts are split over "
                        "ep ranks, each expert's width over tp/ep")
