"""Synchronous generation on the decode core: a batch of prompts, or one prompt as streamed text.

`Generation` runs requests on an `Engine` (a fresh one, or one kept across calls: a compiled
step, a chat session's prefix cache) and yields a list per step with one `TokenEvent` or None per
request. `stream_generate` turns one request's events into `GenerationResponse` records with text
and timing. Sequences of different lengths share every forward, each at its own positions, so a
sequence gives the same tokens in a batch as alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..config import ContextLengthError
from .core import Engine
from .draft import Drafter
from .sampling import SamplingParams, sampling_from
from .sequence import Constraint, GenerationRequest, TokenEvent
from .speculative import Speculation, make_speculation

TokenStep = TokenEvent  # what a step yields per sequence (token, logprob, top_logprobs, finish_reason)


class PromptTooLongError(ContextLengthError):
    """The prompt leaves no room to generate within the model's context."""


class Generation:
    """Requests run together on an engine; iterate for a list per step (one event or None each).

    `engine` must have a free row per request; without one, an engine just big enough is made
    (speculating with `speculation`, see engine/speculative.py). `finish(i)` ends request i early.
    `on_prefill(done, total)` is called between prefill chunks (prompt tokens fed so far, of all),
    so a long prompt can show progress.
    """

    def __init__(self, model, requests: list[GenerationRequest], engine: Engine | None = None,
                 speculation: Speculation | None = None, on_prefill: Callable[[int, int], None] | None = None):
        self.on_prefill = on_prefill
        context = engine.context if engine is not None else model.config.max_position_embeddings
        for r in requests:
            if not r.prompt:
                raise ValueError("empty prompt: give at least one token (e.g. <bos>)")
            if len(r.prompt) >= context:
                raise PromptTooLongError(context, len(r.prompt), 1)
        if engine is None:
            need = max(len(r.prompt) + max(r.max_tokens, 0) for r in requests)
            engine = Engine(model, rows=len(requests), max_len=min(need, context), speculation=speculation)
        elif speculation is not None and engine.speculation is not speculation:
            raise ValueError("give the speculation to the engine (Engine(model, speculation=...)), not beside it")
        elif engine.free_rows < len(requests):
            raise ValueError(f"{len(requests)} requests need as many free rows; the engine has {engine.free_rows}")
        self.engine = engine
        self.sequences = [engine.new_sequence(r) for r in requests]

    def finish(self, i: int) -> None:
        seq = self.sequences[i]
        if not seq.finished:
            self.engine.cancel(seq, "stop")

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[TokenEvent | None]]:
        engine, seqs = self.engine, self.sequences
        try:
            for seq in seqs:
                engine.add(seq)
            engine.reserve(max(s.prompt_len + max(s.limit, 0) for s in seqs), len(seqs))
            events = self._prefill()
            index = {id(seq): i for i, seq in enumerate(seqs)}
            while True:
                # A speculative step gives a sequence several tokens: one list per token, in order.
                steps: list[list[TokenEvent | None]] = []
                for seq, event in events:
                    i = index[id(seq)]
                    step = next((step for step in steps if step[i] is None), None)
                    if step is None:
                        steps.append(step := [None] * len(seqs))
                    step[i] = event
                yield from steps
                if all(s.finished for s in seqs):
                    return
                events = engine.decode()
        finally:
            for seq in seqs:  # abandoned early (the caller stopped iterating): free the rows
                if not seq.finished:
                    engine.cancel(seq)


    def _prefill(self) -> list:
        engine, seqs = self.engine, self.sequences
        if self.on_prefill is None:
            return engine.prefill()
        # Whole chunks per call, so each row is fed in the same chunks as by one unbounded call.
        budget, total = engine.prefill_chunk * PROGRESS_CHUNKS, sum(s.prompt_len for s in seqs)
        events = []
        while any(s.prefilling for s in seqs):
            events += engine.prefill(budget)
            self.on_prefill(sum(min(s.fed, s.prompt_len) for s in seqs), total)
        return events


PROGRESS_CHUNKS = 8  # prefill chunks between two `on_prefill` calls


class TokenGenerator(Generation):
    """`Generation` of plain prompts: one sampling, token limit and stop-token set per prompt.
    `logprobs` (k) adds each token's top-k; the sampled token's own logprob is always given."""

    def __init__(self, model, prompts: list[list[int]], sampling: list[SamplingParams], max_tokens: list[int],
                 stop_token_ids: set[int], logprobs: int = 0, engine: Engine | None = None):
        stops = frozenset(stop_token_ids)
        super().__init__(model, [GenerationRequest(list(p), m, s, stops, logprobs)
                                 for p, s, m in zip(prompts, sampling, max_tokens)], engine)


