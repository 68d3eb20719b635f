"""`gemma4 serve --tp N` under torchrun: rank 0 serves HTTP, the other ranks follow its engine."""

from __future__ import annotations

import sys

from ..parallel.layout import Layout


def serve_rank(layout: Layout, ckpt, args, lead) -> int:
    """`gemma4 serve --tp N` on this rank: rank 0 runs `lead()` (the HTTP server, its scheduler
    leading the engine), the others load their shard and follow the engine's steps
    (gemma4.engine.replica) until rank 0 is done."""
    from ..api import load
    from ..engine import replica
    from ..parallel.run import finish

    try:
        if layout.rank == 0:
            try:
                return lead()
            finally:
                replica.stop(layout.tp_group)
        model, tokenizer, _ = load(ckpt, dtype=args.dtype, device=args.device, text_only=args.text_only,
                                   layout=layout)
        try:
            replica.follow(model, tokenizer, layout.tp_group)
        except RuntimeError as error:  # the collective failed: rank 0 died, hung or the group broke
            print(f"gemma4 serve: rank {layout.rank}: lost rank 0 ({error}); stopping", file=sys.stderr)
            return 1
        return 0
    finally:
        finish(layout)
