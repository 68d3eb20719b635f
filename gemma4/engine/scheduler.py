"""Continuous batching: a scheduler thread that runs many requests on one decode core.

Each loop iteration (one "step"):
  1. drop cancelled requests (their rows are freed at once) and admit waiting ones into free rows
     (a prompt that starts like an earlier one takes its K/V from the engine's prefix cache);
  2. `Engine.step`: up to `prefill_chunk` prompt tokens in total, in chunks; a request whose
     prompt is done samples its first token; then one decode forward for every decoding row
     (with speculative decoding, a verify forward: a row may get several tokens).
So a new request joins the running batch between two decode steps, long prompts are cut into
chunks that alternate with decode steps, and concurrent streams share each forward pass.

The scheduler adds threads, a bounded queue and cancellation to the engine; what a request
generates and how (sampling, constraints, logprobs, stops) is the engine's `Sequence`. Each
request gets its tokens through a callback, called on the scheduler thread with one `TokenEvent`
per token; the last event has `finish_reason` set ("stop", "length", "abort" or "error"). A request
gives the same tokens alone or in a batch; a failure in one request's sampling ends that request
only.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import check_context
from .core import PREFILL_CHUNK, Engine
from .sequence import Constraint, GenerationRequest, Sequence, TokenEvent
from .speculative import Speculation, SpecStats

__all__ = ["Constraint", "GenerationRequest", "TokenEvent", "Scheduler", "RequestHandle", "QueueFullError",
           "SchedulerClosedError", "SchedulerStats"]

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; try again later."""


class SchedulerClosedError(RuntimeError):
    """The scheduler is stopping or its thread died."""


class RequestHandle:
    """A submitted request: `cancel()` it from any thread; timing fields are time.monotonic()."""

    def __init__(self, rid: int, request: GenerationRequest, callback: Callable[[TokenEvent], None]):
        self.id, self.request, self.callback = rid, request, callback
        self.cancelled = False
        self.seq: Sequence | None = None  # the engine's state of this request, once admitted
        self.done = False
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
        return self.done

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose K/V came from the prefix cache."""
        return self.seq.cached if self.seq is not None else 0


@dataclass(frozen=True)
class SchedulerStats:
    running: int  # requests holding a row
    waiting: int
    slots_in_use: int
    num_slots: int
    kv_tokens: int  # tokens held in the cache by running requests
    kv_capacity: int  # num_slots * max_len
    alive: bool
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens reused
    spec_drafts: int = 0  # speculative decoding: verify steps of a row with a draft
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()  # [i]: drafts whose token i was accepted


class Scheduler:
    """Runs generation requests on `model` in a background thread (see the module docstring).

    max_batch: rows decoded together; max_len: tokens per row (default the model's context);
    mode: the engine's decode step ("eager", "compile", ...); prefix_cache: tokens of K/V kept for
    reuse across requests (0 = off); speculation: a drafter (engine/speculative.py), each
    row accepting its own number of drafted tokens per step.
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_len: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        vocab_limit: int | None = None,
        mode: str = "eager",
        prefix_cache: int = 0,
        compile_options: dict | None = None,
        speculation: Speculation | None = None,
    ):
        options = dict(rows=max_batch, max_len=max_len, mode=mode, prefill_chunk=prefill_chunk,
                       prefix_cache=prefix_cache, vocab_limit=vocab_limit, compile_options=compile_options)
        self.engine = Engine(model, **options, speculation=speculation)
        layout = getattr(model, "parallel", None)  # a tensor-parallel shard: the other ranks follow (replica.py)
        if layout is not None:
            from .replica import Leader

            self.engine = Leader(self.engine, options, layout.tp_group)
        self.model, self.cache = model, self.engine.cache
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = self.engine.context
        self.vocab_size = model.config.vocab_size
        self._waiting: deque[RequestHandle] = deque()
        self._running: dict[int, RequestHandle] = {}  # id(sequence) -> its handle
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None

    @property
    def steps(self) -> int:
        """Decode forwards run so far (tests watch it advance)."""
        return self.engine.steps

    # -- public, any thread -----------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="gemma4-scheduler", daemon=True)
        self._thread.start()
        return self

    def warm_up(self) -> None:
        """Trace (or capture) the compiled step for every batch size before serving (no-op when eager)."""
        b = 1
        while True:
            self.engine.warm_up(min(b, self.max_batch))
            if b >= self.max_batch:
                return
            b *= 2

    def submit(self, request: GenerationRequest, callback: Callable[[TokenEvent], None]) -> RequestHandle:
        """Queue a request; raises ValueError / ContextLengthError / QueueFullError / SchedulerClosedError."""
        if not request.prompt:
            raise ValueError("empty prompt: give at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        check_context(self.max_len, len(request.prompt), request.max_tokens)
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
            running = list(self._running.values())
            waiting = len(self._waiting)
        prefix = self.engine.prefix
        spec = self.engine.speculation.stats if self.engine.speculation is not None else SpecStats()
        return SchedulerStats(
            running=len(running),
            waiting=waiting,
            slots_in_use=self.max_batch - self.engine.free_rows,
            num_slots=self.max_batch,
            kv_tokens=sum(h.seq.fed for h in running if h.seq is not None),
            kv_capacity=self.max_batch * self.max_len,
            alive=self.dead is None and self._thread is not None and self._thread.is_alive(),
            prefix_queries=prefix.queries if prefix is not None else 0,
            prefix_hits=prefix.hits if prefix is not None else 0,
            spec_drafts=spec.drafts,
            spec_draft_tokens=spec.draft_tokens,
            spec_accepted_tokens=spec.accepted_tokens,
            spec_accepted_per_pos=tuple(spec.accepted_per_pos),
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
            for seq, event in self.engine.step(self.prefill_chunk):
                self._deliver(self._running[id(seq)], event)
        except Exception:  # noqa: BLE001 - a bug in a step: fail the requests in flight, keep serving
            log.exception("generation step failed")
            self._abort_running("error", "the engine failed while generating")
        return True

    def _reap(self) -> None:
        with self._cond:
            gone = [h for h in self._waiting if h.cancelled]
            for h in gone:
                self._waiting.remove(h)
        for h in gone:
            self._deliver(h, TokenEvent(None, finish_reason="abort", time=time.monotonic()))
        for h in [h for h in self._running.values() if h.cancelled]:
            self._deliver(h, self.engine.cancel(h.seq))

    def _admit(self) -> None:
        while self.engine.free_rows:
            with self._cond:
                if not self._waiting:
                    return
                h = self._waiting.popleft()
            h.seq = self.engine.new_sequence(h.request)
            h.admitted = time.monotonic()
            self._running[id(h.seq)] = h
            self.engine.add(h.seq)

    def _deliver(self, h: RequestHandle, event: TokenEvent) -> None:
        if h.done:
            return
        if event.token is not None and h.first_token is None:
            h.first_token = event.time
        if event.finish_reason is not None:
            h.done = True
            if h.seq is not None:
                self._running.pop(id(h.seq), None)
        try:
            h.callback(event)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the other requests
            log.exception("request %d: the token callback failed; cancelling it", h.id)
            h.cancelled = True

    def _abort_all(self, reason: str, error: str | None) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting:
            self._deliver(h, TokenEvent(None, finish_reason=reason, error=error, time=time.monotonic()))
        self._abort_running(reason, error)

    def _abort_running(self, reason: str, error: str | None) -> None:
        for h in list(self._running.values()):
            self._deliver(h, self.engine.cancel(h.seq, reason, error))
