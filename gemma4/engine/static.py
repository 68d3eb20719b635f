"""Static KV caches and a capturable one-token decode step (gpt-fast's recipe).

Every buffer has a fixed shape and every per-step quantity (token ids, positions, the cache slot
being written) lives in a tensor, so a decode step is the same sequence of kernels each time:
`torch.compile(mode="reduce-overhead")` or a hand-captured CUDA graph replays it with no Python
and no per-kernel launch cost. Prefill stays eager (chunked, logits only for the last row): it is
a few large matmuls per chunk, where launch overhead does not matter.

- `StaticKVCache` implements the model's cache protocol with preallocated K/V per layer (a ring of
  `window` slots on sliding layers, `max_len` slots on full layers, nothing on KV-shared layers).
  A one-token step writes with `index_copy_` at a slot *tensor*; prefill chunks write at Python
  offsets. Eager decoding may `trim` attention to the filled slots (the CPU fast path); a captured
  step must attend over the whole buffer (masked by positions), as its shapes cannot change.
- `StaticDecoder` owns one cache and the step: `prefill(ids, positions)` then `step(ids, positions)`
  -> logits [B, V], eager, compiled or replayed from a CUDA graph (`mode`).

Masks come from token positions (-1 = empty), so slot order never matters and padding rows
(position -1) are inert: a batch smaller than the decoder's is padded with them.
"""

from __future__ import annotations

import torch

from ..config import TextConfig
from ..model.layers import grouped_mm_works
from .cache import ContextLengthError

MODES = ("eager", "compile", "reduce-overhead", "cuda-graph")


