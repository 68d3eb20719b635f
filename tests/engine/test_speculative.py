"""Speculative decoding against plain decoding (STYLE habit 8): greedy tokens identical whatever
the drafter proposes, every per-row rule of Sequence.choose kept, sampling distribution-preserving.

The identity tests run in float64: the verify forward scores k + 1 positions where a plain step
scores one, and in float32 the two round differently (~1e-5), which could flip a near-tie; in
float64 they agree to ~1e-14, so a difference can only be a bug.
"""

import math
import random

import pytest
import torch
from testing_utils import random_drafter, random_model

from gemma4.engine.core import Engine
from gemma4.engine.draft import Draft, NgramDrafter
from gemma4.engine.generate import Generation
from gemma4.engine.sampling import Sampler, SamplingParams
from gemma4.engine.sequence import GenerationRequest
from gemma4.engine.mtp import MTPDrafter
from gemma4.engine.speculative import Speculation, SpeculationError, make_speculation

GREEDY = SamplingParams(temperature=0)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(vocab, n, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class OracleDrafter:
    """Proposes the known continuation of each prompt, each token replaced by a random one with
    probability `noise`: drafts that are right, wrong from any position on, or wholly wrong."""

    needs_hidden = False
    default_k = None

    def __init__(self, answers: dict[tuple, list[int]], vocab: int, noise: float = 0.3, seed: int = 0):
        self.answers, self.vocab, self.noise = answers, vocab, noise
        self.rng = random.Random(seed)

    def propose(self, engine, seqs, ks):
        drafts = []
        for s, k in zip(seqs, ks):
            known = self.answers[tuple(s.tokens[: s.prompt_len])][s.produced : s.produced + k]
            drafts.append(Draft([self.rng.randrange(self.vocab) if self.rng.random() < self.noise else t
                                 for t in known] + [self.rng.randrange(self.vocab)] * (k - len(known))))
        return drafts


def _run(model, requests, speculation=None, headroom=32, max_len=160):
    """(events per request, engine) of a Generation on a fresh engine."""
    engine = Engine(model, rows=len(requests), max_len=max_len, headroom=headroom, speculation=speculation)
    out = [[] for _ in requests]
    for step in Generation(model, requests, engine):
        for row, e in zip(out, step):
            if e is not None:
                row.append(e)
    return out, engine


def _ids(events):
    return [[e.token for e in row if e.token is not None] for row in events]


def _model(name, **overrides):
    return random_model(name, embed_std=0.05, **overrides).double()


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-26b-a4b", "tiny-gemma-3-270m"])
def test_greedy_tokens_are_identical_with_any_drafter(name):
    """Rows of different lengths in one batch, and one alone: the tokens of plain greedy decoding
    with an n-gram drafter and with a noisy oracle (drafts accepted in full, in part, or not at
    all). Sliding windows of 4 with a headroom of 4 make every ring wrap many times, and a k of 4
    rolls them back by up to the whole headroom; tiny-e2b shares K/V, tiny-gemma-3-270m is Gemma 3."""
    model = _model(name)
    V = model.config.vocab_size
    base = _tokens(V, 7, 1)
    prompts = [base * 3, _tokens(V, 4, 2), _tokens(V, 19, 3)]
    requests = [GenerationRequest(p, 40, GREEDY) for p in prompts]
    want, _ = _run(model, requests)
    want = _ids(want)
    answers = {tuple(p): w for p, w in zip(prompts, want)}
    for drafter in (NgramDrafter(min_n=1), OracleDrafter(answers, V)):
        got, engine = _run(model, requests, Speculation(drafter, 4), headroom=4)
        assert _ids(got) == want
        stats = engine.speculation.stats
        assert stats.draft_tokens > 0
        if isinstance(drafter, OracleDrafter):
            assert 0 < stats.accepted_tokens < stats.draft_tokens
            assert engine.steps < 40  # several tokens a step
        alone, _ = _run(model, requests[1:2], Speculation(drafter, 4), headroom=4)
        assert _ids(alone) == want[1:2]


def test_every_rule_of_choose_holds_mid_draft():
    """Stop tokens and max_tokens that fall inside an accepted draft, logprobs, penalties,
    logit_bias and a constraint: the same events (tokens, logprobs, finish reasons) as plain
    decoding, with an oracle whose drafts run past each stop."""
    model = _model("tiny-gemma-3-270m")
    V = model.config.vocab_size
    prompts = [_tokens(V, 6, 4), _tokens(V, 11, 5), _tokens(V, 8, 6), _tokens(V, 9, 7)]
    plain, _ = _run(model, [GenerationRequest(p, 30, GREEDY) for p in prompts])
    stop = _ids(plain)[0][9]  # a token the first row generates 10th: it stops there

    class Ban:  # a grammar-like constraint: token 5 never, and never the same token twice running
        def __init__(self):
            self.last = None

        def allowed(self):
            mask = torch.ones(V, dtype=torch.bool)
            mask[5] = False
            if self.last is not None:
                mask[self.last] = False
            return mask

        def advance(self, token):
            self.last = token

    def requests():
        return [GenerationRequest(prompts[0], 30, GREEDY, frozenset({stop}), logprobs=3),
                GenerationRequest(prompts[1], 13, GREEDY, logprobs=0),  # ends by length mid-draft
                GenerationRequest(prompts[2], 30, SamplingParams(temperature=0, repetition_penalty=1.5,
                                                                 frequency_penalty=0.5), logit_bias={7: 3.0}),
                GenerationRequest(prompts[3], 30, GREEDY, constraints=[Ban()])]

    want, _ = _run(model, requests())
    answers = {tuple(p): w + _tokens(V, 8, 9) for p, w in zip(prompts, _ids(want))}
    got, engine = _run(model, requests(), Speculation(OracleDrafter(answers, V, noise=0.1), 6, adaptive=False))
    assert engine.speculation.stats.draft_tokens > 0
    assert len(want[0]) == 10 and want[0][-1].finish_reason == "stop" and want[1][-1].finish_reason == "length"
    for w_row, g_row in zip(want, got):
        assert [(e.token, e.finish_reason, e.top_logprobs and [t for t, _ in e.top_logprobs]) for e in g_row] == \
               [(e.token, e.finish_reason, e.top_logprobs and [t for t, _ in e.top_logprobs]) for e in w_row]
        for a, b in zip(w_row, g_row):
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert abs(a.logprob - b.logprob) < 1e-9


def test_sampling_keeps_the_target_distribution():
    """The joint distribution of three sampled tokens (the first from the prompt's logits, the
    next two from one verify step of k = 2) against its exact value, computed from the target
    alone, by Pearson's chi-square over the outcomes; for a drafter with its own distribution q, a
    deterministic one that always proposes the least likely allowed token (rejected most of the
    time: the residual draw does the work), and a random MTP drafter sampling its drafts, with the
    full head and with a shortlist head (`ShortlistHead`: q restricted to a third of the vocabulary).

    Threshold: p > 0.001. The seeds are fixed, so the test is deterministic: it cannot flake; a
    correct sampler passes with probability 0.999 over seed choices, and this one passes with
    these seeds. A wrong one fails: accepting every draft, or drawing a rejected position from p
    instead of the residual, gives p < 1e-30 here (checked by breaking each)."""
    model = _model("tiny-gemma-3-270m")
    V = model.config.vocab_size
    prompt = _tokens(V, 5, 11)
    params = SamplingParams(temperature=1.5, top_k=3)
    rows, N = 128, 3072

    # Exact joint distribution: p(a) p(b | a) p(c | a, b) with the sampler's processing.
    def probs(prefixes):
        with torch.no_grad():
            logits = model(torch.tensor(prefixes))[:, -1]
        return [Sampler(params, [], V).process(row).softmax(-1) for row in logits]

    p1 = probs([prompt])[0]
    firsts = p1.nonzero().flatten().tolist()
    p2 = dict(zip(firsts, probs([prompt + [a] for a in firsts])))
    pairs = [(a, b) for a in firsts for b in p2[a].nonzero().flatten().tolist()]
    p3 = dict(zip(pairs, probs([prompt + list(ab) for ab in pairs])))
    exact = {(a, b, c): float(p1[a] * p2[a][b] * p3[a, b][c]) for a, b in pairs for c in p3[a, b].nonzero().flatten().tolist()}

    def worst(a):  # the least likely of the tokens the target may sample after `a`
        return min(p2[a].nonzero().flatten().tolist(), key=lambda t: float(p2[a][t]))

    class QDrafter:  # draws from q: 0.9 on worst(a) after a first token a, the rest spread evenly
        needs_hidden, default_k = False, None

        def propose(self, engine, seqs, ks):
            out = []
            for s, k in zip(seqs, ks):
                q = torch.full((V,), 0.1 / V)
                if s.produced == 1:
                    q[worst(s.tokens[-1])] += 0.9
                toks = torch.multinomial(q, k, replacement=True, generator=s.sampler.generator).tolist()
                out.append(Draft(toks, q.expand(k, V)))
            return out

    class Worst:  # deterministic: the least likely of the allowed second tokens, k times
        needs_hidden, default_k = False, None

        def propose(self, engine, seqs, ks):
            out = []
            for s, k in zip(seqs, ks):
                out.append(Draft([worst(s.tokens[-1]) if s.produced == 1 else 0] * k))
            return out

    shortlist = list(range(0, V, 3))  # the MTP drafter's restricted head: q is 0 off it and the prompt's tokens
    for drafter in (QDrafter(), Worst(), MTPDrafter(random_drafter(model), model),
                    MTPDrafter(random_drafter(model, seed=1), model, vocabulary=shortlist)):
        counts: dict[tuple, int] = {}
        for batch in range(N // rows):
            requests = [GenerationRequest(prompt, 4, SamplingParams(**{**params.__dict__, "seed": batch * rows + i}))
                        for i in range(rows)]
            got, engine = _run(model, requests, Speculation(drafter, 2, adaptive=False), max_len=16)
            for row in _ids(got):
                counts[tuple(row[:3])] = counts.get(tuple(row[:3]), 0) + 1
            assert engine.speculation.stats.draft_tokens >= 2 * rows
        assert set(counts) <= set(exact)
        chi2, df = _pearson(counts, exact, N)
        p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                                torch.tensor(chi2 / 2, dtype=torch.float64)))
        assert p_value > 1e-3, (type(drafter).__name__, chi2, df)


