"""Soak test of the OpenAI-compatible server: N concurrent streams for T seconds, mixed traffic.

    python benchmarks/soak.py                              # the real gemma-3-270m, 8 streams, 60 s
    python benchmarks/soak.py --streams 32 --seconds 300   # a long run (docs/serving.md records one)
    python benchmarks/soak.py --url http://127.0.0.1:8000 --served-model-name gemma   # a running server

Each stream sends request after request until the time is up, drawing (from a seeded generator)
among: streamed greedy chat, whole greedy chat, sampled chat (temperature, top-p, top-k, a seed),
a legacy completion, and chat with logprobs. Before the soak, every greedy prompt is sent once
alone; during it, every greedy reply must equal that reply (batching must not change tokens).

Reported: requests and errors by kind, mismatched greedy replies, tokens/s, TTFT and end-to-end
latency percentiles, the server's RSS after warm-up (each greedy prompt alone, then one wave of
N requests at once) and at the end (a server this script started),
and /metrics reconciled: requests the server started = finished + aborted + failed, and every
request the clients saw counted. tests/serve/test_soak.py runs a short soak in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import default_model, machine, percentile, start_server, stream_chat  # noqa: E402

PROMPTS = ["Tell me about rivers.", "Write two lines about the sea.", "Name three colours.",
           "What is a bicycle?", "Say something kind.", "Count from one to five.", "Describe a cat.",
           "Why is the sky blue?"]
KINDS = ("stream", "whole", "sampled", "completion", "logprobs")


def _chat(prompt: str, max_tokens: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, **extra}


async def _request(client: httpx.AsyncClient, model: str, kind: str, prompt: str, max_tokens: int,
                   seed: int) -> dict:
    """One request of `kind`: its text (greedy kinds), tokens, TTFT and latency."""
    start = time.perf_counter()
    if kind == "completion":
        r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                        "temperature": 0})
        r.raise_for_status()
        body = r.json()
        end = time.perf_counter()
        return {"text": body["choices"][0]["text"], "tokens": body["usage"]["completion_tokens"],
                "ttft": end - start, "latency": end - start}
    extra = {"temperature": 0}
    if kind == "sampled":
        extra = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "seed": seed}
    elif kind == "logprobs":
        extra = {"temperature": 0, "logprobs": True, "top_logprobs": 3}
    if kind != "stream":
        r = await client.post("/v1/chat/completions", json={"model": model, **_chat(prompt, max_tokens, **extra)})
        r.raise_for_status()
        body = r.json()
        end = time.perf_counter()
        return {"text": body["choices"][0]["message"]["content"], "tokens": body["usage"]["completion_tokens"],
                "ttft": end - start, "latency": end - start}
    r = await stream_chat(client, {"model": model, **_chat(prompt, max_tokens, **extra)})
    return {"text": r["text"], "tokens": r["tokens"], "ttft": r["ttft"], "latency": r["latency"]}


def _greedy_key(kind: str, prompt: str) -> tuple[str, str] | None:
    """Greedy requests whose reply must not depend on the batch (the chat kinds share one text)."""
    if kind == "sampled":
        return None
    return ("completion" if kind == "completion" else "chat", prompt)


async def soak(url: str, model: str, streams: int = 8, seconds: float = 30.0, max_tokens: int = 24,
               seed: int = 0, rss=None) -> dict:
    """Run the soak against `url`; `rss()` (optional) gives the server's resident memory in bytes."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        alone = {}
        for prompt in PROMPTS:  # the reference replies, each request alone (also the warm-up)
            for kind in ("whole", "completion"):
                alone[_greedy_key(kind, prompt)] = (await _request(client, model, kind, prompt, max_tokens, 0))["text"]
        # One wave at full concurrency first, so the start of the memory reading is after the
        # engine's buffers have grown to the batch (its KV cache doubles as rows lengthen).
        await asyncio.gather(*(_request(client, model, "whole", PROMPTS[i % len(PROMPTS)], max_tokens, 0)
                               for i in range(streams)))
        rss_start = rss() if rss else None
        metrics_before = _metrics(await client.get("/metrics"))
        rng = random.Random(seed)
        results, errors, mismatches = [], [], []
        deadline = time.perf_counter() + seconds

        async def stream_worker():
            while time.perf_counter() < deadline:
                kind, prompt = rng.choice(KINDS), rng.choice(PROMPTS)
                try:
                    r = await _request(client, model, kind, prompt, max_tokens, rng.randrange(1 << 30))
                except Exception as error:  # noqa: BLE001 - counted and reported, the soak goes on
                    errors.append(f"{kind}: {type(error).__name__}: {error}")
                    continue
                results.append((kind, r))
                key = _greedy_key(kind, prompt)
                if key is not None and r["text"] != alone[key]:
                    mismatches.append((kind, prompt, r["text"], alone[key]))

        start = time.perf_counter()
        await asyncio.gather(*(stream_worker() for _ in range(streams)))
        wall = time.perf_counter() - start
        metrics_after = _metrics(await client.get("/metrics"))
    delta = {k: metrics_after.get(k, 0.0) - metrics_before.get(k, 0.0) for k in metrics_after}
    finished = sum(v for k, v in delta.items() if k.startswith("request_success_total"))
    ended = finished + delta.get("num_aborted_requests_total", 0) + delta.get("num_failed_requests_total", 0)
    return {
        "streams": streams, "seconds": wall, "requests": len(results), "errors": errors, "mismatches": mismatches,
        "by_kind": {k: sum(kind == k for kind, _ in results) for k in KINDS},
        "tokens_per_s": sum(r["tokens"] for _, r in results) / wall,
        "ttft_p50": percentile([r["ttft"] for _, r in results], 0.5),
        "ttft_p99": percentile([r["ttft"] for _, r in results], 0.99),
        "latency_p50": percentile([r["latency"] for _, r in results], 0.5),
        "latency_p99": percentile([r["latency"] for _, r in results], 0.99),
        "rss_start": rss_start, "rss_end": rss() if rss else None,
        "server_started": delta.get("num_requests_started_total"), "server_finished": finished,
        "server_ended": ended, "server_rejected": delta.get("num_rejected_requests_total", 0),
    }


