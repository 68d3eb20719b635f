"""A slotted KV cache for continuous batching: one slot per sequence, each at its own length.

`KVCache` (cache.py) holds a batch whose rows advance together. Here every slot is an
independent sequence that is admitted, grows and is freed on its own, so the scheduler can add a
request to the running batch between two decode steps. Entries are addressed by token position:

- full layers: K/V [slots, Hkv, capacity, d]; the token at position p lives at index p. The
  capacity grows (doubling, up to `max_len`) as the longest sequence needs it, so memory follows use.
- sliding layers: a ring [slots, Hkv, window, d] per slot; position p lives at index p % window.
- KV-shared layers: nothing (they read their producer's K/V).

Every entry carries its position (-1 = empty), and attention masks are built from positions, so
slots at different lengths share one forward: a batch row whose query position is -1 (a slot
that is not decoding this step) writes nothing and its output is ignored. Freeing a slot resets
its positions to -1; the stale K/V values are never visible again.

A forward runs on a contiguous range of slots `[lo, hi)` (`view(lo, hi)`), so the K/V it reads
are views of the buffers, never gathered copies; the scheduler keeps live slots packed low.
"""

from __future__ import annotations

import torch

from ..config import TextConfig
from .cache import ContextLengthError


class _SlotLayer:
    """The K/V of one layer for all slots (full: capacity grows; sliding: a ring of `window`)."""

    def __init__(self, slots: int, heads: int, head_dim: int, size: int, window: int | None, dtype, device):
        self.window = window
        self.k = torch.zeros(slots, heads, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((slots, size), -1, dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def grow(self, size: int) -> None:
        old = self.size
        pad = (0, 0, 0, size - old)
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)
        self.pos = torch.nn.functional.pad(self.pos, (0, size - old), value=-1)

    def write(self, lo: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store k/v [B, H, T, d] of rows lo.. at their positions; rows/tokens at -1 write nothing."""
        valid = pos >= 0
        if self.window is not None:  # of a chunk longer than the ring, only the last `window` tokens stay
            valid &= pos > pos.max(dim=1, keepdim=True).values - self.window
        if not bool(valid.any()):
            return
        B, T = pos.shape
        rows = (torch.arange(B, device=pos.device)[:, None].expand(B, T) + lo)[valid]
        p = pos[valid]
        idx = p % self.window if self.window is not None else p
        self.k[rows, :, idx] = k.transpose(1, 2)[valid]
        self.v[rows, :, idx] = v.transpose(1, 2)[valid]
        self.pos[rows, idx] = p


class _LayerView:
    """What attention sees of one layer for the rows [lo, hi) of a forward (the LayerCache protocol)."""

    def __init__(self, layer: _SlotLayer, lo: int, hi: int):
        self.layer, self.lo, self.hi = layer, lo, hi

    def update(self, k, v, pos):
        L, lo, hi = self.layer, self.lo, self.hi
        if L.window is not None and k.shape[2] > 1:
            # A chunk's early queries still need the ring entries the chunk is about to overwrite.
            seen = (torch.cat([L.k[lo:hi], k], 2), torch.cat([L.v[lo:hi], v], 2), torch.cat([L.pos[lo:hi], pos], 1))
            L.write(lo, k, v, pos)
            return seen
        L.write(lo, k, v, pos)
        if L.window is not None:
            # The entry a single token overwrites held position q - window, outside its window anyway.
            return L.k[lo:hi], L.v[lo:hi], L.pos[lo:hi]
        end = int(pos.max()) + 1  # no row of this forward looks past its own (newest) position
        return L.k[lo:hi, :, :end], L.v[lo:hi, :, :end], L.pos[lo:hi, :end]


class _ModelView:
    """The ModelCache protocol for one forward over slots [lo, hi) (positions are always explicit)."""

    def __init__(self, cache: "SlotKVCache", lo: int, hi: int):
        self.cache, self.lo, self.hi = cache, lo, hi

    def reserve(self, n: int) -> int:
        return 0  # capacity is ensured by the scheduler before the forward; positions are explicit

    def layer(self, index: int):
        layer = self.cache.layers[index]
        return None if layer is None else _LayerView(layer, self.lo, self.hi)


class SlotKVCache:
    """K/V for `num_slots` independent sequences of up to `max_len` tokens each."""

    def __init__(self, config: TextConfig, num_slots: int, max_len: int, dtype=torch.float32, device=None,
                 initial_len: int = 256):
        if max_len > config.max_position_embeddings:
            raise ContextLengthError(
                f"a slot of {max_len} tokens exceeds the model's context of {config.max_position_embeddings} tokens"
            )
        self.num_slots, self.max_len = num_slots, max_len
        self.capacity = min(initial_len, max_len)
        self.layers: list[_SlotLayer | None] = []
        for spec in config.layers:
            if spec.shares_kv:
                self.layers.append(None)
            elif spec.window is not None:
                w = min(spec.window, max_len)
                self.layers.append(_SlotLayer(num_slots, spec.num_kv_heads, spec.head_dim, w, w, dtype, device))
            else:
                self.layers.append(
                    _SlotLayer(num_slots, spec.num_kv_heads, spec.head_dim, self.capacity, None, dtype, device)
                )

    def ensure(self, length: int) -> None:
        """Make room for positions < length in every slot (grows the full layers by doubling)."""
        if length > self.max_len:
            raise ContextLengthError(f"{length} tokens do not fit in a slot of {self.max_len} tokens")
        if length <= self.capacity:
            return
        size = self.capacity
        while size < length:
            size *= 2
        self.capacity = min(size, self.max_len)
        for layer in self.layers:
            if layer is not None and layer.window is None:
                layer.grow(self.capacity)

    def view(self, lo: int, hi: int) -> _ModelView:
        return _ModelView(self, lo, hi)

    def free(self, slot: int) -> None:
        """Forget a slot's tokens (its K/V become invisible; the memory is reused by the next owner)."""
        for layer in self.layers:
            if layer is not None:
                layer.pos[slot] = -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer is not None
                   for t in (layer.k, layer.v, layer.pos))
