"""The MTP drafter as an engine `Drafter` (spec 5): the model math is gemma4/model/drafter.py; this
adapter feeds it from the engine's state.

For each drafting row, at p = the position of its newest token t_p (the cache holds positions < p):
  - the target's K/V of its store layers (`kv_store_layers`), sliced from the engine's cache for
    the rows at once (views, no copy; entries at positions >= p, e.g. drafts of the last step, are
    masked by the drafter);
  - h: the target's final-normed hidden state that predicted t_p (`seq.spec.hidden`, kept by the
    engine's prefill and verify steps, since `needs_hidden`);
  - the target's scaled embedding of t_p, then of each draft.
k steps from the same p. A greedy row drafts the argmax; a sampling row draws each draft from the
drafter's distribution after its own sampling settings, and passes that distribution on, so
rejection sampling keeps the target's distribution.

On the CPU fast path (a target packed by `engine.cpu.speed_up`) a drafter must cost a small
fraction of a target step, and a full-width tied head over 262144 tokens costs more than the
target's body. So the drafter's linears are packed for fbgemm in int8 (per-row int8 activations, as
the target's head: a quarter of fp32's bytes; its rounding moves drafts, never the output), and a
dense-head drafter with a draft vocabulary (`draft_vocabulary.json`, written by `finetune
--drafter`: the tokens of its training prompts and answers) scores only that vocabulary plus the
row's own tokens (`ShortlistHead`). Every other token gets probability 0 in the draft: a greedy row
drafts the argmax over the shortlist, a sampling row draws from the softmax over it (after its
sampling settings) and passes exactly that q on, so the output is unchanged either way; a token
outside the shortlist is simply never drafted.

A greedy row stops drafting at the first token the drafter gives less than `min_confidence` of its
probability (the draft ends before it): a doubtful draft is usually rejected, and each drafted token
costs the verify forward a position and the drafter a step. Only the number of drafts changes, never
the output (the target verifies every token; sampling rows keep their k, whose q is exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import kv_store_layers
from .attend import swap_attention
from .cache import DEFAULT_HEADROOM
from .cpu import PackedLinear, fbgemm_works, pack_linears
from .draft import Draft
from .norm import swap_norms
from .sampling import draw

# A greedy row's drafts end before a token the drafter gives less than this probability
# (measured on gemma-3-270m with a trained drafter: docs/speculative.md).
DEFAULT_MIN_CONFIDENCE = 0.3


class MTPDrafter:
    needs_hidden = True
    # Its sliding layers read W + 1 keys before p, one more than the target's window: a verify step
    # of k drafts overwrites ring entries up to p + k - (W + headroom), so k < headroom.
    ring_reach = 1

    def __init__(self, drafter, target, default_k: int | None = None, vocabulary: list[int] | None = None,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE):
        """`vocabulary`: the draft vocabulary a dense-head drafter scores (`ShortlistHead`); None: all.
        `min_confidence`: a greedy row's drafts end before a token of lower drafter probability (0: never)."""
        if not 0 <= min_confidence < 1:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        self.min_confidence = min_confidence
        from ..weights.drafter import check_fits

        check_fits(drafter.config, target.config)
        self.model, self.target = drafter, target
        self.default_k = min(default_k, DEFAULT_HEADROOM - self.ring_reach) if default_k else None
        self.store = {t: spec.index for t, spec in kv_store_layers(target.config).items()}
        self.head = None
        if vocabulary is not None and drafter.masked_embedding is None:
            self.head = ShortlistHead(drafter.model.embed_tokens.weight, vocabulary, packed=_packed(drafter))

    @classmethod
    def load(cls, source, target) -> MTPDrafter:
        """From a drafter checkpoint (a path or Hub id: its weights in the target's dtype and
        device, k from its generation_config.json) or an already loaded drafter model."""
        if isinstance(source, torch.nn.Module):
            return cls(source, target)
        from ..weights.drafter import load_drafter, read_vocabulary
        from ..weights.hub import resolve

        param = next(target.parameters())
        path = resolve(source)
        drafter = load_drafter(path, target.config, dtype=param.dtype, device=param.device)
        fast = _packed(target) and param.dtype == torch.float32 and fbgemm_works("fp16")
        if fast:  # the target runs on the CPU fast path: so does the drafter, in int8 (it only moves acceptance)
            pack_linears(drafter, "int8-dynamic" if fbgemm_works("int8-dynamic") else "fp16", head=None)
            swap_norms(drafter)  # as the target's: ~25 norms a draft step
            swap_attention(drafter)
        vocabulary = read_vocabulary(path, target.config.vocab_size) if fast else None
        return cls(drafter, target, _num_assistant_tokens(Path(path)), vocabulary)

    def propose(self, engine, seqs, ks) -> list[Draft]:
        cache, device = engine.cache, engine.device
        lo, hi = min(s.row for s in seqs), max(s.row for s in seqs) + 1
        end = max(s.fed for s in seqs)
        kv = {}
        for t, index in self.store.items():
            layer = cache.layers[index]
            n = layer.size if end > layer.size else end
            kv[t] = (layer.k[lo:hi, :, :n], layer.v[lo:hi, :, :n], layer.pos[lo:hi, :n])
        D = self.target.config.hidden_size
        ids = torch.zeros(hi - lo, dtype=torch.long)
        p = torch.full((hi - lo,), -1, dtype=torch.long)
        h = torch.zeros(hi - lo, D, dtype=engine.dtype, device=device)
        for s in seqs:
            ids[s.row - lo], p[s.row - lo] = s.tokens[-1], s.fed
            h[s.row - lo] = s.spec.hidden
        ids, p = ids.to(device), p.to(device)
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        done = [False] * len(seqs)
        context = None
        if self.head is not None:
            self.head.start([s.tokens for s in seqs], [s.row - lo for s in seqs], hi - lo)
            context = self.model.model.context(p[:, None], kv, h.dtype)  # RoPE and masks: one p for the round
        for step in range(max(ks)):
            embeds = self.target.model.embed(ids)
            if self.head is None:  # no draft vocabulary (a released drafter, or off the fast path): the full head
                out = self.model.step(embeds, h, kv, p)
                logits, h = out.logits, out.hidden
                confidence, best = logits.float().softmax(-1).max(-1)
                picked = best.tolist()
            else:
                z, h = self.model.run(embeds[:, None], h[:, None], kv, p[:, None], context)
                z, h, logits = z[:, 0], h[:, 0], None
                picked, confidence = self.head(z)
            confidence = confidence.tolist()
            for i, s in enumerate(seqs):
                if step >= ks[i] or done[i]:
                    done[i] = True
                    continue
                r = s.row - lo
                if s.sampler.params.greedy and confidence[r] < self.min_confidence:
                    done[i] = True
                    continue
                if not s.sampler.params.greedy:
                    row = logits[r] if logits is not None else self.head.full(z, r)
                    processed = s.sampler.process(row)
                    if not processed.isfinite().any():  # the sampling settings remove every drafted token
                        done[i] = True
                        continue
                    picked[r] = draw(processed, s.sampler.generator)
                    probs[i].append(processed.softmax(-1))
                tokens[i].append(picked[r])
            if all(done[i] or step + 1 >= ks[i] for i in range(len(seqs))):
                break
            ids = torch.tensor(picked, device=device)
        return [Draft(t, torch.stack(q) if q else None) for t, q in zip(tokens, probs)]


