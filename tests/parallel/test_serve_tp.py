"""`gemma4 serve --tp 2` under torchrun (2 gloo ranks) answers the openai client with the tokens of
one process: greedy chat and completions, two requests at once (rows batched on both ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serve"))
from serve_helpers import make_app, running_server, save_checkpoint, started_url  # noqa: E402


def ask(url: str) -> list[str]:
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

    def chat(text):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                           max_tokens=10, temperature=0)
        return r.choices[0].message.content

    def complete(text):
        return client.completions.create(model="tiny", prompt=text, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(chat, "hello there"), pool.submit(complete, "The cat sat")]]


def test_tp_server_answers_like_one_process(tmp_path):
    from gemma4.serve import load_checkpoint

    path = save_checkpoint(tmp_path / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gemma4",
           "serve", "--tp", "2", "--model", str(path), "--served-model-name", "tiny", "--port", "0", "--no-ui"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url, log = started_url(proc)
        for _ in range(600):
            if httpx.get(url + "/health", timeout=60).status_code == 200:
                break
            time.sleep(0.1)
        got = ask(url)
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun stops both ranks (and exits non-zero, as it does on a signal)
        proc.wait(60)

    with running_server(make_app(load_checkpoint(path, exact=True), model_name="tiny")) as one:
        want = ask(one)
    print(got, want)
    assert got == want and all(got)
