"""What a run trains on, stored with each checkpoint so that `--resume` continues the same run only.

- data: for a file, the SHA-256 of its bytes; always, that of the tokenized examples (ids and loss
  mask), which also catches a new tokenizer, chat format, --max-length or --on-bad-data;
- model: a hash of its config and one of the first 1,024 values of every weight, rounded to bf16
  (a base loaded in bf16 or fp32 has the same; never GBs of weights). The source path is shown,
  not compared: a moved checkpoint is the same model;
- options: every TrainConfig field but those in MAY_CHANGE.

MAY_CHANGE holds what a resumed run may change: its length (raise --max-steps / --epochs to extend
a run), cadences, the micro-batch size and memory switches (the token-weighted loss makes the
gradient independent of them up to rounding, as it is of the number of processes) and what
happens after training. --max-length and --on-bad-data only matter through the tokenized data.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .data import Example

MAY_CHANGE = frozenset({"epochs", "max_steps", "micro_batch_size", "eval_every", "eval_batch_size", "save_every",
                        "gradient_checkpointing", "ce_chunk_size", "max_length", "on_bad_data", "resume",
                        "overwrite", "export_merged", "progress"})
SAMPLE = 1024  # first values of each weight that identify the base


def fingerprint(model: torch.nn.Module, source: str | None, config, train, train_ex: list[Example], val,
                val_ex: list[Example] | None) -> dict[str, Any]:
    """JSON-able description of the run; call before adapters are added (the plain base)."""
    options = {k: v for k, v in asdict(config).items() if k not in MAY_CHANGE}
    return {"train": _data(train, train_ex), "val": None if val_ex is None else _data(val, val_ex),
            "model": _model(model, source), "options": json.loads(json.dumps(options))}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, one phrase per difference."""
    out = []
    for key, what in (("train", "training data"), ("val", "validation data")):
        a, b = saved.get(key), now.get(key)
        if a is None or b is None:
            if (a is None) != (b is None):
                had, has = ("no", "some") if a is None else ("some", "no")
                out.append(f"the checkpoint had {had} {what}, this run has {has}")
        elif a.get("file") is not None and b["file"] is not None and a["file"] != b["file"]:
            names = b["name"] if a.get("name") == b["name"] else f"{a.get('name')} -> {b['name']}"
            out.append(f"the {what} changed ({names})")
        elif a.get("tokens") != b["tokens"]:
            if b["file"] is not None and a.get("file") == b["file"]:
                why = "the same file: the tokenizer, chat format, --max-length or --on-bad-data differ"
            else:
                why = f"{a.get('examples')} -> {b['examples']} examples"
            out.append(f"the tokenized {what} changed ({why})")
    a, b = saved.get("model") or {}, now["model"]
    src = f"{a.get('source')} -> {b['source']}" if a.get("source") != b["source"] else str(b["source"])
    if a.get("config") != b["config"]:
        out.append(f"the base model's config changed ({src})")
    elif a.get("weights") != b["weights"]:
        out.append(f"the base model's weights changed ({src})")
    old, new = _flat(saved.get("options") or {}), _flat(now["options"])
    out += [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return out


def _flat(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 4}} -> {"lora.r": 4}, so a message names the one LoRA field that differs."""
    out = {}
    for k, v in options.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k == "lora" else {prefix + k: v})
    return out


def _data(data, examples: list[Example]) -> dict[str, Any]:
    tokens = hashlib.sha256()
    for e in examples:
        tokens.update(len(e.ids).to_bytes(8, "little"))
        tokens.update(array("q", e.ids).tobytes())
        tokens.update(bytes(e.mask))
    path = Path(data) if isinstance(data, (str, Path)) else None
    return {"name": path.name if path else None, "file": _file_hash(path) if path else None,
            "tokens": tokens.hexdigest(), "examples": len(examples)}


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _model(model: torch.nn.Module, source: str | None) -> dict[str, Any]:
    config = json.dumps(model.config.to_hf_dict(), sort_keys=True, default=str)
    weights = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):  # weights and persistent buffers (quantized bases)
        head = t.reshape(-1)[:SAMPLE].to("cpu", torch.bfloat16)
        weights.update(name.encode() + b"\0" + head.view(torch.int16).numpy().tobytes())
    return {"source": source, "config": hashlib.sha256(config.encode()).hexdigest(), "weights": weights.hexdigest()}
