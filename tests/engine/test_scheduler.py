"""Continuous batching on the slotted cache equals one-sequence-at-a-time generation."""

import threading
import time

import pytest
import torch

from gemma4.engine.cache import ContextLengthError, KVCache
from gemma4.engine.generate import TokenGenerator
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.scheduler import GenerationRequest, QueueFullError, Scheduler
from testing_utils import random_model as shared_random_model

GREEDY = SamplingParams(temperature=0)
pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(name: str):
    return shared_random_model(name, embed_std=0.05)  # greedy continuations vary, not echo the prompt


def alone(model, prompt, n, params=GREEDY):
    out = []
    for (step,) in TokenGenerator(model, [prompt], [params], [n], set()):
        out.append(step.token)
    return out


class Collector:
    """Callback target: tokens per request, and a per-request `on_token` hook (runs on the scheduler thread)."""

    def __init__(self):
        self.tokens, self.finish, self.done = {}, {}, {}

    def callback(self, key, on_token=None):
        self.tokens[key], self.done[key] = [], threading.Event()

        def cb(event):
            if event.token is not None:
                self.tokens[key].append(event.token)
                if on_token:
                    on_token(len(self.tokens[key]))
            if event.finish_reason:
                self.finish[key] = event.finish_reason
                self.done[key].set()

        return cb

    def wait(self, keys=None, timeout=60):
        for key in list(self.done) if keys is None else keys:
            deadline = time.monotonic() + timeout
            while key not in self.done and time.monotonic() < deadline:
                time.sleep(0.01)
            assert self.done[key].wait(max(deadline - time.monotonic(), 0)), f"request {key} did not finish"