def _pearson(counts, exact, n):
    """Pearson's statistic, cells with an expected count under 5 pooled into one; (chi2, dof)."""
    chi2, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for outcome, p in exact.items():
        expected, observed = n * p, counts.get(outcome, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
        else:
            chi2 += (observed - expected) ** 2 / expected
            cells += 1
    if pooled_exp > 0:
        chi2 += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return chi2, cells - 1


def test_bad_draft_lengths_are_refused_with_a_clear_error():
    model = random_model("tiny-gemma-3-270m")
    for k in (0, -1, 2.5):
        with pytest.raises(SpeculationError, match="whole number >= 1"):
            make_speculation(model, "ngram", draft_tokens=k)
    with pytest.raises(SpeculationError, match="between 1 and 32"):
        Engine(model, speculation=make_speculation(model, "ngram", draft_tokens=100))
    with pytest.raises(SpeculationError, match="unknown speculative method"):
        make_speculation(model, "medusa")
    with pytest.raises(SpeculationError, match="needs a drafter"):
        make_speculation(model, draft_tokens=4)
    assert make_speculation(model) is None


def test_ngram_lookup_takes_the_latest_longest_match():
    d = NgramDrafter(max_n=3, min_n=1)
    assert d.lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], 3) == [7, 8, 5]  # "2 3" last seen before "7 8 5"
    assert d.lookup([4, 5, 6, 4, 5, 6, 1, 4, 5, 6], 2) == [1, 4]  # the 3-gram's latest occurrence
    assert d.lookup([1, 2, 3], 4) == []
    assert NgramDrafter(max_n=2, min_n=2).lookup([1, 2, 9, 3, 2], 3) == []  # no earlier "3 2"


