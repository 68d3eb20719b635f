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
