"""The same trainer under torchrun: FSDP2 over 2 CPU processes (gloo) follows the 1-process run.

Tolerance: the two runs see the same micro-batches and the same token weights; only the order of
floating-point reductions differs (gradients are reduce-scattered across ranks), so per-step
losses agree to ~1e-6 relative; we allow 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import conversation, swap_task, write_jsonl
from train_helpers import tiny_dir

from gemma4.commands.finetune import main

RTOL = 1e-4


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_two_process_fsdp_matches_one_process(tmp_path):
    train, held_out = swap_task()
    # 22 sequences in batches of 8, micro-batches of 2: one batch of the first epoch holds 6 sequences
    # (3 micro-batches), so a rank runs a zero-weighted stand-in to keep FSDP's collectives in step.
    data = write_jsonl(tmp_path / "train.jsonl", [conversation(a, b) for a, b in train[:22]])
    val = write_jsonl(tmp_path / "val.jsonl", [conversation(a, b) for a, b in held_out[:4]])
    base = tiny_dir("tiny-26b-a4b")  # MoE: expert adapters are sharded too
    args = ["--model", str(base), "--data", str(data), "--val", str(val), "--max-steps", "4", "--batch-size", "8",
            "--micro-batch-size", "2", "--rank", "4", "--lr", "2e-3", "--warmup-steps", "2", "--save-every", "2",
            "--target-parameters", "experts.gate_up_proj,experts.down_proj", "--no-progress"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gemma4", "finetune", *args, "--out", str(tmp_path / "fsdp")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    print(f"torchrun: {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    # A checkpoint written by the 2-process run resumes in one process (full tensors, keyed by name).
    resume = ["--resume", str(tmp_path / "fsdp" / "checkpoint-000002")]
    assert main([*args, "--out", str(tmp_path / "resumed"), *resume]) == 0

    train_1, val_1 = losses(tmp_path / "single")
    train_2, val_2 = losses(tmp_path / "fsdp")
    print("1 process:", [round(x, 5) for x in train_1], "\n2 processes:", [round(x, 5) for x in train_2])
    assert len(train_1) == len(train_2) == 4
    assert train_1[-1] < train_1[0]
    assert train_2 == pytest.approx(train_1, rel=RTOL)
    assert val_2 == pytest.approx(val_1, rel=RTOL)
    resumed, _ = losses(tmp_path / "resumed")
    assert resumed == pytest.approx(train_1[2:], rel=RTOL)

    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
