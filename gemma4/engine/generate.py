"""The generation loop: prefill, then decode one token per step for a batch of sequences.

`TokenGenerator` works on token ids and yields one `TokenStep` per live sequence per step; the
text layer (`stream_generate`) turns those into `GenerationResponse` records with text pieces,
stop strings and timing. The CLI, the Python API and the server all consume the same loop.

Prompts of different lengths are left-padded; padding takes no position and no attention, so a
sequence gives the same tokens in a batch as alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import ContextLengthError, KVCache
from .sampling import Sampler, SamplingParams
from .static import GrowingDecoder, StaticDecoder, prefill
from .stops import StopMatcher


class PromptTooLongError(ContextLengthError):
    """The prompt leaves no room to generate within the model's context."""


@dataclass
class TokenStep:
    token: int
    logprob: float  # log-probability under the model's (unprocessed) distribution
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop token), "length", or None while running


class TokenGenerator:
    """Generates tokens for several prompts at once; iterate to get a list per step.

    Each list holds a TokenStep for every sequence that produced a token at this step and None
    for sequences already finished. `finish(i)` ends sequence i early (e.g. on a stop string).
    """

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        sampling: list[SamplingParams],
        max_tokens: list[int],
        stop_token_ids: set[int],
        logprobs: int = 0,
        prefill_chunk: int = 512,
        decoder: StaticDecoder | None = None,
    ):
        """`decoder`: a `StaticDecoder` of `model` (reused across generations) to run prefill and
        decode steps on its static cache, e.g. with a compiled or CUDA-graph-captured step."""
        cfg = model.config
        context = cfg.max_position_embeddings
        for p in prompts:
            if not p:
                raise ValueError("empty prompt: give at least one token (e.g. <bos>)")
            if len(p) >= context:
                raise PromptTooLongError(
                    f"the prompt has {len(p)} tokens, but the model's maximum context length is {context} tokens; "
                    "shorten the prompt"
                )
        self.model = model
        self.prompts = prompts
        self.limits = [min(m, context - len(p)) for m, p in zip(max_tokens, prompts)]
        self.decoder = decoder
        if decoder is not None:
            need = max(len(p) for p in prompts) + max(self.limits)
            if len(prompts) > decoder.batch_size or need > decoder.max_len:
                raise ContextLengthError(
                    f"{len(prompts)} prompts needing {need} tokens do not fit the decoder's static cache of "
                    f"{decoder.batch_size} x {decoder.max_len}; build a StaticDecoder with a larger batch_size/max_len"
                )
        self.stop_ids = stop_token_ids
        self.logprobs = logprobs
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.samplers = [Sampler(s, p, cfg.vocab_size, self.device) for s, p in zip(sampling, prompts)]
        self.done = [limit <= 0 for limit in self.limits]
        self.produced = [0] * len(prompts)

    def finish(self, i: int) -> None:
        self.done[i] = True

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[TokenStep | None]]:
        B, L = len(self.prompts), max(len(p) for p in self.prompts)
        ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, p in enumerate(self.prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
        if self.decoder is not None:
            logits = self.decoder.prefill(ids, pos)
        else:
            cache = KVCache(self.model.config, B, L + max(self.limits), self.dtype, self.device)
            logits = prefill(self.model, ids, pos, cache, self.prefill_chunk)
        last = [len(p) - 1 for p in self.prompts]  # the position of each row's newest token
        while not all(self.done):
            steps = [self._step(i, logits[i]) if not self.done[i] else None for i in range(B)]
            yield steps
            if all(self.done):
                return
            # Positions are kept on the host: building the step's inputs costs no device round trip.
            last = [p + 1 if not d else p for p, d in zip(last, self.done)]
            nxt = torch.tensor([[s.token if s else 0] for s in steps]).to(self.device, non_blocking=True)
            step_pos = torch.tensor([[-1 if d else p] for p, d in zip(last, self.done)]).to(self.device,
                                                                                          non_blocking=True)
            if self.decoder is not None:
                logits = self.decoder.step(nxt, step_pos)
            else:
                logits = self.model(nxt, positions=step_pos, cache=cache)[:, -1]

    def _step(self, i: int, logits: torch.Tensor) -> TokenStep:
        token = self.samplers[i].sample(logits)
        logits = logits.float()
        top = []
        if self.logprobs:
            logp = torch.log_softmax(logits, -1)
            values, index = torch.topk(logp, self.logprobs)
            top = list(zip(index.tolist(), values.tolist()))
            logprob = float(logp[token])
        else:  # one pass over the vocabulary instead of a full log_softmax
            logprob = float(logits[token] - torch.logsumexp(logits, -1))
        self.produced[i] += 1
        reason = "stop" if token in self.stop_ids else "length" if self.produced[i] >= self.limits[i] else None
        if reason:
            self.done[i] = True
        return TokenStep(token, logprob, top, reason)


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
    add_bos: bool | None = None,
    decoder: GrowingDecoder | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from one prompt, yielding a response per token; the last one has finish_reason set.

    Stop tokens are not part of the text. Stop strings end generation and are cut from the text.
    add_bos=None follows the tokenizer (base checkpoints add <bos>; chat prompts carry their own).
    `decoder` runs the steps on a static cache, e.g. compiled (`GrowingDecoder(model, "compile")`),
    kept from one call to the next.
    """
    ids = tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
    stops = set(model.config.eos_token_id) if stop_token_ids is None else set(stop_token_ids)
    start = time.perf_counter()
    static = decoder.fit(len(ids) + max(max_tokens, 1)) if decoder is not None else None
    gen = TokenGenerator(model, [ids], [sampling or SamplingParams()], [max_tokens], stops, logprobs, decoder=static)
    detok, matcher = tokenizer.detokenizer(), StopMatcher(stop)
    prompt_tps = 0.0
    n = 0
    for (step,) in gen:
        now = time.perf_counter()
        if n == 0:
            prompt_tps, start = len(ids) / max(now - start, 1e-9), now
        n += 1
        piece = "" if step.token in stops else detok.add(step.token)
        reason = step.finish_reason
        if reason:
            piece += detok.flush()
        text, hit = matcher.feed(piece)
        if hit:
            gen.finish(0)
            reason = "stop"
        elif reason:
            text += matcher.flush()
        yield GenerationResponse(text, step.token, step.logprob, reason, len(ids), n, prompt_tps,
                                 n / max(time.perf_counter() - start, 1e-9), step.top_logprobs)
        if reason:
            return


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
) -> list[str]:
    """Completions for several prompts in one batch (same tokens as generating them one by one)."""
    ids = [tokenizer.encode(p, add_bos=add_bos) if isinstance(p, str) else list(p) for p in prompts]
    params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(ids)
    stops = set(model.config.eos_token_id) if stop_token_ids is None else set(stop_token_ids)
    out: list[list[int]] = [[] for _ in ids]
    for steps in TokenGenerator(model, ids, params, [max_tokens] * len(ids), stops):
        for i, s in enumerate(steps):
            if s is not None and s.token not in stops:
                out[i].append(s.token)
    return [tokenizer.decode(t) for t in out]
