"""One engine on several tensor-parallel ranks: rank 0 leads, the others follow its steps.

Every rank holds its own `Engine` over its shard of the model. The leader (rank 0: the server's
scheduler) runs as usual through a `Leader` proxy that records what comes from outside the engine
(a sequence added, a sequence cancelled) and, before each step, broadcasts those events and the
step's budget. A follower (`follow`) applies the same events to its own engine and runs the same
step. Given the same events, the engines stay identical: the forwards' collectives line up, the
gathered logits are the same on every rank, and each request carries a seed (drawn by the leader
when the client gave none), so every rank samples the same tokens and frees the same rows.

While the leader is idle it sends an empty message every `HEARTBEAT` seconds, so a follower's
wait never reaches the process group's timeout; a follower whose leader died sees the collective
fail and exits with a message (torchrun then stops the group). A leader whose step or heartbeat
fails (a follower died or hung) cannot keep the ranks in step: it says so and exits the process
(`lost`), rather than serve errors from a broken group.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import secrets
import threading
import time

import torch.distributed as dist

from .core import Engine
from .sequence import GenerationRequest, Sequence

log = logging.getLogger(__name__)

HEARTBEAT = 30.0  # seconds between messages of an idle leader
_send_lock = threading.Lock()
_last_send = [time.monotonic()]


def send(message: list, group=None) -> None:
    """Broadcast one message (a list of events) from rank 0 to the group."""
    with _send_lock:
        dist.broadcast_object_list([message], src=0, group=group)
        _last_send[0] = time.monotonic()


def _portable(request: GenerationRequest) -> GenerationRequest:
    """The request as sent: without the tokenizer (each rank has its own)."""
    return dataclasses.replace(request, tokenizer=None)


class Leader:
    """The engine as the scheduler sees it (every attribute is the engine's), recording events."""

    def __init__(self, engine: Engine, options: dict, group=None):
        self._engine, self._group = engine, group
        self._events: list[tuple] = [("engine", options)]
        self._ids = itertools.count()
        self._seq_ids: dict[int, int] = {}
        threading.Thread(target=self._heartbeat, name="gemma4-tp-heartbeat", daemon=True).start()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def new_sequence(self, request: GenerationRequest) -> Sequence:
        if request.sampling.seed is None:  # every rank must draw the same tokens
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling,
                                                                                 seed=secrets.randbits(62)))
        return self._engine.new_sequence(request)

    def add(self, seq: Sequence) -> None:
        n = next(self._ids)
        self._seq_ids[id(seq)] = n
        self._events.append(("add", n, _portable(seq.request)))
        self._engine.add(seq)

    def cancel(self, seq: Sequence, reason: str = "abort", error: str | None = None):
        self._events.append(("cancel", self._seq_ids.pop(id(seq), None), reason, error))
        return self._engine.cancel(seq, reason, error)

    def step(self, budget: int | None = None):
        self._events.append(("step", budget))
        try:
            send(self._events, self._group)
            self._events = []
            out = self._engine.step(budget)
        except Exception as error:  # noqa: BLE001 - the followers ran (or wait in) this step: no way back
            lost(error)
        for seq, _ in out:
            if seq.finished:
                self._seq_ids.pop(id(seq), None)
        return out

    def _heartbeat(self) -> None:
        while True:
            time.sleep(HEARTBEAT / 3)
            if time.monotonic() - _last_send[0] > HEARTBEAT:
                try:
                    send([], self._group)
                except Exception as error:  # noqa: BLE001 - the group is gone
                    lost(error)


def lost(error: BaseException) -> None:
    """The leader's ranks are out of step (a follower died or hung, or a step failed): exit the
    process non-zero with the reason; torchrun then ends the other ranks."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    log.critical("rank 0: the tensor-parallel group broke (%s): another rank died or hung, or a step failed; "
                 "stopping every rank", first)
    os._exit(1)


def stop(group=None) -> None:
    """Tell the followers to exit (the leader is done)."""
    send([("stop",)], group)


def follow(model, tokenizer=None, group=None) -> None:
    """A follower's loop: build the leader's engine, apply its events, run its steps, until told to stop."""
    engine: Engine | None = None
    seqs: dict[int, Sequence] = {}
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        for event in box[0]:
            kind = event[0]
            if kind == "stop":
                return
            if kind == "engine":
                engine = Engine(model, **event[1])
            elif kind == "add":
                request = dataclasses.replace(event[2], tokenizer=tokenizer) if event[2].stop else event[2]
                seqs[event[1]] = seq = engine.new_sequence(request)
                engine.add(seq)
            elif kind == "cancel":
                seq = seqs.pop(event[1], None)
                if seq is not None and not seq.finished:
                    engine.cancel(seq, event[2], event[3])
            elif kind == "step":
                engine.step(event[1])
                seqs = {n: s for n, s in seqs.items() if not s.finished}
