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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import kv_store_layers
from .cache import DEFAULT_HEADROOM
from .draft import Draft
from .sampling import draw


class MTPDrafter:
    needs_hidden = True
    # Its sliding layers read W + 1 keys before p, one more than the target's window: a verify step
    # of k drafts overwrites ring entries up to p + k - (W + headroom), so k < headroom.
    ring_reach = 1

    def __init__(self, drafter, target, default_k: int | None = None):
        from ..weights.drafter import check_fits

        check_fits(drafter.config, target.config)
        self.model, self.target = drafter, target
        self.default_k = min(default_k, DEFAULT_HEADROOM - self.ring_reach) if default_k else None
        self.store = {t: spec.index for t, spec in kv_store_layers(target.config).items()}

    @classmethod
    def load(cls, source, target) -> MTPDrafter:
        """From a drafter checkpoint (a path or Hub id: its weights in the target's dtype and
        device, k from its generation_config.json) or an already loaded drafter model."""
        if isinstance(source, torch.nn.Module):
            return cls(source, target)
        from ..weights.drafter import load_drafter
        from ..weights.hub import resolve

        param = next(target.parameters())
        path = resolve(source)
        drafter = load_drafter(path, target.config, dtype=param.dtype, device=param.device)
        return cls(drafter, target, _num_assistant_tokens(Path(path)))

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
        for step in range(max(ks)):
            out = self.model.step(self.target.model.embed(ids), h, kv, p)
            ids, h = out.logits.argmax(-1), out.hidden
            picked = ids.tolist()
            for i, s in enumerate(seqs):
                if step >= ks[i]:
                    continue
                r = s.row - lo
                if not s.sampler.params.greedy:
                    processed = s.sampler.process(out.logits[r])
                    picked[r] = draw(processed, s.sampler.generator)
                    probs[i].append(processed.softmax(-1))
                tokens[i].append(picked[r])
            ids = torch.tensor(picked, device=device)
        return [Draft(t, torch.stack(q) if q else None) for t, q in zip(tokens, probs)]


def _num_assistant_tokens(path: Path) -> int | None:
    """The drafter's own draft length: `num_assistant_tokens` of its generation_config.json."""
    try:
        k = json.loads((path / "generation_config.json").read_text()).get("num_assistant_tokens")
    except (OSError, ValueError, AttributeError):
        return None
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None
