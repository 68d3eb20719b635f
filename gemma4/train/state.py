"""Resumable training checkpoints: `checkpoint-NNNNNN/` = the adapter + the trainer's state.

Nothing is pickled: tensors (AdamW moments and step counts, keyed by parameter name, and the RNG
state) go to `trainer_state.safetensors`, the rest (step, losses, scheduler, optimizer
hyper-parameters, config, the run's fingerprint) to `trainer_state.json`. Tensors are saved
whole, so a checkpoint of an N-process FSDP run resumes in any number of processes.

A checkpoint is written into `.tmp-checkpoint-NNNNNN/` and renamed when whole, so a crash never
leaves half a checkpoint to resume from. Reading one checks every file and field first
(`read_state`): a damaged one is a `ResumeError` that names the file, and `resumable` falls back
to the checkpoint before it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter import CONFIG_FILE, TMP_PREFIX, WEIGHTS_FILE, adapter_state_dict, save_adapter

STATE_FILE = "trainer_state.json"  # step, losses, scheduler, config, fingerprint
TENSORS_FILE = "trainer_state.safetensors"  # AdamW moments, RNG state
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, TENSORS_FILE)
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
RNG_KEY = "rng/cpu"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from, or a run that is not the checkpoint's."""


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:06d}"


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint directories in `out`, newest first (whole or not: `read_state` checks)."""
    found = [p for p in out.glob("checkpoint-*") if CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name)[1]), reverse=True)


def resumable(out: Path, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `out` that reads back and its state, saying why newer ones do not;
    None when `out` has no checkpoint at all."""
    problems = []
    for directory in checkpoints(out):
        try:
            meta = read_state(directory)
        except ResumeError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            say(f"{problem}: resuming from the checkpoint before it, {directory}")
        return directory, meta
    if problems:
        raise ResumeError(f"no checkpoint in {out} can be resumed from: {'; '.join(problems)} "
                          "(--overwrite starts the run again)")
    return None


def save_state(directory: Path, model, optimizer, scheduler, config, step: int, history, val_history, rank: int,
               source: str | None, fingerprint: dict[str, Any]) -> None:
    """Adapter + trainer state. Every rank calls this (gathering shards is collective); rank 0 writes."""
    state = adapter_state_dict(model)
    tensors, groups = _optimizer_state(model, optimizer)
    if rank != 0:
        return
    tmp = directory.with_name(TMP_PREFIX + directory.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp, config.lora, base_model_name_or_path=source, state=state)
        tensors[RNG_KEY] = torch.get_rng_state()
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        meta = {"step": step, "history": history, "val_history": val_history, "scheduler": scheduler.state_dict(),
                "optimizer_param_groups": groups, "fingerprint": fingerprint,
                "config": {k: v for k, v in asdict(config).items() if k != "lora"}}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.rename(directory)  # fails rather than replace a directory that is not empty
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _optimizer_state(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as whole CPU tensors named "optim/<parameter>/<key>" (the same file for 1 or N
    processes), and the param groups' hyper-parameters (JSON)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"optim/{names[id(p)]}/{k}"] = _whole(torch.as_tensor(v))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, groups


def _whole(v: torch.Tensor) -> torch.Tensor:
    return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous().clone()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What trainer_state.json must hold, checked before anything is restored from it.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "step": ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "history": ("a list of numbers", lambda v: isinstance(v, list) and all(map(_number, v))),
    "val_history": ("a list of [step, loss]",
                    lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_number, p))
                                                          for p in v)),
    "scheduler": ("an object", lambda v: isinstance(v, dict)),
    "optimizer_param_groups": ("a list of objects", lambda v: isinstance(v, list) and all(isinstance(g, dict)
                                                                                       for g in v)),
    "fingerprint": ("an object of objects", lambda v: isinstance(v, dict) and all(x is None or isinstance(x, dict)
                                                                                  for x in v.values())),
}


def read_state(directory: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, once every file of it reads back; else a ResumeError naming
    the file. A state without a fingerprint (older checkpoints) is accepted."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"{directory} is not a checkpoint: it has no {STATE_FILE}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path} is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise ResumeError(f"{path} is unreadable (not a JSON object)")
    for key, (kind, ok) in _FIELDS.items():
        if key == "fingerprint" and key not in meta:
            continue
        if not ok(meta.get(key)):
            raise ResumeError(f"{path} is unreadable ({key!r} must be {kind}, not {meta.get(key)!r:.40})")
    if len(meta["history"]) != meta["step"]:
        raise ResumeError(f"{path} is unreadable ({len(meta['history'])} losses for step {meta['step']})")
    for name in (TENSORS_FILE, WEIGHTS_FILE):
        try:
            with safe_open(str(directory / name), "pt") as f:  # the header, checked against the file size
                keys = set(f.keys())
        except Exception as e:  # safetensors raises its own error types, or OSError
            raise ResumeError(f"{directory / name} is unreadable ({e})") from None
        if name == TENSORS_FILE and RNG_KEY not in keys:
            raise ResumeError(f"{directory / name} is unreadable (no {RNG_KEY})")
    return meta


def load_state(directory: Path, model, optimizer, scheduler,
               meta: dict[str, Any] | None = None) -> tuple[int, list[float], list[tuple[int, float]]]:
    """Restore the optimizer, scheduler and RNG; returns (step, train losses, validation losses)."""
    meta = read_state(directory) if meta is None else meta
    tensors = load_file(str(directory / TENSORS_FILE))
    names = {id(p): n for n, p in model.named_parameters()}
    for group, saved_group in zip(optimizer.param_groups, meta["optimizer_param_groups"], strict=True):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items()})
        for p in group["params"]:
            prefix = f"optim/{names[id(p)]}/"
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not entry:
                raise ValueError(f"{directory}: no optimizer state for {names[id(p)]}; another LoRA configuration?")
            optimizer.state[p] = {k: _like(v, p) for k, v in entry.items()}
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors[RNG_KEY])
    return meta["step"], list(meta["history"]), [tuple(v) for v in meta["val_history"]]


def _like(v, p: torch.Tensor):
    """A saved whole tensor laid out like parameter p (sharded like it under FSDP)."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return v.to(p.device)
