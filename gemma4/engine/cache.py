"""The KV cache: one object for every caller (a batch of prompts, the server's slots, a compiled
step, the verify step of speculative decoding, prefix reuse). Spec 1.5 and 1.11.

Rows are independent sequences, each at its own length. Per layer, by type (`_layer_size`):
- sliding layers: a ring of `window + headroom` entries; the token at position p lives at p % size;
- full layers: a buffer of `capacity` entries (grown by doubling up to `max_len`); p lives at p;
- KV-shared layers: nothing (they read their producer's K/V).

Every entry carries its position (-1 = empty) and attention masks are built from positions, so
entry order never matters. Each buffer has one more entry, the sink (index `size`): tokens at
position -1 (padding, inert rows) are written there, so one write routine serves every forward and
never branches on data (a compiled or CUDA-graph step can run it). The sink is never read.

The headroom is what makes rolling back possible: `truncate(row, n)` forgets a row's last n
positions on every layer type, and a ring still holds the whole window of the next query as long
as n <= headroom, across a wrap too. It also lets a chunk of up to headroom + 1 tokens (a verify
step) be written before it is attended to; longer chunks attend to the ring as it was plus themselves.
"""

from __future__ import annotations

import torch

from ..config import ContextLengthError, TextConfig, check_context  # noqa: F401 - ContextLengthError re-exported

# Ring entries beyond the window: the most a row can be rolled back (speculative decoding drafts
# fewer), and enough that prefix blocks of 16 tokens near a row's end are still whole in the ring.
DEFAULT_HEADROOM = 32


class _Slots:
    """The entry positions [rows, size + 1] shared by every layer of one geometry (size, ring):
    all of them write the same positions in a forward, so they are stored, written and rolled
    back once. The last entry is the sink."""

    def __init__(self, rows: int, size: int, ring: bool, device):
        self.size, self.ring = size, ring
        self.pos = torch.full((rows, size + 1), -1, dtype=torch.long, device=device)

    def grow(self, size: int) -> None:
        pos = self.pos.new_full((self.pos.shape[0], size + 1), -1)
        pos[:, : self.size] = self.pos[:, : self.size]
        self.pos, self.size = pos, size


