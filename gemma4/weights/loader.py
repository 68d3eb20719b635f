"""Checkpoint -> model: resolve the source, read the config, build on `meta`, assign tensors.

The model is built on the meta device (no memory), then every parameter is assigned a tensor
from the checkpoint (memory-mapped, converted only when the dtype or device differs). Loading is
strict: a missing, unexpected or mis-shaped tensor is an error naming it, vision and audio towers
included. The only exceptions are explicit: the vision and audio sides when loading `text_only`
(skipped on purpose, one log line), the tied LM head, the unused K/V weights that released
checkpoints ship for KV-shared layers, and a SigLIP pooling head that Gemma 3 does not use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dataclasses import dataclass
from typing import Any, Protocol

from ..config import AudioConfig, ConfigError, TextConfig, VisionConfig
from ..model import Gemma
from .errors import CheckpointError
from .hub import resolve
from .safetensors import open_tensors, read_config, shard_files

log = logging.getLogger(__name__)

TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")  # multimodal (v5, v4), text-only
# Checkpoint prefix -> our module's (the released layouts and what transformers 5 writes; first match wins).
VISION_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."), ("multi_modal_projector.", "multi_modal_projector."),
    # The 12B: on disk vision_embedder.* and embed_vision.embedding_projection; transformers' in-memory
    # names (embed_vision.patch_ln1, embed_vision.multimodal_embedder.*) are accepted too.
    ("model.vision_embedder.", "vision_embedder."), ("model.embed_vision.multimodal_embedder.", "embed_vision."),
    *((f"model.embed_vision.{n}", f"vision_embedder.{n}") for n in ("patch_ln1", "patch_dense", "patch_ln2",
                                                                   "pos_embedding", "pos_norm")),
    ("model.embed_vision.", "embed_vision."),
)
# Audio (E2B/E4B: tower and embedder; the 12B: the embedder alone): the released names are the modules'.
AUDIO_PREFIXES = (("model.audio_tower.", "audio_tower."), ("model.embed_audio.", "embed_audio."))
Entry = tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]  # (checkpoint name, lazy getter, shape)
# Swaps the weights a `quantization_config` lists for quantized placeholders on the meta model and
# returns the names of the tensors to assign as stored (gemma4.quant.prepare_quantized). A hook, so
# that loading does not import quantization.
Prepare = Callable[[Gemma, dict, torch.dtype], set[str]]


class Shard(Protocol):
    """A tensor-parallel rank's part (gemma4.parallel): its own model, and its slice of each tensor."""

    def model(self, config: TextConfig, vision: VisionConfig | None, audio: AudioConfig | None) -> Gemma:
        """The rank-local model (built on meta by the caller)."""
        ...

    def read(self, name: str, get: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's slice of checkpoint tensor `name` (global `shape`), reading only that slice."""
        ...


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


def canonical_name(name: str) -> str:
    """Checkpoint name -> our parameter name."""
    for theirs, ours in VISION_PREFIXES + AUDIO_PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    for prefix in TEXT_PREFIXES[:2]:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name


def is_vision(name: str) -> bool:
    """Whether one of our parameter names belongs to the image side (skipped by text_only)."""
    return name.startswith(("vision_tower.", "vision_embedder.", "embed_vision.", "multi_modal_projector."))


def is_audio(name: str) -> bool:
    """Whether one of our parameter names belongs to the audio side (skipped by text_only)."""
    return name.startswith(("audio_tower.", "embed_audio."))


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
    vision: VisionConfig | None = None  # the image side of a multimodal checkpoint
    audio: AudioConfig | None = None  # its audio side (E2B, E4B, 12B)

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
    text_only: bool = False,
) -> Gemma:
    """Load a Gemma 3/4 model from a local checkpoint, a .gguf file, a Hub id or an opened
    `Checkpoint`: the text model, and the image and audio sides of a multimodal checkpoint unless
    `text_only` (which skips them on purpose, to save memory). A quantized checkpoint needs `prepare`
    (`gemma4.load_model` passes gemma4.quant's)."""
    device = torch.device(device or "cpu")
    dtype = parse_dtype(dtype, device)
    ckpt = path_or_id if isinstance(path_or_id, Checkpoint) else open_checkpoint(path_or_id, revision)
    return build(ckpt.config, ckpt.entries(dtype), dtype, device, str(ckpt.source), ckpt.quantization, prepare,
                 vision=ckpt.vision, audio=ckpt.audio, text_only=text_only)


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
        vision = VisionConfig.from_hf_dict(raw, config)
        audio = AudioConfig.from_hf_dict(raw, config)
    except ConfigError as e:
        fix = ("Download or convert the file again" if gguf is not None
               else "Fix config.json, or use the one that came with these weights")
        raise CheckpointError(f"{source}: {str(e).rstrip('.')}. {fix}.") from None
    if gguf is None:  # a GGUF file checks its block_count against its blk.N tensors itself
        _check_layer_count(config, found, source)
    return Checkpoint(source, config, raw, tensors, gguf, vision, audio)


def _check_layer_count(config: TextConfig, entries: list[Entry], source: Path) -> None:
    """Every layer of num_hidden_layers must hold tensors, checked before anything is built per layer
    (1,000 layers take a second to build even on meta). Tensors beyond it are reported by `_check`."""
    held = set()
    for name, _, _ in entries:
        parts = canonical_name(name).split(".", 3)
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
    vision: VisionConfig | None = None,
    text_only: bool = False,
    audio: AudioConfig | None = None,
    shard: Shard | None = None,
) -> Gemma:
    """Build on meta and assign checkpoint tensors, strictly (see module docstring).

    `quantization`: a gemma4.quant `quantization_config`; `prepare` swaps its quantized weights in on
    meta first, and their tensors are assigned as stored (no dtype cast, no re-quantization).
    `vision`, `audio`: the image and audio sides to build and load; `text_only` skips both (and their
    tensors) on purpose.
    `shard`: a tensor-parallel rank's part: the checks run against the whole model, then the
    rank's own model is built and each of its tensors is read as the rank's slice only.
    """
    with torch.device("meta"):
        model = Gemma(config, None if text_only else vision, None if text_only else audio)
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
    # A SigLIP config may declare a pooling head (transformers' default) that Gemma 3 never runs.
    ignore_prefix = ("vision_tower.head.",) if vision is not None and vision.vision_use_head else ()
    found: dict[str, tuple[Callable[[], torch.Tensor], tuple[int, ...]]] = {}
    unused_vision = unused_audio = 0
    for name, get, shape in entries:
        ours = canonical_name(name)
        if text_only and is_vision(ours):
            unused_vision += 1
        elif text_only and is_audio(ours):
            unused_audio += 1
        elif ours not in ignore and not ours.startswith(ignore_prefix or ("\0",)):
            found[ours] = (get, shape)
    if unused_vision or unused_audio:
        skipped = " and ".join(f"the {n} {what} tensors" for n, what in ((unused_vision, "vision"),
                                                                         (unused_audio, "audio")) if n)
        log.warning("%s: text_only: skipped %s (only text can be sent to this model)", source, skipped)
    _check(expected, found, source)
    if shard is not None:
        with torch.device("meta"):
            model = shard.model(config, None if text_only else vision, None if text_only else audio)

    state = {}
    for name in tqdm(model.state_dict(), desc="loading weights", unit="tensor", disable=None, leave=False):
        get, shape = found[name]
        tensor = get() if shard is None else shard.read(name, get, shape)
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
