"""`gemma4 generate`: one prompt in, streamed text out."""

from __future__ import annotations

import sys

from .common import (check_media_args, check_speculative_args, engine_from_args, load_from_args, messages_with_system,
                     open_from_args, prefill_progress, print_events, print_stats, sampling_from_args, with_media)


def run(args) -> int:
    from ..parallel.run import finish, lost_group, start

    args.layout = start(args)
    try:
        return _run(args)
    except RuntimeError as error:
        if lost_group(args.layout, error, "generate"):
            return 1
        raise
    finally:
        finish(args.layout)


def _run(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass it as an argument or on stdin")
    sampling = sampling_from_args(args)
    check_speculative_args(args)
    check_media_args(args)
    ckpt = open_from_args(args, chat=False)
    model, tokenizer, fmt = load_from_args(args, ckpt)
    engine = engine_from_args(args, model)
    media = bool(args.image or args.video or args.audio)  # media need the chat format's placeholders
    chat = args.format == "chat" or (args.format == "auto" and (fmt.template is not None or args.system or args.think
                                                                or media))
    if chat:
        from ..api import base_model_warning, stream_chat

        if warning := base_model_warning(ckpt):
            print(f"gemma4: warning: {warning}", file=sys.stderr, flush=True)

        content = with_media(prompt, args.image, args.video, args.audio)
        messages = messages_with_system(args.system, [{"role": "user", "content": content}])
        events = stream_chat(model, tokenizer, messages, enable_thinking=args.think, max_tokens=args.max_tokens,
                             sampling=sampling, chat_format=fmt, engine=engine, on_prefill=prefill_progress(),
                             image_tokens=args.image_tokens)
        response = print_events(events, show_thoughts=True)
        if args.verbose and response:
            print_stats(response)
        _print_speculation(args, engine)
        return 0
    if media:
        raise ValueError("--image, --video and --audio need the chat format: leave out --format raw")
    from ..engine.generate import stream_generate

    last = None
    sys.stdout.write(prompt)
    for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampling=sampling,
                                stop=args.stop, engine=engine, on_prefill=prefill_progress()):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and last:
        print(f"[prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s; "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s; "
              f"finish: {last.finish_reason}]", file=sys.stderr)
    _print_speculation(args, engine)
    return 0


def _print_speculation(args, engine) -> None:
    if args.verbose and engine is not None and engine.speculation is not None:
        print(f"[{engine.speculation.stats.describe()}]", file=sys.stderr)
