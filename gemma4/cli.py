"""The `gemma4` command: one entry point, subcommands imported lazily so `--help` is instant.

    gemma4 generate "The capital of France is"           # the embedded gemma-3-270m
    gemma4 generate --model google/gemma-4-E2B-it --think "Why is the sky blue?"
    gemma4 chat --model ./my-checkpoint
    gemma4 info --variant gemma-4-26b-a4b
    gemma4 finetune --data train.jsonl --val val.jsonl --out run1   # a LoRA adapter for the 270m
    gemma4 chat --adapter run1                                       # ... used unmerged
    gemma4 quantize --out 270m-int8 --scheme int8                     # then: gemma4 chat -m 270m-int8
    gemma4 eval perplexity --model 270m-int8 --file text.txt
    gemma4 transcribe meeting.mp3 --model google/gemma-4-E2B-it --format srt
"""

from __future__ import annotations

import argparse
import sys

from .helptext import HelpFormatter
from .parallel.args import add_parallel_arguments

MODEL_HELP = ("checkpoint directory, .gguf file or Hugging Face Hub id (e.g. google/gemma-4-E2B-it); "
              "default: the embedded gemma-3-270m")


# name -> (help, module, function, pip extra that provides its dependencies)
PASSTHROUGH_TARGETS = {
    "serve": ("OpenAI-compatible HTTP server (see `gemma4 serve --help`)", "gemma4.serve.cli", "serve_cli", "serve"),
    # No extra: training needs only the base dependencies.
    "finetune": ("train a LoRA / QLoRA adapter on chat or text JSONL (see `gemma4 finetune --help`)",
                 "gemma4.commands.finetune", "main", None),
    "quantize": ("save an int8/int4 copy of a checkpoint (see `gemma4 quantize --help`)",
                 "gemma4.commands.quantize", "main", None),
    "eval": ("evaluate a model: `gemma4 eval perplexity --file text.txt` (see `gemma4 eval --help`)",
             "gemma4.commands.eval", "main", None),
}
PASSTHROUGH = {name: spec[0] for name, spec in PASSTHROUGH_TARGETS.items()}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter directory (from `gemma4 finetune` or PEFT: adapter_config.json + "
                        "adapter_model.safetensors), merged into float weights on load (kept unmerged over "
                        "quantized ones)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize a float or GGUF --model while loading it (int4: groups of 64): less "
                        "memory, some quality lost (docs/benchmarks.md); `gemma4 quantize` saves such a copy")
    p.add_argument("--exact", action="store_true",
                   help="on CPU, keep every weight in float32. By default a float32 CPU model decodes "
                        "about 2x faster with fp16 linear weights (fp32 math) and an int8 LM head whose "
                        "64 best candidates are recomputed exactly: greedy output is unchanged")
    p.add_argument("--compile", action="store_true",
                   help="decode with a compiled step (torch.compile over a static KV cache; on CUDA with CUDA "
                        "graphs). On a 2-core CPU gemma-3-270m decoded 1.2-1.6x faster, after a compile of "
                        "~35 s the first time (~5 s from the on-disk cache): for chat sessions and long "
                        "outputs, not a short one-off prompt")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (HF style)")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def _speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (same output, faster when drafts are accepted; docs/speculative.md)")
    g.add_argument("--speculative", choices=["ngram"], default=None,
                   help="draft by prompt lookup (n-grams of the prompt and output), for any model: copy-heavy work")
    g.add_argument("--draft-model", default=None, metavar="PATH",
                   help="a Gemma 4 MTP drafter (an -it-assistant checkpoint) for --model")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="tokens drafted per step, 1 to 32 (default: the drafter's own; adapted down when drafts fail)")


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt (Gemma 3: prepended to the first user turn)")
    p.add_argument("--think", action="store_true", help="enable thinking (Gemma 4); thoughts go to stderr")
    g = p.add_argument_group("images, video and audio (multimodal checkpoints; docs/multimodal.md)")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the (first) message; repeat for several")
    g.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video for the (first) message (Gemma 4; needs PyAV: pip install 'gemma4[video]')")
    g.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="an audio clip of at most 30 s for the (first) message (Gemma 4 E2B, E4B, 12B; "
                        "pip install 'gemma4[audio]'); longer recordings: `gemma4 transcribe`")
    g.add_argument("--image-tokens", type=int, default=280, choices=[70, 140, 280, 560, 1120],
                   help="soft tokens per image (Gemma 4): more sees finer detail and costs more prefill")
    g.add_argument("--text-only", action="store_true",
                   help="leave out a multimodal checkpoint's vision and audio towers (less memory; text only)")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("gemma4")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4", description="Run Gemma 4 and Gemma 3 models locally.")
    parser.add_argument("--version", action="version", version=f"gemma4 {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (streamed to stdout)",
                       formatter_class=HelpFormatter,
                       description="Generate from a prompt given as argument or on stdin. Base checkpoints "
                                   "continue the text; instruction checkpoints answer it as a chat message "
                                   "(choose with --format).")
    g.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    _model_args(g)
    _sampling_args(g)
    _chat_args(g)
    _speculative_args(g)
    g.add_argument("--format", choices=["auto", "chat", "raw"], default="auto",
                   help="raw: continue the text; chat: wrap it as a user turn; auto: chat when the checkpoint "
                        "has a chat template or --system/--think is given, raw otherwise")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--verbose", "-v", action="store_true", help="print speed statistics to stderr")
    add_parallel_arguments(g)

    c = sub.add_parser("chat", help="interactive chat (/reset, /system TEXT, /image PATH, /audio PATH, /exit; "
                                        "Ctrl-C stops a reply)",
                       formatter_class=HelpFormatter,
                       description="Chat with a model in the terminal: replies stream as they are written and "
                                   "the conversation is kept (each turn prefills only what is new). Commands: "
                                   "/reset, /system TEXT, /image PATH, /audio PATH, /exit. "
                                   "A line ending in \\ continues on the next; "
                                   '""" on a line opens and closes a multi-line block; the arrow keys recall '
                                   "earlier input. Use an instruction-tuned checkpoint (e.g. google/gemma-3-270m-it): "
                                   "the embedded gemma-3-270m is a base model that only continues text.")
    _model_args(c)
    _sampling_args(c)
    _chat_args(c)
    _speculative_args(c)
    c.add_argument("--verbose", "-v", action="store_true",
                   help="print tokens and speed (and speculative decoding statistics) after each reply")
    add_parallel_arguments(c)

    t = sub.add_parser("transcribe", help="transcribe a recording of any length (audio models: Gemma 4 E2B, E4B, 12B)",
                       formatter_class=HelpFormatter,
                       description="Transcribe an audio file (WAV, FLAC, OGG, MP3, ...; pip install "
                                   "'gemma4[audio]') of any length: it is cut into windows of at most 30 s at "
                                   "silences where it can, several windows run together, and the text is "
                                   "joined in order with each window's start and end (progress on stderr).")
    t.add_argument("file", help="the recording")
    _model_args(t)
    _sampling_args(t)
    t.add_argument("--format", choices=["text", "json", "verbose_json", "srt", "vtt"], default="text",
                   help="text; json {text}; verbose_json with segments (start/end seconds); srt or vtt subtitles")
    t.add_argument("--language", default=None, help="the spoken language (e.g. en), said in the instruction")
    t.add_argument("--prompt", default=None, help="context for the model: names and spellings to follow")
    t.add_argument("--batch", type=int, default=4, help="windows transcribed together")

    # Subcommands with their own parsers (and optional extras): arguments are passed through, so
    # `gemma4 --help` never imports the server stack. `gemma4 serve --help` shows their flags.
    for name, text in PASSTHROUGH.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)

    i = sub.add_parser("info", help="show a model's configuration, parameter counts and memory needs",
                       description="Describe a checkpoint (--model; default: the embedded gemma-3-270m) or a "
                                   "released variant by name (--variant, any case; --list names them): layers, "
                                   "attention geometry, parameters, weight and KV-cache memory, chat format. "
                                   "Reads only the config, never the weights.")
    i.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    i.add_argument("--variant", default=None, help="a released variant by name, e.g. gemma-4-e2b (see --list)")
    i.add_argument("--list", action="store_true", help="list the released variants")
    i.add_argument("--context", type=int, default=None,
                   help="tokens of one sequence for the per-rank KV-cache line (default: the model's context)")
    add_parallel_arguments(i)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .chat import ChatTemplateError
    from .weights import CheckpointError

    if argv and argv[0] in PASSTHROUGH_TARGETS:  # parsed by the subcommand itself, --help included
        args = argparse.Namespace(command=argv[0], args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        if args.command in PASSTHROUGH_TARGETS:
            return _passthrough(args.command, args.args)
        if args.command == "info":
            from .commands.info import run
        elif args.command == "generate":
            from .commands.generate import run
        elif args.command == "transcribe":
            from .commands.transcribe import run
        else:
            from .commands.chat import run
        return run(args) or 0
    except (CheckpointError, ChatTemplateError, ValueError, OSError) as e:  # meant for the user: no traceback
        print(f"gemma4: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _passthrough(command: str, argv: list[str]) -> int:
    import importlib

    _, module, function, extra = PASSTHROUGH_TARGETS[command]
    try:
        run = getattr(importlib.import_module(module), function)
    except ImportError as e:
        if extra is None:
            raise
        raise ValueError(f"`gemma4 {command}` needs extra packages ({e.name} is missing): "
                         f"pip install 'gemma4[{extra}]'") from None
    return run(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
