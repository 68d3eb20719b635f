"""The decode core: rolling back, scoring k tokens in one forward, prefix reuse, one bad row.

Each fast or shortcut path against its plain path (STYLE habit 8): a row rolled back and continued
against a row that never took the detour; a k-token scoring step against k single steps; reused
prefix K/V against a prefill of the whole prompt.
"""

import threading

import pytest
import torch
from test_cache import ALL
from test_fast_paths import _rows, _step
from testing_utils import random_model

from gemma4.engine.core import Engine
from gemma4.engine.generate import Generation
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.scheduler import Scheduler
from gemma4.engine.sequence import GenerationRequest

GREEDY = SamplingParams(temperature=0)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(vocab, n, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ALL)
def test_rolling_back_on_every_layer_type_and_continuing_equals_a_fresh_run(name):
    """A row that, before each true token, takes a detour of 1-3 junk tokens (scored in one forward,
    then rolled back) gives the logits of a row fed only the true tokens, on every layer type: full
    layers, sliding layers whose ring (window 4 + headroom 3) wraps several times, KV-shared layers.
    Float64, so any slip shows (the two agree to ~1e-14)."""
    model = random_model(name).double()
    H, T = 3, 26
    true = _tokens(model.config.vocab_size, T, 1)
    fresh, detour = Engine(model, max_len=T + H, headroom=H), Engine(model, max_len=T + H, headroom=H)
    (a,), (b,) = _rows(fresh, [true[:3]]), _rows(detour, [true[:3]])
    want = [fresh.score([a], [true[:3]])[0]]
    got = [detour.score([b], [true[:3]])[0]]
    for t in range(3, T):
        want.append(fresh.score([a], [[true[t]]])[0])
        k = t % H + 1
        detour.score([b], [_tokens(model.config.vocab_size, k, 100 + t)])
        detour.truncate(b, k)
        assert b.tokens == true[:t] and b.fed == t  # the rolled-back tokens are gone
        got.append(detour.score([b], [[true[t]]])[0])
    assert b.tokens == true and detour.cache.lengths[b.row] == T
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=0, atol=1e-10)


def test_rolling_back_more_than_the_headroom_is_refused():
    model = random_model("tiny-e2b")
    engine = Engine(model, max_len=30, headroom=2)
    (seq,) = _rows(engine, [[2] * 12])
    engine.score([seq], [[2] * 12])
    with pytest.raises(ValueError, match="at most 2 tokens"):
        engine.truncate(seq, 3)
    engine.truncate(seq, 12)  # emptying the row is always possible
    assert engine.cache.lengths[seq.row] == 0


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-26b-a4b", "tiny-gemma-3-270m"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 5e-5)])
def test_scoring_k_tokens_in_one_forward_equals_k_single_steps(name, dtype, atol):
    """The verify step of speculative decoding: two rows at different lengths score 3 and 5 tokens
    in one forward; the logits after each equal those of one-token steps. In float64 to 1e-10: the
    same computation. In fp32 (logits up to ~17) the matmuls of 1 and of k rows round differently,
    and the differences grow through the layers: up to 2.7e-5 measured, so 5e-5 (a wrong position
    or a missed key moves logits by units)."""
    model = random_model(name).to(dtype)
    V = model.config.vocab_size
    prompts = [_tokens(V, 9, 2), _tokens(V, 6, 3)]
    drafts = [_tokens(V, 3, 4), _tokens(V, 5, 5)]
    multi = Engine(model, rows=2, max_len=24, headroom=4)
    seqs = _rows(multi, prompts)
    multi.score(seqs, prompts)
    got = multi.score(seqs, drafts)
    for i, (prompt, draft) in enumerate(zip(prompts, drafts)):
        single = Engine(model, max_len=24, headroom=4)
        (seq,) = _rows(single, [prompt])
        single.score([seq], [prompt])
        want = torch.cat([_step(single, [seq], torch.tensor([draft]), t) for t in range(len(draft))])
        torch.testing.assert_close(got[i], want, rtol=0, atol=atol)


def _generate(engine, prompts, n):
    gen = Generation(engine.model, [GenerationRequest(p, n, GREEDY) for p in prompts], engine)
    out = [[] for _ in prompts]
    for step in gen:
        for row, e in zip(out, step):
            if e is not None and e.token is not None:
                row.append(e.token)
    return out, [s.cached for s in gen.sequences]


