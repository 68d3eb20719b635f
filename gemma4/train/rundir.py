"""A run's `--out` directory: what a run owns there, and who may write into a used one.

A run owns the final adapter, `train_log.jsonl`, `checkpoint-NNNNNN/` and `.tmp-*` (those being
written). A second run into a used `--out` would mix its adapter, log and checkpoints with the
first's, and a later `--resume` would continue either, so a non-empty `--out` is refused unless
the run is continued (`--resume`) or replaced (`--overwrite`, which removes only what a run owns).

Continuing at step s drops what the run recorded past s: later checkpoints (unreadable ones, or a
continuation being replaced) and log records, so the log has each step once and a later
`--resume` cannot pick a checkpoint of the abandoned continuation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .adapter import CONFIG_FILE, TMP_PREFIX, WEIGHTS_FILE
from .state import CHECKPOINT, CHECKPOINT_FILES, checkpoints, read_state, resumable

LOG_FILE = "train_log.jsonl"


def resume_point(out: Path, resume: bool | str | Path,
                 say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint directory, its state) to continue from, or None for a new run."""
    if not resume:
        return None
    if resume is True or Path(resume).resolve() == out.resolve():
        found = resumable(out, say) if out.is_dir() else None
        if found is None:
            say(f"--resume: no checkpoint in {out} yet: starting a new run at step 0")
        return found
    return Path(resume), read_state(Path(resume))


def check_out(out: str | Path, resume: bool | str | Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an `out` whose files this run would mix with another's."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one or the other")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is not a directory")
    if overwrite:
        _owned(out)  # refuses a checkpoint directory holding files of someone else's
        return
    point = resume_point(out, resume, lambda _: None)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries or point is not None and point[0].parent.resolve() == out.resolve():
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    why = f"--resume found no checkpoint in {out}, and it is not empty" if point is None and resume \
        else f"--out {out} is not empty"
    raise FileExistsError(f"{why} ({shown}): pass --resume to continue the run in it, --overwrite to replace it "
                          "(that removes only the files a run writes), or choose another directory")


def prepare_out(out: Path, *, overwrite: bool, step: int | None, say: Callable[[str], None]) -> None:
    """Make `out` ready to write into: the old run removed (`overwrite`), or rewound to `step`, where
    this run continues it; files a killed run left half-written removed in any case."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.name.startswith(TMP_PREFIX) and _ours(p.name.removeprefix(TMP_PREFIX)):
            _remove(p)
    if overwrite:
        for p in _owned(out):
            _remove(p)
    elif step is not None:
        _rewind(out, step, say)


def _rewind(out: Path, step: int, say: Callable[[str], None]) -> None:
    later = [d for d in checkpoints(out) if int(CHECKPOINT.fullmatch(d.name)[1]) > step]
    for d in later:
        _refuse_foreign(d)
    for d in later:
        say(f"removing {d}: the run continues from step {step}")
        _remove(d)
    log = out / LOG_FILE
    if not log.is_file():
        return
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (n := _step(line)) is not None and n <= step]
    if len(kept) < len(lines):
        say(f"{log}: {len(lines) - len(kept)} record(s) past step {step} dropped (resuming from step {step})")
        tmp = out / (TMP_PREFIX + LOG_FILE)
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(log)


def _step(line: str) -> int | None:
    """The step of a log record; None for a torn line (a run killed mid-write) or a foreign one."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _owned(out: Path) -> list[Path]:
    """The entries of `out` a run wrote; a checkpoint directory that holds anything else is refused,
    never deleted."""
    if not out.is_dir():
        return []
    found = []
    for p in sorted(out.iterdir()):
        if not _ours(p.name.removeprefix(TMP_PREFIX)):
            continue
        if CHECKPOINT.fullmatch(p.name) and p.is_dir():
            _refuse_foreign(p)
        found.append(p)
    return found


def _refuse_foreign(checkpoint: Path) -> None:
    """A checkpoint directory is removed whole only if it holds nothing but a checkpoint's files."""
    foreign = sorted(q.name for q in checkpoint.iterdir()
                     if q.name.removeprefix(TMP_PREFIX) not in CHECKPOINT_FILES or q.is_dir())
    if foreign:
        raise FileExistsError(f"{checkpoint} holds files a run does not write ({', '.join(foreign)}): move them "
                              "first, or choose another --out")


def _ours(name: str) -> bool:
    return name in (CONFIG_FILE, WEIGHTS_FILE, LOG_FILE) or CHECKPOINT.fullmatch(name) is not None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)

