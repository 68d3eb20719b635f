"""Resumable training checkpoints: `checkpoint-NNNNNN/` = the adapter + the trainer's state.

Nothing is pickled: tensors (AdamW moments and step counts, keyed by parameter name, and the RNG
state) go to `trainer_state.safetensors`, the rest (step, losses, scheduler, optimizer
hyper-parameters, config) to `trainer_state.json`. Tensors are saved whole, so a checkpoint of an
N-process FSDP run resumes in any number of processes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .adapter import adapter_state_dict, save_adapter

STATE_FILE = "trainer_state.json"  # step, losses, scheduler, config
TENSORS_FILE = "trainer_state.safetensors"  # AdamW moments, RNG state
RNG_KEY = "rng/cpu"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*/" + STATE_FILE))
    return found[-1].parent if found else None


def save_state(directory: Path, model, optimizer, scheduler, config, step: int, history, val_history, rank: int,
               source: str | None) -> None:
    """Adapter + trainer state. Every rank calls this (gathering shards is collective); rank 0 writes."""
    from safetensors.torch import save_file

    state = adapter_state_dict(model)
    tensors, groups = _optimizer_state(model, optimizer)
    if rank != 0:
        return
    save_adapter(model, directory, config.lora, base_model_name_or_path=source, state=state)
    tensors[RNG_KEY] = torch.get_rng_state()
    save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": "pt"})
    meta = {"step": step, "history": history, "val_history": val_history, "scheduler": scheduler.state_dict(),
            "optimizer_param_groups": groups, "config": {k: v for k, v in asdict(config).items() if k != "lora"}}
    (directory / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")


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


def load_state(directory: Path, model, optimizer, scheduler) -> tuple[int, list[float], list[tuple[int, float]]]:
    """Restore the optimizer, scheduler and RNG; returns (step, train losses, validation losses)."""
    from safetensors.torch import load_file

    meta = json.loads((directory / STATE_FILE).read_text())
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
