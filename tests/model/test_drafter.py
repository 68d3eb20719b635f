"""The MTP drafter against transformers 5.23 (fp32, through the production loader), and its contract
with the engine's cache: shared K/V in ring order, with stale entries at positions >= p."""

import pytest
import torch
from drafter_helpers import hf_drafter, kv_sharing_patched
from testing_utils import random_model

from gemma4.config import kv_store_layers
from gemma4.engine.cache import KVCache
from gemma4.weights.drafter import load_drafter

PAIRS = {"tiny-e2b-assistant": "tiny-e2b", "tiny-31b-assistant": "tiny-31b", "tiny-12b-assistant": "tiny-12b"}
L = 13  # prompt length: over three sliding windows (4)


def _setup(tmp_path, name):
    ref = hf_drafter(name)
    with kv_sharing_patched():
        ref.save_pretrained(tmp_path / name)
    target = random_model(PAIRS[name])
    ours = load_drafter(tmp_path / name, target.config, dtype=torch.float32)
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = target.decode(ids)
    return ref, ours, target, ids, out


@pytest.mark.parametrize("name", list(PAIRS))
def test_drafter_matches_reference(tmp_path, name):
    """Three chained draft steps for rows at several positions p, batched with per-row p (ours) and
    one row at a time with the K/V cropped to positions < p (the reference)."""
    ref, ours, target, ids, out = _setup(tmp_path, name)
    ps = torch.tensor([3, 5, 6, 9, L])  # inside the first window, just past it (W + 1 = 5 keys), far past it
    B = len(ps)
    kv = {t: (k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), pos.expand(B, -1))
          for t, (k, v, pos) in out.shared_kv.items()}
    first = torch.randint(0, 128, (B,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        our_tokens, our_logits = ours.draft(target.model.embed, first, out.hidden[0, ps - 1], kv, ps, 3)
        h = out.hidden[0, ps - 1]
        states = [out.hidden[:, p - 1 : p] for p in ps.tolist()]  # the reference's h, row by row
        for step in range(3):
            mine = ours.step(target.model.embed(our_tokens[:, step - 1] if step else first), h, kv, ps)
            h = mine.hidden
            for row, p in enumerate(ps.tolist()):
                tok = first[row : row + 1, None] if step == 0 else our_tokens[row : row + 1, step - 1 : step]
                got = ref(inputs_embeds=torch.cat([target.model.embed(tok), states[row]], -1),
                          position_ids=torch.tensor([[p]]),
                          shared_kv_states={t: (k[:, :, :p], v[:, :, :p]) for t, (k, v, _) in out.shared_kv.items()})
                assert got.logits.abs().max() > 1.0
                torch.testing.assert_close(mine.logits[row], got.logits[0, 0], rtol=0, atol=1e-4)
                torch.testing.assert_close(mine.hidden[row], got.last_hidden_state[0, 0], rtol=0, atol=1e-4)
                torch.testing.assert_close(our_logits[row, step], mine.logits[row], rtol=0, atol=1e-5)
                assert got.logits[0, 0].argmax() == our_tokens[row, step]
                states[row] = got.last_hidden_state


@pytest.mark.parametrize("name", ["tiny-e2b-assistant", "tiny-31b-assistant"])
def test_cache_slices_are_a_valid_input(tmp_path, name):
    """The K/V a `KVCache` holds (a wrapped ring, entries in slot order, K/V of positions >= p still
    present) give the drafter exactly what a plain forward's K/V give."""
    _, ours, target, ids, out = _setup(tmp_path, name)
    cache = KVCache(target.config, rows=1, max_len=64, headroom=4)  # 3 drafts + 1
    extra = torch.randint(0, 128, (1, 3))
    with torch.no_grad():
        target.decode(torch.cat([ids, extra], 1), cache=cache)  # 3 tokens past p = L, not rolled back
        sliced = {}
        for t, spec in kv_store_layers(target.config).items():
            layer = cache.layers[spec.index]
            sliced[t] = (layer.k[:, :, : layer.size], layer.v[:, :, : layer.size], layer.pos[:, : layer.size])
        assert sliced["sliding_attention"][2].shape[1] < L  # a ring shorter than the sequence: it wrapped
        p = torch.tensor([L])
        args = (target.model.embed(ids[:, -1]), out.hidden[:, -1])
        want = ours.step(*args, out.shared_kv, p)
        got = ours.step(*args, sliced, p)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)  # key order: float noise
    torch.testing.assert_close(got.hidden, want.hidden, rtol=0, atol=1e-4)


def test_saved_drafter_loads_in_transformers(tmp_path):
    """`save_drafter` writes the released layout: transformers reads it back to the same outputs."""
    from transformers.models.gemma4_assistant import Gemma4AssistantForCausalLM

    from gemma4.weights.drafter import save_drafter

    _, ours, target, ids, out = _setup(tmp_path, "tiny-e2b-assistant")
    save_drafter(tmp_path / "ours", ours)
    with kv_sharing_patched():
        back = Gemma4AssistantForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    p = L
    with torch.no_grad():
        mine = ours(target.model.embed(ids[:, -1:]), out.hidden[:, -1:], out.shared_kv, torch.tensor([[p]]))
        got = back(inputs_embeds=torch.cat([target.model.embed(ids[:, -1:]), out.hidden[:, -1:]], -1),
                   position_ids=torch.tensor([[p]]),
                   shared_kv_states={t: (k, v) for t, (k, v, _) in out.shared_kv.items()})
    torch.testing.assert_close(mine.logits, got.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(mine.hidden, got.last_hidden_state, rtol=0, atol=1e-4)
