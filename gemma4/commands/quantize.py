"""`gemma4 quantize`: a float checkpoint or GGUF file -> a quantized checkpoint directory.

    gemma4 quantize --model google/gemma-3-270m --out ./270m-int4 --scheme int4 --group-size 64
    gemma4 generate --model ./270m-int4 "Hello"
    gemma4 eval perplexity --model ./270m-int4 --file tests/data/eval/essays.txt

The output directory holds config.json (with `quantization_config`), model.safetensors and the
tokenizer: copied from a checkpoint directory, or written as tokenizer.json + tokenizer_config.json
(with the chat template) when the source is a GGUF file, so every command can load it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..helptext import RawHelpFormatter
from ..quant.gptq import CALIBRATION_TEXT
from ..quant.quantize import SCHEMES, model_nbytes
from ..quant.tensor import INT4_GROUP_SIZES

EXAMPLES = """examples:
  gemma4 quantize --out ./270m-int8                        # int8 (the default) of the embedded gemma-3-270m
  gemma4 quantize -m google/gemma-4-E4B-it -o ./e4b-int4 --scheme int4 --group-size 64
  gemma4 generate -m ./e4b-int4 "Hello"                    # every command loads the result
  gemma4 quantize -o ./270m-int4 --group-size 32          # GGUF source: groups on its blocks
  gemma4 quantize -o ./270m-gptq --calibration             # GPTQ int4 on the shipped text: best quality
  gemma4 quantize -o ./270m-gptq --calibration notes.txt   # ... calibrated on your own kind of text

