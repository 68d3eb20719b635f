"""Drafter checkpoints (`-it-assistant`: config.json + safetensors) -> `Drafter`, strictly.

Every tensor is checked by name and shape, and the drafter is checked against the target it
will serve (`DrafterConfig.mismatches`): a drafter trained for another model is refused with the
list of what differs, before anything is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, DrafterConfig, TextConfig
from ..model.drafter import Drafter
from .errors import CheckpointError
from .hub import resolve
from .loader import _check, parse_dtype
from .safetensors import SINGLE, open_tensors, read_config, shard_files
from .save import check_target, write_safetensors

IGNORED = ("lm_head.weight",)  # tied to model.embed_tokens.weight; written by some exporters


def read_drafter_config(source: Path) -> DrafterConfig:
    raw = read_config(source)
    try:
        return DrafterConfig.from_hf_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {str(e).rstrip('.')}. Point --draft-model at an MTP drafter "
                              "(a '-it-assistant' checkpoint) or fix its config.json.") from None


def check_fits(config: DrafterConfig, target: TextConfig, source: str = "the drafter") -> None:
    """Raise a CheckpointError naming every difference that keeps the drafter from serving `target`."""
    diff = config.mismatches(target)
    if diff:
        raise CheckpointError(f"{source} was not made for this target model: " + "; ".join(diff)
                              + ". Use the drafter released with the target (its '-it-assistant' checkpoint), "
                              "or train one with `gemma4 finetune --drafter`.")


def load_drafter(path_or_id: str | Path, target: TextConfig | None = None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, revision: str | None = None) -> Drafter:
    """Load a drafter from a directory or Hub id; with `target`, refuse one that does not fit it."""
    device = torch.device(device or "cpu")
    dtype = parse_dtype(dtype, device)
    source = resolve(path_or_id, revision=revision)
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a drafter checkpoint directory (config.json + *.safetensors)")
    config = read_drafter_config(source)
    if target is not None:
        check_fits(config, target, str(source))
    with torch.device("meta"):
        model = Drafter(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {name: (get, shape) for name, get, shape in open_tensors(shard_files(source)) if name not in IGNORED}
    _check(expected, found, str(source))
    state = {}
    for name in expected:
        t = found[name][0]()
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else torch.long)
    model.load_state_dict(state, assign=True, strict=True)
    model.model.reset_buffers(device)
    if model.masked_embedding is not None:
        _check_ordering(model.masked_embedding.token_ordering, str(source))
    return model.eval()


def _check_ordering(ordering: torch.Tensor, source: str) -> None:
    """token_ordering must be a permutation of the vocabulary, or the sparse head indexes garbage."""
    n = ordering.numel()
    ok = bool(((ordering >= 0) & (ordering < n)).all()) and torch.bincount(ordering.clamp(0, n - 1),
                                                                           minlength=n).eq(1).all()
    if not ok:
        raise CheckpointError(f"{source}: masked_embedding.token_ordering is not a permutation of the {n} token ids; "
                              "the checkpoint is corrupt: re-download it")


def save_drafter(directory: str | Path, model: Drafter, num_assistant_tokens: int = 4) -> Path:
    """Write the released layout (config.json, model.safetensors, and generation_config.json with
    the draft length `num_assistant_tokens`) that `load_drafter` reads."""
    directory = check_target(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    write_safetensors(state, directory / SINGLE, metadata={"format": "pt"})
    config = model.config.to_hf_dict()
    config["dtype"] = str(model.pre_projection.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"num_assistant_tokens": num_assistant_tokens, "num_assistant_tokens_schedule": "constant"}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return directory


VOCABULARY = "draft_vocabulary.json"  # beside the released files; transformers ignores it


def save_vocabulary(directory: str | Path, ids) -> Path:
    """Write the token ids a drafter's training saw (prompts and answers), which its CPU fast path
    scores instead of the whole vocabulary (gemma4/engine/mtp.py)."""
    path = Path(directory) / VOCABULARY
    path.write_text(json.dumps({"token_ids": sorted({int(i) for i in ids})}) + "\n", encoding="utf-8")
    return path


def read_vocabulary(directory: str | Path, vocab_size: int) -> list[int] | None:
    """The drafter's shortlist (`save_vocabulary`), or None when it has none (released drafters)."""
    path = Path(directory) / VOCABULARY
    if not path.is_file():
        return None
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))["token_ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a draft vocabulary ({e}); delete it or retrain the drafter") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise CheckpointError(f"{path}: token_ids must be a list of ids below {vocab_size}; delete it or retrain "
                              "the drafter")
    return ids
