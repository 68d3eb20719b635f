"""Prefix reuse: K/V of token blocks that earlier sequences computed, for prompts that start the same way.

Requests often share a prompt prefix: a system prompt, tool declarations, the history of a chat.
`PrefixCache` keeps the K/V of every layer for blocks of `block` tokens in a fixed pool (vLLM's
hashed blocks; SGLang's radix tree), keyed by (parent block, the block's tokens), so a block is
found only after the exact same tokens from position 0: K/V depend on every token before them
and on their position. Inputs other than token ids (image or audio soft tokens) must extend the
key before they may share blocks.

- `save(row, tokens)`: after a prefill chunk and when a sequence ends, the complete blocks of a
  row that the pool lacks are copied into it.
- `load(row, tokens, limit)`: before prefill, the longest run of cached blocks of a prompt is
  copied into the row; the prompt's prefill starts after it.

Sliding layers (decided here): a ring holds only its row's last `window + headroom` positions,
so a block keeps its sliding-layer K/V only if they were still in the ring when it was saved.
Blocks saved during prefill always are (the engine keeps prefill chunks short enough:
`max_chunk`); blocks of a reply longer than the ring keep only their full-layer K/V. A prefix of m tokens is reusable when every
block before m has its full-layer K/V and the blocks covering the last window before m also have
their sliding-layer K/V: exactly what the next query can see. So a chat's next turn reuses its
whole history, and a shared system prompt is reused whatever followed it.

Memory is bounded by the pool (`tokens`); when it is full, the least recently used block that no
other cached block extends is evicted first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KVCache

BLOCK = 16


@dataclass
class _Block:
    id: int
    key: tuple
    ring: bool  # holds its sliding-layer K/V too
    used: int  # LRU clock
    children: int = 0


class PrefixCache:
    def __init__(self, cache: KVCache, tokens: int, block: int = BLOCK):
        if cache.headroom < block:
            raise ValueError(f"prefix reuse needs a ring headroom of at least one block ({block}), got {cache.headroom}")
        self.cache, self.block = cache, block
        self.capacity = max(tokens // block, 1)
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        for layer in cache.layers:
            if layer is None:
                self.k.append(None)
                self.v.append(None)
                continue
            rows, heads, _, dim = layer.k.shape
            self.k.append(layer.k.new_zeros(self.capacity, heads, block, dim))
            self.v.append(layer.v.new_zeros(self.capacity, heads, block, dim))
        self.blocks: dict[tuple, _Block] = {}
        self._ids: dict[int, _Block] = {}
        self._ring_from: dict[int, int] = {}  # row -> its first position whose sliding K/V are real
        self._free = list(range(self.capacity))
        self._clock = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, tokens whose K/V were reused

    @property
    def tokens(self) -> int:
        """Tokens held (whole blocks)."""
        return len(self.blocks) * self.block

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    # -- lookup -----------------------------------------------------------------------------------
    def _chain(self, tokens: list[int], n_blocks: int) -> list[_Block]:
        chain, parent = [], -1
        B = self.block
        for i in range(n_blocks):
            b = self.blocks.get((parent, tuple(tokens[i * B : (i + 1) * B])))
            if b is None:
                break
            chain.append(b)
            parent = b.id
        return chain

    def max_chunk(self) -> int:
        """The longest prefill chunk after which every block it completed is still whole in every
        ring (a block may have begun in the chunk before): the smallest ring less a block, plus 1."""
        rings = [layer.size for layer in self.cache.layers if layer is not None and layer.ring]
        return min(rings) - self.block + 1 if rings else 1 << 30

    def _window(self) -> int:
        """The widest sliding window among ring layers (0 if none)."""
        return max((spec.window for spec, layer in zip(self.cache.config.layers, self.cache.layers)
                    if layer is not None and layer.ring), default=0)

    def load(self, row: int, tokens: list[int], limit: int, resumable=None) -> int:
        """Copy the K/V of the longest reusable cached prefix of `tokens` (at most `limit` tokens)
        into `row` (empty); return its length m (the row then holds positions 0..m-1).
        `resumable(m)`: whether the prompt may go on from m (not inside an image)."""
        self.queries += limit
        self._ring_from[row] = 0
        B, W = self.block, self._window()
        chain = self._chain(tokens, limit // B)
        m = 0
        for j in range(len(chain), 0, -1):  # the longest prefix whose last window has sliding K/V
            first = max(0, j * B - W + 1) // B if W else j
            if all(b.ring for b in chain[first:j]) and (resumable is None or resumable(j * B)):
                m = j * B
                break
        if not m:
            return 0
        used = chain[: m // B]
        for b in used:
            self._touch(b)
        self.cache.ensure(m)
        first_ring = max(0, m - W + 1) // B if W else len(used)
        for i, layer in enumerate(self.cache.layers):
            if layer is None:
                continue
            blocks = used[first_ring:] if layer.ring else used
            start = (first_ring if layer.ring else 0) * B
            ids = torch.tensor([b.id for b in blocks], device=layer.k.device)
            positions = torch.arange(start, m, device=layer.k.device)
            idx = positions % layer.size if layer.ring else positions
            for buf, pool in ((layer.k, self.k[i]), (layer.v, self.v[i])):
                src = pool[ids].permute(1, 0, 2, 3).reshape(buf.shape[1], len(blocks) * B, buf.shape[3])
                buf[row].index_copy_(1, idx, src)
            layer.pos[row].index_copy_(0, idx, positions)
        self.cache.lengths[row] = m
        self._ring_from[row] = first_ring * B
        self.hits += m
        return m

    # -- storing ----------------------------------------------------------------------------------
    def save(self, row: int, tokens: list[int]) -> None:
        """Store the complete blocks of `row`, which holds `tokens` (positions 0..len-1), that the
        pool lacks (and the sliding-layer K/V of cached blocks that lacked them and are in the ring)."""
        B, length = self.block, len(tokens)
        in_ring = [layer.size for layer in self.cache.layers if layer is not None and layer.ring]
        # The oldest position every ring still holds (and not before what `load` put there).
        oldest = max(length - min(in_ring), self._ring_from.get(row, 0)) if in_ring else 0
        parent, pinned = -1, set()
        full: list[tuple[int, int]] = []  # (block id, first position) whose full-layer K/V to copy
        ring: list[tuple[int, int]] = []  # ... whose sliding-layer K/V to copy
        for i in range(length // B):
            key = (parent, tuple(tokens[i * B : (i + 1) * B]))
            has_ring = i * B >= oldest
            b = self.blocks.get(key)
            if b is None:
                block_id = self._allocate(pinned)
                if block_id is None:
                    break
                b = self.blocks[key] = _Block(block_id, key, has_ring, 0)
                self._ids[block_id] = b
                if parent >= 0:
                    self._ids[parent].children += 1
                full.append((b.id, i * B))
                if has_ring:
                    ring.append((b.id, i * B))
            elif has_ring and not b.ring:
                b.ring = True
                ring.append((b.id, i * B))
            self._touch(b)
            pinned.add(b.id)
            parent = b.id
        for i, layer in enumerate(self.cache.layers):
            todo = (ring if layer.ring else full) if layer is not None else []
            if not todo:
                continue
            ids = torch.tensor([b for b, _ in todo], device=layer.k.device)
            positions = torch.cat([torch.arange(p, p + B) for _, p in todo]).to(layer.k.device)
            idx = positions % layer.size if layer.ring else positions
            for buf, pool in ((layer.k, self.k[i]), (layer.v, self.v[i])):
                src = buf[row].index_select(1, idx)  # [H, n * B, d]
                pool.index_copy_(0, ids, src.unflatten(1, (len(todo), B)).transpose(0, 1))

    def _touch(self, b: _Block) -> None:
        self._clock += 1
        b.used = self._clock

    def _allocate(self, pinned: set[int]) -> int | None:
        """A free block id, evicting the least recently used leaf block if the pool is full."""
        if self._free:
            return self._free.pop()
        leaves = [b for b in self.blocks.values() if b.children == 0 and b.id not in pinned]
        if not leaves:
            return None
        victim = min(leaves, key=lambda b: b.used)
        del self.blocks[victim.key]
        del self._ids[victim.id]
        parent = victim.key[0]
        if parent >= 0:
            self._ids[parent].children -= 1
        return victim.id
