"""The generation loop against plain full forwards; batching, seeds, stops and limits."""

import pytest
import torch

from gemma4.engine.generate import PromptTooLongError, TokenGenerator, batch_generate, generate, stream_generate
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.core import Engine
from testing_utils import random_model


class LetterTokenizer:
    """A stand-in tokenizer: id i <-> one letter, enough to test the text layer."""

    def encode(self, text, add_bos=None):
        return ([2] if add_bos in (None, True) else []) + [ord(c) - 60 for c in text]

    def decode(self, ids):
        return "".join(chr(60 + i) for i in ids)

    def detokenizer(self):
        tok = self

        class D:
            def add(self, i):
                return tok.decode([i])

            def flush(self):
                return ""

        return D()


def greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def tokens(model, prompts, params, max_tokens=12, stops=()):
    gen = TokenGenerator(model, prompts, params, [max_tokens] * len(prompts), set(stops))
    out = [[] for _ in prompts]
    for steps in gen:
        for i, s in enumerate(steps):
            if s:
                out[i].append(s.token)
    return out


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-26b-a4b", "tiny-gemma-3-270m"])
def test_greedy_equals_argmax_of_full_forwards(name):
    model = random_model(name)
    prompt = [2, 17, 33, 5, 9, 70, 71]
    assert tokens(model, [prompt], [SamplingParams(temperature=0)], 14) == [greedy_by_full_forward(model, prompt, 14)]


def test_batch_of_different_lengths_equals_one_at_a_time():
    model = random_model("tiny-e4b")
    prompts = [[2, 5, 6, 7], [2, 9, 10, 11, 12, 13, 14, 15, 16, 17], [2, 40]]
    greedy = [SamplingParams(temperature=0)] * 3
    assert tokens(model, prompts, greedy) == [tokens(model, [p], greedy[:1])[0] for p in prompts]
    seeded = [SamplingParams(temperature=1.0, top_k=20, seed=s) for s in (1, 2, 3)]
    assert tokens(model, prompts, seeded) == [tokens(model, [p], [q])[0] for p, q in zip(prompts, seeded)]


def test_seed_reproducible_and_varied():
    model = random_model("tiny-12b")
    p = [[2, 30, 31]]
    a = tokens(model, p, [SamplingParams(temperature=1.5, seed=7)], 20)
    assert a == tokens(model, p, [SamplingParams(temperature=1.5, seed=7)], 20)
    assert a != tokens(model, p, [SamplingParams(temperature=1.5, seed=8)], 20)


def test_stop_token_and_length_finish_reasons():
    model = random_model("tiny-gemma-3-270m")
    prompt = [2, 17, 33, 5]
    first = greedy_by_full_forward(model, prompt, 10)
    j = next(j for j in range(1, 10) if first[j] not in first[:j])  # a token that first appears at step j
    steps = [s for (s,) in TokenGenerator(model, [prompt], [SamplingParams(temperature=0)], [10], {first[j]})]
    assert [s.token for s in steps] == first[: j + 1] and steps[-1].finish_reason == "stop"
    steps = [s for (s,) in TokenGenerator(model, [prompt], [SamplingParams(temperature=0)], [4], set())]
    assert len(steps) == 4 and steps[-1].finish_reason == "length" and steps[0].finish_reason is None


def test_logprobs_are_the_models():
    model = random_model("tiny-gemma-3-270m")
    prompt = [2, 17, 33]
    (step,) = next(iter(TokenGenerator(model, [prompt], [SamplingParams(temperature=0)], [1], set(), logprobs=3)))
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
    assert step.logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert [t for t, _ in step.top_logprobs] == expected.topk(3).indices.tolist()


def test_prompt_too_long_is_a_clear_error():
    model = random_model("tiny-gemma-3-270m")
    with pytest.raises(PromptTooLongError, match="maximum context length is 512 tokens"):
        TokenGenerator(model, [[2] * 600], [SamplingParams()], [5], set())


def test_generation_stops_at_the_context_end():
    model = random_model("tiny-gemma-3-270m")
    out = tokens(model, [[2] * 508], [SamplingParams(temperature=0)], max_tokens=50)
    assert len(out[0]) == 4


def test_text_layer_streams_and_cuts_stop_strings():
    model = random_model("tiny-gemma-3-270m")
    tok = LetterTokenizer()
    greedy = SamplingParams(temperature=0)
    full = generate(model, tok, "ABC", max_tokens=10, sampling=greedy, stop_token_ids=set())
    assert len(full) == 10
    responses = list(stream_generate(model, tok, "ABC", max_tokens=10, sampling=greedy, stop=[full[4:6]],
                                     stop_token_ids=set()))
    assert "".join(r.text for r in responses) == full[: full.index(full[4:6])]
    assert responses[-1].finish_reason == "stop"
    assert batch_generate(model, tok, ["ABC", "QRSTU"], max_tokens=10, sampling=greedy, stop_token_ids=set())[0] == full


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_one_engine_gives_the_same_text_and_grows_by_doubling_up_to_the_context(mode):
    """One engine across generations (a CLI session): its cache reused while it fits, doubled when
    it does not, capped at the context (512 here); compiled (traced by aot_eager: no C++ build) or not."""
    model = random_model("tiny-gemma-3-270m")
    tok, greedy = LetterTokenizer(), SamplingParams(temperature=0)
    engine = Engine(model, mode=mode, initial_len=16, compile_options={"backend": "aot_eager"})

    def both(prompt, n):
        want = generate(model, tok, prompt, max_tokens=n, sampling=greedy, stop_token_ids=set())
        got = generate(model, tok, prompt, max_tokens=n, sampling=greedy, stop_token_ids=set(), engine=engine)
        assert got == want
        return engine.cache

    torch._dynamo.reset()
    try:
        first = both("ABC", 10)  # 4 + 10 tokens
        assert first.capacity == 16 and engine.mode == mode
        assert engine.steps == 9  # it ran the generation: 9 decode steps after the prefill's token
        assert both("ABCDE", 10) is first and first.capacity == 16  # 16 still fits
        assert both("AB" * 12, 10).capacity == 64  # 25 + 10
        assert both("A" * 500, 50).capacity == 512  # stops at the context end
    finally:
        torch._dynamo.reset()