class ShortlistHead:
    """The drafter's tied head over a draft vocabulary plus each row's own tokens (prompt and output
    so far, which hold the names and words a continuation repeats): on gemma-3-270m ~10^4 of 262144
    rows, a few MB per step instead of 671 MB (fp32) or 168 MB (int8). `start` sets the rows of a
    round; `__call__` gives each row's argmax over its candidates, `full` a row's logits [V] with
    -inf outside them (the distribution a sampling row drafts from)."""

    def __init__(self, table: torch.Tensor, vocabulary: list[int], packed: bool = False):
        self.table = table
        self.ids = torch.tensor(sorted(set(vocabulary)), dtype=torch.long, device=table.device)
        rows = table[self.ids]
        self.linear = PackedLinear(rows, "fp16") if packed else (lambda z, w=rows: z @ w.T)
        self.known = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device)
        self.known[self.ids] = True

    def start(self, tokens: list[list[int]], rows: list[int], batch: int) -> None:
        """Each row's extra candidates: its tokens outside the vocabulary (a mask over their union)."""
        own = [torch.tensor(t, dtype=torch.long, device=self.table.device).unique() for t in tokens]
        own = [t[~self.known[t]] for t in own]
        self.extra = torch.cat(own).unique() if own else self.ids[:0]
        self.mask = torch.zeros(batch, len(self.extra), dtype=torch.bool, device=self.table.device)
        for r, t in zip(rows, own):
            self.mask[r] = torch.isin(self.extra, t)
        self.extra_rows = self.table[self.extra]

    def _scores(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fixed = self.linear(z).float()
        extra = (z @ self.extra_rows.T).float().masked_fill(~self.mask, float("-inf"))
        return fixed, extra

    def __call__(self, z: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """z [B, d] -> each row's best candidate id, and its probability among the candidates."""
        confidence, best = torch.cat(self._scores(z), -1).softmax(-1).max(-1)
        return torch.cat([self.ids, self.extra])[best].tolist(), confidence

    def full(self, z: torch.Tensor, row: int) -> torch.Tensor:
        """Row `row`'s logits over the whole vocabulary: its candidates' scores, -inf elsewhere."""
        fixed, extra = self._scores(z[row : row + 1])
        out = torch.full((self.table.shape[0],), float("-inf"), device=z.device)
        out[self.ids] = fixed[0]
        keep = self.mask[row]
        out[self.extra[keep]] = extra[0, keep]
        return out


def _packed(model) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def _num_assistant_tokens(path: Path) -> int | None:
    """The drafter's own draft length: `num_assistant_tokens` of its generation_config.json."""
    try:
        k = json.loads((path / "generation_config.json").read_text()).get("num_assistant_tokens")
    except (OSError, ValueError, AttributeError):
        return None
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None
