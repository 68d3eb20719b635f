"""The server with speculative decoding: continuous batching where each row accepts its own number
of drafted tokens per step (an n-gram drafter, and a noisy copy of the target that is accepted in
full, in part or not at all), the replies of a server without it, and the spec_decode series."""

import asyncio
import random

import httpx
import openai
import torch

from serve_helpers import MODEL_NAME, make_app, running_server
from testing_utils import random_drafter

from gemma4.engine.draft import Draft

# Copy-heavy prompts: the n-gram drafter finds the text to repeat in the prompt.
PROMPTS = ["Repeat: red green blue red green blue red green blue", "Say 'one two three' three times.",
           "Copy this: the cat sat on the mat, the cat sat on the mat.", "Hi"]


async def _complete(url, prompts, max_tokens):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(p):
        r = await client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text

    return await asyncio.gather(*(one(p) for p in prompts))


class NoisySelfDrafter:
    """Drafts the target's own greedy continuation (a cacheless forward per token), each token
    replaced by a random one with probability 0.3: rows accept all, some or none of their drafts."""

    needs_hidden, default_k = False, None

    def __init__(self, model):
        self.model, self.rng = model, random.Random(0)

    def propose(self, engine, seqs, ks):
        drafts = []
        for s, k in zip(seqs, ks):
            tokens = list(s.tokens)
            for _ in range(k):
                token = int(self.model(torch.tensor([tokens]))[0, -1].argmax())
                tokens.append(self.rng.randrange(100) if self.rng.random() < 0.3 else token)
            drafts.append(Draft(tokens[len(s.tokens):]))
        return drafts


def _metric(text, name):
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def test_speculative_server_gives_the_plain_servers_greedy_replies(loaded, tmp_path):
    """Concurrent requests, then one alone, on servers without speculation, with n-gram drafts,
    with a noisy copy of the target, and with an MTP drafter checkpoint (--draft-model)."""
    from gemma4.weights.drafter import save_drafter

    model = loaded[0]
    drafter_dir = str(save_drafter(tmp_path / "drafter", random_drafter(model, "tiny-e2b-assistant")))
    replies, metrics = {}, {}
    for spec in (None, "ngram", "self", "mtp"):
        options = {"speculative": NoisySelfDrafter(model) if spec == "self" else spec, "draft_tokens": 4}
        if spec is None:
            options = {}
        elif spec == "mtp":
            options = {"draft_model": drafter_dir}
        app = make_app(loaded, max_batch=4, **options)
        with running_server(app) as url:
            replies[spec] = asyncio.run(_complete(url, PROMPTS, 24)) + asyncio.run(_complete(url, PROMPTS[:1], 24))
            metrics[spec] = httpx.get(url + "/metrics").text
    assert replies["ngram"] == replies[None] and replies["self"] == replies[None] and replies["mtp"] == replies[None]
    assert _metric(metrics["mtp"], "gemma4:spec_decode_num_draft_tokens_total") > 0
    assert replies[None][0] == replies[None][-1]  # alone = batched
    assert _metric(metrics["ngram"], "gemma4:spec_decode_num_draft_tokens_total") > 0
    text = metrics["self"]
    drafted = _metric(text, "gemma4:spec_decode_num_draft_tokens_total")
    accepted = _metric(text, "gemma4:spec_decode_num_accepted_tokens_total")
    drafts = _metric(text, "gemma4:spec_decode_num_drafts_total")
    assert 0 < accepted < drafted
    assert _metric(text, "gemma4:spec_decode_acceptance_rate") == accepted / drafted
    assert _metric(text, "gemma4:spec_decode_mean_accepted_length") == 1 + accepted / drafts
    per_pos = [_metric(text, f'gemma4:spec_decode_num_accepted_tokens_per_pos_total{{model_name="{MODEL_NAME}",'
                             f'position="{i}"}}') for i in range(4)]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    assert _metric(metrics[None], "gemma4:spec_decode_num_draft_tokens_total") == 0


def test_bad_speculation_options_are_refused_before_loading(capsys):
    """`gemma4 serve` and `gemma4 generate` refuse a bad draft length or contradictory drafters
    with one line, before any model is loaded (no model path is valid here)."""
    from gemma4.cli import main

    for argv, message in [(["serve", "--speculative", "ngram", "--draft-tokens", "100"], "between 1 and 32"),
                          (["serve", "--draft-tokens", "4"], "needs a drafter"),
                          (["generate", "--speculative", "ngram", "--draft-tokens", "0", "hi"], "whole number >= 1"),
                          (["chat", "--speculative", "ngram", "--draft-model", "x"], "not both")]:
        assert main(argv + ["--model", "/nonexistent"]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "loading" not in err