class _Layer:
    """K/V [rows, heads, size + 1, head_dim] of one layer (the last entry is the sink); its
    positions are its geometry's `_Slots`. `ring`: positions wrap modulo `size` (sliding layers)."""

    def __init__(self, slots: _Slots, rows: int, heads: int, head_dim: int, dtype, device):
        self.slots = slots
        self.k = torch.zeros(rows, heads, slots.size + 1, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._views()

    size = property(lambda self: self.slots.size)
    ring = property(lambda self: self.slots.ring)
    pos = property(lambda self: self.slots.pos)

    def _views(self) -> None:
        # [rows, entries, heads, d] views of the buffers: writes index (row, entry) pairs.
        self.k_rows, self.v_rows = self.k.transpose(1, 2), self.v.transpose(1, 2)

    def grow(self, old: int) -> None:
        """Follow the slots' new size (a full layer; contents kept, new entries empty)."""
        k = self.k.new_zeros(self.k.shape[0], self.k.shape[1], self.size + 1, self.k.shape[3])
        k[:, :, :old] = self.k[:, :, :old]
        v = torch.zeros_like(k)
        v[:, :, :old] = self.v[:, :, :old]
        self.k, self.v = k, v
        self._views()


class KVCache:
    """K/V of every layer for `rows` sequences of up to `max_len` tokens each.

    `static`: full layers are allocated at `max_len` at once and a forward attends over whole
    buffers (fixed shapes: what a compiled or captured step needs); otherwise full layers start at
    `initial_len` entries, double as rows grow, and a forward attends only up to its longest row.

    Used directly as a model's cache (`model(ids, cache=cache)`), rows 0..B-1 take a batch of B,
    and positions default to each row's next ones; the engine instead opens a `CacheView` on a
    range of rows for each forward, with explicit positions.
    """

    def __init__(self, config: TextConfig, rows: int, max_len: int, dtype=torch.float32, device=None, *,
                 headroom: int = DEFAULT_HEADROOM, static: bool = False, initial_len: int = 256):
        check_context(config.max_position_embeddings, max_len)
        self.config, self.rows, self.max_len = config, rows, max_len
        self.headroom, self.static, self.device = headroom, static, device
        self._open: CacheView | None = None  # the forward opened by `prepare` (direct use)
        self.lengths = [0] * rows  # tokens held by each row (positions 0..length-1), kept on the host
        self.capacity = max_len if static else min(initial_len, max_len)
        self.layers: list[_Layer | None] = []
        self.slots: dict[tuple[int, bool], _Slots] = {}  # by geometry: full layers, rings of each window
        for spec in config.layers:
            if spec.shares_kv:
                self.layers.append(None)
                continue
            ring = spec.window is not None and spec.window + headroom < max_len
            key = (spec.window + headroom, True) if ring else (0, False)
            if key not in self.slots:
                self.slots[key] = _Slots(rows, key[0] if ring else self.capacity, ring, device)
            self.layers.append(_Layer(self.slots[key], rows, spec.num_kv_heads, spec.head_dim, dtype, device))
        # The longest chunk a ring can take before attending (write first, then read the ring).
        self.write_first = headroom + 1

    # -- growth, rollback, bookkeeping ------------------------------------------------------------
    def ensure(self, length: int) -> None:
        """Make room for positions < length in every row (full layers grow by doubling)."""
        check_context(self.max_len, length)
        if length <= self.capacity:
            return
        old, size = self.capacity, self.capacity
        while size < length:
            size *= 2
        self.capacity = min(size, self.max_len)
        full = self.slots.get((0, False))
        if full is not None:
            full.grow(self.capacity)
            for layer in self.layers:
                if layer is not None and not layer.ring:
                    layer.grow(old)

    def truncate(self, row: int, n: int) -> None:
        """Forget the last n tokens of `row` on every layer. A ring keeps the window of the next
        query only if n <= headroom; more is refused unless it empties the row."""
        length = self.lengths[row]
        if not 0 <= n <= length:
            raise ValueError(f"cannot roll back {n} tokens of a row holding {length}")
        if n > self.headroom and n < length and any(slots.ring for slots in self.slots.values()):
            raise ValueError(f"a row can be rolled back by at most {self.headroom} tokens (the ring headroom), "
                             f"not {n}; build the cache with a larger headroom")
        keep = length - n
        for slots in self.slots.values():
            slots.pos[row].masked_fill_(slots.pos[row] >= keep, -1)
        self.lengths[row] = keep

    def reset(self, row: int) -> None:
        """Empty a row (its K/V become invisible; the memory is reused by the next sequence)."""
        for slots in self.slots.values():
            slots.pos[row] = -1
        self.lengths[row] = 0

    def tensors(self) -> list[torch.Tensor]:
        return ([t for layer in self.layers if layer is not None for t in (layer.k, layer.v)]
                + [slots.pos for slots in self.slots.values()])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # -- opening a forward ------------------------------------------------------------------------
    def view(self, lo: int = 0, hi: int | None = None, end: int | None = None) -> CacheView:
        """The rows [lo, hi) for one forward. `end`: one past the largest position any of them will
        hold after it (the engine knows it; attention then reads only that far); None on a static
        cache reads whole buffers."""
        return CacheView(self, lo, self.rows if hi is None else hi, end)

    def prepare(self, shape: tuple[int, int], positions: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The model-cache protocol, for direct use: a batch of B takes rows 0..B-1, and the rows'
        lengths are learnt from the positions (a device sync, which the engine's views avoid)."""
        self._open = CacheView(self, 0, shape[0], None, learn=True)
        return self._open.prepare(shape, positions, attention_mask)

    def layer(self, index: int):
        return self._open.layer(index)


class CacheView:
    """What one forward sees of a `KVCache`: rows [lo, hi), the model-cache protocol (`prepare`,
    `layer`). Write targets are computed once per forward per buffer geometry."""

    def __init__(self, cache: KVCache, lo: int, hi: int, end: int | None, learn: bool = False):
        self.cache, self.lo, self.hi, self.end, self.learn = cache, lo, hi, end, learn
        self._targets: dict[_Slots, torch.Tensor] = {}
        self._seen: dict[_Slots, torch.Tensor] = {}  # positions a long chunk attends to, by geometry
        self._rows: torch.Tensor | None = None

    def prepare(self, shape: tuple[int, int], positions: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Positions [B, T] of this forward's tokens: as given, or each row's next T (per
        `attention_mask`, left padding at -1). A direct use (`learn`) records the rows' new lengths."""
        c, lo, hi = self.cache, self.lo, self.hi
        if positions is None:
            start = torch.tensor(c.lengths[lo:hi], device=c.device)[:, None]
            if attention_mask is not None:
                mask = attention_mask.to(c.device).long()
                positions = (mask.cumsum(-1) - 1 + start).masked_fill(mask == 0, -1)
            else:
                positions = start + torch.arange(shape[1], device=c.device)
        if self.learn:
            lengths = [max(old, p + 1) for old, p in zip(c.lengths[lo:hi], positions.amax(1).tolist())]
            c.ensure(max(lengths))
            c.lengths[lo:hi] = lengths
            self.end = None if c.static else max(lengths)
        return positions

    def layer(self, index: int):
        layer = self.cache.layers[index]
        return None if layer is None else _LayerView(self, layer)

    def targets(self, slots: _Slots, pos: torch.Tensor) -> torch.Tensor:
        """Entry index of each token [B, T]: its slot, or the sink for position -1 (and, in a
        chunk longer than a ring, for all but each row's last `size` tokens). The first layer of
        a geometry to ask also writes the positions, once for all of them."""
        idx = self._targets.get(slots)
        if idx is None:
            valid = pos >= 0
            if slots.ring and pos.shape[1] > slots.size:
                valid = valid & (pos > pos.amax(1, keepdim=True) - slots.size)
            idx = self._targets[slots] = torch.where(valid, pos % slots.size if slots.ring else pos, slots.size)
            if slots.ring and pos.shape[1] > self.cache.write_first:  # attended before it is written
                n = self.readable(slots)
                self._seen[slots] = torch.cat([slots.pos[self.lo : self.hi, :n], pos], 1)
            self._put(slots.pos, idx, pos)
        return idx

    def _put(self, buf: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, rows_view=None) -> None:
        """Write `values` at entries `idx` [B, T] of rows [lo, hi) of `buf` (K/V [rows, H, entries, d]
        with values [B, H, T, d]; positions [rows, entries] with values [B, T]): an index_copy_
        along the entries for one row, else an index_put_ of (row, entry) pairs on `rows_view`,
        the buffer seen as [rows, entries, ...]."""
        if self.hi - self.lo == 1:
            buf[self.lo : self.hi].index_copy_(buf.dim() - 2 if buf.dim() == 4 else 1, idx[0], values)
        elif rows_view is None:
            buf.index_put_((self.rows(idx), idx), values)
        else:
            rows_view.index_put_((self.rows(idx), idx), values.transpose(1, 2))

    def rows(self, pos: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            self._rows = torch.arange(self.lo, self.hi, device=pos.device)[:, None].expand(pos.shape)
        return self._rows

    def readable(self, layer: _Layer | _Slots) -> int:
        """How many entries attention reads: up to the longest row, or the whole buffer (never the sink)."""
        if self.end is None or self.end > layer.size:
            return layer.size
        return self.end


class _LayerView:
    """The LayerCache protocol of one layer within a CacheView."""

    __slots__ = ("view", "layer")

    def __init__(self, view: CacheView, layer: _Layer):
        self.view, self.layer = view, layer

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store k/v [B, H, T, d] at their positions [B, T]: the one ring (and buffer) write."""
        view, layer = self.view, self.layer
        idx = view.targets(layer.slots, pos)
        view._put(layer.k, idx, k, layer.k_rows)
        view._put(layer.v, idx, v, layer.v_rows)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        view, layer = self.view, self.layer
        lo, hi = view.lo, view.hi
        if layer.ring and k.shape[2] > view.cache.write_first:
            # A long chunk's early queries still need the ring entries it is about to overwrite.
            n = view.readable(layer)
            k_seen, v_seen = torch.cat([layer.k[lo:hi, :, :n], k], 2), torch.cat([layer.v[lo:hi, :, :n], v], 2)
            self.write(k, v, pos)
            return k_seen, v_seen, view._seen[layer.slots]
        self.write(k, v, pos)
        n = view.readable(layer)
        return layer.k[lo:hi, :, :n], layer.v[lo:hi, :, :n], layer.pos[lo:hi, :n]
