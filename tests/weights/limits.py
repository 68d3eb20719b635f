"""Time and memory bounds for tests that feed the loaders hostile files (issue 22).

`bounded(seconds, memory_mb)` measures the peak resident memory its block adds (Linux: VmHWM, reset
through /proc/self/clear_refs) and fails when it reaches `memory_mb`. So that a regression fails at
once instead of swapping or hanging the machine, the block also gets a SIGALRM after `seconds` and an
address-space cap of `memory_mb` plus SLACK_MB: threads and malloc arenas reserve address space
without using memory, so the cap is a guard, and the measured peak is the bound.
"""

from __future__ import annotations

import contextlib
import re
import resource
import signal
from dataclasses import dataclass

SLACK_MB = 1024
# The bound for one hostile checkpoint, opened and loaded: measured at most 17 MB (tiny models, one
# thread); the failures of issue 22 took 800 MB to 8 GB.
LOAD_MB = 256


@dataclass
class Usage:
    peak_rss_mb: float = 0.0  # peak resident memory the block added


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _timeout(signum, frame):
    raise TimeoutError("the bounded block ran out of time")


@contextlib.contextmanager
def bounded(seconds: float, memory_mb: int):
    usage = Usage()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status_kb("VmSize") * 1024 + ((memory_mb + SLACK_MB) << 20)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss = _status_kb("VmRSS")
    previous = signal.signal(signal.SIGALRM, _timeout)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield usage
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)
        usage.peak_rss_mb = (_status_kb("VmHWM") - rss) / 1024
    assert usage.peak_rss_mb < memory_mb, f"peak RSS grew by {usage.peak_rss_mb:.0f} MB (bound {memory_mb} MB)"
