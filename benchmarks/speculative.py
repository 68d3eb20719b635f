"""Speculative decoding: decode speed with and without a drafter, in the same run, same prompts.

    python benchmarks/speculative.py                                  # the real gemma-3-270m, n-gram drafts
    python benchmarks/speculative.py --draft-model DRAFTER_DIR        # an MTP drafter (gemma4 finetune --drafter)
    python benchmarks/speculative.py --draft-tokens 2,4,8 --exact     # several k; float32 weights on CPU
    python benchmarks/speculative.py --prompts prompts.txt --json out.json

For each prompt (one a line of --prompts, or built-in copy-heavy and free-form ones), batch 1,
greedy: the plain decode tok/s, then each draft length's tok/s, acceptance rate and mean accepted
length, and whether the tokens equal the plain ones (they must). Plain and speculative runs
alternate per prompt so a machine's drift hits both; the median of --repeat runs is reported with
the load average beside it (a busy CPU distorts everything: measure on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma4.engine.core import Engine  # noqa: E402
from gemma4.engine.generate import Generation  # noqa: E402
from gemma4.engine.sampling import SamplingParams  # noqa: E402
from gemma4.engine.sequence import GenerationRequest  # noqa: E402
from gemma4.engine.draft import NgramDrafter  # noqa: E402
from gemma4.engine.speculative import Speculation  # noqa: E402

PROMPTS = {
    "copy-list": "Repeat this list exactly, one item a line: apples, bananas, cherries, dates, elderberries, figs, "
                 "grapes, honeydew melons, kiwis, lemons, mangoes, nectarines, oranges, papayas.\n",
    "edit-code": "Rename the variable `total` to `sum_` in this function and print the whole function:\n\n"
                 "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
                 "    return total / len(values)\n\n",
    "free-form": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run(model, tokenizer, prompt: str, max_tokens: int, speculation) -> tuple[list[int], float, object]:
    """(tokens, decode tok/s after the first token, the speculation's stats) for one greedy generation."""
    ids = tokenizer.encode(prompt)
    engine = Engine(model, max_len=len(ids) + max_tokens, speculation=speculation)
    request = GenerationRequest(ids, max_tokens, SamplingParams(temperature=0))
    tokens, first = [], None
    for (event,) in Generation(model, [request], engine):
        if event is not None and event.token is not None:
            if first is None:
                first = time.perf_counter()
            tokens.append(event.token)
    elapsed = time.perf_counter() - first
    return tokens, (len(tokens) - 1) / max(elapsed, 1e-9), speculation.stats if speculation else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="target checkpoint (default: the embedded gemma-3-270m)")
    ap.add_argument("--draft-model", default=None, help="an MTP drafter checkpoint (default: n-gram drafts)")
    ap.add_argument("--draft-tokens", default="4", help="comma-separated draft lengths k")
    ap.add_argument("--prompts", default=None, help="a text file, one prompt a line")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--exact", action="store_true", help="CPU: keep float32 weights (default: gemma4 generate's fast path)")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import gemma4
    from gemma4.engine.cpu import speed_up

    model, tokenizer, _ = gemma4.load(args.model)
    if not args.exact:
        speed_up(model)
    prompts = (dict(enumerate(Path(args.prompts).read_text().splitlines())) if args.prompts else PROMPTS)
    ks = [int(k) for k in args.draft_tokens.split(",")]
    kind = "mtp" if args.draft_model else "ngram"
    if args.draft_model:
        from gemma4.engine.mtp import MTPDrafter

        drafter = MTPDrafter.load(args.draft_model, model)  # once: each run gets fresh statistics
    else:
        drafter = NgramDrafter()
    rows = []
    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads; drafter: {kind}")
    for name, prompt in prompts.items():
        plain, spec = [], {k: [] for k in ks}
        for _ in range(args.repeat):
            want, tps, _ = run(model, tokenizer, prompt, args.max_tokens, None)
            plain.append(tps)
            for k in ks:
                speculation = Speculation(drafter, k)
                got, tps, stats = run(model, tokenizer, prompt, args.max_tokens, speculation)
                spec[k].append((tps, stats, got == want))
        base = statistics.median(plain)
        for k in ks:
            tps = statistics.median(t for t, _, _ in spec[k])
            stats = spec[k][-1][1]
            row = {"prompt": name, "drafter": kind, "k": k, "plain_tps": round(base, 1), "spec_tps": round(tps, 1),
                   "speedup": round(tps / base, 2), "acceptance": round(stats.acceptance_rate, 3),
                   "mean_accepted_length": round(stats.mean_accepted_length, 2),
                   "same_tokens": all(same for _, _, same in spec[k]), "load": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(f"{name:>12} k={k}: plain {base:6.1f} tok/s, speculative {tps:6.1f} tok/s ({row['speedup']:.2f}x), "
                  f"acceptance {100 * row['acceptance']:.0f}%, mean accepted length {row['mean_accepted_length']:.2f}, "
                  f"same tokens: {row['same_tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
