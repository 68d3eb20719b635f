"""Speculative decoding: decode speed with and without a drafter, in the same run, same prompts.

    python benchmarks/speculative.py                                  # the real gemma-3-270m, n-gram drafts
    python benchmarks/speculative.py --draft-model DRAFTER_DIR        # an MTP drafter (gemma4 finetune --drafter)
    python benchmarks/speculative.py --draft-tokens 2,4,8 --exact     # several k; float32 weights on CPU
    python benchmarks/speculative.py --prompts prompts.txt --json out.json
    python benchmarks/speculative.py --draft-model D --prompts held.txt --chat --draft-tokens 3   # as trained
    python benchmarks/speculative.py --draft-model D --prompts held.txt --adapter LORA --replay   # acceptance only

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


def run(model, ids: list[int], max_tokens: int, speculation) -> tuple[list[int], float, object]:
    """(tokens, decode tok/s after the first token, the speculation's stats) for one greedy generation."""
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


class Timed:
    """A drafter whose `propose` calls are counted and timed: the budget of a verify round."""

    def __init__(self, drafter):
        self.drafter, self.calls, self.seconds = drafter, 0, 0.0
        self.needs_hidden, self.default_k = drafter.needs_hidden, drafter.default_k
        self.ring_reach = getattr(drafter, "ring_reach", 0)

    def propose(self, engine, seqs, ks):
        t = time.perf_counter()
        try:
            return self.drafter.propose(engine, seqs, ks)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


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
    ap.add_argument("--chat", action="store_true",
                    help="render each prompt as one user turn (as `finetune --drafter` reads a prompt file)")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter of the model, merged (a fine-tuned target)")
    ap.add_argument("--min-confidence", type=float, default=None,
                    help="with --draft-model: a greedy row's drafts end before a token of lower drafter "
                         "probability (default: the drafter's, 0.3; 0: always k)")
    ap.add_argument("--lookup-first", action="store_true",
                    help="with --draft-model: prompt lookup where a 3-token match is found, the MTP drafter elsewhere")
    ap.add_argument("--replay", action="store_true",
                    help="no timing: the drafter's greedy acceptance replayed on the model's own answers "
                         "(gemma4.train.drafter.acceptance, k = the first --draft-tokens), deterministic")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import gemma4
    from gemma4.engine.cpu import speed_up

    model, tokenizer, chat = gemma4.load(args.model, adapter=args.adapter)
    if not args.exact:
        speed_up(model)
    prompts = (dict(enumerate(Path(args.prompts).read_text().splitlines())) if args.prompts else PROMPTS)
    ks = [int(k) for k in args.draft_tokens.split(",")]
    if args.replay:
        return replay(model, tokenizer, chat, args, ks[0])
    encode = (lambda p: tokenizer.encode(chat.render([{"role": "user", "content": p}], None,
                                                      add_generation_prompt=True), add_bos=False)) if args.chat \
        else tokenizer.encode
    kind = "mtp" if args.draft_model else "ngram"
    if args.draft_model:
        from gemma4.engine.mtp import MTPDrafter

        drafter = MTPDrafter.load(args.draft_model, model)  # once: each run gets fresh statistics
        if args.min_confidence is not None:
            drafter.min_confidence = args.min_confidence
        if args.lookup_first:
            from gemma4.engine.draft import LookupFirst

            drafter, kind = LookupFirst(drafter), "ngram+mtp"
    else:
        drafter = NgramDrafter()
    rows, totals = [], {"plain": [0, 0.0], **{k: [0, 0.0] for k in ks}}  # tokens, seconds (all runs)
    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads; drafter: {kind}")
    for name, prompt in prompts.items():
        plain, spec = [], {k: [] for k in ks}
        for _ in range(args.repeat):
            want, tps, _ = run(model, encode(prompt), args.max_tokens, None)
            plain.append(tps)
            totals["plain"][0] += len(want) - 1
            totals["plain"][1] += (len(want) - 1) / tps
            for k in ks:
                timed = Timed(drafter)
                speculation = Speculation(timed, k)
                got, tps, stats = run(model, encode(prompt), args.max_tokens, speculation)
                spec[k].append((tps, stats, got == want, timed, len(got)))
                totals[k][0] += len(got) - 1
                totals[k][1] += (len(got) - 1) / tps
        base = statistics.median(plain)
        for k in ks:
            tps = statistics.median(t for t, *_ in spec[k])
            stats, timed = spec[k][-1][1], spec[k][-1][3]
            tps_last, n_last = spec[k][-1][0], spec[k][-1][4]
            # The round's budget (last run): speed-up = (tokens per round x plain step) / (draft + verify).
            per_round = (n_last - 1) / max(timed.calls, 1)
            round_ms = 1000 * per_round / tps_last
            draft_ms = 1000 * timed.seconds / max(timed.calls, 1)
            budget = (f"    budget: plain step {1000 / base:.1f} ms; a round = drafting {draft_ms:.1f} ms + verify and "
                      f"the rest {round_ms - draft_ms:.1f} ms, {per_round:.2f} tokens a round")
            row = {"prompt": name, "drafter": kind, "k": k, "plain_tps": round(base, 1), "spec_tps": round(tps, 1),
                   "speedup": round(tps / base, 2), "acceptance": round(stats.acceptance_rate, 3),
                   "mean_accepted_length": round(stats.mean_accepted_length, 2),
                   "same_tokens": all(same for _, _, same, *_ in spec[k]), "load": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(f"{name:>12} k={k}: plain {base:6.1f} tok/s, speculative {tps:6.1f} tok/s ({row['speedup']:.2f}x), "
                  f"acceptance {100 * row['acceptance']:.0f}%, mean accepted length {row['mean_accepted_length']:.2f}, "
                  f"same tokens: {row['same_tokens']}")
            print(budget)
    n, sec = totals["plain"]
    for k in ks:
        print(f"all prompts, k={k}: plain {n / sec:.1f} tok/s, speculative {totals[k][0] / totals[k][1]:.1f} tok/s "
              f"({totals[k][0] / totals[k][1] / (n / sec):.2f}x; tokens over time of every run)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["same_tokens"] for r in rows) else 1


def replay(model, tokenizer, chat, args, k: int) -> int:
    """The greedy acceptance of --draft-model on the model's answers to --prompts (chat-rendered
    user turns, --max-tokens each), replayed as `finetune --drafter --val` measures it."""
    from gemma4.train.drafter import acceptance, distill, read_prompts
    from gemma4.weights.drafter import load_drafter

    if not (args.draft_model and args.prompts):
        raise SystemExit("--replay needs --draft-model and --prompts")
    drafter = load_drafter(args.draft_model, model.config, dtype=torch.float32)
    seqs = distill(model, read_prompts(args.prompts, tokenizer, chat, 4096), args.max_tokens)
    result = acceptance(drafter, model, seqs, k)
    print(json.dumps({"drafter": args.draft_model, "adapter": args.adapter, "prompts": args.prompts, **result}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
