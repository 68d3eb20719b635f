"""Continuous batching: a scheduler thread that runs many requests through one slotted KV cache.

Each loop iteration (one "step"):
  1. drop cancelled requests (their slots are freed at once) and admit waiting ones into free slots;
  2. prefill: up to `prefill_chunk` prompt tokens in total, request by request, in chunks; a request
     whose prompt is done samples its first token from the last prompt position;
  3. decode: one forward over every decoding slot (each at its own position), one token each.
So a new request joins the running batch between two decode steps, long prompts are cut into
chunks that alternate with decode steps, and concurrent streams share each forward pass.

The scheduler works on token ids only; text, stop strings and parsing belong to the caller. Each
request gets its tokens through a callback, called on the scheduler thread with one `TokenEvent`
per token; the last event has `finish_reason` set ("stop", "length", "abort" or "error"). Sampling
is per request (its own `Sampler` and seeded generator), so a request gives the same tokens alone
or in a batch. Optional per-request `constraints` (token masks: grammars, forced tokens, banned
tokens) are applied to the logits before sampling; reported logprobs are the model's own.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .cache import ContextLengthError
from .sampling import Sampler, SamplingParams
from .slots import SlotKVCache

log = logging.getLogger(__name__)


class Constraint(Protocol):
    """A per-request token mask, advanced with every sampled token."""

    def allowed(self) -> torch.Tensor | None:
        """Bool [V] of the tokens that may come next (True = allowed), or None for no restriction."""
        ...

    def advance(self, token: int) -> None:
        ...


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; try again later."""


class SchedulerClosedError(RuntimeError):
    """The scheduler is stopping or its thread died."""


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    constraints: list[Constraint] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None


@dataclass
class TokenEvent:
    token: int | None  # None on an "abort" / "error" event
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    time: float = 0.0  # time.monotonic() when the token was sampled


_WAITING, _PREFILL, _DECODE, _DONE = "waiting", "prefill", "decode", "done"


class RequestHandle:
    """A submitted request: `cancel()` it from any thread; timing fields are time.monotonic()."""

    def __init__(self, rid: int, request: GenerationRequest, callback: Callable[[TokenEvent], None]):
        self.id, self.request, self.callback = rid, request, callback
        self.state = _WAITING
        self.cancelled = False
        self.slot: int | None = None
        self.length = 0  # tokens of this request in the cache
        self.produced = 0
        self.last_token = -1
        self.sampler: Sampler | None = None
        self.submitted = time.monotonic()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self._scheduler: Scheduler | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler._wake()

    @property
    def finished(self) -> bool:
        return self.state == _DONE


@dataclass(frozen=True)
class SchedulerStats:
    running: int  # requests holding a slot
    waiting: int
    slots_in_use: int
    num_slots: int
    kv_tokens: int  # tokens held in the cache by running requests
    kv_capacity: int  # num_slots * max_len
    alive: bool


