"""Record the fine-tuning figures in docs/finetuning.md: LoRA and QLoRA on the real gemma-3-270m.

Dev tool, not a test. Two steps, because matplotlib is not a dependency of the project:

    .venv/bin/python tests/data/train/record_finetune_figures.py run     # -> docs/finetuning_runs.json
    python-with-matplotlib tests/data/train/record_finetune_figures.py plot   # -> docs/finetuning_loss.png

`run` trains each mode in its own process (so the peak RSS is that mode's alone) on
pirate_train.jsonl for STEPS steps, validating every EVAL_EVERY steps, and records the train/val
loss curves, tokens/s, peak memory and the greedy answers to held-out questions before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
RUNS = ROOT / "docs" / "finetuning_runs.json"
PNG = ROOT / "docs" / "finetuning_loss.png"
STEPS, EVAL_EVERY = 24, 4
THREADS = 1  # on the shared 2-core machine, 2 intra-op threads ran ~4x slower than 1
PROMPTS = ["What is the capital of Portugal?", "How many legs does a cat have?", "What color is a lemon?",
           "What do you call a baby sheep?", "What is the opposite of big?", "What do spiders spin?"]


def one(mode: str) -> dict:
    import os
    import platform
    import time
    from datetime import datetime, timezone

    import torch

    import gemma4
    from gemma4 import SamplingParams, batch_generate
    from gemma4.train import LoraConfig, TrainConfig, finetune

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model, tok, chat = gemma4.load()
    load_s = time.perf_counter() - t0

    def answers():
        prompts = [chat.render([{"role": "user", "content": p}]) for p in PROMPTS]
        return batch_generate(model.eval(), tok, prompts, max_tokens=16, sampling=SamplingParams(temperature=0),
                              add_bos=False)

    before = answers()
    config = TrainConfig(lora=LoraConfig(r=8, alpha=16), max_steps=STEPS, batch_size=4, micro_batch_size=4,
                         lr=2e-3, warmup_steps=2, eval_every=EVAL_EVERY, eval_batch_size=12,
                         quantize=None if mode == "lora" else "int4", progress=False)
    with tempfile.TemporaryDirectory() as out:
        result = finetune(model, HERE / "pirate_train.jsonl", val=HERE / "pirate_val.jsonl", out=out, tokenizer=tok,
                          chat_format=chat, config=config)
    cpu_s = time.process_time()
    return {
        "mode": mode, "process_cpu_s": cpu_s, "steps": result.steps, "train_losses": result.train_losses,
        "val_losses": result.val_losses,
        "tokens_per_s": result.tokens_per_s, "peak_rss_gib": result.peak_memory_bytes / 2**30,
        "train_s": result.elapsed_s, "load_s": load_s, "trainable_parameters": result.trainable_parameters,
        "answers_before": before, "answers_after": answers(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "gradient_checkpointing": config.gradient_checkpointing, "cpus": os.cpu_count(),
        "recorded_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run() -> None:
    results = []
    for mode in ("lora", "qlora-int4"):
        out = subprocess.run([sys.executable, __file__, "one", mode], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{mode}: val {r['val_losses'][0][1]:.3f} -> {r['val_losses'][-1][1]:.3f}, "
              f"{r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    RUNS.write_text(json.dumps(results, indent=1) + "\n")


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(RUNS.read_text())
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, color in zip(results, ("tab:blue", "tab:orange")):
        ax.plot(range(1, len(r["train_losses"]) + 1), r["train_losses"], color=color, alpha=0.5,
                label=f"{r['mode']} train")
        steps, vals = zip(*r["val_losses"])
        ax.plot(steps, vals, "o-", color=color, label=f"{r['mode']} validation")
    ax.set_xlabel("optimizer step (4 conversations each)")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.set_title("gemma-3-270m, LoRA r=8 on pirate_train.jsonl (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["one"]:
        print(json.dumps(one(sys.argv[2])))
    elif sys.argv[1:2] == ["run"]:
        run()
    elif sys.argv[1:2] == ["plot"]:
        plot()
    else:
        sys.exit(__doc__)