@dataclass
class GenerationResponse:
    """One streamed piece of a generation (mlx-lm style)."""

    text: str
    token: int | None
    logprob: float | None
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose K/V came from the engine's prefix cache
    drafted_tokens: int = 0  # speculative decoding: tokens drafted so far for this request
    accepted_tokens: int = 0  # of those, accepted by the target


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: list[str] | None = None,
    stop_token_ids: set[int] | None = None,
    logprobs: int = 0,
    logit_bias: dict[int, float] | None = None,
    constraints: list[Constraint] | None = None,
    add_bos: bool | None = None,
    engine: Engine | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    speculative: str | Drafter | None = None,
    draft_model=None,
    draft_tokens: int | None = None,
    media: tuple = (),
    **sampling_options,
) -> Iterator[GenerationResponse]:
    """Generate from one prompt, yielding a response per token; the last one has finish_reason set.

    Stop tokens are not part of the text. Stop strings end generation and are cut from the text.
    add_bos=None follows the tokenizer (base checkpoints add <bos>; chat prompts carry their own).
    `engine`: an `Engine` kept from one call to the next, e.g. with a compiled step
    (`Engine(model, mode="compile")`) or a prefix cache (a chat re-prefills only its new turn).
    Greedy unless told: `sampling=SamplingParams(...)`, or its fields as keywords (`temperature=0.7,
    top_p=0.9, seed=1`), as `gemma4 generate --temp 0.7 --top-p 0.9 --seed 1`.
    `on_prefill(done, total)`: prompt tokens fed so far, called as a long prompt is prefilled.
    Speculative decoding (docs/speculative.md): `speculative="ngram"` (prompt lookup) or a
    `Drafter`, or `draft_model` (an MTP drafter: a checkpoint path or a loaded drafter);
    `draft_tokens`: the draft length k. Same tokens when greedy, same distribution when sampling.
    With an `engine`, give the drafter to it instead (`Engine(model, speculation=...)`).
    `media`: the prompt's images and frames (`gemma4.engine.media.MediaInput`s over its placeholders).
    """
    sampling = sampling_from(sampling, **sampling_options)
    ids = tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
    stops = set(model.config.eos_token_id) if stop_token_ids is None else set(stop_token_ids)
    request = GenerationRequest(ids, max_tokens, sampling, frozenset(stops), logprobs,
                                list(constraints or []), logit_bias, stop, tokenizer, tuple(media))
    start = time.perf_counter()
    speculation = make_speculation(model, speculative, draft_model, draft_tokens)
    if speculation is not None and engine is not None:
        raise ValueError("with an engine, give it the drafter (Engine(model, speculation=make_speculation(...)))")
    gen = Generation(model, [request], engine, speculation, on_prefill)
    seq = gen.sequences[0]
    prompt_tps = 0.0
    n = 0
    for (event,) in gen:
        now = time.perf_counter()
        if n == 0:
            prompt_tps, start = len(ids) / max(now - start, 1e-9), now
        n += 1
        spec = seq.spec
        yield GenerationResponse(event.text, event.token, event.logprob, event.finish_reason, len(ids), n,
                                 prompt_tps, n / max(time.perf_counter() - start, 1e-9), event.top_logprobs,
                                 seq.cached, spec.drafted if spec else 0, spec.accepted if spec else 0)


def generate(model, tokenizer, prompt: str | list[int], **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def batch_generate(
    model,
    tokenizer,
    prompts: list[str | list[int]],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | list[SamplingParams] | None = None,
    stop_token_ids: set[int] | None = None,
    add_bos: bool | None = None,
    **sampling_options,
) -> list[str]:
    """Completions for several prompts in one batch (same tokens as generating them one by one).
    Greedy unless told, as `stream_generate`."""
    ids = [tokenizer.encode(p, add_bos=add_bos) if isinstance(p, str) else list(p) for p in prompts]
    params = sampling if isinstance(sampling, list) else [sampling_from(sampling, **sampling_options)] * len(ids)
    stops = set(model.config.eos_token_id) if stop_token_ids is None else set(stop_token_ids)
    out: list[list[int]] = [[] for _ in ids]
    for steps in TokenGenerator(model, ids, params, [max_tokens] * len(ids), stops):
        for i, s in enumerate(steps):
            if s is not None and s.token is not None and s.token not in stops:
                out[i].append(s.token)
    return [tokenizer.decode(t) for t in out]
