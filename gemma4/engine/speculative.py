"""Speculative decoding: settings, per-row state and counters of the decode core's verify step.

Each decode step of an engine with a `Speculation` (core.py, `Engine._verify`):
  1. the drafter proposes up to k tokens per row (draft.py), k adapted per row;
  2. the target scores [newest token, d1..dk] of every row in one forward (`Engine.score`'s
     forward), giving k + 1 logits per row;
  3. `Sequence.choose` runs on them in order, each with its draft: greedy keeps a draft when it
     is the argmax, sampling by speculative rejection sampling (`Sampler.sample`); the first
     token that is not the draft (a correction) or the token after the last draft (a bonus) ends
     the row's step, so each step yields 1 to k + 1 tokens per row, rows differing;
  4. each row's cache is rolled back past its rejected drafts (`Engine.truncate`'s rollback).
Stops, limits, logprobs, penalties, logit_bias and grammar constraints are the per-token rules
of `Sequence.choose`, applied token by token to the logits of exactly the accepted prefix: all
of them hold under speculation, with no fallback (docs/speculative.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import DEFAULT_HEADROOM
from .draft import Drafter, NgramDrafter

DEFAULT_K = 4  # when neither the drafter nor the caller says


class SpeculationError(ValueError):
    """Speculative decoding was asked for with settings it cannot run."""


@dataclass
class RowState:
    """One row's speculation: its current draft length and the target's last hidden state."""

    k: int
    hidden: torch.Tensor | None = None  # [D], final-normed: the state that predicted seq.tokens[-1]
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # verify steps with a non-empty draft


@dataclass
class SpecStats:
    """Totals over an engine's life (vLLM's spec_decode counters)."""

    drafts: int = 0  # verify steps of a row with a non-empty draft
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: drafts whose token i was accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a drafting step yields on average: the accepted drafts plus the target's own."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else 0.0

    def describe(self) -> str:
        return (f"speculative: {self.accepted_tokens}/{self.draft_tokens} drafted tokens accepted "
                f"({100 * self.acceptance_rate:.0f}%), mean accepted length {self.mean_accepted_length:.2f}")


class Speculation:
    """A drafter with its draft length `k` (at most the cache's rollback headroom).

    `adaptive`: each row's k moves between 1 and `k` (the heuristic of transformers' assisted
    generation): +2 after a step that accepted every draft, -1 after one that rejected some, so a
    row whose drafts keep failing soon drafts 1 token a step."""

    def __init__(self, drafter: Drafter, k: int | None = None, *, adaptive: bool = True):
        k = k if k is not None else (drafter.default_k or DEFAULT_K)
        _check_k(k)
        self.drafter, self.k, self.adaptive = drafter, k, adaptive
        self.stats = SpecStats(accepted_per_pos=[0] * k)

    def check(self, headroom: int) -> None:
        """Refuse a k the cache cannot roll back (a verify step rejects up to k tokens), less what a
        drafter reads of a ring beyond the target's window (`ring_reach`)."""
        _check_k(self.k, headroom - getattr(self.drafter, "ring_reach", 0))

    def budget(self, seq) -> int:
        """Tokens `seq` may draft this step: its k, and room for the target's own token within its limit."""
        return max(0, min(seq.spec.k, seq.limit - seq.produced - 1))

    def record(self, seq, drafted: int, accepted: int) -> None:
        state, stats = seq.spec, self.stats
        if drafted:
            state.rounds += 1
            state.drafted += drafted
            state.accepted += accepted
            stats.drafts += 1
            stats.draft_tokens += drafted
            stats.accepted_tokens += accepted
            for i in range(accepted):
                stats.accepted_per_pos[i] += 1
            if self.adaptive:
                state.k = min(self.k, state.k + 2) if accepted == drafted else max(1, state.k - 1)


def _check_k(k, headroom: int | None = None) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SpeculationError(f"the draft length must be a whole number >= 1, got {k!r}")
    if headroom is not None and k > headroom:
        raise SpeculationError(f"a draft length of {k} is more than the KV cache can roll back "
                               f"(its sliding-window headroom); use --draft-tokens between 1 and {headroom}")


def check_options(speculative=None, draft_model=None, draft_tokens: int | None = None,
                  headroom: int = DEFAULT_HEADROOM) -> None:
    """Refuse contradictory or out-of-range speculation options before anything is loaded."""
    if speculative is not None and draft_model is not None:
        raise SpeculationError("give either a draft model or --speculative ngram, not both")
    if isinstance(speculative, str) and speculative != "ngram":
        raise SpeculationError(f"unknown speculative method {speculative!r}; use 'ngram' "
                               "(or --draft-model PATH for an MTP drafter)")
    if draft_tokens is not None:
        if speculative is None and draft_model is None:
            raise SpeculationError("--draft-tokens needs a drafter: --draft-model PATH or --speculative ngram")
        _check_k(draft_tokens, headroom)


def make_speculation(model, speculative: str | Drafter | None = None, draft_model=None,
                     draft_tokens: int | None = None, *, adaptive: bool = True) -> Speculation | None:
    """The `Speculation` asked for by the CLI / API options, or None for plain decoding.

    speculative: "ngram" (prompt lookup), a `Drafter`, or None; draft_model: an MTP drafter
    checkpoint path or a loaded drafter model, checked against `model` (the target)."""
    if draft_tokens is not None:
        _check_k(draft_tokens)
    check_options(speculative, draft_model, draft_tokens, headroom=10**9)  # the engine checks its own headroom
    if speculative is None and draft_model is None:
        return None
    if isinstance(speculative, str):
        drafter: Drafter = NgramDrafter()
    elif speculative is not None:
        drafter = speculative
    else:
        from .mtp import MTPDrafter

        drafter = MTPDrafter.load(draft_model, model)
    return Speculation(drafter, draft_tokens, adaptive=adaptive)