def prompts_for(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(5, vocab, (n - 1,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-gemma-3-270m", "tiny-26b-a4b"])
def test_staggered_admissions_equal_single_sequence_decode(name):
    model = random_model(name)
    # Prompts shorter and longer than the window (4) and the prefill chunk (6); more requests than slots.
    prompts = prompts_for(model.config.vocab_size, [3, 11, 7, 17, 5, 9])
    n = [12, 9, 14, 6, 10, 8]
    # Greedy and seeded sampling mixed.
    params = [GREEDY, SamplingParams(temperature=1.0, seed=1), GREEDY, SamplingParams(temperature=0.8, seed=2),
              SamplingParams(temperature=1.0, top_k=20, seed=3), GREEDY]
    expected = [alone(model, p, k, s) for p, k, s in zip(prompts, n, params)]

    sched = Scheduler(model, max_batch=3, max_queue=8, max_len=64, prefill_chunk=6).start()
    got = Collector()

    def submit(i):
        # Request i+1 arrives once request i has produced 2 tokens: admissions land mid-decode.
        hook = (lambda count: count == 2 and submit(i + 1)) if i + 1 < len(prompts) else None
        sched.submit(GenerationRequest(prompts[i], n[i], params[i]), got.callback(i, hook))

    submit(0)
    got.wait(range(len(prompts)))
    for i in range(len(prompts)):
        assert got.tokens[i] == expected[i], f"request {i}"
        assert got.finish[i] == "length"
    stats = sched.stats()
    assert (stats.running, stats.waiting, stats.slots_in_use, stats.kv_tokens) == (0, 0, 0, 0)
    assert all((layer.pos == -1).all() for layer in sched.cache.layers if layer is not None)
    sched.stop()


def test_seeded_sampling_is_batch_invariant():
    model = random_model("tiny-e4b")
    prompts = prompts_for(128, [4, 9, 6], seed=1)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    expected = [alone(model, p, 10, s) for p, s in zip(prompts, params)]
    sched = Scheduler(model, max_batch=4, max_len=32).start()
    got = Collector()
    for i, (p, s) in enumerate(zip(prompts, params)):
        sched.submit(GenerationRequest(p, 10, s), got.callback(i))
    got.wait()
    assert [got.tokens[i] for i in range(3)] == expected
    sched.stop()


def test_cancel_frees_the_slot_within_a_step_and_others_continue():
    model = random_model("tiny-e2b")
    sched = Scheduler(model, max_batch=2, max_len=256).start()
    got = Collector()
    cancel_at = threading.Event()
    long = sched.submit(GenerationRequest([2, 7, 8], 200, GREEDY),
                        got.callback("long", lambda c: c == 3 and cancel_at.set()))
    other = prompts_for(128, [5])[0]
    sched.submit(GenerationRequest(other, 20, GREEDY), got.callback("other"))
    assert cancel_at.wait(30)
    long.cancel()
    got.wait()
    assert got.finish["long"] == "abort" and len(got.tokens["long"]) < 10
    assert got.tokens["other"] == alone(model, other, 20)
    assert sched.stats().slots_in_use == 0
    sched.stop()


def test_stop_token_limits_and_queue_bound():
    model = random_model("tiny-gemma-3-270m")
    prompt = [2, 30, 31, 32]
    first = alone(model, prompt, 8, SamplingParams(temperature=1.0, seed=5))
    k = next(i for i in range(1, 8) if first[i] not in first[:i])  # the first new token ends it
    sched = Scheduler(model, max_batch=1, max_queue=1, max_len=32)  # not started: nothing gets admitted
    sched._thread = threading.current_thread()  # accept submissions without running the loop
    with pytest.raises(ContextLengthError, match="maximum context length"):
        sched.submit(GenerationRequest(prompt, 40), lambda e: None)
    sched.submit(GenerationRequest(prompt, 4), lambda e: None)
    with pytest.raises(QueueFullError):
        sched.submit(GenerationRequest(prompt, 4), lambda e: None)

    sched = Scheduler(model, max_batch=2, max_len=32).start()
    got = Collector()
    stop = frozenset({first[k]})
    sched.submit(GenerationRequest(prompt, 10, SamplingParams(temperature=1.0, seed=5), stop), got.callback(0))
    got.wait()
    assert got.tokens[0] == first[: k + 1] and got.finish[0] == "stop"
    sched.stop()


def test_constraints_logprobs_and_engine_errors():
    model = random_model("tiny-e2b")

    class Force:
        def __init__(self, script):
            self.script, self.i = script, 0

        def allowed(self):
            if self.i >= len(self.script):
                return None
            mask = torch.zeros(128, dtype=torch.bool)
            mask[self.script[self.i]] = True
            return mask

        def advance(self, token):
            self.i += 1

    sched = Scheduler(model, max_batch=2, max_len=32).start()
    got = Collector()
    events = []
    req = GenerationRequest([2, 5, 6], 5, GREEDY, constraints=[Force([40, 41, 42])], logprobs=3)
    cb = got.callback(0)
    sched.submit(req, lambda e: (events.append(e), cb(e)))
    got.wait()
    assert got.tokens[0][:3] == [40, 41, 42]
    assert all(e.logprob is not None and len(e.top_logprobs) == 3 for e in events)

    # A failing forward ends the requests in it with an error event; the engine keeps serving.
    real = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom at 0x7f00")
        return real(*args, **kwargs)

    model.forward = flaky
    errors = []
    sched.submit(GenerationRequest([2, 5, 6], 5, GREEDY), lambda e: e.finish_reason and errors.append(e))
    for _ in range(200):
        if errors:
            break
        threading.Event().wait(0.05)
    assert errors[0].finish_reason == "error" and "0x" not in errors[0].error
    model.forward = real
    got2 = Collector()
    sched.submit(GenerationRequest([2, 5, 6], 4, GREEDY), got2.callback(0))
    got2.wait()
    assert got2.tokens[0] == alone(model, [2, 5, 6], 4)
    assert sched.stats().alive
    sched.stop()


def test_full_layers_grow_and_rings_wrap():
    model = random_model("tiny-e2b")
    cache = KVCache(model.config, rows=2, max_len=100, initial_len=8)
    cache.ensure(20)
    assert cache.capacity == 32
    with pytest.raises(ContextLengthError):
        cache.ensure(101)


