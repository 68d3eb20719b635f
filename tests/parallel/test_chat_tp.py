"""`gemma4 chat --tp 2` under torchrun: rank 0 reads the terminal, both ranks run every turn, and
the conversation prints what one process prints (greedy; a /reset between turns)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serve"))
from serve_helpers import save_checkpoint  # noqa: E402

TURNS = "hello there\n/reset\nthe cat sat\nand then?\n"


def test_tp_chat_prints_what_one_process_prints(tmp_path, monkeypatch, capsys):
    from gemma4.cli import main

    path = save_checkpoint(tmp_path / "tiny")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gemma4",
           "chat", "--tp", "2", "--model", str(path), "--max-tokens", "12"]
    tp = subprocess.run(cmd, input=TURNS, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert tp.returncode == 0, tp.stderr[-3000:]
    monkeypatch.setattr(sys, "stdin", io.StringIO(TURNS))
    assert main(["chat", "--model", str(path), "--max-tokens", "12"]) == 0
    one = capsys.readouterr().out
    assert tp.stdout == one and one.count("> ") >= 4