class Scheduler:
    """Runs generation requests on `model` in a background thread (see the module docstring)."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_len: int | None = None,
        prefill_chunk: int = 256,
        vocab_limit: int | None = None,
    ):
        cfg = model.config
        param = next(model.parameters())
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        self.vocab_size = cfg.vocab_size
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < cfg.vocab_size else None
        self.device = param.device
        self.cache = SlotKVCache(cfg, max_batch, self.max_len, param.dtype, param.device)
        self._free = list(range(max_batch))  # a heap: the lowest free slot first keeps live slots packed
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[RequestHandle] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None
        self.steps = 0  # decode forwards run so far (tests watch it advance)

    # -- public, any thread -----------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="gemma4-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: GenerationRequest, callback: Callable[[TokenEvent], None]) -> RequestHandle:
        """Queue a request; raises ValueError / ContextLengthError / QueueFullError / SchedulerClosedError."""
        if not request.prompt:
            raise ValueError("empty prompt: give at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise ContextLengthError(
                f"{len(request.prompt)} prompt tokens + {request.max_tokens} to generate exceed the "
                f"maximum context length of {self.max_len} tokens"
            )
        if any(not 0 <= t < self.vocab_size for t in request.prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        handle = RequestHandle(next(self._ids), request, callback)
        handle._scheduler = self
        with self._cond:
            if self._closing or self.dead is not None or self._thread is None:
                raise SchedulerClosedError("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def stats(self) -> SchedulerStats:
        with self._cond:
            running = list(self._running)
            waiting = len(self._waiting)
        return SchedulerStats(
            running=len(running),
            waiting=waiting,
            slots_in_use=self.max_batch - len(self._free),
            num_slots=self.max_batch,
            kv_tokens=sum(h.length for h in running),
            kv_capacity=self.max_batch * self.max_len,
            alive=self.dead is None and self._thread is not None and self._thread.is_alive(),
        )

    def stop(self, timeout: float | None = 10.0) -> None:
        """Abort everything queued or running and end the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the scheduler thread -----------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._iteration():
                    pass
        except BaseException as error:  # noqa: BLE001 - the thread must report, whatever happened
            log.exception("the scheduler thread died")
            self.dead = error
            self._abort_all("error", "the engine stopped unexpectedly")

    def _iteration(self) -> bool:
        with self._cond:
            while not (self._closing or self._waiting or self._running):
                self._cond.wait()
            closing = self._closing
        if closing:
            self._abort_all("abort", None)
            return False
        self._reap()
        self._admit()
        try:
            self._prefill()
            self._decode()
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: fail the batch, keep serving
            log.exception("generation step failed")
            for h in list(self._running):
                self._finish(h, TokenEvent(None, finish_reason="error", error=_describe(error), time=time.monotonic()))
        return True

    def _reap(self) -> None:
        with self._cond:
            gone = [h for h in self._waiting if h.cancelled]
            for h in gone:
                self._waiting.remove(h)
        for h in gone + [h for h in self._running if h.cancelled]:
            self._finish(h, TokenEvent(None, finish_reason="abort", time=time.monotonic()))

    def _admit(self) -> None:
        while self._free:
            with self._cond:
                if not self._waiting:
                    return
                h = self._waiting.popleft()
            h.slot = heapq.heappop(self._free)
            h.state, h.admitted = _PREFILL, time.monotonic()
            h.sampler = Sampler(h.request.sampling, h.request.prompt, self.vocab_size, self.device)
            self._running.append(h)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for h in [h for h in self._running if h.state == _PREFILL]:
            if budget <= 0:
                return
            prompt = h.request.prompt
            n = min(len(prompt) - h.length, budget)
            budget -= n
            start, end = h.length, h.length + n
            self.cache.ensure(end)
            ids = torch.tensor([prompt[start:end]], device=self.device)
            pos = torch.arange(start, end, device=self.device)[None]
            out = self.model.decode(ids, positions=pos, cache=self.cache.view(h.slot, h.slot + 1), logits_to_keep=1)
            h.length = end
            if end == len(prompt):
                h.state = _DECODE
                self._sample(h, self.model.logits(out.hidden[0, -1]))

    def _decode(self) -> None:
        rows = [h for h in self._running if h.state == _DECODE]
        if not rows:
            return
        lo, hi = min(h.slot for h in rows), max(h.slot for h in rows) + 1
        ids = torch.zeros(hi - lo, 1, dtype=torch.long)
        pos = torch.full((hi - lo, 1), -1, dtype=torch.long)
        for h in rows:
            ids[h.slot - lo, 0], pos[h.slot - lo, 0] = h.last_token, h.length
        self.cache.ensure(max(h.length for h in rows) + 1)
        logits = self.model(ids.to(self.device), positions=pos.to(self.device), cache=self.cache.view(lo, hi))
        self.steps += 1
        for h in rows:
            h.length += 1
            self._sample(h, logits[h.slot - lo, -1])

    def _sample(self, h: RequestHandle, raw: torch.Tensor) -> None:
        req = h.request
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
            self._finish(h, TokenEvent(None, finish_reason="stop", time=time.monotonic()))
            return
        token = h.sampler.sample(logits)
        for c in req.constraints:
            c.advance(token)
        event = TokenEvent(token, time=time.monotonic())
        if req.logprobs is not None:
            logp = torch.log_softmax(raw, -1)
            event.logprob = float(logp[token])
            if req.logprobs:
                values, index = torch.topk(logp, req.logprobs)
                event.top_logprobs = list(zip(index.tolist(), values.tolist()))
        h.produced += 1
        h.last_token = token
        if h.first_token is None:
            h.first_token = event.time
        if token in req.stop_token_ids:
            event.finish_reason = "stop"
        elif h.produced >= req.max_tokens:
            event.finish_reason = "length"
        if event.finish_reason:
            self._finish(h, event)
        else:
            _deliver(h, event)

    def _finish(self, h: RequestHandle, event: TokenEvent) -> None:
        if h.state == _DONE:
            return
        if h.slot is not None:
            self.cache.free(h.slot)
            heapq.heappush(self._free, h.slot)
            h.slot = None
        if h in self._running:
            self._running.remove(h)
        h.state, h.length = _DONE, 0
        h.sampler = None
        _deliver(h, event)

    def _abort_all(self, reason: str, error: str | None) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting + list(self._running):
            self._finish(h, TokenEvent(None, finish_reason=reason, error=error, time=time.monotonic()))


def _deliver(h: RequestHandle, event: TokenEvent) -> None:
    try:
        h.callback(event)
    except Exception:  # noqa: BLE001 - a consumer's bug must not stop the other requests
        log.exception("request %d: the token callback failed; cancelling it", h.id)
        h.cancelled = True


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "the engine ran out of memory"
    return "the engine failed while generating"
