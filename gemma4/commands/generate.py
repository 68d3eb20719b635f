"""`gemma4 generate`: one prompt in, streamed text out."""

from __future__ import annotations

import sys

from .common import (check_speculative_args, engine_from_args, load_from_args, messages_with_system, print_events,
                     sampling_from_args)


def run(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass it as an argument or on stdin")
    sampling = sampling_from_args(args)
    check_speculative_args(args)
    model, tokenizer, fmt = load_from_args(args)
    engine = engine_from_args(args, model)
    chat = args.format == "chat" or (args.format == "auto" and (fmt.template is not None or args.system or args.think))
    if chat:
        from ..api import stream_chat

        messages = messages_with_system(args.system, [{"role": "user", "content": prompt}])
        events = stream_chat(model, tokenizer, messages, enable_thinking=args.think, max_tokens=args.max_tokens,
                             sampling=sampling, chat_format=fmt, engine=engine)
        response = print_events(events, show_thoughts=True)
        if args.verbose and response:
            print(f"[{response.prompt_tokens} prompt tokens, {response.completion_tokens} generated]", file=sys.stderr)
        _print_speculation(args, engine)
        return 0
    from ..engine.generate import stream_generate

    last = None
    sys.stdout.write(prompt)
    for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampling=sampling,
                                stop=args.stop, engine=engine):
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