int8 keeps ~50% of the bf16 bytes and costs little quality; int4 keeps ~30% (group 64) and costs
more (smaller groups: better quality, more bytes; --calibration: much better quality). Norms, the
MoE router and tiny tensors stay in float. Under int4 the embedding, which is also the tied output
layer, is stored int8 and the per-layer-embedding table int4 in groups of 128.
A GGUF source is dequantized tensor by tensor and quantized again; no float copy of the whole
model is ever held. Its blocks hold 32 weights, so --group-size 32 re-rounds each block on its own
grid: on the embedded gemma-3-270m, int4 perplexity rises 4-14% at group 32 (by text) and 98% at 64
rounded to nearest. --calibration runs GPTQ on Hadamard-rotated weights instead (the float model is
loaded whole; ~1 min for this model on a 2-core Xeon), calibrated on the shipped mix of ordinary English
(gemma4/quant/data) or on FILE: at group 64 it rises 5-6% on prose (4-9% over other sign draws).
Calibrate on the kind of text the model will read: calibrated on markdown docs it rose 8-27% on
prose. --tune-samples 16 then fits the float norms to the float model on text it samples itself
(~25 min on 2 cores; measured only with docs calibration, where it moved the default draw by a
point or less; docs/benchmarks.md). The output is
config.json (+ quantization_config), model.safetensors and the tokenizer files."""

CALIBRATION_TOKENS = 16384
TUNE_SAMPLES = 0  # off: on the default GPTQ draws the shipped sampling measured about no gain (docs/benchmarks.md)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="float checkpoint directory, .gguf file or Hub id (default: the embedded gemma-3-270m)")
    p.add_argument("--out", "-o", required=True, help="directory to write the quantized checkpoint to")
    p.add_argument("--scheme", choices=SCHEMES, default=None,
                   help="int8: per-channel, ~50%% of bf16, about no quality lost; int4: groups along K, ~30%% "
                        "of bf16. Default: int4 when --group-size or --calibration is given, else int8")
    p.add_argument("--group-size", type=int, default=None, choices=INT4_GROUP_SIZES, metavar="N",
                   help="int4 (implies it): weights per scale/zero along the input dim: 16, 32, 64 (default), "
                        "128 or 256")
    p.add_argument("--calibration", nargs="?", const=CALIBRATION_TEXT, default=None, metavar="FILE",
                   help="int4: run GPTQ on Hadamard-rotated weights, calibrated on FILE (UTF-8 text of the "
                        "kind you will use the model on, not your eval text) or, with no FILE, on the shipped "
                        "mix of ordinary English: much better quality. Loads the float model whole first")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS, metavar="N",
                   help=f"tokens of --calibration to use (default {CALIBRATION_TOKENS}; ~10k measured well)")
    p.add_argument("--tune-samples", type=int, default=TUNE_SAMPLES, metavar="N",
                   help="with --calibration: after GPTQ, fit the float norms to the float model on N texts of "
                        "512 tokens it samples itself (default 0: off; 16 is what was measured)")


def main(argv: list[str] | None = None) -> int:
    """`gemma4 quantize ...` (dispatched from gemma4/cli.py, which turns ValueError/OSError into messages)."""
    return run(parser().parse_args(argv))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4 quantize", epilog=EXAMPLES, formatter_class=RawHelpFormatter,
                                     description="Quantize a checkpoint's weights to int8 or int4 and save it.")
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    scheme = args.scheme or ("int4" if args.group_size or args.calibration else "int8")
    if args.group_size and scheme != "int4":
        raise ValueError(f"--group-size applies to int4 only; --scheme {scheme} quantizes per channel")
    quantize_cli(args.model, args.out, scheme, args.group_size or 64, calibration=args.calibration,
                 calibration_tokens=args.calibration_tokens, tune_samples=args.tune_samples)
    return 0


def quantize_cli(model: str | Path | None, out: str | Path, scheme: str = "int4", group_size: int = 64,
                 revision: str | None = None, calibration: str | Path | None = None,
                 calibration_tokens: int = CALIBRATION_TOKENS, tune_samples: int = TUNE_SAMPLES) -> Path:
    """Quantize `model` (None: the embedded gemma-3-270m) into the directory `out`; returns `out`.

    With `calibration` (a text file; int4 only) the float model is loaded whole and its linear
    layers are quantized by GPTQ on the text (gptq.py)."""
    from ..api import default_model_path, load_tokenizer
    from ..quant import quantize_checkpoint, save_quantized
    from ..weights import open_checkpoint
    from ..weights.hub import resolve
    from ..weights.save import check_target

    source = default_model_path() if model is None else resolve(model, revision=revision)
    out = check_target(out, "--out")
    _check_calibration(calibration, scheme, calibration_tokens, tune_samples)
    start = time.perf_counter()
    print(f"quantizing {source} to {scheme}" + (f" (group {group_size})" if scheme == "int4" else ""),
          file=sys.stderr, flush=True)
    if calibration is None:
        ckpt = open_checkpoint(source)
        qmodel = quantize_checkpoint(ckpt, scheme, group_size)
        # A checkpoint directory's tokenizer files are copied; a GGUF's tokenizer is written out.
        tokenizer, chat_format = load_tokenizer(ckpt) if ckpt.gguf is not None else (None, None)
    else:
        qmodel, tokenizer, chat_format = _calibrated(source, group_size, Path(calibration), calibration_tokens,
                                                     tune_samples)
    save_quantized(qmodel, out, scheme, group_size, tokenizer=tokenizer, chat_format=chat_format, source=source)
    size = (out / "model.safetensors").stat().st_size
    bf16 = 2 * qmodel.config.num_parameters()
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s: {size / 2**20:.1f} MiB of weights "
          f"({100 * size / bf16:.1f}% of bf16; {model_nbytes(qmodel) / 2**20:.1f} MiB in memory)",
          file=sys.stderr, flush=True)
    if source.suffix == ".gguf":
        _gguf_note(source, size, scheme)
    if scheme == "int4" and calibration is None:
        print("note: int4 was rounded to nearest; add --calibration (GPTQ on a shipped text; loads the float model "
              "whole) for far better quality: gemma-3-270m at group 64 rose +5% in perplexity with it, +98% without",
              file=sys.stderr, flush=True)
    return out


def _gguf_note(source: Path, size: int, scheme: str) -> None:
    """Re-quantizing an already low-bit GGUF: say what it can and cannot do."""
    from ..weights.gguf import GGUFFile

    with GGUFFile(source) as f:
        infos = list(f.tensor_infos.values())
    bits = 8 * sum(t.nbytes for t in infos) / max(1, sum(_numel(t.shape) for t in infos))
    if bits >= 8:
        return
    larger = (f"; at {size / 2**20:.0f} MiB the {scheme} file is larger than its {source.stat().st_size / 2**20:.0f} "
              "MiB source" if size > source.stat().st_size else "")
    print(f"note: {source.name} is already quantized (~{bits:.1f} bits a weight): quantizing it again cannot "
          f"bring back quality it lost{larger}. For a better or smaller model, quantize from the float checkpoint "
          "(e.g. --model google/gemma-3-270m); to save memory, the GGUF itself loads directly (--model FILE.gguf).",
          file=sys.stderr, flush=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_calibration(calibration: str | Path | None, scheme: str, calibration_tokens: int, tune_samples: int) -> None:
    """Before the (slow) work: the calibration flags' errors."""
    if calibration is not None and not Path(calibration).is_file():
        raise ValueError(f"--calibration {calibration}: no such file; give a text file to calibrate on")
    if calibration is not None and scheme != "int4":
        raise ValueError("--calibration applies to int4 only (int8 rounded to nearest already keeps quality)")
    if calibration_tokens < 2:
        raise ValueError(f"--calibration-tokens must be at least 2, got {calibration_tokens}")
    if tune_samples < 0:
        raise ValueError(f"--tune-samples must be 0 (no tuning) or more, got {tune_samples}")


def _calibrated(source: Path, group_size: int, text_file: Path, tokens: int, tune_samples: int):
    from ..api import load
    from ..quant import gptq_quantize
    from ..quant.tune import DEFAULT_WINDOW, record_targets, sample_windows, tune_norms

    model, tokenizer, chat_format = load(source, dtype="float32", device="cpu")
    ids = tokenizer.encode(text_file.read_text(encoding="utf-8"))[:tokens]
    if tune_samples:
        print(f"sampling {tune_samples} texts of up to {DEFAULT_WINDOW} tokens from the float model "
              "(to tune the norms on after GPTQ)", file=sys.stderr, flush=True)
        windows = sample_windows(model, tokenizer, tune_samples)
        targets = record_targets(model, windows)
    print(f"calibrating on {len(ids)} tokens of {text_file} (GPTQ)", file=sys.stderr, flush=True)
    gptq_quantize(model, ids, group_size)
    if tune_samples:
        curve = tune_norms(model, windows, targets)
        print(f"tuned the norms: mean KL to the float model {curve[0]:.4f} (first epoch) -> {curve[-1]:.4f} (last)",
              file=sys.stderr, flush=True)
    return model, tokenizer, chat_format
