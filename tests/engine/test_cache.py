"""Cached decoding equals one full forward, past the sliding window and through KV sharing."""

import pytest
import torch

from gemma4.engine.cache import DEFAULT_HEADROOM, ContextLengthError, KVCache
from gemma4.variants import variant
from testing_utils import random_model

ALL = ["tiny-e2b", "tiny-e4b", "tiny-12b", "tiny-26b-a4b", "tiny-31b", "tiny-gemma-3-270m", "tiny-gemma-3-4b"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("headroom", [1, DEFAULT_HEADROOM])
def test_cached_decode_equals_full_forward(name, headroom):
    """In float64, so the check is of the caching (the two agree to ~1e-14) and not of fp32 summation
    order, which alone moved a tiny-e4b logit by 1.0e-4 on an AVX-512 Xeon (fp32 parity with the
    reference is tests/model/test_parity.py's). A headroom of 1 makes the sliding layers rings that
    wrap (window + 1 < T), where a chunk of 5 attends to the ring as it was and one of 2 is written first."""
    model = random_model(name).double()
    window = model.config.sliding_window
    T = 3 * window + 2  # three windows and more
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, rows=2, max_len=T, dtype=torch.float64, headroom=headroom)
        pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:7], cache=cache)]  # chunked prefill
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(7, T)]  # token by token
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)


def test_cached_decode_with_left_padding():
    model = random_model("tiny-e2b")
    ids = torch.randint(1, 128, (2, 14))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.config, rows=2, max_len=14, headroom=1)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
        steps = [model(ids[:, :6], positions=pos[:, :6], cache=cache)]
        steps += [model(ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache) for t in range(6, 14)]
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[0, 4:], full[0, 4:], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], full[1], rtol=0, atol=1e-4)


def test_kv_shared_layers_get_no_cache():
    cfg = variant("tiny-e2b")
    cache = KVCache(cfg, 1, 16, headroom=2)
    assert [c is None for c in cache.layers] == [s.shares_kv for s in cfg.layers]
    # Sliding layers: a ring of window + headroom entries, plus the sink.
    assert all(c.ring and c.k.shape[2] == cfg.sliding_window + 2 + 1
               for c, s in zip(cache.layers, cfg.layers) if c and s.window)


def test_overflowing_the_cache_is_a_clear_error():
    model = random_model("tiny-gemma-3-270m")
    cache = KVCache(model.config, 1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ContextLengthError, match="maximum context length is 8 tokens"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_cache_longer_than_context_is_refused():
    cfg = variant("tiny-gemma-3-270m")
    with pytest.raises(ContextLengthError, match="maximum context length is 512 tokens"):
        KVCache(cfg, 1, 513)


def test_position_past_context_is_refused():
    model = random_model("tiny-gemma-3-270m")
    with pytest.raises(ValueError, match="maximum context length is 512 tokens"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[511, 512]]))