def test_adaptive_k_backs_off_when_drafts_fail():
    """A drafter whose drafts are always wrong drafts 1 token a step after a few steps; one always
    right climbs back to k."""
    model = _model("tiny-gemma-3-270m")
    V = model.config.vocab_size
    prompt = _tokens(V, 6, 21)
    want = _ids(_run(model, [GenerationRequest(prompt, 30, GREEDY)])[0])[0]
    spec = Speculation(OracleDrafter({tuple(prompt): [(t + 1) % V for t in want]}, V, noise=0), 6)
    _, engine = _run(model, [GenerationRequest(prompt, 30, GREEDY)], spec)
    assert spec.stats.accepted_tokens == 0 and spec.stats.draft_tokens < 6 + 5 + 4 + 3 + 2 + 25
    spec = Speculation(OracleDrafter({tuple(prompt): want}, V, noise=0), 6)
    got, engine = _run(model, [GenerationRequest(prompt, 30, GREEDY)], spec)
    assert _ids(got)[0] == want and spec.stats.acceptance_rate == 1.0 and engine.steps <= 30 // 7 + 1
    assert math.isclose(spec.stats.mean_accepted_length, 1 + spec.stats.accepted_tokens / spec.stats.drafts)


@pytest.mark.slow
def test_ngram_speculation_on_the_real_gemma_3_270m_gives_the_same_greedy_tokens(gemma3_270m):
    """The embedded gemma-3-270m (float32) through the Python API, alone and in a batch of prompts
    of different lengths: n-gram drafting changes the number of forwards, not the tokens."""
    import gemma4

    model, tokenizer, _ = gemma3_270m
    prompts = ["Repeat this list exactly: apples, bananas, cherries, dates, elderberries, figs, grapes.\n",
               "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"]
    want = [[r.token for r in gemma4.stream_generate(model, tokenizer, p, max_tokens=24,
                                                     sampling=GREEDY)] for p in prompts]
    got = [list(gemma4.stream_generate(model, tokenizer, p, max_tokens=24, sampling=GREEDY, speculative="ngram"))
           for p in prompts]
    assert [[r.token for r in g] for g in got] == want
    assert sum(g[-1].accepted_tokens for g in got) > 10
    ids = [tokenizer.encode(p) for p in prompts]
    spec = make_speculation(model, "ngram")
    requests = [GenerationRequest(i, 24, GREEDY, frozenset(model.config.eos_token_id)) for i in ids]
    batched, engine = _run(model, requests, spec, max_len=128)
    assert _ids(batched) == want
    assert engine.steps < 20


