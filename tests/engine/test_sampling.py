"""Sampling: each processor does what it says, parameters are validated, draws are seeded."""

import pytest
import torch

from gemma4.engine.sampling import Sampler, SamplingParams, argmax
from gemma4.engine.stops import StopMatcher

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def sampler(**kw):
    return Sampler(SamplingParams(**kw), prompt=[0], vocab_size=5)


def test_greedy_and_top_k_1():
    assert sampler(temperature=0).sample(LOGITS) == 1
    assert sampler(top_k=1, seed=0).sample(LOGITS) == 1


def test_top_k_keeps_k():
    kept = torch.isfinite(sampler(top_k=2).process(LOGITS.clone()))
    assert kept.tolist() == [False, True, True, False, False]


def test_top_p_keeps_smallest_prefix():
    probs = LOGITS.softmax(-1)  # 0.09, 0.64, 0.24, 0.05, 0.01
    kept = torch.isfinite(sampler(top_p=0.7).process(LOGITS.clone()))
    assert kept.tolist() == [False, True, True, False, False] and probs[1] < 0.7


def test_min_p():
    kept = torch.isfinite(sampler(min_p=0.2).process(LOGITS.clone()))
    assert kept.tolist() == [False, True, True, False, False]


def test_repetition_penalty_on_prompt_tokens():
    out = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), [1, 4], 5).process(LOGITS.clone())
    assert out[1] == 1.5 and out[4] == -2.0 and out[2] == 2.0


def test_presence_and_frequency_penalties_on_generated_tokens():
    s = Sampler(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), [], 5)
    s.observe(1)
    s.observe(1)
    out = s.process(LOGITS.clone())
    assert out[1] == pytest.approx(3.0 - 0.5 - 0.5) and out[2] == 2.0


def test_seeded_draws_repeat():
    a = [sampler(seed=3).sample(LOGITS) for _ in range(1)]
    draws = lambda: [s.sample(LOGITS) for s in [sampler(seed=3)] for _ in range(20)]
    assert draws() == draws() and a[0] == draws()[0]


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                dict(min_p=2), dict(repetition_penalty=0), dict(presence_penalty=3)])
def test_invalid_parameters(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_stop_matcher_holds_back_prefixes():
    m = StopMatcher(["END"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Xyz") == ("ENXyz", False)
    assert m.feed("..EN") == ("..", False)
    assert m.feed("D tail") == ("", True)


def test_stop_matcher_earliest_stop_wins():
    m = StopMatcher(["bb", "a"])
    assert m.feed("xxbba") == ("xx", True)


@pytest.mark.parametrize("n", [262144, 1000, 64 * 40 + 1])
def test_argmax_is_torch_argmax_first_maximum(n):
    """The blocked argmax returns torch's index: the first of tied maxima, a NaN if there is one."""
    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        x = torch.randint(-50, 50, (n,), generator=gen).float()  # integers: many ties at the top
        assert argmax(x) == int(x.argmax())
    x[n // 3] = float("nan")
    assert argmax(x) == int(x.argmax()) == n // 3


def _nucleus_by_sorting(logits, top_p):
    """The reference rule: sort everything, keep the smallest prefix whose mass reaches top_p (the
    probabilities as exp(logit - logsumexp), in fp32, as the sampler computes them)."""
    logits = logits - logits.max()
    values, order = torch.sort(logits, descending=True)
    probs = (values - torch.logsumexp(logits, -1)).exp()
    return set(order[probs.cumsum(-1) - probs < top_p].tolist())


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat (the whole sort), middling, peaked
def test_top_p_over_a_large_vocabulary_keeps_exactly_the_sorted_nucleus(scale, monkeypatch):
    from gemma4.engine import sampling

    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(262144, generator=gen) * scale
    got = Sampler(SamplingParams(top_p=0.9), [], 262144).process(logits)
    assert set(torch.isfinite(got).nonzero().flatten().tolist()) == _nucleus_by_sorting(logits, 0.9)
    if scale == 12.0:  # a peaked distribution's nucleus is found without sorting the vocabulary
        monkeypatch.setattr(sampling.torch, "sort", lambda *a, **k: pytest.fail("sorted the vocabulary"))
        Sampler(SamplingParams(top_p=0.9), [], 262144).process(logits)


def test_draws_follow_the_distribution_and_never_pick_removed_tokens():
    """The inverse-CDF draw: frequencies within 4 sigma of the probabilities over 20000 draws;
    tokens at -inf (removed by truncation) never come up."""
    logits = torch.tensor([2.0, float("-inf"), 1.0, 0.0, float("-inf"), -1.0])
    probs = logits.softmax(-1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sampling_draw(logits, gen) for _ in range(20000)]), minlength=6)
    assert counts[1] == counts[4] == 0
    sigma = (20000 * probs * (1 - probs)).sqrt()
    assert ((counts - 20000 * probs).abs() <= 4 * sigma + 1).all()


def sampling_draw(logits, gen):
    from gemma4.engine.sampling import draw

    return draw(logits, gen)
