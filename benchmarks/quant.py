"""Memory, perplexity and CPU decode speed of gemma-3-270m: float32 vs int8 vs int4.

    .venv/bin/python benchmarks/quant.py                       # whole eval text, all configs
    .venv/bin/python benchmarks/quant.py --tokens 1024 --configs float32 int8
    .venv/bin/python benchmarks/quant.py --configs float32 int4 int4-calibrated   # GPTQ on the shipped text
    .venv/bin/python benchmarks/quant.py --configs float32 int4-calibrated --calibration notes.txt
    .venv/bin/python benchmarks/quant.py --text tests/data/eval/sketches.txt   # a second, held-out text
    .venv/bin/python benchmarks/quant.py --fast --keep /tmp/q   # through the CPU fast path (`speed_up`)

The float32 model is the embedded Q4_K_M GGUF dequantized (the reference the quantized models are
compared with); int8 / int4 are quantized from that file tensor by tensor (`gemma4 quantize`) into
checkpoint directories, which are then loaded like any checkpoint. Each configuration runs in its
own process, so its peak RSS is its own. Reported per configuration:
- weights: bytes of the model's tensors in memory; file: the saved checkpoint (float32: the
  bytes a float32 safetensors file would take);
- load peak: how far loading and then reading every tensor once raised the peak RSS above the
  process's RSS before loading (compare with the file); RSS after load, and peak RSS over the whole run (load, perplexity, decode);
- perplexity of `--text` (default tests/data/eval/essays.txt; sliding windows), and agreement of each position's
  greedy (argmax) prediction with float32's;
- decode tok/s: greedy, batch 1, after a 16-token prompt, mean over `--decode-tokens` steps.
With `--fast`, each model is measured (perplexity and decode) through `gemma4.engine.cpu.speed_up`, what the CLI
runs: fp16 linears and a rescored int8 head for float32, `gemma4.quant.speed_up_quantized` for int8 / int4.
`--keep DIR` keeps the quantized checkpoints in DIR/<config> and reuses those already there (GPTQ takes minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "eval" / "essays.txt"
CONFIGS = {"float32": None, "int8": ("int8", 64), "int4": ("int4", 64), "int4-g32": ("int4", 32),
           "int4-calibrated": ("int4", 64)}  # gemma4 quantize --calibration [FILE]


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def run_one(args) -> None:
    """In a child process: load one configuration, measure, print a JSON line."""
    import torch

    from gemma4.engine.generate import TokenGenerator
    from gemma4.engine.sampling import SamplingParams
    from gemma4.eval import gemma_logits_fn, perplexity
    from gemma4.model import Gemma
    from gemma4.quant import model_nbytes
    from gemma4.variants import variant
    from gemma4.api import load_model  # quantized checkpoints too (gemma4.weights.load_model refuses them)

    torch.set_num_threads(args.threads)
    ids = json.loads(Path(args.ids).read_text())
    with torch.device("meta"):  # warm up: torch's first meta-device use imports ~70 MB of code
        Gemma(variant("tiny-gemma-3-270m"))
    rss_before = status("VmRSS")
    start = time.perf_counter()
    model = load_model(args.one, dtype=torch.float32)
    load_s = time.perf_counter() - start
    if args.fast:
        from gemma4.engine.cpu import speed_up

        speed_up(model)
    for t in model.state_dict().values():  # read every byte (mapped files load lazily); max: no copy
        t.reshape(-1).view(torch.uint8).max()
    rss_loaded, load_peak = status("VmRSS"), status("VmHWM") - rss_before
    weights = model_nbytes(model)
    start = time.perf_counter()
    ppl = perplexity(gemma_logits_fn(model), ids, args.window, args.stride, progress=False)
    ppl_s = time.perf_counter() - start
    prompt = ids[:16]
    gen = TokenGenerator(model, [prompt], [SamplingParams(temperature=0)], [args.decode_tokens + 1], set())
    it = iter(gen)
    greedy = [next(it)[0].token]  # prefill + first token
    start = time.perf_counter()
    for steps in it:
        greedy.append(steps[0].token)
    decode_s = time.perf_counter() - start
    print(json.dumps(dict(load_s=load_s, rss_loaded=rss_loaded, load_peak=load_peak, rss_peak=status("VmHWM"),
                          weights=weights, ppl=ppl.perplexity, nll=ppl.nll, scored=ppl.tokens, ppl_s=ppl_s,
                          tok_s=(len(greedy) - 1) / decode_s, greedy=greedy,
                          predictions=ppl.predictions.tolist())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--text", type=Path, default=TEXT,
                   help="text to score (default: tests/data/eval/essays.txt); a second one, "
                        "tests/data/eval/sketches.txt, shows how much a figure depends on the text")
    p.add_argument("--tokens", type=int, default=None, help="score only the first N tokens (default: all)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="text file for the int4-calibrated config (not the eval text; default: the shipped "
                        "gemma4/quant/data/calibration.txt, as `gemma4 quantize --calibration`)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--fast", action="store_true", help="measure through the CPU fast path (gemma4.engine.cpu.speed_up)")
    p.add_argument("--keep", type=Path, default=None, help="keep quantized checkpoints here (DIR/<config>) and reuse them")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args)

    import torch

    from gemma4.api import default_model_path
    from gemma4.config import TextConfig
    from gemma4.commands.quantize import quantize_cli
    from gemma4.quant.gptq import CALIBRATION_TEXT
    from gemma4.tokenizer import Tokenizer
    from gemma4.weights.gguf import GGUFFile

    gguf = default_model_path()
    if not args.text.is_file():
        p.error(f"--text {args.text}: no such file")
    text = args.text.read_text(encoding="utf-8")
    ids = Tokenizer.from_gguf(gguf).encode(text)[: args.tokens]
    f = GGUFFile(gguf)
    params = TextConfig.from_hf_dict(f.config).num_parameters()
    f.close()
    tmp = Path(tempfile.mkdtemp(prefix="gemma4-quant-bench-"))
    (tmp / "ids.json").write_text(json.dumps(ids))
    rows = {}
    for name in args.configs:
        source, file_bytes, quant_s = str(gguf), 4 * params, None
        if CONFIGS[name]:
            scheme, group = CONFIGS[name]
            start = time.perf_counter()
            calibration = (args.calibration or CALIBRATION_TEXT) if name.endswith("-calibrated") else None
            out = (args.keep or tmp) / name
            if not (out / "model.safetensors").is_file():
                out = quantize_cli(gguf, out, scheme, group, calibration=calibration)
            quant_s = time.perf_counter() - start
            source, file_bytes = str(out), (out / "model.safetensors").stat().st_size
        cmd = [sys.executable, __file__, "--one", source, "--ids", str(tmp / "ids.json"),
               "--window", str(args.window), "--stride", str(args.stride), "--decode-tokens",
               str(args.decode_tokens), "--threads", str(args.threads)] + ["--fast"] * args.fast
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if res.returncode:
            sys.exit(f"{name} failed:\n{res.stderr}")
        rows[name] = json.loads(res.stdout.strip().splitlines()[-1]) | dict(file=file_bytes, quant_s=quant_s)
        rows[name]["predictions"] = torch.tensor(rows[name]["predictions"])
        print(f"[{name}] {json.dumps({k: v for k, v in rows[name].items() if k not in ('greedy', 'predictions')})}",
              file=sys.stderr, flush=True)

    base = rows.get("float32")
    mib = 2**20
    print(f"\ngemma-3-270m ({params / 1e6:.0f}M parameters), {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}" + (", CPU fast path (speed_up)" if args.fast else ""))
    print(f"text: {args.text} (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}), "
          f"{len(ids)} tokens, window {args.window}, stride {args.stride}\n")
    print("| config | weights MiB | file MiB | % of bf16 | load peak MiB | RSS loaded / peak MiB | perplexity | "
          "vs float32 | greedy agreement | decode tok/s | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        rel = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%" if base else "-"
        agree = f"{100 * (r['predictions'] == base['predictions']).float().mean().item():.1f}%" if base else "-"
        same = "-"
        if base:
            n = next((i for i, (a, b) in enumerate(zip(r["greedy"], base["greedy"])) if a != b), len(r["greedy"]))
            same = f"{n}/{len(base['greedy'])}"
        print(f"| {name} | {r['weights'] / mib:.0f} | {r['file'] / mib:.0f} | {100 * r['file'] / (2 * params):.1f}% | "
              f"{r['load_peak'] / mib:.0f} | {r['rss_loaded'] / mib:.0f} / {r['rss_peak'] / mib:.0f} | {r['ppl']:.3f} | {rel} | {agree} | "
              f"{r['tok_s']:.1f} | {same} |")


if __name__ == "__main__":
    main()
