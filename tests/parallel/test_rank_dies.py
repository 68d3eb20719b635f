"""A rank that dies stops the whole --tp group with a message naming it, within a bounded time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serve"))
from serve_helpers import VOCAB, save_checkpoint  # noqa: E402
from testing_utils import rewrite_config  # noqa: E402

BOUND = 60  # seconds from the kill to the whole group's exit


def _child_with_rank(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (its environment says RANK=rank)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and f"\0RANK={rank}\0".encode() in (
                    b"\0" + (proc / "environ").read_bytes()):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_a_killed_rank_stops_the_group(tmp_path):
    """`gemma4 generate --tp 2` under torchrun; rank 1 is SIGKILLed once both ranks have loaded,
    while they generate (greedy, with an end-of-sequence id it never picks: the whole context, ~500
    tokens, some seconds): rank 0, in a collective with the dead rank, fails at once, torchrun ends
    the group and its summary names rank 1."""
    path = save_checkpoint(tmp_path / "tiny")
    rewrite_config(path, lambda c: c | {"eos_token_id": [VOCAB - 1]})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gemma4",
           "generate", "--tp", "2", "--model", str(path), "--max-tokens", "2000", "--temp", "0", "--format", "raw",
           "once upon a time"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        log, loaded = [], 0
        while loaded < 2:
            line = proc.stderr.readline()
            assert line, "torchrun ended before both ranks loaded:\n" + "".join(log)
            log.append(line)
            loaded = "".join(log).count("loaded in")  # the ranks' lines may share a line of the pipe
        victim = _child_with_rank(proc.pid, 1)
        assert victim is not None, "rank 1's process not found"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rest = proc.communicate(timeout=BOUND)[1]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the group did not stop within {BOUND}s of rank 1's death")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    took = time.monotonic() - killed
    print(f"the group stopped {took:.1f}s after rank 1 died, rc {proc.returncode}")
    assert proc.returncode != 0
    summary = rest[rest.rfind("Root Cause"):]
    assert "rank      : 1" in summary and "SIGKILL" in summary, rest[-3000:]

    assert "Traceback" not in rest[:rest.find("torch.distributed.elastic")] or "the tensor-parallel group broke" in rest


def test_a_leader_whose_step_fails_stops(monkeypatch, caplog):
    """Rank 0 of `serve --tp` cannot go on after a failed step (its followers ran it, or wait in
    it): it exits non-zero with the reason instead of serving errors from a broken group."""
    from gemma4.engine import replica

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(replica.os, "_exit", exit_)
    monkeypatch.setattr(replica.Leader, "_heartbeat", lambda self: None)
    leader = replica.Leader(object(), {}, None)  # no process group: the step's broadcast fails
    with pytest.raises(SystemExit) as stopped:
        leader.step()
    assert stopped.value.code == 1
    assert "the tensor-parallel group broke" in caplog.text