def _metrics(response: httpx.Response) -> dict[str, float]:
    """The gemma4: counters of a /metrics page, summed over labels, by name without the prefix."""
    out: dict[str, float] = {}
    for line in response.text.splitlines():
        m = re.match(r"gemma4:(\w+?)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m and m.group(1).endswith("_total"):
            labels = m.group(2) or ""
            reason = re.search(r'finished_reason="(\w+)"', labels)
            key = m.group(1) + (f"[{reason.group(1)}]" if reason else "")
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def report(r: dict) -> str:
    lines = [f"{r['streams']} streams for {r['seconds']:.0f} s: {r['requests']} requests "
             f"({', '.join(f'{k} {n}' for k, n in r['by_kind'].items())}), {len(r['errors'])} errors, "
             f"{len(r['mismatches'])} greedy replies unlike the same request alone",
             f"{r['tokens_per_s']:.1f} output tok/s; TTFT p50 {r['ttft_p50']:.2f} s, p99 {r['ttft_p99']:.2f} s; "
             f"latency p50 {r['latency_p50']:.2f} s, p99 {r['latency_p99']:.2f} s",
             f"/metrics: started {r['server_started']}, finished {r['server_finished']:.0f}, ended (finished + "
             f"aborted + failed) {r['server_ended']:.0f}, rejected {r['server_rejected']:.0f}"]
    if r["rss_start"] is not None:
        lines.append(f"server RSS {r['rss_start'] / 2**20:.0f} MiB after warm-up, {r['rss_end'] / 2**20:.0f} MiB "
                     "at the end")
    lines += [f"error: {e}" for e in r["errors"][:10]]
    return "\n".join(lines)


def _process_rss(pid: int):
    def rss() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    return rss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir or .gguf (default: the packaged gemma-3-270m Q4_K_M GGUF)")
    p.add_argument("--url", help="soak an already running server instead of starting one")
    p.add_argument("--served-model-name", default="gemma")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    server, rss, url = None, None, args.url
    if url is None:
        args.model = args.model or default_model()
        server, url = start_server(args.model, args.served_model_name, args.streams, 1024)
        rss = _process_rss(server.pid)
    try:
        result = asyncio.run(soak(url, args.served_model_name, args.streams, args.seconds, args.max_tokens,
                                  args.seed, rss))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {machine()} | model {args.model or url}")
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["errors"] or result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