def prefill(model, ids: torch.Tensor, positions: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Run prompts ids, positions [B, L] into `cache` in chunks of `chunk` tokens (bounding the
    activations of long prompts); logits [B, V] of the last position only."""
    for s in range(0, ids.shape[1], chunk):
        hidden = model.decode(ids[:, s : s + chunk], positions=positions[:, s : s + chunk], cache=cache,
                              logits_to_keep=1).hidden
    return model.logits(hidden[:, -1])


class _StaticLayer:
    """K/V [B, Hkv, slots, d] of one layer and the position of each slot [B, slots]."""

    def __init__(self, owner: StaticKVCache, batch, heads, slots, head_dim, window, dtype, device):
        self.owner, self.window, self.slots = owner, window, slots
        self.k = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        owner, T = self.owner, k.shape[2]
        if T == 1 and owner.step_index is not None:
            # The ring slot overwritten held position q - window, which the window excludes anyway.
            idx = owner.step_index[self.window]
            self.k.index_copy_(2, idx, k)
            self.v.index_copy_(2, idx, v)
            self.pos.index_copy_(1, idx, pos)
            n = min(owner.length, self.slots) if owner.trim else self.slots
            return self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n]
        start = owner.length - T  # reserve() already counted this chunk
        before = min(start, self.slots)
        if self.window is None:
            self.k[:, :, start : start + T] = k
            self.v[:, :, start : start + T] = v
            self.pos[:, start : start + T] = pos
            return self.k[:, :, : start + T], self.v[:, :, : start + T], self.pos[:, : start + T]
        # Early queries of a chunk still need the ring entries the chunk is about to overwrite.
        seen = (torch.cat([self.k[:, :, :before], k], 2), torch.cat([self.v[:, :, :before], v], 2),
                torch.cat([self.pos[:, :before], pos], 1))
        n = min(T, self.slots)
        idx = torch.arange(start + T - n, start + T, device=k.device) % self.slots
        self.k.index_copy_(2, idx, k[:, :, T - n :])
        self.v.index_copy_(2, idx, v[:, :, T - n :])
        self.pos.index_copy_(1, idx, pos[:, T - n :])
        return seen


class StaticKVCache:
    """Preallocated K/V of every layer for a batch whose rows advance together (slot i = i-th token).

    `length` (a Python int) counts the slots written, padding included. `begin_step(slot)` makes
    the next one-token forward write at the slot held in a tensor, which is what a compiled or
    captured step does; an eager `model(ids, cache=...)` call reserves slots as with `KVCache`.
    """

    def __init__(self, config: TextConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                 trim: bool = True):
        if max_len > config.max_position_embeddings:
            raise ContextLengthError(f"requested cache of {max_len} tokens exceeds the model's context of "
                                     f"{config.max_position_embeddings} tokens")
        self.batch_size, self.max_len, self.trim = batch_size, max_len, trim
        self.length = 0
        self.step_index: dict[int | None, torch.Tensor] | None = None
        self.layers: list[_StaticLayer | None] = []
        for spec in config.layers:
            if spec.shares_kv:
                self.layers.append(None)
                continue
            slots = max_len if spec.window is None else min(spec.window, max_len)
            window = None if spec.window is None else slots
            self.layers.append(_StaticLayer(self, batch_size, spec.num_kv_heads, slots, spec.head_dim, window,
                                            dtype, device))
        self.windows = sorted({layer.window for layer in self.layers if layer is not None and layer.window})

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers if layer is not None for t in (layer.k, layer.v, layer.pos)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Forget every sequence (positions to -1); buffers keep their addresses for captured graphs."""
        for layer in self.layers:
            if layer is not None:
                layer.pos.fill_(-1)
        self.length = 0
        self.step_index = None

    def reserve(self, n: int) -> int:
        """Eager forwards (Gemma.decode): claim n slots; a one-token forward writes at a slot tensor."""
        if self.length + n > self.max_len:
            raise ContextLengthError(f"{self.length + n} tokens do not fit in a cache of {self.max_len} "
                                     f"(already holding {self.length}); start a new sequence or allocate a longer cache")
        start, self.length = self.length, self.length + n
        if n == 1:
            device = self.layers[0].k.device if self.layers and self.layers[0] is not None else None
            self.begin_step(torch.tensor([start], device=device))
        else:
            self.step_index = None
        return start

    def begin_step(self, slot: torch.Tensor) -> None:
        """The next one-token forward writes slot `slot` (long [1]); ring layers write slot % window."""
        self.step_index = {None: slot} | {w: slot % w for w in self.windows}

    def layer(self, index: int):
        return self.layers[index]


def compilable(model) -> bool:
    """Whether torch.compile can trace the model's step: not with quantized weights, which dynamo
    sees as opaque objects created inside the graph."""
    from ..quant.tensor import QuantizedTensor

    return not any(isinstance(m, QuantizedTensor) for m in model.modules())


class StaticDecoder:
    """Prefill and one-token decode steps over a `StaticKVCache`, the step optionally captured.

    mode:
      "eager"            plain PyTorch; attention trimmed to the filled slots (best on CPU).
      "compile"          torch.compile of the step (inductor; no CUDA graphs).
      "reduce-overhead"  torch.compile with CUDA graphs (the GPU fast path).
      "cuda-graph"       the eager step captured by hand in a torch.cuda.CUDAGraph (no compiler).
    In the captured modes the step reads and writes fixed tensors: ids [B, 1], positions [B, 1],
    the slot [1] and the cache; `step` copies its arguments in and returns the static logits
    (valid until the next step). Batches smaller than `batch_size` are padded with inert rows.
    `compile_options` go to torch.compile (e.g. {"backend": "aot_eager"} traces without codegen).
    The step is traced with fullgraph=True: a graph break is an error, not a silent slow path.
    """

    def __init__(self, model, batch_size: int = 1, max_len: int = 2048, mode: str = "eager",
                 prefill_chunk: int = 512, ple_on_host: bool | None = None, compile_options: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        cfg = model.config
        param = next(model.parameters())
        self.model, self.mode, self.prefill_chunk = model, mode, prefill_chunk
        self.device, self.dtype = param.device, param.dtype
        self.cache = StaticKVCache(cfg, batch_size, max_len, self.dtype, self.device, trim=mode == "eager")
        self.batch_size, self.max_len = batch_size, max_len
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.full((batch_size, 1), -1, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        # PLE rows are looked up outside the step when the table lives elsewhere (e.g. host memory).
        ple = cfg.hidden_size_per_layer_input
        table = model.model.embed_tokens_per_layer.weight.device if ple else None
        self.ple_outside = bool(ple) and (table != self.device if ple_on_host is None else ple_on_host)
        self.ple = (torch.zeros(batch_size, 1, cfg.num_hidden_layers * ple, dtype=self.dtype, device=self.device)
                    if self.ple_outside else None)
        self.logits: torch.Tensor | None = None
        self.graph = None
        self._fn = self._step
        if cfg.enable_moe_block:
            grouped_mm_works(self.device, self.dtype)  # probe eagerly: the traced step only reads the answer
        if mode in ("compile", "reduce-overhead"):
            if not compilable(model):
                raise ValueError(f"mode {mode!r} cannot trace quantized weights (gemma4.quant) yet; use mode='eager'")
            # Fixed addresses: the cache is written in place and the inputs are never copied.
            for t in [*self.cache.tensors(), self.ids, self.pos, self.slot] + ([self.ple] if self.ple_outside else []):
                torch._dynamo.mark_static_address(t)
            options = {"mode": None if mode == "compile" else mode, "fullgraph": True} | (compile_options or {})
            self._fn = torch.compile(self._step, **options)
        elif mode == "cuda-graph":
            self._capture()

    # -- the step ---------------------------------------------------------------------------------
    def _step(self) -> torch.Tensor:
        self.cache.begin_step(self.slot)
        out = self.model.model(self.ids, self.pos, cache=self.cache, ple_tokens=self.ple)
        return self.model.logits(out.hidden[:, -1])

    def _capture(self) -> None:
        if self.device.type != "cuda":
            raise ValueError("mode 'cuda-graph' needs the model on a CUDA device")
        # Warm up on a side stream (allocator pools, lazy inits), then capture. Positions are -1,
        # so the slot-0 writes of warm-up and capture are invisible; reset() forgets them anyway.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._step()
        self.cache.reset()

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [b, V] for one new token per row: ids, positions [b, 1] (position -1 = inert row)."""
        b = ids.shape[0]
        slot = self.cache.length
        if slot >= self.max_len:
            raise ContextLengthError(f"{slot + 1} tokens do not fit in a cache of {self.max_len}; "
                                     "start a new sequence or allocate a longer cache")
        self.cache.length += 1
        self.ids[:b].copy_(ids, non_blocking=True)
        self.pos[:b].copy_(positions, non_blocking=True)
        self.slot.fill_(slot)
        if self.ple is not None:
            self.ple[:b].copy_(self.model.model.per_layer_tokens(ids, self.device), non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return self.logits[:b]
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return self._fn()[:b]

    def warm_up(self) -> None:
        """Run a step once, so its compile or capture is not paid by the first generation's tokens."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.prefill(ids, ids)
        self.step(ids, ids + 1)

    # -- prefill ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Start new sequences: ids, positions [b, L] (left padding at -1) -> last-position logits [b, V]."""
        b, L = ids.shape
        if b > self.batch_size:
            raise ValueError(f"batch of {b} rows exceeds the decoder's batch size {self.batch_size}")
        if L >= self.max_len:
            raise ContextLengthError(f"the prompt has {L} tokens; the cache holds {self.max_len}")
        self.cache.reset()
        if b < self.batch_size:  # inert rows keep the fixed batch shape of the captured step
            pad = self.batch_size - b
            ids = torch.cat([ids, ids.new_zeros(pad, L)])
            positions = torch.cat([positions, positions.new_full((pad, L), -1)])
        return prefill(self.model, ids, positions, self.cache, self.prefill_chunk)[:b]


class GrowingDecoder:
    """A one-row `StaticDecoder` for generation after generation (a CLI session, a chat), its cache
    grown only when a generation needs more: `fit(n)` returns a decoder whose cache holds n tokens.

    A captured step attends over its whole cache, so the cache starts small (`min_len`) and doubles,
    capped at the model's context; each size is compiled once (a compile of gemma-3-270m's CPU step
    took ~35 s cold and ~5 s from inductor's on-disk cache), so a session compiles at most
    log2(context / min_len) + 1 times.
    """

    def __init__(self, model, mode: str = "compile", min_len: int = 1024, compile_options: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.model, self.mode, self.min_len, self.compile_options = model, mode, min_len, compile_options
        self.decoder: StaticDecoder | None = None

    def fit(self, need: int) -> StaticDecoder:
        """A decoder holding `need` tokens, or the model's context if that is less (`TokenGenerator`
        then reports the prompt that does not fit)."""
        context = self.model.config.max_position_embeddings
        need = min(need, context)
        if self.decoder is None or self.decoder.max_len < need:
            size = self.min_len
            while size < need:
                size *= 2
            self.decoder = None  # free the old cache before allocating the new one
            self.decoder = StaticDecoder(self.model, batch_size=1, max_len=min(size, context), mode=self.mode,
                                         compile_options=self.compile_options)
            if self.mode != "eager":
                self.decoder.warm_up()
        return self.decoder
