"""Load test of the OpenAI-compatible server: throughput and latency at several concurrency levels.

    python benchmarks/serve.py                         # the real gemma-3-270m (Q4_K_M GGUF), CPU
    python benchmarks/serve.py --model DIR_OR_GGUF --concurrency 1,8,32 --requests 32 --max-tokens 64
    python benchmarks/serve.py --url http://127.0.0.1:8000 --served-model-name gemma   # a running server
    python benchmarks/serve.py --scenario prefix       # prefix reuse: a shared system prompt, a 10-turn chat

It starts `python -m gemma4.serve` in a subprocess (so the load generator does not share the
server's interpreter), waits for /health, then for each concurrency level C sends `--requests`
streaming chat requests, C at a time, and reports requests/s, output tokens/s, time to first
token (TTFT) and inter-token latency (ITL) percentiles. Tokens are counted from the usage chunk;
TTFT is measured to the first chunk carrying text and ITL between text chunks (one per token,
except where a multi-byte character or stop-string prefix is held back). Prints a markdown table
and writes the raw numbers as JSON with `--json`.

`--scenario prefix` measures prefix reuse instead, one request at a time: (1) two requests that
share a ~2,000-token system prompt (the second one's time to first token against the first's),
then the same pair again with a different system prompt; (2) a 10-turn chat, each turn sending the
whole history, reporting per turn the prompt tokens, those the server took from its prefix cache
(`usage.prompt_tokens_details.cached_tokens`) and so the tokens prefilled, and the TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers  # noqa: E402
from servers import default_model, machine, percentile, start_server  # noqa: E402

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "List five fruits and one fact about each.",
    "What is the capital of France, and what is it known for?",
    "Describe how a bicycle works to a child.",
    "Give me three tips for learning a new language.",
    "Summarize the story of Little Red Riding Hood.",
    "What are the planets of the solar system?",
]


async def stream_chat(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy streamed chat request: the time of each text chunk, the reply, the usage."""
    return await servers.stream_chat(client, {"model": model, "messages": messages, "max_tokens": max_tokens,
                                              "temperature": 0})


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    return await stream_chat(client, model, [{"role": "user", "content": prompt}], max_tokens)


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, model, "Hello", 4)  # warm-up
        queue = list(range(requests))
        results = []

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": requests, "wall_s": wall, "req_per_s": requests / wall,
        "out_tok_per_s": tokens / wall, "output_tokens": tokens, "mean_tokens": tokens / requests,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9), "ttft_p99": percentile(ttft, 0.99),
        "itl_p50": percentile(itl, 0.5), "itl_p90": percentile(itl, 0.9), "itl_p99": percentile(itl, 0.99),
        "latency_mean": statistics.mean(r["latency"] for r in results),
    }


def system_prompt(words: int, offset: int = 0) -> str:
    """~`words` words of the shipped calibration text (ordinary English prose), from word `offset`."""
    text = (Path(__file__).resolve().parents[1] / "gemma4" / "quant" / "data" / "calibration.txt").read_text()
    return "Use the following notes to answer.\n\n" + " ".join(text.split()[offset: offset + words])


async def run_prefix(url: str, model: str, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await stream_chat(client, model, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        shared = []
        for offset in (0, 3000):  # two different ~2,000-token system prompts, a pair of requests each
            system = system_prompt(1500, offset)
            for question in ("What is the first topic of these notes?", "Summarise the notes in one line."):
                messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                shared.append(await stream_chat(client, model, messages, max_tokens))
        history, turns = [], []
        for i in range(10):
            history.append({"role": "user", "content": f"Turn {i + 1}: tell me one more short fact about rivers."})
            r = await stream_chat(client, model, history, max_tokens)
            history.append({"role": "assistant", "content": r["text"]})
            turns.append(r)
    return {"shared_system": shared, "chat": turns}


def print_prefix(results: dict) -> None:
    s = results["shared_system"]
    print("| system prompt | request | prompt tokens | cached | TTFT (s) |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(s):
        print(f"| {'AB'[i // 2]} | {i % 2 + 1} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft']:.3f} |")
    for pair in (s[:2], s[2:]):
        print(f"\nsecond request's TTFT: {pair[0]['ttft'] / pair[1]['ttft']:.1f}x sooner than the first")
    print("\n| turn | prompt tokens | cached | prefilled | TTFT (s) |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(results["chat"]):
        print(f"| {i + 1} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['prompt_tokens'] - r['cached_tokens']} "
              f"| {r['ttft']:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir or .gguf (default: the packaged gemma-3-270m Q4_K_M GGUF)")
    p.add_argument("--url", help="benchmark an already running server instead of starting one")
    p.add_argument("--served-model-name", default="gemma")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, >= 8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--server-threads", type=int, default=0, help="the server's --threads (0: torch's default)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--scenario", choices=["load", "prefix"], default="load",
                   help="load: throughput and latency at each concurrency (default); prefix: prefix reuse")
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")] if args.scenario == "load" else [1]
    if args.scenario == "prefix":
        args.max_model_len = max(args.max_model_len, 4096)
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    server = None
    if args.url:
        url = args.url
    else:
        args.model = args.model or default_model()
        extra = ["--threads", str(args.server_threads)] if args.server_threads else []
        server, url = start_server(args.model, args.served_model_name, max(args.levels), args.max_model_len, *extra)
    try:
        if args.scenario == "prefix":
            results = asyncio.run(run_prefix(url, args.served_model_name, args.max_tokens))
            print(f"\n{time.strftime('%Y-%m-%d')} | {machine()} | model {args.model or args.url} | "
                  f"max_tokens {args.max_tokens}, greedy, load average before {args.load_before}\n")
            print_prefix(results)
            if args.json:
                Path(args.json).write_text(json.dumps({"machine": machine(), "model": args.model, **results},
                                                      indent=2))
            return 0
        results = []
        for c in args.levels:
            n = args.requests or max(8, 2 * c)
            results.append(asyncio.run(run_level(url, args.served_model_name, c, n, args.max_tokens)))
            print(f"concurrency {c}: {results[-1]['out_tok_per_s']:.1f} tok/s", file=sys.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    print(f"\n{time.strftime('%Y-%m-%d')} | {machine()} | model {args.model or args.url} | "
          f"max_tokens {args.max_tokens}, greedy, server threads {args.server_threads or 'default'}, "
          f"load average before {args.load_before}\n")
    print("| concurrency | requests | req/s | output tok/s | TTFT p50 / p90 / p99 (s) | ITL p50 / p90 / p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} / {r['ttft_p99']:.2f} | "
              f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p90'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "model": args.model, "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
