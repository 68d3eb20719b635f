"""Decode throughput of a batch under greedy, temperature and top-p sampling (the cost of sampling).

    python benchmarks/sampling.py                       # the embedded real gemma-3-270m, batch 8, CPU
    python benchmarks/sampling.py --batch 16 --tokens 64

The same prompts are decoded together with each setting; the output tokens/s (best of --repeat)
show what sampling adds to a step on top of the batched forward.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemma4  # noqa: E402
from gemma4.engine.cpu import speed_up  # noqa: E402
from gemma4.engine.generate import TokenGenerator  # noqa: E402
from gemma4.engine.sampling import SamplingParams  # noqa: E402

PROMPTS = ["Tell me about rivers.", "Write two lines about the sea.", "Name three colours.", "What is a bicycle?",
           "Say something kind.", "Count from one to five.", "Describe a cat.", "Why is the sky blue?"]
SETTINGS = {"greedy": SamplingParams(temperature=0), "temperature 0.8": SamplingParams(temperature=0.8, seed=1),
            "temperature 0.8, top-p 0.95": SamplingParams(temperature=0.8, top_p=0.95, seed=1),
            "temperature 0.8, top-k 40": SamplingParams(temperature=0.8, top_k=40, seed=1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = gemma4.load()
    model, tokenizer = loaded[0], loaded[1]  # (model, tokenizer) before 2026-12-07, with the chat format since
    speed_up(model)
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    n = args.tokens
    print(f"| batch {args.batch}, {n} tokens | output tok/s |\n|---|---|")
    for name, params in SETTINGS.items():
        best = 0.0
        for _ in range(args.repeat):
            first = None
            for _steps in TokenGenerator(model, prompts, [params] * args.batch, [n] * args.batch, set()):
                now = time.perf_counter()
                first = first or now
            best = max(best, args.batch * (n - 1) / (now - first))
        print(f"| {name} | {best:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
