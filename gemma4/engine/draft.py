"""Drafters for speculative decoding: what proposes the tokens the target then verifies.

A drafter proposes up to k tokens for each decoding row; the decode core (core.py) scores them
with the target in one forward and keeps the agreeing prefix (speculative.py). A drafter only
makes decoding faster or slower, never different: greedy output is the target's whatever it
proposes, and sampled output keeps the target's distribution.

- `NgramDrafter` (prompt lookup): the tokens that followed the latest earlier occurrence of the
  row's last n tokens. No model; deterministic (a point mass for rejection sampling). Pays off
  on copy-heavy work: editing code, summarising or quoting a given text, extracting fields.
- `MTPDrafter`: Gemma 4's multi-token-prediction assistant (spec section 5) over the target's
  cache and last hidden state (gemma4/engine/mtp.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .core import Engine
    from .sequence import Sequence


@dataclass
class Draft:
    """Proposed tokens for one row, and the distributions [len(tokens), V] they were drawn from
    (None: chosen deterministically, e.g. an argmax or a lookup)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    """Proposes tokens for rows of an engine (`propose`), given how many each may take."""

    # The verify step keeps the target's final-normed hidden state that predicted each row's
    # newest token (`seq.spec.hidden`), which an MTP drafter reads.
    needs_hidden: bool
    # The drafter's own draft length (e.g. from its generation config); None: no preference.
    default_k: int | None
    # Optional: ring entries beyond the target's window the drafter reads (an MTP drafter's sliding
    # layers see W + 1 keys), taken off the longest draft a ring's headroom allows.
    # ring_reach: int

    def propose(self, engine: Engine, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """Up to ks[i] tokens to follow seqs[i].tokens (k >= 1 each)."""
        ...


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the row's last n tokens (n from
    `max_n` down to `min_n`) in its prompt and output, and propose the tokens that followed it."""

    needs_hidden = False
    default_k = 4  # short drafts: a lookup that misses costs k + 1 scored positions

    def __init__(self, max_n: int = 3, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, engine: Engine, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        return [Draft(self.lookup(s.tokens, k)) for s, k in zip(seqs, ks)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        L = len(tokens)
        if L < self.min_n + 1 or k < 1:
            return []
        t = torch.tensor(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            # windows starting at 0..L-n-1: every earlier n-gram (the suffix itself excluded)
            hits = (t[: L - 1].unfold(0, n, 1) == t[L - n :]).all(1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start : start + k]
        return []


class LookupFirst:
    """Prompt lookup where it finds a match, another drafter (an MTP drafter) for the other rows.

    A lookup draft costs nothing and, on text the model repeats (a copied list, its own earlier
    sentences), is accepted whole; the model drafter covers free text. Each row's draft comes from
    one of them, with that one's distribution (a point mass for a lookup), so verification is
    unchanged. `min_n` (3): only a match of that many tokens counts, as shorter ones mostly guess."""

    def __init__(self, fallback: Drafter, min_n: int = 3, max_n: int = 3):
        self.lookup, self.fallback = NgramDrafter(max_n, min_n), fallback
        self.needs_hidden, self.default_k = fallback.needs_hidden, fallback.default_k
        self.ring_reach = getattr(fallback, "ring_reach", 0)

    def propose(self, engine: Engine, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        drafts = self.lookup.propose(engine, seqs, ks)
        rest = [i for i, d in enumerate(drafts) if not d.tokens]
        if rest:
            for i, d in zip(rest, self.fallback.propose(engine, [seqs[i] for i in rest], [ks[i] for i in rest])):
                drafts[i] = d
        return drafts