@pytest.mark.parametrize("shared", [20, 70])
def test_prefix_reuse_gives_the_same_tokens_as_prefilling(shared):
    """Requests sharing a prefix shorter (20) or longer (70) than the sliding window (48), the later
    ones batched together: reused K/V give the greedy tokens of a plain prefill. Prefill chunks of
    8 keep every block's sliding-layer K/V; the second wave also reuses the first wave's replies."""
    model = random_model("tiny-e4b", embed_std=0.05, sliding_window=48)  # KV sharing too
    V = model.config.vocab_size
    base = _tokens(V, shared, 7)
    first = [base + _tokens(V, 9, 8)]
    wave = [base + _tokens(V, 5, 9), base + _tokens(V, 30, 10)]
    plain = Engine(model, rows=3, max_len=160, prefill_chunk=8)
    reuse = Engine(model, rows=3, max_len=160, prefill_chunk=8, prefix_cache=512)
    want_first, _ = _generate(plain, first, 12)
    got_first, cached = _generate(reuse, first, 12)
    assert got_first == want_first and cached == [0]
    wave.append(first[0] + want_first[0] + _tokens(V, 3, 11))  # a chat's next turn: its history and reply
    want, _ = _generate(plain, wave, 12)
    got, cached = _generate(reuse, wave, 12)
    assert got == want
    block = reuse.prefix.block
    assert cached[:2] == [shared // block * block] * 2
    # its history, beyond the shared prefix: the first prompt and the reply but its last token (never fed)
    assert cached[2] == (len(first[0]) + 12 - 1) // block * block
    assert reuse.prefix.hits == sum(cached)


def test_prefix_reuse_after_a_reply_longer_than_the_ring():
    """Blocks whose sliding-layer K/V left the ring (a reply longer than it) are kept for their full
    layers only; reuse then stops where the window would need them, and the tokens stay those of a
    plain prefill. (Prefill chunks are cut to the ring, here 17 tokens instead of 256, so prompt
    blocks keep theirs.)"""
    model = random_model("tiny-gemma-3-270m", embed_std=0.05, sliding_window=16)
    V = model.config.vocab_size
    prompt = _tokens(V, 100, 12)
    plain = Engine(model, max_len=300, headroom=16)
    reuse = Engine(model, max_len=300, headroom=16, prefix_cache=1024)  # ring 32
    assert reuse.prefill_chunk == 32 - 16 + 1
    (reply,), _ = _generate(plain, [prompt], 60)
    assert _generate(reuse, [prompt], 60) == ([reply], [0])
    later = [prompt[:70] + _tokens(V, 4, 13), prompt + reply + _tokens(V, 4, 14)]
    for p in later:
        want, _ = _generate(plain, [p], 10)
        got, cached = _generate(reuse, [p], 10)
        assert got == want
    assert cached[0] > 100  # the turn after the reply reuses it: its last window is still in the ring


def test_prefix_cache_evicts_least_recently_used_leaves():
    model = random_model("tiny-gemma-3-270m", embed_std=0.05)
    V = model.config.vocab_size
    engine = Engine(model, max_len=200, prefix_cache=64)  # 4 blocks of 16
    a, b = _tokens(V, 40, 20), _tokens(V, 40, 21)
    _generate(engine, [a], 2)  # blocks a0, a1 (a2 is incomplete)
    _generate(engine, [b], 2)  # b0, b1: the pool is full
    _generate(engine, [a + [5] * 30], 2)  # needs 2 more for a: evicts b's leaf, then b's root
    assert engine.prefix.tokens == 64
    assert _generate(engine, [a + [5] * 30], 2)[1] == [64]
    assert _generate(engine, [b], 2)[1] == [0]


def test_one_bad_row_ends_alone():
    """A request whose sampling fails ends with an error of its own; the requests beside it (and
    those with extreme but valid parameters, which used to poison the batch with NaNs) finish as
    they would alone."""
    model = random_model("tiny-e2b", embed_std=0.05)
    V = model.config.vocab_size

    class Broken:
        def allowed(self):
            raise RuntimeError("a constraint bug")

        def advance(self, token):
            pass

    prompts = [_tokens(V, 5 + i, 30 + i) for i in range(4)]
    params = [GREEDY, SamplingParams(temperature=1e-38, seed=1), SamplingParams(repetition_penalty=1e-40, seed=2),
              SamplingParams(temperature=0.7, seed=3)]
    alone = [_generate(Engine(model, max_len=64), [p], 16)[0][0] for p in prompts[:1]]
    sched = Scheduler(model, max_batch=5, max_len=64).start()
    events, done = {}, {}
    for i, (p, s) in enumerate(zip(prompts + [prompts[0]], params + [GREEDY])):
        done[i] = threading.Event()
        events[i] = []
        request = GenerationRequest(p, 16, s, constraints=[Broken()] if i == 4 else [])
        sched.submit(request, lambda e, i=i: (events[i].append(e), e.finish_reason and done[i].set()))
    for i in done:
        assert done[i].wait(60)
    assert events[4][-1].finish_reason == "error" and "sampling failed" in events[4][-1].error
    for i in range(4):
        assert [e.finish_reason for e in events[i]][-1] == "length" and len(events[i]) == 16
        assert all(e.token is not None and 0 <= e.token < V for e in events[i])
    assert [e.token for e in events[0]] == alone[0]
    # temperature 1e-38 is greedy in effect: the same tokens as temperature 0
    assert [e.token for e in events[1]] == _generate(Engine(model, max_len=64), [prompts[1]], 16)[0][0]
    assert sched.stats().alive
    sched.stop()


def test_prefill_batches_only_equal_chunks_and_never_cuts_a_chunk_to_the_budget():
    """Rows prefill in the chunks they would get alone: a forward holds rows whose chunks have the
    same length (no padding position), and a chunk that does not fit what is left of a call's
    budget waits for the next call instead of being cut."""
    model = random_model("tiny-gemma-3-270m")
    engine = Engine(model, rows=4, max_len=64, prefill_chunk=8)
    seen = []
    real = model.decode

    def spy(ids, **kwargs):
        seen.append(kwargs["positions"].tolist())
        return real(ids, **kwargs)

    model.decode = spy
    try:
        for n in (5, 5, 12, 5):
            engine.add(engine.new_sequence(GenerationRequest(_tokens(128, n, n), 2)))
        engine.prefill(budget=12)  # rows 0-1 (5 + 5); row 2's chunk of 8 does not fit the 2 left
        first = list(seen)
        engine.prefill(budget=12)  # row 2 in its chunks alone, 8 then 4; row 3's 5 do not fit the 0 left
        second = seen[len(first):]
    finally:
        del model.decode
    assert first == [[list(range(5)), list(range(5))]]
    assert second == [[list(range(8))], [list(range(8, 12))]]
    assert all(p >= 0 for forward in seen for row in forward for p in row)
