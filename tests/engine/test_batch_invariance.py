"""A row's numbers must not depend on the rows batched beside it (serving's greedy replies equal
the same request alone). Here: the CPU fast path's int8 activations, which fbgemm quantizes with
one scale per input, so a neighbour with a wider range moved a row's rescored-head candidates and
flipped a greedy near-tie of the real gemma-3-270m in a 32-stream server soak."""

import pytest
import torch
from testing_utils import random_model

from gemma4.engine.core import Engine
from gemma4.engine.cpu import PackedLinear, RescoredHead, fbgemm_works, pack_linears
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.sequence import GenerationRequest

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not fbgemm_works("int8-dynamic"), reason="fbgemm int8 kernels unavailable")]


def test_int8_linear_and_rescored_head_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3072, 64, generator=gen) / 8
    x = torch.randn(1, 64, generator=gen) * 4
    x[0, 3] = -30.0  # Gemma-like: one large channel, a lopsided range
    wide = torch.randn(3, 64, generator=gen) * 40  # neighbours whose range is wider
    flat = torch.zeros(2, 64)  # and constant rows
    # the int8 matmul exactly; the head's fp32 rescoring of its candidates to fp32 noise (before
    # the fix, its int8 logits moved by ~3 and its candidates changed)
    for layer, atol in ((PackedLinear(w, "int8-dynamic"), 0), (RescoredHead(w, k=16), 1e-4)):
        alone = layer(x)
        for others in (wide, flat, torch.cat([flat, wide])):
            torch.testing.assert_close(layer(torch.cat([x, others]))[:1], alone, rtol=0, atol=atol)
            torch.testing.assert_close(layer(torch.cat([others, x]))[-1:], alone, rtol=0, atol=atol)
    want = x @ w.T
    got = PackedLinear(w, "int8-dynamic")(x)
    assert 0 < (got - want).abs().max() < 0.03 * want.abs().max()  # still int8 error, no more
    got = PackedLinear(w, "int8-dynamic")(flat + 2.0)  # a constant row: W 1 alone, of the int8 weight
    torch.testing.assert_close(got, (flat + 2.0) @ w.T, rtol=0, atol=0.03 * got.abs().max().item())


def test_packed_engine_gives_a_row_the_same_logprobs_beside_any_neighbours():
    """The packed tiny model in the engine: a greedy logprobs request prefilled and decoded beside
    other rows gets the logprobs of the same request alone, to fp32 noise (they moved by ~7e-3
    when the batch's range set the int8 activations' scale)."""
    model = pack_linears(random_model("tiny-gemma-3-270m"), k=4)  # 4 exact candidates of 128 tokens: the rest int8
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    # as long as the prompt: prefilled in one forward with it, so its first token is batched too
    others = [torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12, 7)]
    greedy = SamplingParams(temperature=0)

    def run(prompts, mine):
        engine = Engine(model, rows=len(prompts), max_len=32)
        seqs = [engine.new_sequence(GenerationRequest(p, 6, greedy, logprobs=3)) for p in prompts]
        for s in seqs:
            engine.add(s)
        events = []
        while not seqs[mine].finished:
            events += [e for s, e in engine.step() if s is seqs[mine]]
        return [(e.token, e.top_logprobs) for e in events]

    alone = run([prompt], 0)
    for batch, mine in (([prompt, *others], 0), ([*others, prompt], 3)):
        got = run(batch, mine)
        assert [t for t, _ in got] == [t for t, _ in alone]
        for (_, g), (_, a) in zip(got, alone):
            torch.testing.assert_close(torch.tensor([v for _, v in g]), torch.tensor([v for _, v in a]),
                                       rtol=0, atol=1e-5)
