"""Time and memory bounds for tests that feed the loaders hostile files (issue 22).

Inside `bounded`, the address space may grow by at most `memory_mb` and the block gets `seconds`:
a regression fails at once (MemoryError, TimeoutError) instead of swapping or hanging the machine,
and the peak resident memory the block added is measured (Linux: VmHWM, reset through
/proc/self/clear_refs), so a test can state and assert its bound.
"""

from __future__ import annotations

import contextlib
import re
import resource
import signal
from dataclasses import dataclass


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
    limit = _status_kb("VmSize") * 1024 + (memory_mb << 20)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss = _status_kb("VmRSS")
    previous = signal.signal(signal.SIGALRM, _timeout)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield usage
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)
        usage.peak_rss_mb = (_status_kb("VmHWM") - rss) / 1024
