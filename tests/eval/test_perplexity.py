"""Sliding-window perplexity against direct computations."""

import math

import pytest
import torch

from gemma4.eval import gemma_logits_fn, perplexity
from gemma4.weights import load_model


class Bigram:
    """A model whose next-token distribution depends on the previous token only: its perplexity is
    the same for every window and stride, and computable by hand."""

    def __init__(self, vocab=11, seed=0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
        self.calls = []

    def __call__(self, ids, n):
        self.calls.append((ids.shape[1], n))
        return self.table[ids[:, -n:]]


def bigram_nll(model, ids, targets_from=1):
    lp = torch.log_softmax(model.table, -1)
    return [-lp[ids[t - 1], ids[t]].item() for t in range(targets_from, len(ids))]


IDS = torch.randint(0, 11, (100,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("window,stride", [(200, 100), (100, 50), (16, 4), (10, 9), (2, 1)])
def test_every_token_scored_once_with_overlapping_windows(window, stride):
    model = Bigram()
    res = perplexity(model, IDS, window, stride, progress=False)
    nll = bigram_nll(model, IDS)
    assert res.tokens == 99
    assert res.nll == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert torch.equal(res.predictions, model.table[IDS[:-1]].argmax(-1))
    assert all(length <= window - 1 for length, _ in model.calls)  # windows never exceed `window` tokens


def test_stride_equal_to_window_skips_each_windows_first_token():
    model = Bigram()
    res = perplexity(model, IDS, 10, 10, progress=False)
    assert res.tokens == 99 - 9  # tokens 10, 20, ..., 90 start a window and have no context
    scored = [t for t in range(1, 100) if t % 10]
    lp = torch.log_softmax(model.table, -1)
    assert res.nll == pytest.approx(sum(-lp[IDS[t - 1], IDS[t]].item() for t in scored) / len(scored), rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        perplexity(Bigram(), IDS, 10, 11)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(Bigram(), IDS[:1], 10, 5)
    with pytest.raises(ValueError, match="returned 3 positions"):
        perplexity(lambda ids, n: torch.zeros(1, 3, 11), IDS, 10, 5)


def test_gemma_whole_sequence_in_one_window_matches_full_logits(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-e2b")
    model = load_model(path)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    res = perplexity(gemma_logits_fn(model), ids, window=64, progress=False)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids[None])[0, :-1].float(), -1)
    nll = -lp.gather(1, ids[1:, None]).mean().item()
    assert res.nll == pytest.approx(nll, rel=1e-5)


def test_gemma_sliding_windows_match_a_naive_loop(tiny_checkpoint):
    """The Hugging Face recipe written out plainly: full logits per window, earlier targets masked."""
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    model = load_model(path)
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(1))
    window, stride = 16, 6
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        with torch.no_grad():
            lp = torch.log_softmax(model(ids[None, begin:end])[0].float(), -1)
        for t in range(max(prev_end, begin + 1), end):
            total -= lp[t - begin - 1, ids[t]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    res = perplexity(gemma_logits_fn(model), ids, window, stride, progress=False)
    assert res.tokens == count == 49
    assert res.nll == pytest.approx(total / count, rel=1e-5)
