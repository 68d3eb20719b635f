"""`gemma4 eval perplexity`: sliding-window perplexity of a model on a text file.

    gemma4 eval perplexity --model ./270m-int4 --file tests/data/eval/essays.txt --window 512 --stride 256

Progress goes to stderr (a bar while scoring), the result line to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..helptext import RawHelpFormatter
from ..eval.perplexity import PerplexityResult, gemma_logits_fn, perplexity

PERPLEXITY_HELP = """Sliding-window perplexity: windows of --window tokens start every --stride tokens, and each
token is scored once, in the first window that reaches it, so after the first window every token
sees at least window - stride tokens of context. Lower is better; compare models only on the same
text, window and stride (and tokenizer).

examples:
  gemma4 eval perplexity --file tests/data/eval/essays.txt              # the embedded gemma-3-270m
  gemma4 eval perplexity -m ./270m-int4 -f tests/data/eval/essays.txt   # after `gemma4 quantize`"""


def main(argv: list[str] | None = None) -> int:
    """`gemma4 eval perplexity ...` (dispatched from gemma4/cli.py, which turns ValueError/OSError into messages)."""
    return run(parser().parse_args(argv))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4 eval", description="Evaluate a language model.")
    sub = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file", description=PERPLEXITY_HELP,
                       formatter_class=RawHelpFormatter)
    add_arguments(p)
    return parser


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint directory (float or quantized), .gguf file or Hub id (default: embedded 270m)")
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file to score")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts (default 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    perplexity_cli(args.model, args.file, window=args.window, stride=args.stride, max_tokens=args.max_tokens,
                   dtype=args.dtype, device=args.device)
    return 0


def perplexity_cli(model: str | Path | None, file: str | Path, window: int = 512, stride: int = 256,
                   max_tokens: int | None = None, dtype: str | None = "auto", device: str | None = None,
                   ) -> PerplexityResult:
    """Load `model` (and its tokenizer), tokenize `file` and print/return its perplexity."""
    import torch

    from ..api import load

    if window < 2 or not 0 < stride <= window:  # checked before the (slow) load
        raise ValueError(f"need --window >= 2 and 0 < --stride <= --window, got {window} and {stride}")
    if not Path(file).is_file():
        raise ValueError(f"--file {file}: no such file")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = Path(file).read_text(encoding="utf-8")
    start = time.perf_counter()
    lm, tokenizer, _ = load(model, dtype=dtype, device=device)
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    print(f"loaded in {time.perf_counter() - start:.1f}s; scoring {len(ids)} tokens of {file}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = perplexity(gemma_logits_fn(lm), ids, window=window, stride=stride)
    took = time.perf_counter() - start
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.4f} nats over {result.tokens} tokens; "
          f"window {window}, stride {stride}; {took:.1f}s)")
    return result
