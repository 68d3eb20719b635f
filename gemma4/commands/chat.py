"""`gemma4 chat`: an interactive conversation with history and streaming."""

from __future__ import annotations

import sys

from .common import (check_speculative_args, engine_from_args, load_from_args, messages_with_system, print_events,
                     sampling_from_args)

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def run(args) -> int:
    sampling = sampling_from_args(args)
    check_speculative_args(args)
    model, tokenizer, chat_format = load_from_args(args)
    engine = engine_from_args(args, model, session=True)
    from ..api import stream_chat

    system, history = args.system, []
    print(f"chatting with {args.model or 'gemma-3-270m'}; {HELP}; Ctrl-C stops a reply, Ctrl-D quits",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            print("[conversation cleared]", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation cleared]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"[unknown command; {HELP}]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        events = stream_chat(model, tokenizer, messages_with_system(system, history), enable_thinking=args.think,
                             max_tokens=args.max_tokens, sampling=sampling, chat_format=chat_format,
                             engine=engine)
        try:
            response = print_events(events, show_thoughts=args.think)
        except KeyboardInterrupt:
            events.close()
            print("\n[stopped]", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": response.content if response else ""})
        if args.verbose and engine.speculation is not None:
            print(f"[{engine.speculation.stats.describe()}]", file=sys.stderr)
