"""KV caches, one object per layer, chosen by layer type (spec 1.5, 1.11).

- Sliding layers: a ring buffer of `window` slots. A chunk of new tokens attends over the old
  ring plus itself; then its last `window` entries overwrite the oldest slots.
- Full layers: a preallocated buffer of `max_len` slots.
- KV-shared layers: nothing; they read their producer's K/V.

Every slot carries the position of its token (-1 = empty or padding), so attention masks are
built from positions and the ring's slot order never matters.
"""

from __future__ import annotations

import torch

from ..config import TextConfig


class ContextLengthError(ValueError):
    """More tokens than the cache (or the model's context) can hold."""


class _Buffers:
    def __init__(self, batch: int, heads: int, slots: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)

    def write(self, idx, k, v, pos) -> None:
        self.k[:, :, idx] = k
        self.v[:, :, idx] = v
        self.pos[:, idx] = pos


class FullCache(_Buffers):
    """Preallocated K/V for a global-attention layer."""

    def __init__(self, batch, heads, max_len, head_dim, dtype, device):
        super().__init__(batch, heads, max_len, head_dim, dtype, device)
        self.length = 0

    def update(self, k, v, pos):
        end = self.length + k.shape[2]
        self.write(slice(self.length, end), k, v, pos)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:, :end]


class RingCache(_Buffers):
    """The last `window` K/V of a sliding-window layer."""

    def __init__(self, batch, heads, window, head_dim, dtype, device):
        super().__init__(batch, heads, window, head_dim, dtype, device)
        self.window = window
        self.written = 0

    def update(self, k, v, pos):
        T, W = k.shape[2], self.window
        if T == 1:
            # The slot overwritten holds position q - W, which the window excludes anyway.
            self.write(self.written % W, k[:, :, 0], v[:, :, 0], pos[:, 0])
            self.written += 1
            return self.k, self.v, self.pos
        # Early queries of a chunk still need the entries the chunk is about to overwrite.
        seen = (torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), torch.cat([self.pos, pos], dim=1))
        n = min(T, W)
        idx = (torch.arange(self.written + T - n, self.written + T, device=k.device)) % W
        self.write(idx, k[:, :, T - n :], v[:, :, T - n :], pos[:, T - n :])
        self.written += T
        return seen


class KVCache:
    """The caches of all layers for a batch of sequences that advance together.

    `max_len` bounds the number of slots (prompt + generated, padding included); going past it
    raises ContextLengthError instead of silently dropping context.
    """

    def __init__(self, config: TextConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        if max_len > config.max_position_embeddings:
            raise ContextLengthError(
                f"requested cache of {max_len} tokens exceeds the model's context of "
                f"{config.max_position_embeddings} tokens"
            )
        self.max_len = max_len
        self.length = 0
        self.layers: list[FullCache | RingCache | None] = []
        for spec in config.layers:
            if spec.shares_kv:
                self.layers.append(None)
            elif spec.window is not None:
                self.layers.append(
                    RingCache(batch_size, spec.num_kv_heads, min(spec.window, max_len), spec.head_dim, dtype, device)
                )
            else:
                self.layers.append(FullCache(batch_size, spec.num_kv_heads, max_len, spec.head_dim, dtype, device))

    def reserve(self, n: int) -> int:
        if self.length + n > self.max_len:
            raise ContextLengthError(
                f"{self.length + n} tokens do not fit in a cache of {self.max_len} (already holding {self.length}); "
                "start a new sequence or allocate a longer cache"
            )
        start, self.length = self.length, self.length + n
        return start

    def layer(self, index: int):
        return self.layers[index]
