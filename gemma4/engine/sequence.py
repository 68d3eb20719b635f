"""One sequence's generation: what to generate, and the one place that turns a row's logits into
its next token, text and finish reason.

The decode core (core.py) keeps a `Sequence` per cache row; `generate`, the chat helpers and the
server's scheduler all describe their work as a `GenerationRequest`, so sampling, penalties,
`logit_bias`, the vocabulary limit, grammar constraints, logprobs, stop tokens, stop strings and
finish reasons behave the same wherever a request comes from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .media import MediaInput, check_spans, cut, keyed_tokens
from .sampling import Sampler, SamplingParams
from .stops import StopMatcher

log = logging.getLogger(__name__)


class Constraint(Protocol):
    """A per-request token mask, advanced with every sampled token."""

    def allowed(self) -> torch.Tensor | None:
        """Bool [V] of the tokens that may come next (True = allowed), or None for no restriction."""
        ...

    def advance(self, token: int) -> None:
        ...


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    constraints: list[Constraint] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None
    stop: list[str] | None = None  # stop strings: end the output, cut from the text (need `tokenizer`)
    tokenizer: object | None = None  # with a `detokenizer()`: events then carry text pieces
    media: tuple[MediaInput, ...] = ()  # images, frames, audio: their placeholder runs in `prompt`


@dataclass
class TokenEvent:
    """One generated token of one sequence (the last event of a sequence has `finish_reason`)."""

    token: int | None  # None on an "abort" / "error" event, or when a constraint allows nothing
    logprob: float | None = None  # under the model's own distribution (before any processing)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
    time: float = 0.0  # time.monotonic() when the token was sampled
    text: str = ""  # the text this token completes (with a tokenizer); stop tokens have none


class Sequence:
    """The generation state of one request on one cache row.

    `tokens` holds the prompt then every generated token; `fed` counts those the cache holds.
    While `fed < len(prompt)` the sequence is prefilling; then each step feeds its newest token.
    `limit`: the tokens it may generate (its max_tokens, cut to what the context has left).
    """

    def __init__(self, request: GenerationRequest, vocab_size: int, context: int, device=None,
                 vocab_limit: int | None = None):
        if not request.prompt:
            raise ValueError("empty prompt: give at least one token (e.g. <bos>)")
        self.request = request
        self.prompt_len = len(request.prompt)
        check_spans(request.media, self.prompt_len)
        self.tokens = list(request.prompt)
        self._keyed = keyed_tokens(self.tokens, request.media)
        self.limit = min(request.max_tokens, context - self.prompt_len)
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < vocab_size else None
        self.sampler = Sampler(request.sampling, request.prompt, vocab_size, device)
        self.row: int | None = None
        self.fed = 0
        self.cached = 0  # prompt tokens whose K/V came from the prefix cache
        self.spec = None  # the row's speculative-decoding state (speculative.RowState) when the engine drafts
        self.finish_reason: str | None = None
        self._detok = request.tokenizer.detokenizer() if request.tokenizer is not None else None
        self._stops = StopMatcher(request.stop)
        self._stop_hit = False

    def chunk(self, size: int) -> int:
        """Prompt tokens in the next prefill chunk: at most `size`, unless a media span starting
        here is longer (an image is never split across forwards)."""
        end = min(self.fed + size, self.prompt_len)
        return cut(self.request.media, self.fed, end) - self.fed

    def keyed(self, n: int) -> list[int]:
        """The first n tokens as the prefix cache knows them (media positions keyed by content)."""
        if not self.request.media:
            return self.tokens[:n]
        return self._keyed[:n] + self.tokens[self.prompt_len : n]

    @property
    def produced(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.finish_reason is None and self.fed < self.prompt_len

    @property
    def decoding(self) -> bool:
        return self.finish_reason is None and self.fed >= self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def end(self, reason: str, error: str | None = None) -> TokenEvent:
        """Finish without a token (cancelled, failed, or nothing allowed): the last event."""
        self.finish_reason = reason
        text = self._text(None, True) if reason == "stop" else ""
        return TokenEvent(None, finish_reason=reason, error=error, time=time.monotonic(), text=text)

    def choose(self, raw: torch.Tensor, draft: int | None = None, draft_probs: torch.Tensor | None = None
               ) -> TokenEvent:
        """The next token from this row's logits [V] (the model's), with its logprobs, text and
        finish reason. A sampling failure ends this sequence alone, with an error event.

        `draft` (speculative decoding, engine/speculative.py): the token a drafter proposed here,
        drawn from `draft_probs` [V] (None: deterministically); every rule above still applies to
        the logits, and the event's token equals the draft exactly when it is accepted."""
        try:
            return self._choose(raw, draft, draft_probs)
        except Exception as error:  # noqa: BLE001 - one bad row must not end its neighbours
            log.exception("sampling failed for one sequence; ending it")
            return self.end("error", f"sampling failed: {type(error).__name__}")

    def _choose(self, raw: torch.Tensor, draft: int | None, draft_probs: torch.Tensor | None) -> TokenEvent:
        req = self.request
        raw = raw.float()
        logits = raw
        if self.vocab_limit is not None or req.logit_bias or req.constraints:
            logits = raw.clone()
            if self.vocab_limit is not None:
                logits[self.vocab_limit :] = float("-inf")
            if req.logit_bias:
                index = torch.tensor(list(req.logit_bias), device=logits.device)
                logits[index] += torch.tensor(list(req.logit_bias.values()), device=logits.device)
            for c in req.constraints:
                allowed = c.allowed()
                if allowed is not None:
                    logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
            if not bool(torch.isfinite(logits).any()):  # a constraint allows nothing: the output is complete
                return self.end("stop")
        token = self.sampler.sample(logits, draft, draft_probs)
        for c in req.constraints:
            c.advance(token)
        event = TokenEvent(token, time=time.monotonic())
        if req.logprobs:
            logp = torch.log_softmax(raw, -1)
            event.logprob = float(logp[token])
            values, index = torch.topk(logp, req.logprobs)
            event.top_logprobs = list(zip(index.tolist(), values.tolist()))
        elif req.logprobs is not None:  # one pass over the vocabulary instead of a full log_softmax
            event.logprob = float(raw[token] - torch.logsumexp(raw, -1))
        self.tokens.append(token)
        if token in req.stop_token_ids:
            event.finish_reason = "stop"
        elif self.produced >= self.limit:
            event.finish_reason = "length"
        event.text = self._text(token, event.finish_reason is not None)
        if self._stop_hit:
            event.finish_reason = "stop"
        self.finish_reason = event.finish_reason
        return event

    def _text(self, token: int | None, ending: bool) -> str:
        """Text of `token` (none for stop tokens), held back while it may begin a stop string."""
        if self._detok is None:
            return ""
        piece = self._detok.add(token) if token is not None and token not in self.request.stop_token_ids else ""
        if ending:
            piece += self._detok.flush()
        text, hit = self._stops.feed(piece)
        if hit:
            self._stop_hit = True
        elif ending:
            text += self._stops.flush()
        return text
