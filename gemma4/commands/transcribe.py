"""`gemma4 transcribe FILE`: a recording of any length to text, window by window (gemma4.transcription)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import decode_mode, load_from_args, open_from_args, sampling_from_args


def run(args) -> int:
    from ..media import SAMPLING_RATE, load_audio
    from ..transcription import transcribe

    if not Path(args.file).is_file():
        raise ValueError(f"{args.file}: no such file")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    sampling = sampling_from_args(args)
    ckpt = open_from_args(args, chat=False)  # refuses a model without audio before loading it
    samples = load_audio(args.file)  # a file that cannot be read is refused before loading, too
    model, tokenizer, fmt = load_from_args(args, ckpt)
    mode = decode_mode(args, model)
    start = time.perf_counter()

    def progress(done: int, total: int, segment) -> None:
        elapsed = time.perf_counter() - start
        print(f"\rtranscribed {done}/{total} windows of 30 s or less (last: {_clock(segment.start)}-"
              f"{_clock(segment.end)}) in {elapsed:.0f} s", end="\n" if done == total else "", file=sys.stderr,
              flush=True)

    result = transcribe(model, tokenizer, (samples, SAMPLING_RATE), chat_format=fmt, language=args.language,
                        prompt=args.prompt, max_tokens=args.max_tokens, sampling=sampling, batch=args.batch,
                        on_window=progress, mode=mode)
    out = result.render(args.format, sampling.temperature)
    sys.stdout.write(json.dumps(out, ensure_ascii=False, indent=2) + "\n" if isinstance(out, dict) else out)
    return 0


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
