"""The decode core: one engine for the CLI, the Python API and the server.

An `Engine` owns one `KVCache` of `rows` rows and the sequences on them:

    engine.add(Sequence(...))      take the lowest free row (its prompt prefix from the prefix cache)
    engine.prefill(budget)         feed prompt tokens in chunks; a finished prompt samples its first token
    engine.decode()                one forward for every decoding row, one token each
    engine.score(rows, tokens)     k given tokens per row in one forward: logits at every position
    engine.truncate(row, n)        roll a row back (a rejected draft)

With a `Speculation` (speculative.py), `decode` is a verify step: a drafter proposes tokens,
`score`'s forward checks them, `truncate`'s rollback drops the rejected ones; one to k + 1
tokens per row and step.

It returns `(sequence, TokenEvent)` pairs and frees the rows of finished sequences. The
synchronous drivers (`generate.py`) and the server's scheduler (`scheduler.py`) both run it.

Decode steps run eagerly, or compiled by torch.compile, or captured as a CUDA graph (`mode`):
then a step runs over rows [0, b) for b a power of two (inert rows at position -1), attends
over whole buffers, and reads its inputs from fixed tensors, so each (b, cache capacity) is traced
once. Prefill and scoring stay eager: few large matmuls, where launch overhead does not matter.
"""

from __future__ import annotations

import heapq
import logging

import torch

from ..config import check_context
from ..model.layers import grouped_mm_works
from .cache import DEFAULT_HEADROOM, KVCache
from .draft import Draft
from .media import EncoderCache, resumable
from .prefix import PrefixCache
from .sequence import Sequence, TokenEvent
from .speculative import RowState, Speculation

log = logging.getLogger(__name__)

MODES = ("eager", "compile", "reduce-overhead", "cuda-graph")
PREFILL_CHUNK = 256  # prompt tokens per row per forward: bounds activations and decode stalls
COMPILED_MIN_LEN = 1024  # a traced step attends over its whole cache: start small, double


def compilable(model) -> bool:
    """Whether torch.compile can trace the model's step: not with modules standing in for weight
    tensors (`__torch_function__`: quantized weights), which dynamo sees as opaque objects."""
    return not any(hasattr(type(m), "__torch_function__") for m in model.modules())


