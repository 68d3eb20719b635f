"""Hostile clients at the connection level (issue 22), and /metrics that reconcile. The bad-input
table (one request, one expected error) is test_bad_input.py."""

import time

import httpx
import pytest

from serve_helpers import MODEL_NAME, make_app, running_server, served

SMALL = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
NO_STOP = {"logit_bias": {str(i): -100 for i in range(17)}}  # no special token: plain text to the limit


@pytest.fixture(scope="module")
def server(loaded):
    app = make_app(loaded, max_batch=1, max_queue=1)
    with running_server(app) as url:
        yield url, app


def assert_healthy(url):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.post(url + "/v1/chat/completions", json=SMALL, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# -- 10: /metrics reconcile -----------------------------------------------------------------------

def _metrics(url) -> dict[str, float]:
    """Each gemma4: counter, summed over its labels (request_success_total over its finish reasons)."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith("gemma4:") and name.endswith("_total"):
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_started_requests_reconcile_with_their_outcomes(server):
    """Without a started counter, accepted = finished + aborted + failed + rejected could not be checked."""
    url, app = server
    sched = served(app).scheduler
    before = _metrics(url)
    for _ in range(2):
        assert httpx.post(url + "/v1/chat/completions", json=SMALL).status_code == 200
    long = {**SMALL, "max_tokens": 400, "stream": True, **NO_STOP}
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", url + "/v1/chat/completions", json=long) as running:
            lines = running.iter_lines()
            next(lines)
            with b.stream("POST", url + "/v1/chat/completions", json=long):
                deadline = time.monotonic() + 10
                while sched.stats().waiting < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                full = httpx.post(url + "/v1/chat/completions", json=SMALL)  # one running, one waiting
                assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    deadline = time.monotonic() + 10
    while (sched.stats().running or sched.stats().waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    after = _metrics(url)
    started, success, aborted, failed, rejected = (
        after.get(f"gemma4:{name}_total", 0.0) - before.get(f"gemma4:{name}_total", 0.0)
        for name in ("num_requests_started", "request_success", "num_aborted_requests", "num_failed_requests",
                     "num_rejected_requests"))
    assert (started, success, aborted, failed, rejected) == (4, 2, 2, 0, 1)
    assert started == success + aborted + failed
    assert_healthy(url)
