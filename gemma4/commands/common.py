"""What the subcommands share: loading with a status line, sampling flags -> SamplingParams."""

from __future__ import annotations

import sys
from pathlib import Path
import time

import torch

from ..engine.sampling import SamplingParams


def pick_device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def open_from_args(args, *, chat: bool):
    """The checkpoint, opened (config and headers only) so that options are checked against it
    before a long load (audio asked of a model without an audio tower is refused here); a `chat`
    use of a base model gets its warning here, plainly, on stderr."""
    from ..api import base_model_warning, check_device, default_model_path
    from ..weights import open_checkpoint
    from ..weights.hub import resolve

    if getattr(args, "max_tokens", 1) < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    check_device(args.device)
    ckpt = open_checkpoint(resolve(args.model) if args.model else default_model_path())
    if getattr(args, "think", False) and ckpt.config.family != "gemma4":
        raise ValueError(f"--think: {ckpt.config.family} models have no thinking mode (Gemma 4 only); drop --think")
    if (getattr(args, "audio", None) or getattr(args, "command", None) == "transcribe") and (
            ckpt.audio is None or getattr(args, "text_only", False)):
        from ..api import NO_AUDIO

        raise ValueError(NO_AUDIO)
    if chat and (warning := base_model_warning(ckpt)):
        print(f"gemma4: warning: {warning}", file=sys.stderr, flush=True)
    return ckpt


def load_from_args(args, ckpt=None):
    """`gemma4.load` with the command's options and a status line; `ckpt` as `open_from_args` gave it."""
    from ..api import load

    start = time.perf_counter()
    adapter = getattr(args, "adapter", None)
    with_adapter = f" with the adapter {adapter}" if adapter else ""
    print(f"loading {args.model or 'the embedded gemma-3-270m'}{with_adapter} ...", file=sys.stderr, flush=True)
    loaded = load(ckpt if ckpt is not None else args.model, dtype=args.dtype, device=pick_device(args.device),
                  adapter=adapter, quantize=getattr(args, "quantize", None),
                  text_only=getattr(args, "text_only", False), layout=getattr(args, "layout", None))
    if not getattr(args, "exact", True):
        from ..engine.cpu import speed_up

        speed_up(loaded.model)  # CPU float32 only; a no-op elsewhere
    print(f"loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return loaded


def check_speculative_args(args) -> None:
    """Refuse bad --speculative / --draft-model / --draft-tokens before loading anything."""
    from ..engine.speculative import check_options

    check_options(getattr(args, "speculative", None), getattr(args, "draft_model", None),
                  getattr(args, "draft_tokens", None))


def engine_from_args(args, model, *, session: bool = False):
    """The decode engine kept for a whole command: with a compiled step when --compile is given,
    for a chat `session` a prefix cache, so each turn prefills only what is new, and a drafter
    for --speculative / --draft-model. None when a plain one-shot generation needs none of them."""
    from ..engine.speculative import make_speculation

    speculation = make_speculation(model, getattr(args, "speculative", None), getattr(args, "draft_model", None),
                                   getattr(args, "draft_tokens", None))
    if not (getattr(args, "compile", False) or session or speculation):
        return None
    from ..engine.core import Engine

    mode = decode_mode(args, model)
    compile_step = mode != "eager"
    if not (compile_step or session or speculation):
        return None
    engine = Engine(model, mode=mode, prefix_cache=SESSION_PREFIX_CACHE if session else 0, speculation=speculation)
    if compile_step:
        start = time.perf_counter()
        print("compiling the decode step (slow the first time; later runs read inductor's on-disk cache) ...",
              file=sys.stderr, flush=True)
        engine.warm_up()
        print(f"compiled in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return engine


def decode_mode(args, model) -> str:
    """The engine's decode step for --compile: traced (CUDA graphs on a GPU), or eager without the
    flag or for quantized weights, which cannot be compiled yet (said on stderr)."""
    if not getattr(args, "compile", False):
        return "eager"
    from ..engine.core import compilable

    if not compilable(model):
        print("--compile: quantized weights cannot be compiled yet; decoding without it", file=sys.stderr)
        return "eager"
    return "reduce-overhead" if next(model.parameters()).device.type == "cuda" else "compile"


# Tokens of K/V a chat session keeps for its next turns (gemma-3-270m: 36 KB a token in float32).
SESSION_PREFIX_CACHE = 4096


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def check_media_args(args) -> None:
    """--image / --video / --audio files must exist (checked before a long load)."""
    for kind in ("image", "video", "audio"):
        for path in getattr(args, kind, None) or ():
            if not Path(path).is_file():
                raise ValueError(f"--{kind} {path}: no such file")


def with_media(text: str, images=(), videos=(), audios=()) -> str | list[dict]:
    """A user message's content: the text alone, or content parts with the media first."""
    if not images and not videos and not audios:
        return text
    return ([{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
            + [{"type": "audio", "audio": p} for p in audios] + [{"type": "text", "text": text}])


def messages_with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def print_events(events, show_thoughts: bool):
    """Write streamed chat events: content to stdout, thoughts (dimmed) to stderr. Returns the response."""
    from ..api import ChatResponse
    from ..chat import ContentDelta, ThoughtDelta, ToolCallComplete

    response = None
    for ev in events:
        if isinstance(ev, ContentDelta):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif isinstance(ev, ThoughtDelta) and show_thoughts:
            sys.stderr.write(f"\033[2m{ev.text}\033[0m")
            sys.stderr.flush()
        elif isinstance(ev, ToolCallComplete):
            sys.stdout.write(f"\n[tool call] {ev.call}\n")
        elif isinstance(ev, ChatResponse):
            response = ev
    sys.stdout.write("\n")
    return response


PROGRESS_FROM = 2048  # prompts this long (tokens) show a prefill progress line


def prefill_progress(stream=None):
    """An `on_prefill` callback for a long prompt: one rewritten stderr line, tokens and speed."""
    stream = stream or sys.stderr
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        if total < PROGRESS_FROM:
            return
        rate = done / max(time.perf_counter() - start, 1e-9)
        end = "\n" if done >= total else ""
        stream.write(f"\rprefill {done:,} / {total:,} prompt tokens ({rate:,.0f} tok/s){end}")
        stream.flush()

    return report


def print_stats(response) -> None:
    """The `-v` line after a reply: tokens, prefix reuse and speeds."""
    cached = f", {response.cached_tokens} reused" if response.cached_tokens else ""
    print(f"[prompt: {response.prompt_tokens} tokens{cached}, {response.prompt_tps:.1f} tok/s; generation: "
          f"{response.completion_tokens} tokens, {response.generation_tps:.1f} tok/s; "
          f"finish: {response.finish_reason}]", file=sys.stderr)
