"""Checkpoint -> model: resolve the source, read the config, build on `meta`, assign tensors.

The model is built on the meta device (no memory), then every parameter is assigned a tensor
from the checkpoint (memory-mapped, converted only when the dtype or device differs). Loading is
strict: a missing, unexpected or mis-shaped tensor is an error naming it. The only exceptions
are explicit: the towers of multimodal checkpoints (not supported yet, skipped with a notice),
the tied LM head, and the unused K/V weights that released checkpoints ship for KV-shared layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, TextConfig
from ..model import Gemma
from .errors import CheckpointError
from .hub import resolve
from .safetensors import open_tensors, read_config, shard_files

log = logging.getLogger(__name__)

TEXT_PREFIXES = ("model.language_model.", "model.")  # multimodal, then text-only layout
# Parts of multimodal checkpoints that the text model does not use (yet).
TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                  "model.vision_embedder.")
Entry = tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]  # (checkpoint name, lazy getter, shape)
# Swaps the weights a `quantization_config` lists for quantized placeholders on the meta model and
# returns the names of the tensors to assign as stored (gemma4.quant.prepare_quantized). A hook, so
# that loading does not import quantization.
Prepare = Callable[[Gemma, dict, torch.dtype], set[str]]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (the checkpoints' own dtype); float32 on CPU, where bf16 matmuls are slow."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)} or 'auto'")
    return names[dtype]


def ignored_keys(config: TextConfig) -> set[str]:
    """Checkpoint tensors that exist on disk but that the model has no use for.

    Released E2B/E4B checkpoints still ship k_proj/v_proj/k_norm/v_norm for KV-shared layers;
    those layers read the producer's K/V instead (spec 1.5), so the tensors are dropped.
    """
    keys = set()
    for spec in config.layers:
        if spec.shares_kv:
            for part in ("k_proj", "v_proj", "k_norm", "v_norm"):
                keys.add(f"model.layers.{spec.index}.self_attn.{part}.weight")
    if config.tie_word_embeddings:
        keys.add("lm_head.weight")  # tied to model.embed_tokens.weight
    return keys


def canonical_name(name: str) -> str | None:
    """Checkpoint name -> our parameter name; None for tower tensors we skip."""
    if name.startswith(TOWER_PREFIXES):
        return None
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


@dataclass
class Checkpoint:
    """An opened checkpoint: its config and its tensors, nothing read yet but the headers.
    `gguf`: the parsed .gguf (metadata, tokenizer vocabulary) when the source is one, so the
    tokenizer and the chat template come from the same single parse."""

    source: Path
    config: TextConfig
    raw: dict  # config.json (or the GGUF metadata as config.json keys)
    _tensors: Callable[[torch.dtype], list[Entry]]
    gguf: Any = None

    def entries(self, gguf_dtype: torch.dtype = torch.float32) -> list[Entry]:
        """Lazy tensors: memory-mapped safetensors, or GGUF tensors dequantized to `gguf_dtype` one
        by one when their getter is called."""
        return self._tensors(gguf_dtype)

    @property
    def quantization(self) -> dict | None:
        return self.raw.get("quantization_config")


def load_model(
    path_or_id: str | Path | Checkpoint,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    prepare: Prepare | None = None,
) -> Gemma:
    """Load a Gemma 3/4 text model from a local checkpoint, a .gguf file, a Hub id or an opened
    `Checkpoint`. A quantized checkpoint needs `prepare` (`gemma4.load_model` passes gemma4.quant's)."""
    device = torch.device(device or "cpu")
    dtype = parse_dtype(dtype, device)
    ckpt = path_or_id if isinstance(path_or_id, Checkpoint) else open_checkpoint(path_or_id, revision)
    return build(ckpt.config, ckpt.entries(dtype), dtype, device, str(ckpt.source), ckpt.quantization, prepare)


def open_checkpoint(path_or_id: str | Path, revision: str | None = None) -> Checkpoint:
    """Resolve a source and read its config and tensor headers (see `Checkpoint`)."""
    source = resolve(path_or_id, revision=revision)
    gguf = None
    if source.is_file() and source.suffix == ".gguf":
        from .gguf import GGUFFile

        gguf = GGUFFile(source)
        raw = gguf.config

        def tensors(dtype: torch.dtype) -> list[Entry]:
            return [(n, partial(gguf.tensor, n, dtype), tuple(gguf.shape(n))) for n in gguf.names()]
    else:
        if not source.is_dir():
            raise CheckpointError(f"{source} is neither a checkpoint directory nor a .gguf file")
        raw = read_config(source)
        found = list(open_tensors(shard_files(source)))

        def tensors(dtype: torch.dtype) -> list[Entry]:
            return found
    try:
        config = TextConfig.from_hf_dict(raw)
    except ConfigError as e:
        fix = ("Download or convert the file again" if gguf is not None
               else "Fix config.json, or use the one that came with these weights")
        raise CheckpointError(f"{source}: {str(e).rstrip('.')}. {fix}.") from None
    if gguf is None:  # a GGUF file checks its block_count against its blk.N tensors itself
        _check_layer_count(config, found, source)
    return Checkpoint(source, config, raw, tensors, gguf)


def _check_layer_count(config: TextConfig, entries: list[Entry], source: Path) -> None:
    """Every layer of num_hidden_layers must hold tensors, checked before anything is built per layer
    (1,000 layers take a second to build even on meta). Tensors beyond it are reported by `_check`."""
    held = set()
    for name, _, _ in entries:
        parts = (canonical_name(name) or "").split(".", 3)
        if parts[:2] == ["model", "layers"] and len(parts) > 3 and parts[2].isdecimal() and len(parts[2]) < 10:
            held.add(int(parts[2]))
    n = config.num_hidden_layers
    missing = [i for i in range(n) if i not in held]
    if missing:
        raise CheckpointError(f"{source}: config.json says num_hidden_layers={n}, but the weights hold no tensors "
                              f"for layers {_some(missing)}. Is config.json the one that belongs to these weights?")


def _some(items) -> str:
    """The first five of `items`, then how many more: error messages stay short."""
    items = list(items)
    return ", ".join(map(str, items[:5])) + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")


def build(
    config: TextConfig,
    entries: list[Entry],
    dtype: torch.dtype,
    device: torch.device,
    source: str = "checkpoint",
    quantization: dict | None = None,
    prepare: Prepare | None = None,
) -> Gemma:
    """Build on meta and assign checkpoint tensors, strictly (see module docstring).

    `quantization`: a gemma4.quant `quantization_config`; `prepare` swaps its quantized weights in on
    meta first, and their tensors are assigned as stored (no dtype cast, no re-quantization).
    """
    with torch.device("meta"):
        model = Gemma(config)
    as_stored: set[str] = set()
    if quantization is not None:
        if prepare is None:
            raise CheckpointError(f"{source} is a quantized checkpoint (gemma4.quant); load it with gemma4.load "
                                  "or gemma4.load_model, which know its format")
        try:
            as_stored = prepare(model, quantization, dtype)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignore = ignored_keys(config)
    found: dict[str, tuple[Callable[[], torch.Tensor], tuple[int, ...]]] = {}
    skipped = 0
    for name, get, shape in entries:
        ours = canonical_name(name)
        if ours is None:
            skipped += 1
        elif ours not in ignore:
            found[ours] = (get, shape)
    if skipped:
        log.warning("%s: skipped %d vision/audio tensors (only the text model is supported so far)", source, skipped)
    _check(expected, found, source)

    state = {}
    for name in tqdm(expected, desc="loading weights", unit="tensor", disable=None, leave=False):
        tensor = found[name][0]()
        cast = tensor.is_floating_point() and name not in as_stored
        state[name] = tensor.to(device=device, dtype=dtype if cast else tensor.dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.model.reset_buffers(device)
    return model.eval()


def _check(expected: dict[str, tuple[int, ...]], found: dict, source: str) -> None:
    missing = expected.keys() - found.keys()
    if missing:
        raise CheckpointError(f"{source} is missing tensors the config requires: {_some(sorted(missing))}. "
                              "Is config.json the one that belongs to these weights?")
    unexpected = found.keys() - expected.keys()
    if unexpected:
        raise CheckpointError(f"{source} has tensors this config does not use: {_some(sorted(unexpected))}. "
                              "Is config.json the one that belongs to these weights?")
    wrong = [f"{k} {found[k][1]} (expected {expected[k]})" for k in expected if tuple(found[k][1]) != expected[k]]
    if wrong:
        raise CheckpointError(f"{source} has tensors of the wrong shape: {_some(sorted(wrong))}")