def test_a_failing_drafter_costs_speed_not_the_requests(caplog):
    """A drafter that raises every other step, and otherwise ends its drafts with ids outside the
    vocabulary: the failing steps decode without drafts (logged), the bad ids are dropped, and the
    tokens are plain greedy decoding's."""
    model = _model("tiny-gemma-3-270m")
    prompt = _tokens(model.config.vocab_size, 7, 41) * 2

    class Flaky(NgramDrafter):
        calls = 0

        def propose(self, engine, seqs, ks):
            Flaky.calls += 1
            if Flaky.calls % 2:
                raise RuntimeError("drafter bug")
            return [Draft(d.tokens + [-1, V]) for d in super().propose(engine, seqs, ks)]

    V = model.config.vocab_size
    want = _ids(_run(model, [GenerationRequest(prompt, 20, GREEDY)])[0])
    got, engine = _run(model, [GenerationRequest(prompt, 20, GREEDY)], Speculation(Flaky(min_n=1), 3))
    assert _ids(got) == want and Flaky.calls > 2 and "the drafter failed" in caplog.text
    assert engine.speculation.stats.draft_tokens > 0


def test_score_returns_the_final_normed_hidden_states_of_a_plain_forward():
    """`Engine.score(..., hidden=True)`: what the MTP drafter reads, equal to a cacheless forward's."""
    model = _model("tiny-e2b")
    tokens = _tokens(model.config.vocab_size, 12, 51)
    engine = Engine(model, max_len=32)
    seq = engine.new_sequence(GenerationRequest(tokens, 1))
    engine.add(seq)
    engine.score([seq], [tokens[:5]])
    ((logits, hidden),) = engine.score([seq], [tokens[5:]], hidden=True)
    want = model.decode(torch.tensor([tokens])).hidden[0, 5:]
    torch.testing.assert_close(hidden, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(logits, model.logits(want), rtol=0, atol=1e-10)
