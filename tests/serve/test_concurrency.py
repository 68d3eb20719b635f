"""Continuous batching through the HTTP server: concurrent streams, disconnects, queue bounds."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from serve_helpers import MODEL_NAME, make_app, running_server, served

N = 16
# No special tokens at all (ids 0-16 in the test vocabulary): no stop, and no tool call or thought block
# that would hold text back, so a long request streams plain text until its limit.
NO_STOP = {"logit_bias": {str(i): -100 for i in range(17)}}


@pytest.fixture(scope="module")
def server(loaded):
    app = make_app(loaded, max_batch=N, max_queue=N)
    with running_server(app) as url:
        yield url, app


def prompt(i):
    return [{"role": "user", "content": f"Request number {i}: say something {'!' * (i % 5)}"}]


async def stream_one(client, i, max_tokens):
    text, finish = "", None
    stream = await client.chat.completions.create(model=MODEL_NAME, messages=prompt(i), max_tokens=max_tokens,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return text, finish, usage.completion_tokens


def test_concurrent_streams_equal_each_served_alone(server):
    url, app = server
    sched = served(app).scheduler
    lengths = [8 + (i % 4) * 4 for i in range(N)]  # different lengths: requests finish at different steps

    async def alone():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        return [await stream_one(client, i, lengths[i]) for i in range(N)]

    async def together():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(stream_one(client, i, lengths[i]) for i in range(N)))

    expected = asyncio.run(alone())
    steps = sched.steps
    got = asyncio.run(together())
    assert got == expected
    # Random weights sometimes emit a stop token early; then it did so alone too (same text and count).
    assert all((f, n) == ("length", lengths[i]) or (f == "stop" and n <= lengths[i])
               for i, (_, f, n) in enumerate(got))
    assert sum(f == "length" for _, f, _ in got) >= N // 2
    # Shared forwards: far fewer decode steps than tokens generated.
    assert sched.steps - steps < sum(lengths) // 2
    stats = sched.stats()
    assert (stats.running, stats.waiting, stats.slots_in_use, stats.kv_tokens) == (0, 0, 0, 0)


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_disconnect_mid_stream_frees_the_slot(server):
    url, app = server
    sched = served(app).scheduler
    body = {"model": MODEL_NAME, "messages": prompt(99), "max_tokens": 400, "stream": True, **NO_STOP}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen == 4:
                    break
            assert sched.stats().slots_in_use == 1
            steps_at_close = sched.steps
    # Closing the connection cancels the request: its slot is free within a step or two.
    assert wait_for(lambda: sched.stats().slots_in_use == 0)
    assert sched.steps - steps_at_close <= 3
    text = httpx.get(url + "/metrics").text
    assert 'gemma4:num_aborted_requests_total{model_name="tiny-gemma4"} 1.0' in text


def test_disconnect_while_waiting_and_non_streaming(loaded):
    app = make_app(loaded, max_batch=1, max_queue=4)
    sched = served(app)  # noqa: F841 - the app installs the model at startup
    with running_server(app) as url:
        s = served(app).scheduler
        long = {"model": MODEL_NAME, "messages": prompt(1), "max_tokens": 300, "stream": True, **NO_STOP}
        with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/chat/completions", json=long) as r1:
            lines = r1.iter_lines()  # keep a reference: a discarded iterator closes the connection
            next(lines)
            # A second request waits for the only slot; its client gives up before it is admitted.
            with http.stream("POST", url + "/v1/chat/completions", json=long):
                assert wait_for(lambda: s.stats().waiting == 1)
            assert wait_for(lambda: s.stats().waiting == 0, timeout=2)
            metrics = httpx.get(url + "/metrics").text
            assert 'gemma4:num_aborted_requests_total{model_name="tiny-gemma4"} 1.0' in metrics
        assert wait_for(lambda: s.stats().slots_in_use == 0)

        # A non-streaming client that disconnects also frees its slot.
        def fire():
            try:
                httpx.post(url + "/v1/chat/completions", timeout=0.5,
                           json={**long, "stream": False, "max_tokens": 400})
            except httpx.TimeoutException:
                pass

        t = threading.Thread(target=fire)
        t.start()
        assert wait_for(lambda: s.stats().slots_in_use == 1)
        t.join()
        assert wait_for(lambda: s.stats().slots_in_use == 0)


def test_full_queue_answers_429_and_admitted_requests_finish(loaded):
    app = make_app(loaded, max_batch=1, max_queue=1)
    with running_server(app) as url:
        s = served(app).scheduler
        body = {"model": MODEL_NAME, "messages": prompt(3), "max_tokens": 30, "temperature": 0, **NO_STOP}
        results = {}

        def run(key):
            results[key] = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)

        threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
        threads[0].start()
        assert wait_for(lambda: s.stats().running == 1)
        threads[1].start()
        assert wait_for(lambda: s.stats().waiting == 1)
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        for t in threads:
            t.join()
        assert [results[k].status_code for k in "ab"] == [200, 200]
        assert results["a"].json()["choices"][0]["message"] == results["b"].json()["choices"][0]["message"]
        assert json.loads(results["a"].text)["usage"]["completion_tokens"] == 30


def test_engine_failure_is_reported_and_the_server_keeps_serving(loaded):
    model = loaded[0]
    app = make_app(loaded)
    real = type(model).forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 3 == 0:  # every third decode step fails
            raise RuntimeError("boom at 0x7f3a2b /secret/internal/path.py")
        return real(self, *args, **kwargs)

    body = {"model": MODEL_NAME, "messages": prompt(5), "max_tokens": 20, **NO_STOP}
    with running_server(app) as url:
        model.forward = flaky.__get__(model)
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line]
            whole = httpx.post(url + "/v1/chat/completions", json=body)
        finally:
            del model.forward
        # Streaming: the error goes in-band, then [DONE]. Whole: a 500 with the OpenAI body.
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][len("data: "):])["error"]
        assert error["type"] == "server_error" and "0x" not in error["message"] and "secret" not in error["message"]
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
        ok = httpx.post(url + "/v1/chat/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 20
        assert httpx.get(url + "/health").status_code == 200
        assert served(app).scheduler.stats().slots_in_use == 0
