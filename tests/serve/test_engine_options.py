"""The server on the decode core's options: a compiled step, prefix reuse (usage and /metrics)."""

import asyncio

import httpx
import openai
import torch

from serve_helpers import MODEL_NAME, make_app, running_server

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never mention the weather at all."
QUESTIONS = ["What is a river?", "Name a colour.", "Why do cats purr?", "Count to three.", "Hi"]


async def _ask(url, questions, max_tokens=10, system=SYSTEM):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(q):
        r = await client.chat.completions.create(
            model=MODEL_NAME, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
        return r.choices[0].message.content, r.usage

    return await asyncio.gather(*(one(q) for q in questions))


def test_server_with_a_compiled_step_gives_the_eager_greedy_tokens(loaded):
    """`gemma4 serve --compile`: the step traced for batch sizes 1, 2 and 4 at startup (by aot_eager
    here: inductor's C++ build is too slow for the suite) gives the eager server's tokens, alone and
    batched."""
    texts = {}
    torch._dynamo.reset()
    try:
        for mode in ("eager", "compile"):
            app = make_app(loaded, max_batch=4, max_model_len=160, mode=mode, prefix_cache_tokens=0,
                           compile_options={"backend": "aot_eager"})
            with running_server(app) as url:
                alone = asyncio.run(_ask(url, QUESTIONS[:1]))
                together = asyncio.run(_ask(url, QUESTIONS[:4]))
            texts[mode] = [t for t, _ in alone + together]
    finally:
        torch._dynamo.reset()
    assert texts["compile"] == texts["eager"]
    assert texts["eager"][0] == texts["eager"][1]  # alone = batched


def test_prefix_reuse_reports_cached_tokens_and_a_hit_rate(loaded):
    """Requests sharing a system prompt: the later ones say how many prompt tokens came from the
    cache (`usage.prompt_tokens_details.cached_tokens`, as OpenAI reports it), /metrics counts the
    hits, and the replies equal those of a server without prefix reuse."""
    replies = {}
    for tokens in (0, 4096):
        app = make_app(loaded, max_batch=4, prefix_cache_tokens=tokens)
        with running_server(app) as url:
            first = asyncio.run(_ask(url, QUESTIONS[:1]))
            later = asyncio.run(_ask(url, QUESTIONS[1:]))
            metrics = httpx.get(url + "/metrics").text
        replies[tokens] = [t for t, _ in first + later]
        cached = [u.prompt_tokens_details.cached_tokens for _, u in first + later]
        if tokens == 0:
            assert cached == [0] * 5
            continue
        assert cached[0] == 0 and all(c >= 64 for c in cached[1:])  # the system prompt: ~100 tokens
        assert all(c < u.prompt_tokens for c, (_, u) in zip(cached, first + later))
        hits = float(next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("gemma4:prefix_cache_hits_total")))
        rate = float(next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("gemma4:prefix_cache_hit_rate")))
        assert hits == sum(cached) and 0 < rate < 1
    assert replies[4096] == replies[0]