class Engine:
    """The sequences on one KV cache, and the forwards that advance them (module docstring).

    rows: sequences decoded together (a server's slots); max_len: tokens per row (default the
    model's context); prefix_cache: tokens of K/V kept for reuse by later prompts (0 = off);
    vocab_limit: tokens at or past it are never sampled (a tokenizer smaller than the table);
    compile_options: passed to torch.compile (e.g. {"backend": "aot_eager"}); initial_len: the
    cache's first capacity (it doubles as rows grow; each capacity is traced once when compiled);
    encoder_cache: bytes of soft tokens kept by content, so an image sent again is encoded once;
    speculation: a drafter and draft length (speculative.py) for speculative decoding.
    """

    def __init__(self, model, *, rows: int = 1, max_len: int | None = None, mode: str = "eager",
                 prefill_chunk: int = PREFILL_CHUNK, headroom: int = DEFAULT_HEADROOM, prefix_cache: int = 0,
                 vocab_limit: int | None = None, compile_options: dict | None = None,
                 ple_on_host: bool | None = None, initial_len: int | None = None, encoder_cache: int = 256 << 20,
                 speculation: Speculation | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if speculation is not None:
            speculation.check(headroom)
        self.speculation = speculation
        cfg = model.config
        param = next(model.parameters())
        self.model, self.mode, self.prefill_chunk, self.vocab_limit = model, mode, prefill_chunk, vocab_limit
        # A tensor-parallel rank (gemma4.parallel): a failed forward leaves the ranks' collectives out of
        # step, so it is not survivable per row; it propagates and the group stops.
        self.sharded = getattr(model, "parallel", None) is not None
        self.device, self.dtype = param.device, param.dtype
        self.context = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        compiled = mode != "eager"
        self.cache = KVCache(cfg, rows, self.context, self.dtype, self.device, headroom=headroom,
                             initial_len=initial_len or (COMPILED_MIN_LEN if compiled else 256))
        self.rows = rows
        self.slots: list[Sequence | None] = [None] * rows
        self._free = list(range(rows))  # a heap: the lowest free row first keeps live rows packed
        self.prefix = PrefixCache(self.cache, prefix_cache) if prefix_cache else None
        if self.prefix is not None:  # a chunk must not push a block's sliding K/V out of a ring before it is saved
            self.prefill_chunk = min(prefill_chunk, self.prefix.max_chunk())
        self.encoders = EncoderCache(encoder_cache)
        self.steps = 0  # decode forwards so far
        self._step_fn = None
        self._graphs: dict[tuple[int, int], tuple] = {}
        if compiled:
            self._setup_compiled(compile_options, ple_on_host)

    # -- sequences ----------------------------------------------------------------------------------
    def new_sequence(self, request) -> Sequence:
        """A Sequence for `request` with this engine's vocabulary, context and device."""
        return Sequence(request, self.model.config.vocab_size, self.context, self.device, self.vocab_limit)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def add(self, seq: Sequence) -> None:
        """Put `seq` on the lowest free row; reuse the K/V of its longest cached prompt prefix."""
        check_context(self.context, seq.prompt_len, 1)
        if seq.limit <= 0:  # nothing to generate (the context is full): done without a row
            seq.finish_reason = "length"
            return
        if not self._free:
            raise RuntimeError("no free row: wait for a sequence to finish")
        row = heapq.heappop(self._free)
        self.cache.reset(row)
        seq.row, self.slots[row] = row, seq
        if self.speculation is not None:
            seq.spec = RowState(self.speculation.k)
        if self.prefix is not None:
            spans = seq.request.media
            seq.cached = seq.fed = self.prefix.load(row, seq.keyed(seq.prompt_len), limit=seq.prompt_len - 1,
                                                    resumable=(lambda n: resumable(spans, n)) if spans else None)

    def release(self, seq: Sequence) -> None:
        """Free `seq`'s row (its K/V go to the prefix cache first)."""
        row = seq.row
        if row is None:
            return
        if self.prefix is not None and seq.fed:
            self.prefix.save(row, seq.keyed(seq.fed))
        self.cache.reset(row)
        self.slots[row], seq.row = None, None
        heapq.heappush(self._free, row)

    def cancel(self, seq: Sequence, reason: str = "abort", error: str | None = None) -> TokenEvent:
        """End `seq` now (a client gone, a stop string seen by the caller) and free its row."""
        event = seq.end(reason, error)
        self.release(seq)
        return event

    def truncate(self, seq: Sequence, n: int) -> None:
        """Roll `seq` back by its last n fed tokens (and forget those tokens): a rejected draft."""
        self.cache.truncate(seq.row, n)
        seq.fed -= n
        del seq.tokens[seq.fed :]

    # -- stepping -----------------------------------------------------------------------------------
    def step(self, budget: int | None = None) -> list[tuple[Sequence, TokenEvent]]:
        """Prefill (up to `budget` prompt tokens; None: every prompt whole), then one decode step."""
        return self.prefill(budget) + self.decode()

    @torch.inference_mode()
    def prefill(self, budget: int | None = None) -> list[tuple[Sequence, TokenEvent]]:
        """Feed prompt tokens of prefilling rows, a contiguous run of rows per forward, in chunks of
        at most `prefill_chunk` tokens per row; sample the first token of each finished prompt.

        `budget` caps the tokens of one call (None: every prompt whole). A row's chunk is never cut
        to fit what is left of it (the row waits for the next call), and a forward batches only rows
        whose chunks have the same length (no padding): a prompt is prefilled in the chunks, and with
        the shapes, it would get alone, so batching does not move its numbers (a greedy near-tie of
        the real gemma-3-270m flipped 4 times in 1,300 requests of a 32-stream soak before this)."""
        events: list[tuple[Sequence, TokenEvent]] = []
        left = budget
        while left is None or left > 0:
            run: list[Sequence] = []
            for s in (s for s in self.slots if s is not None and s.prefilling):
                n = s.chunk(self.prefill_chunk)
                if run and (s.row != run[-1].row + 1 or n != T or (left is not None and T * (len(run) + 1) > left)):
                    break
                if not run:
                    if left is not None and n > left and left != budget:
                        break  # a chunk that does not fit what is left waits for the next call
                    T = n if left is None or n <= left else s.chunk(left)  # only a chunk longer than the budget is cut
                run.append(s)
            if not run:
                break
            fed = self._prefill_run(run, T, events)
            if left is not None:
                left -= fed
        return events

    def _prefill_run(self, run: list[Sequence], T: int, events) -> int:
        lo, hi = run[0].row, run[-1].row + 1
        ids = torch.zeros(hi - lo, T, dtype=torch.long)
        pos = torch.full((hi - lo, T), -1, dtype=torch.long)
        last = {}  # row -> index in the chunk of its last prompt token
        fed = 0
        for s in run:
            n = min(T, s.prompt_len - s.fed)
            ids[s.row - lo, :n] = torch.tensor(s.tokens[s.fed : s.fed + n])
            pos[s.row - lo, :n] = torch.arange(s.fed, s.fed + n)
            if s.fed + n == s.prompt_len:
                last[s.row] = n - 1
            fed += n
        ends = [s.fed + min(T, s.prompt_len - s.fed) for s in run]
        keep = sorted(set(last.values())) or [T - 1]
        try:
            media = self._media_inputs(run, lo, ids) if any(s.request.media for s in run) else {}
            hidden = self._forward(lo, hi, ids, pos, max(ends), keep, **media)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: these rows fail, the engine goes on
            if self.sharded:
                raise
            log.exception("a prefill forward failed")
            for s in run:
                events.append((s, self.cancel(s, "error", _describe(error))))
            return fed
        for s, end in zip(run, ends):
            s.fed = self.cache.lengths[s.row] = end
            if self.prefix is not None:
                self.prefix.save(s.row, s.tokens[:end])
        if last:
            rows = torch.tensor([r - lo for r in last], device=self.device)
            cols = torch.tensor([keep.index(i) for i in last.values()], device=self.device)
            states = hidden[rows, cols]
            logits = self.model.logits(states)
            for i, row in enumerate(last):
                if self.speculation is not None:
                    self.slots[row].spec.hidden = states[i]
                self._sampled(self.slots[row], logits[i], events)
        return fed

    @torch.inference_mode()
    def decode(self) -> list[tuple[Sequence, TokenEvent]]:
        """One forward over every decoding row (rows between them are inert), one token each."""
        events: list[tuple[Sequence, TokenEvent]] = []
        rows = [s for s in self.slots if s is not None and s.decoding]
        if not rows:
            return events
        if self.speculation is not None:
            drafts = self._drafts(rows)
            if drafts is not None:
                return self._verify(rows, drafts)
        lo, hi = rows[0].row, rows[-1].row + 1
        tokens, positions = [[0]] * (hi - lo), [[-1]] * (hi - lo)
        for s in rows:
            tokens[s.row - lo], positions[s.row - lo] = [s.tokens[-1]], [s.fed]
        try:
            logits = self.step_logits(lo, hi, torch.tensor(tokens), torch.tensor(positions),
                                      max(s.fed for s in rows) + 1)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: these rows fail, the engine goes on
            if self.sharded:
                raise
            log.exception("a decode step failed")
            return [(s, self.cancel(s, "error", _describe(error))) for s in rows]
        self.steps += 1
        for s in rows:
            s.fed += 1
            self.cache.lengths[s.row] = s.fed
            self._sampled(s, logits[s.row - lo], events)
        return events

    def _sampled(self, seq: Sequence, logits: torch.Tensor, events) -> None:
        event = seq.choose(logits)
        events.append((seq, event))
        if seq.finished:
            self.release(seq)

    def _drafts(self, rows: list[Sequence]):
        """Each row's draft (speculative.py), or None when a plain step does the same work: no
        row has a draft and the drafter needs no hidden states."""
        spec = self.speculation
        ks = [spec.budget(s) for s in rows]
        asked = [i for i, k in enumerate(ks) if k > 0]
        drafts = [Draft([]) for _ in rows]
        try:
            proposed = spec.drafter.propose(self, [rows[i] for i in asked], [ks[i] for i in asked]) if asked else []
        except Exception:  # noqa: BLE001 - a drafter's failure costs speed, never the requests
            log.exception("the drafter failed; this step decodes without drafts")
            proposed = [Draft([]) for _ in asked]
        V = self.model.config.vocab_size
        for i, d in zip(asked, proposed):  # at most k tokens, up to the first that is not a token id
            n = next((j for j, t in enumerate(d.tokens[: ks[i]]) if not 0 <= t < V), min(ks[i], len(d.tokens)))
            drafts[i] = Draft(list(d.tokens[:n]), None if d.probs is None else d.probs[:n])
        if not spec.drafter.needs_hidden and not any(d.tokens for d in drafts):
            return None
        return drafts

    def _verify(self, rows: list[Sequence], drafts: list[Draft]) -> list[tuple[Sequence, TokenEvent]]:
        """Score [newest token, draft...] of every row in one forward, keep each row's accepted
        prefix and the target's next token (`Sequence.choose` with the drafts), roll back the rest."""
        spec = self.speculation
        try:
            scored = self._score(rows, [[s.tokens[-1]] + d.tokens for s, d in zip(rows, drafts)])
        except Exception as error:  # noqa: BLE001 - as in decode: these rows fail, the engine goes on
            log.exception("a verify step failed")
            return [(s, self.cancel(s, "error", _describe(error))) for s in rows]
        self.steps += 1
        events: list[tuple[Sequence, TokenEvent]] = []
        for s, d, (logits, hidden) in zip(rows, drafts, scored):
            m = 0  # drafts accepted
            for i in range(len(d.tokens) + 1):
                draft = d.tokens[i] if i < len(d.tokens) else None
                q = d.probs[i] if draft is not None and d.probs is not None else None
                event = s.choose(logits[i], draft, q)
                events.append((s, event))
                if draft is None or event.token != draft:
                    break
                m += 1
                if s.finished:
                    break
            s.fed += 1 + m
            self.cache.truncate(s.row, len(d.tokens) - m)
            spec.record(s, len(d.tokens), m)
            if spec.drafter.needs_hidden:
                s.spec.hidden = hidden[m]
            if s.finished:
                self.release(s)
        return events

    @torch.inference_mode()
    def score(self, seqs: list[Sequence], tokens: list[list[int]], hidden: bool = False) -> list:
        """Feed `tokens[i]` after what `seqs[i]`'s row holds, all rows in one forward, and return
        the logits [len(tokens[i]), V] after each of them (roll back tokens with `truncate`). The
        tokens join `seq.tokens`. `hidden`: return (logits, final-normed hidden states [len, D])
        pairs instead, what an MTP drafter reads."""
        out = self._score(seqs, tokens)
        for s, t in zip(seqs, tokens):
            s.tokens[s.fed :] = t
            s.fed += len(t)
        return out if hidden else [logits for logits, _ in out]

    def _score(self, seqs: list[Sequence], tokens: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The forward of `score`: (logits, hidden) per row; the rows' cache lengths grow, their
        `fed` and `tokens` are the caller's."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].row)
        lo, hi = seqs[order[0]].row, seqs[order[-1]].row + 1
        T = max(len(t) for t in tokens)
        ids = torch.zeros(hi - lo, T, dtype=torch.long)
        pos = torch.full((hi - lo, T), -1, dtype=torch.long)
        for s, t in zip(seqs, tokens):
            ids[s.row - lo, : len(t)] = torch.tensor(t)
            pos[s.row - lo, : len(t)] = torch.arange(s.fed, s.fed + len(t))
        end = max(s.fed + len(t) for s, t in zip(seqs, tokens))
        hidden = self._forward(lo, hi, ids, pos, end, None)
        logits = self.model.logits(hidden)
        out = []
        for s, t in zip(seqs, tokens):
            self.cache.lengths[s.row] = s.fed + len(t)
            out.append((logits[s.row - lo, : len(t)], hidden[s.row - lo, : len(t)]))
        return out

    # -- forwards -----------------------------------------------------------------------------------
    def _forward(self, lo: int, hi: int, ids, pos, end: int, keep: list[int] | None, **media) -> torch.Tensor:
        """Hidden states [hi - lo, len(keep) or T, D] of an eager forward over rows [lo, hi);
        `media`: inputs_embeds (and groups) of a chunk holding soft tokens."""
        check_context(self.context, end)
        self.cache.ensure(end)
        keep_t = torch.tensor(keep, device=self.device) if keep is not None else None
        out = self.model.decode(ids.to(self.device), positions=pos.to(self.device),
                                cache=self.cache.view(lo, hi, end), logits_to_keep=keep_t, **media)
        return out.hidden

    def _media_inputs(self, run: list[Sequence], lo: int, ids: torch.Tensor) -> dict:
        """The chunk's input embeddings with each span's soft tokens in place of its placeholders
        (which become id 0, as the reference looks them up), and the groups of its image blocks
        (-1: text), for the model's bidirectional attention. Encoders run here, once per content."""
        T = ids.shape[1]
        spans = [(s, sp) for s in run for sp in s.request.media if sp.start < s.fed + T and sp.end > s.fed]
        for s, sp in spans:
            ids[s.row - lo, max(sp.start, s.fed) - s.fed : min(sp.end, s.fed + T) - s.fed] = 0
        ids = ids.to(self.device)
        embeds = self.model.model.embed(ids)
        groups = torch.full(ids.shape, -1, dtype=torch.long)
        for g, (s, sp) in enumerate(spans):
            a, b = max(sp.start, s.fed), min(sp.end, s.fed + T)
            soft = self.encoders.get(sp)
            embeds[s.row - lo, a - s.fed : b - s.fed] = soft[a - sp.start : b - sp.start].to(embeds)
            if sp.block:
                groups[s.row - lo, a - s.fed : b - s.fed] = g
        media = {"inputs_embeds": embeds}
        if bool((groups >= 0).any()):
            media["groups"] = groups.to(self.device)
        return media

    @torch.inference_mode()
    def step_logits(self, lo: int, hi: int, ids: torch.Tensor, pos: torch.Tensor, end: int | None = None
                    ) -> torch.Tensor:
        """The decode forward itself, eager or compiled: logits [hi - lo, V] of one token per row of
        [lo, hi), ids and positions [hi - lo, 1] on the host (position -1: an inert row); `end`:
        one past the largest position, if known. The sequences' bookkeeping is the caller's (`decode`)."""
        end = int(pos.max()) + 1 if end is None else end
        if self._step_fn is None:
            check_context(self.context, end)
            self.cache.ensure(end)
            ids, pos = ids.to(self.device, non_blocking=True), pos.to(self.device, non_blocking=True)
            return self.model(ids, positions=pos, cache=self.cache.view(lo, hi, end), logits_to_keep=1)[:, -1]
        b = _bucket(hi, self.rows)
        self.reserve(end, b)
        self.ids[:b].fill_(0)
        self.pos[:b].fill_(-1)
        self.ids[lo:hi].copy_(ids, non_blocking=True)
        self.pos[lo:hi].copy_(pos, non_blocking=True)
        if self.ple is not None:
            self.ple[:b].copy_(self.model.model.per_layer_tokens(self.ids[:b], self.device), non_blocking=True)
        if self.mode == "cuda-graph":
            graph, logits = self._graphs[b, self.cache.capacity]
            graph.replay()
            return logits[lo:hi]
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return self._step_fn(b)[lo:hi]

    # -- compiled / captured steps ------------------------------------------------------------------
    def _setup_compiled(self, compile_options: dict | None, ple_on_host: bool | None) -> None:
        model, cfg = self.model, self.model.config
        if mode_needs_trace(self.mode) and not compilable(model):
            raise ValueError(f"mode {self.mode!r} cannot trace quantized weights (gemma4.quant) yet; use mode='eager'")
        if self.mode == "cuda-graph" and self.device.type != "cuda":
            raise ValueError("mode 'cuda-graph' needs the model on a CUDA device")
        R = self.rows
        self.ids = torch.zeros(R, 1, dtype=torch.long, device=self.device)
        self.pos = torch.full((R, 1), -1, dtype=torch.long, device=self.device)
        # PLE rows are looked up outside the step when the table lives elsewhere (e.g. host memory).
        ple = cfg.hidden_size_per_layer_input
        table = model.model.embed_tokens_per_layer.weight.device if ple else None
        outside = bool(ple) and (table != self.device if ple_on_host is None else ple_on_host)
        self.ple = (torch.zeros(R, 1, cfg.num_hidden_layers * ple, dtype=self.dtype, device=self.device)
                    if outside else None)
        if cfg.enable_moe_block:
            grouped_mm_works(self.device, self.dtype)  # probe eagerly: the traced step only reads the answer
        self._mark_static()
        if self.mode == "cuda-graph":
            self._step_fn = self._step
        else:
            # One trace per (batch bucket, cache capacity): up to log2(rows) + 1 buckets times the
            # doublings of the cache, more than dynamo's default of 8 before it gives up on a frame.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            options = {"mode": None if self.mode == "compile" else self.mode, "fullgraph": True}
            self._step_fn = torch.compile(self._step, **(options | (compile_options or {})))

    def _mark_static(self) -> None:
        if self.mode in ("compile", "reduce-overhead"):
            for t in [*self.cache.tensors(), self.ids, self.pos] + ([self.ple] if self.ple is not None else []):
                torch._dynamo.mark_static_address(t)

    def _step(self, b: int) -> torch.Tensor:
        """The traced step: one token for rows [0, b), whole buffers, inputs from fixed tensors."""
        ple = self.ple[:b] if self.ple is not None else None
        out = self.model.decode(self.ids[:b], positions=self.pos[:b], cache=self.cache.view(0, b, None),
                                logits_to_keep=1, ple_tokens=ple)
        return self.model.logits(out.hidden[:, -1])

    def reserve(self, length: int, batch: int = 1) -> None:
        """Make the cache hold `length` tokens a row and, for a compiled or captured step, have the
        step for `batch` rows ready, so its compile or capture is not paid by the tokens that follow."""
        check_context(self.context, length)
        capacity = self.cache.capacity
        self.cache.ensure(length)
        if self._step_fn is None:
            return
        if self.cache.capacity != capacity:
            self._mark_static()
        b = _bucket(batch, self.rows)
        if self.mode == "cuda-graph" and (b, self.cache.capacity) not in self._graphs:
            self._capture(b)

    def warm_up(self, batch: int = 1) -> None:
        """Trace (or capture) the step for `batch` rows now, with inert inputs."""
        self.reserve(1, batch)
        if self._step_fn is not None and self.mode != "cuda-graph":
            b = _bucket(batch, self.rows)
            self.pos[:b].fill_(-1)
            with torch.inference_mode():
                self._step_fn(b)

    def _capture(self, b: int) -> None:
        # Warm up on a side stream (allocator pools, lazy inits), then capture. Positions are -1,
        # so the writes of warm-up and capture land in the sinks.
        self.pos[:b].fill_(-1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._step(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            logits = self._step(b)
        self._graphs[b, self.cache.capacity] = (graph, logits)


def mode_needs_trace(mode: str) -> bool:
    return mode in ("compile", "reduce-overhead")


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, at most `limit`: the batch sizes a traced step is built for."""
    b = 1
    while b < n:
        b *= 2
    return min(b, limit)


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "the engine ran out of memory"
    return "the engine failed while generating"
