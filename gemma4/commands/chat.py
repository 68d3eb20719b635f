"""`gemma4 chat`: an interactive conversation with history and streaming.

Input: a line is a message; a line ending in `\\` continues on the next; a line `\"\"\"` opens a block
that the next `\"\"\"` line closes (pasted text). On a terminal, the arrow keys recall earlier input
(readline).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common import (check_media_args, check_speculative_args, engine_from_args, load_from_args,
                     messages_with_system, open_from_args, prefill_progress, print_events, print_stats,
                     sampling_from_args, with_media)

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt), "
        "/image PATH or /audio PATH (attach an image or an audio clip to your next message), /exit")
MULTILINE = 'end a line with \\ to continue it, or put """ on a line before and after a block'


def read_message(prompt=input) -> str:
    """One message from the user, over several lines when it says so. EOFError at the end of input."""
    first = prompt("> ")
    if first.strip() == '"""':
        lines = []
        while (line := prompt(". ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(prompt(". "))
    return "\n".join(lines)


def _line_editing() -> None:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() editing and history
        except ImportError:  # e.g. Windows without pyreadline
            pass


def run(args) -> int:
    from ..parallel.run import finish, lost_group, start

    args.layout = start(args)  # --tp: rank 0 reads the terminal, every rank runs each turn
    try:
        return _run(args)
    except RuntimeError as error:
        if lost_group(args.layout, error, "chat"):
            return 1
        raise
    finally:
        finish(args.layout)


def _run(args) -> int:
    from ..parallel.run import shared_input

    sampling = sampling_from_args(args)
    check_speculative_args(args)
    check_media_args(args)
    ckpt = open_from_args(args, chat=True)
    model, tokenizer, chat_format = load_from_args(args, ckpt)
    engine = engine_from_args(args, model, session=True)
    from ..api import stream_chat
    from ..media import MediaError

    _line_editing()
    system, history = args.system, []
    images, videos, audios = list(args.image), list(args.video), list(args.audio)  # for the next message
    print(f"chatting with {args.model or 'gemma-3-270m'}; {HELP}; {MULTILINE}; Ctrl-C stops a reply, "
          "Ctrl-D quits", file=sys.stderr)
    read = shared_input(args.layout, read_message)
    while True:
        try:
            text = read().strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
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
        if text.startswith(("/image", "/audio")):
            kind, path = text[1:6], text[len("/image"):].strip()
            if not Path(path).is_file():
                print(f"[no such file: {path!r}]", file=sys.stderr)
            else:
                attached = images if kind == "image" else audios
                attached.append(path)
                print(f"[{len(attached)} {kind}(s) attached to your next message]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"[unknown command; {HELP}]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": with_media(text, images, videos, audios)})
        images, videos, audios = [], [], []
        events = stream_chat(model, tokenizer, messages_with_system(system, history), enable_thinking=args.think,
                             max_tokens=args.max_tokens, sampling=sampling, chat_format=chat_format,
                             engine=engine, on_prefill=prefill_progress(), image_tokens=args.image_tokens)
        try:
            response = print_events(events, show_thoughts=args.think)
        except MediaError as error:  # a bad image or clip: say so, and keep the session
            print(f"[{error}]", file=sys.stderr)
            history.pop()
            continue
        except KeyboardInterrupt:
            if args.layout is not None:  # the other ranks are still in this reply: stop them all
                raise
            events.close()
            print("\n[stopped]", file=sys.stderr)
            history.pop()
            continue
        if args.verbose and response:
            print_stats(response)
        history.append({"role": "assistant", "content": response.content if response else ""})
        if args.verbose and engine.speculation is not None:
            print(f"[{engine.speculation.stats.describe()}]", file=sys.stderr)
