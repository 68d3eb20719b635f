"""A/B decode speed of several models in one process, taken in alternating rounds.

    python benchmarks/decode_ab.py fp16=float:fast int8=./270m-int8:fast int4=./270m-int4:fast
    python benchmarks/decode_ab.py int8=./270m-int8 int8fast=./270m-int8:fast --threads 2 --rounds 6

Each argument is NAME=MODEL[:HOW]: MODEL a checkpoint directory, .gguf or `float` (the embedded
gemma-3-270m); HOW `fast` (`gemma4.engine.cpu.speed_up`, what the CLI runs), `fast4` (a quantized
model with int4 head scores: `speed_up_quantized(head="int4")`) or nothing (as loaded). Every
round decodes --tokens greedy tokens after a 32-token prompt with each model in turn. Reported:
steps/s from the thread's CPU time per step (median; with --threads 1 it leaves out the time the
process waited for a core on a shared machine), from the 20th percentile of wall time per step,
the ratio of each to the first model's in the same round, and how many greedy tokens equal the
first model's. On a quiet machine, use --threads 2 and read the wall column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemma4  # noqa: E402
from gemma4.engine.cpu import speed_up  # noqa: E402
from gemma4.engine.generate import TokenGenerator  # noqa: E402
from gemma4.engine.sampling import SamplingParams  # noqa: E402
from gemma4.quant import speed_up_quantized  # noqa: E402

PROMPT = list(range(1000, 1032))


def build(spec: str):
    name, _, rest = spec.partition("=")
    path, _, how = rest.partition(":")
    if not name or not path or how not in ("", "fast", "fast4"):
        sys.exit(f"bad model spec {spec!r}: use NAME=MODEL[:fast|:fast4]")
    model = gemma4.load(None if path == "float" else path, dtype=torch.float32)[0]
    if how == "fast4":
        speed_up_quantized(model, head="int4")
    elif how == "fast":
        speed_up(model)
    return name, model


def run(model, n: int) -> tuple[float, float, list[int]]:
    """(steps/s by CPU time, steps/s by p20 wall time, tokens) of one greedy generation."""
    it = iter(TokenGenerator(model, [PROMPT], [SamplingParams(temperature=0)], [n], set()))
    tokens, cpu, wall = [next(it)[0].token], [], []
    while True:
        t, c = time.perf_counter(), time.thread_time()
        try:
            steps = next(it)
        except StopIteration:
            break
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
        tokens.append(steps[0].token)
    wall.sort()
    return 1 / statistics.median(cpu), 1 / wall[len(wall) // 5], tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=MODEL[:fast|:fast4]; the first is the baseline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=33)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = dict(build(s) for s in args.models)
    for m in models.values():
        run(m, 4)  # warm-up
    cpu = {k: [] for k in models}
    wall = {k: [] for k in models}
    tokens = {}
    for r in range(args.rounds):
        for k, m in models.items():
            c, w, tokens[k] = run(m, args.tokens)
            cpu[k].append(c)
            wall[k].append(w)
        print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in cpu.items())
              + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    base = next(iter(models))
    print(f"\n{args.threads} threads, {args.rounds} rounds, {args.tokens} tokens, torch {torch.__version__}")
    print(f"| model | tok/s (CPU time) | ratio to {base} per round | median ratio | tok/s (p20 wall) | "
          "wall ratio | same greedy tokens |")
    print("|---|---|---|---|---|---|---|")
    for k in models:
        ratios = [a / b for a, b in zip(cpu[k], cpu[base])]
        same = next((i for i, (a, b) in enumerate(zip(tokens[k], tokens[base])) if a != b), len(tokens[k]))
        print(f"| {k} | {statistics.median(cpu[k]):.1f} | {' '.join(f'{x:.2f}' for x in ratios)} | "
              f"{statistics.median(ratios):.2f} | {statistics.median(wall[k]):.1f} | "
              f"{statistics.median(wall[k]) / statistics.median(wall[base]):.2f} | {same}/{len(tokens[k])} |")


if __name__ == "__main__":
    main()
