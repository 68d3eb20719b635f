"""A short soak (benchmarks/soak.py) in the suite: 8 streams of mixed traffic for 15 s on the tiny
model. No errors, every greedy reply equal to the same request alone, the server's counters
reconciled with what the clients saw, and no memory growth past warm-up beyond a margin."""

import asyncio
import importlib.util
import sys
from pathlib import Path

from serve_helpers import MODEL_NAME, make_app, running_server

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RSS_MARGIN = 64 * 2**20  # what 15 s of traffic may add to the process after warm-up


def _soak_module():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gemma4_bench_soak", BENCHMARKS / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_short_soak(loaded):
    soak = _soak_module()
    app = make_app(loaded, max_batch=8, max_queue=16)
    with running_server(app) as url:
        result = asyncio.run(soak.soak(url, MODEL_NAME, streams=8, seconds=15, max_tokens=16, rss=_rss))
    print(soak.report(result))
    assert result["errors"] == [] and result["mismatches"] == []
    assert result["requests"] >= 40 and all(n > 0 for n in result["by_kind"].values())
    assert result["server_finished"] == result["requests"] == result["server_ended"]
    if result["server_started"] is not None:
        assert result["server_started"] == result["requests"]
    assert result["rss_end"] - result["rss_start"] < RSS_MARGIN
