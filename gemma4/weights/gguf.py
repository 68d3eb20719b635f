"""GGUF (llama.cpp's single-file format) -> Hugging Face-named float tensors + a config.json-style dict.

Design:
- The header (metadata and tensor table) is parsed here, with every count, length and offset checked
  against the file size *before* anything is allocated or looped over, so a truncated, corrupt or
  hostile file gives a `GGUFError` saying what is wrong, never a traceback or a huge allocation.
  We parse it ourselves rather than with `gguf.GGUFReader` because the reader builds Python objects
  per array element (the 262k-token vocabulary) and takes minutes on a small machine; dequantizing
  stays with the `gguf` package (`gguf.quants.dequantize`, `GGML_QUANT_SIZES`).
- Tensor data is memory-mapped and dequantized one tensor at a time (`GGUFFile.tensor`), so the
  peak is one fp32 tensor plus the model being built.
- llama.cpp's Gemma 3 converter stores every RMSNorm weight as `1 + w` (HF Gemma 3 computes
  `x̂ · (1 + w)`, llama.cpp `x̂ · w'`); we subtract the 1 again, in fp32. Gemma uses no Q/K row
  permutation (llama.cpp permutes only LLaMA-style rotary layouts), so projections load as stored;
  both facts are checked against transformers' own GGUF loader in tests/weights/test_gguf.py.
- The sliding/full layer pattern is not stored in Gemma 3 GGUF files: llama.cpp hard-codes "every
  6th layer is full" (`set_swa_pattern(6)`) and a local RoPE base of 10k; we do the same, but honour
  `{arch}.attention.sliding_window_pattern` / `{arch}.rope.freq_base_swa` when a file has them.
- Gemma 4 (`gemma4`) follows llama.cpp's converter: per-layer arrays for KV heads and FFN width
  (double-wide MLP), the sliding pattern as flags, full/sliding head dims as `key_length` /
  `key_length_swa`, and proportional RoPE as a `rope_freqs` table (1 = rotated pair, 1e30 = not),
  from which `partial_rotary_factor` is recovered. k_eq_v is a full layer with K but no V tensor.
  Norms carry no offset. No real Gemma 4 GGUF was available: the mapping is tested by a round trip
  of a tiny transformers model written in llama.cpp's layout (gguf-py's own tensor-name map).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["GGUFError", "GGUFCheckpoint", "GGUFFile", "TensorInfo", "dequantize", "read_gguf", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("gemma3", "gemma4")
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 3

# GGUF value type id -> (struct code, size); 8 = string and 9 = array are variable-sized.
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "u1", 10: "u8", 11: "i8", 12: "f8"}
_STRING, _ARRAY = 8, 9
_MIN_VALUE_SIZE = {**{t: s for t, (_, s) in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
# The vocabulary arrays the tokenizer reads, by element type (a GGUF array has one element type).
_TOKENIZER_ARRAYS = {"tokenizer.ggml.tokens": str, "tokenizer.ggml.token_type": int, "tokenizer.ggml.merges": str}


class GGUFError(CheckpointError):
    """A .gguf file that cannot be read: missing, truncated, corrupt, or not a supported Gemma model."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first), i.e. ggml's ne reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFCheckpoint:
    config: dict[str, Any]  # config.json-style (`model_type: gemma3_text`, ...)
    tensors: dict[str, torch.Tensor]  # HF names and shapes, dequantized
    tokenizer: dict[str, Any]  # `tokenizer.*` metadata, prefix stripped: tokens, scores, token_type, ...
    metadata: dict[str, Any] = field(default_factory=dict)  # every other key/value of the header


# ------------------------------------------------------------------------------------------------
# Header parsing, bounded by the file size


class _Cursor:
    """Reads little-endian GGUF fields from a buffer, refusing to read past its end."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.path, self.pos = buf, path, 0
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"{self.path}: truncated or corrupt GGUF file: {what} at byte {self.pos} needs {n} bytes, but the "
                f"file ends at byte {self.size}. Download or convert the file again."
            )

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: corrupt GGUF header: {what} ending at byte {self.pos} is not valid "
                            "UTF-8. Download or convert the file again.") from None

    def _strings(self, n: int, key: str) -> list[str]:
        """A string array (the vocabulary: 262k entries), with the bounds checks of `string` inlined."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(n):
                if pos + 8 > size:
                    break
                (length,) = unpack(buf, pos)
                if length > size - pos - 8:
                    break
                out.append(str(buf[pos + 8:pos + 8 + length], "utf-8"))
                pos += 8 + length
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: corrupt GGUF header: element {len(out)} of {key!r} at byte {pos} is not "
                            "valid UTF-8. Download or convert the file again.") from None
        self.pos = pos
        if len(out) < n:  # re-read the failing element to raise the precise truncation error
            self.string(f"element {len(out)} of {key!r}")
        return out

    def count(self, what: str, min_item_size: int) -> int:
        """A u64 element count, checked against the bytes left (each element takes >= min_item_size)."""
        at = self.pos
        n = self.u64(what)
        room = (self.size - self.pos) // max(min_item_size, 1)
        if n > room:
            raise GGUFError(f"{self.path}: corrupt GGUF header: {what} at byte {at} is {n}, but the rest of the "
                            f"file has room for at most {room}. The file is truncated or corrupt; download or "
                            "convert it again.")
        return n

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            code, size = _SCALARS[vtype]
            return self.scalar(code, size, f"value of {key!r}")
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise GGUFError(f"{self.path}: corrupt GGUF header: {key!r} nests arrays deeper than "
                                f"{MAX_ARRAY_NESTING} levels.")
            etype = self.u32(f"array type of {key!r}")
            if etype not in _MIN_VALUE_SIZE:
                raise GGUFError(f"{self.path}: corrupt GGUF header: array {key!r} has unknown element type {etype} "
                                "(known: 0-12). The file is corrupt or from a newer GGUF version.")
            n = self.count(f"element count of array {key!r}", _MIN_VALUE_SIZE[etype])
            if etype in _NUMPY:  # fixed-size elements: one bounded numpy read
                size = _SCALARS[etype][1]
                self.need(n * size, f"array {key!r}")
                arr = np.frombuffer(self.buf, dtype=np.dtype("<" + _NUMPY[etype]),
                                    count=n, offset=self.pos)
                self.pos += n * size
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            if etype == _STRING:
                return self._strings(n, key)
            return [self.value(etype, f"{key}[{i}]", depth + 1) for i in range(n)]
        raise GGUFError(f"{self.path}: corrupt GGUF header: metadata key {key!r} has unknown value type {vtype} "
                        "(known: 0-12). The file is corrupt or from a newer GGUF version.")


def _parse_header(buf: memoryview, path: str) -> tuple[dict[str, Any], list[TensorInfo]]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = len(buf)
    if size < 24:
        raise GGUFError(f"{path} is too small to be a GGUF file ({size} bytes; the header alone takes 24). "
                        "It is probably truncated: download or convert it again.")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not {GGUF_MAGIC!r}. "
                        "Pass a llama.cpp .gguf file, or a checkpoint directory with config.json + *.safetensors.")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0 and version != 0:  # a big-endian file reads as a huge little-endian version
        raise GGUFError(f"{path} is a big-endian GGUF file, which gemma4 does not read. Convert the model again "
                        "on (or for) a little-endian machine.")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}; this reader handles versions 2 and 3. "
                        "Convert the model again with a recent llama.cpp.")
    cur = _Cursor(buf, path)
    cur.pos = 8
    n_tensors = cur.count("tensor count", 8 + 4 + 8 + 4 + 8)  # name length, n_dims, one dim, type, offset
    n_kv = cur.count("metadata entry count", 8 + 4 + 1)  # key length, value type, smallest value

    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in meta:
            raise GGUFError(f"{path}: corrupt GGUF header: metadata key {key!r} appears twice.")
        meta[key] = cur.value(cur.u32(f"value type of {key!r}"), key)
    for key, kind in _TOKENIZER_ARRAYS.items():
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and (not value or isinstance(value[0], kind))):
            raise GGUFError(f"{path}: metadata key {key!r} is {value!r:.60}, expected an array of {kind.__name__}; "
                            "the file is corrupt. Download or convert it again.")

    raw = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{path}: corrupt GGUF header: tensor {name!r} has {n_dims} dimensions "
                            f"(GGUF allows 1 to {MAX_DIMS}). Download or convert the file again.")
        ne = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        type_id = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"data offset of tensor {name!r}")
        raw.append((name, ne, type_id, offset))

    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise GGUFError(f"{path}: corrupt GGUF header: general.alignment is {alignment!r}, not a power of two.")
    data_start = -(-cur.pos // alignment) * alignment

    infos, seen = [], set()
    for name, ne, type_id, offset in raw:
        if name in seen:
            raise GGUFError(f"{path}: corrupt GGUF header: tensor {name!r} appears twice.")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has unknown GGML type id {type_id}: the file is corrupt, or "
                            "newer than the installed `gguf` package (try `pip install -U gguf`).") from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in ne:
            if d == 0 or d > size * 8:  # no tensor can hold more elements than 8 per file byte (1-bit types)
                raise GGUFError(f"{path}: corrupt GGUF header: tensor {name!r} has impossible shape {ne} for a "
                                f"{size}-byte file. Download or convert the file again.")
            n *= d
        if ne[0] % block:
            raise GGUFError(f"{path}: corrupt GGUF header: tensor {name!r} ({qtype.name}) has a row of {ne[0]} "
                            f"values, not a multiple of its block size {block}.")
        nbytes = n // block * block_bytes
        start = data_start + offset
        if offset % alignment or start + nbytes > size:
            raise GGUFError(f"{path}: tensor {name!r} data (bytes {start} to {start + nbytes}) lies outside the "
                            f"{size}-byte file or is misaligned: the file is truncated or corrupt. Download or "
                            "convert it again.")
        infos.append(TensorInfo(name, tuple(reversed(ne)), type_id, start, nbytes))
    return meta, infos


# ------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face names and config


# llama.cpp tensor names (gguf-py's tensor map) -> Hugging Face names; blk.N.* maps under model.layers.N.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only in untied conversions
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",  # Gemma 4 PLE
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Gemma 4
    "layer_output_scale.weight": "layer_scalar",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
}


def _block(name: str) -> tuple[int, str] | None:
    """'blk.N.rest' -> (N, rest); None for any other name (a 10-digit N is no layer of any model)."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdecimal() and len(parts[1]) < 10:
        return int(parts[1]), parts[2]
    return None


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    block = _block(name)
    if block and block[1] in _LAYER_NAMES:
        return f"model.layers.{block[0]}.{_LAYER_NAMES[block[1]]}"
    return None


class GGUFFile:
    """A validated, memory-mapped .gguf file: metadata, HF-style config, and tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"GGUF file not found: {self.path}. Check the path (or let gemma4 resolve a Hub id).")
        if not self.path.is_file():
            raise GGUFError(f"{self.path} is not a file; pass the path of a .gguf file.")
        size = self.path.stat().st_size
        if size == 0:
            raise GGUFError(f"{self.path} is empty (0 bytes), not a GGUF file. Download or convert it again.")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._mm)
        try:
            self.metadata, infos = _parse_header(buf, str(self.path))
            self.tensor_infos: dict[str, TensorInfo] = {t.name: t for t in infos}
            self.arch = self._arch()
            self.config = self._config()
            self._names = self._map_names()
        except BaseException:
            buf.release()
            self.close()
            raise
        buf.release()

    # -- metadata -------------------------------------------------------------------------------
    def _arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata key 'general.architecture' is missing; the file is incomplete "
                            "or not a llama.cpp model conversion.")
        if arch not in SUPPORTED_ARCHS:
            raise GGUFError(f"{self.path}: GGUF architecture {arch!r} is not supported; gemma4 reads Gemma 3 "
                            "('gemma3') and Gemma 4 ('gemma4') GGUF files. Use a Gemma GGUF, or a safetensors "
                            "checkpoint.")
        return arch

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.path}: required metadata key {full!r} is missing; the file is incomplete "
                                "or not a llama.cpp Gemma conversion.")
            return default
        value = self.metadata[full]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise GGUFError(f"{self.path}: metadata key {full!r} is {value!r:.100}, expected {names}; the file is "
                            "corrupt.")
        return value

    def _positive(self, key: str, default: Any = ...) -> int:
        value = self._get(key, int, default)
        if not isinstance(value, int) or value <= 0:
            raise GGUFError(f"{self.path}: metadata key '{self.arch}.{key}' is {value!r}; it must be a positive "
                            "integer. The file is corrupt.")
        return value

    def _per_layer(self, key: str, n_layers: int, default: Any = ...) -> list[int]:
        """A count stored either once or per layer (llama.cpp writes arrays for Gemma 4)."""
        value = self._get(key, (int, list), default)
        values = value if isinstance(value, list) else [value] * n_layers
        if len(values) != n_layers or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in values):
            raise GGUFError(f"{self.path}: metadata key '{self.arch}.{key}' is {value!r}; expected a count or "
                            f"{n_layers} per-layer counts. The file is corrupt.")
        return values

    @property
    def tokenizer(self) -> dict[str, Any]:
        """`tokenizer.*` metadata with the prefix (`tokenizer.ggml.` or `tokenizer.`) stripped."""
        out = {}
        for key, value in self.metadata.items():
            if key.startswith("tokenizer.ggml."):
                out[key[len("tokenizer.ggml."):]] = value
            elif key.startswith("tokenizer."):
                out[key[len("tokenizer."):]] = value
        return out

    def _layer_types(self, n_layers: int, default_pattern: int | None) -> list[str]:
        """Sliding/full per layer: the file's flag list, else llama.cpp's fixed Gemma 3 rule (every
        `default_pattern`-th layer is full: 5, 11, 17, ... for 6)."""
        key = f"{self.arch}.attention.sliding_window_pattern"
        pattern = self.metadata.get(key, default_pattern)
        if pattern is None:
            raise GGUFError(f"{self.path}: required metadata key {key!r} is missing; the file is incomplete or not "
                            "a llama.cpp Gemma conversion.")
        if isinstance(pattern, list) and len(pattern) == n_layers:
            sliding = [bool(s) for s in pattern]
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
            sliding = [(i + 1) % pattern != 0 for i in range(n_layers)]
        else:
            raise GGUFError(f"{self.path}: {key} is {pattern!r}, neither a period nor {n_layers} per-layer flags; "
                            "the file is corrupt or incomplete.")
        return ["sliding_attention" if s else "full_attention" for s in sliding]

    def _common_config(self) -> dict[str, Any]:
        hidden, n_layers = self._positive("embedding_length"), self._positive("block_count")
        # Every per-layer list below has block_count entries, so each layer must hold tensors in the file
        # before one is built (block_count = 1e9 in a 71 KB file built 1e9-entry lists). Tensors beyond
        # block_count are reported by name in _map_names.
        blocks = {block[0] for block in map(_block, self.tensor_infos) if block}
        held = sum(1 for i in blocks if i < n_layers)
        if held != n_layers:
            raise GGUFError(f"{self.path}: metadata key '{self.arch}.block_count' is {n_layers}, but the file holds "
                            f"tensors (blk.N.*) for only {held} of those layers; the file is corrupt or was edited. "
                            "Download or convert it again.")
        emb = self.tensor_infos.get("token_embd.weight")
        if emb is None or len(emb.shape) != 2:
            raise GGUFError(f"{self.path}: no 2-D 'token_embd.weight' tensor; the file is incomplete.")
        tok = self.tokenizer
        softcap = self._get("final_logit_softcapping", (int, float), None)
        return {
            "vocab_size": emb.shape[0],
            "hidden_size": hidden,
            "num_hidden_layers": n_layers,
            "sliding_window": self._positive("attention.sliding_window", 4096),
            "rms_norm_eps": float(self._get("attention.layer_norm_rms_epsilon", (int, float), 1e-6)),
            "max_position_embeddings": self._positive("context_length", 131072),
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": float(softcap) if softcap else None,
            "bos_token_id": tok.get("bos_token_id", 2),
            "eos_token_id": tok.get("eos_token_id", 1),
            "pad_token_id": tok.get("padding_token_id", 0),
            "tie_word_embeddings": "output.weight" not in self.tensor_infos,
        }

    def _config(self) -> dict[str, Any]:
        return self._gemma3_config() if self.arch == "gemma3" else self._gemma4_config()

    def _gemma3_config(self) -> dict[str, Any]:
        c = self._common_config()
        n_layers, hidden = c["num_hidden_layers"], c["hidden_size"]
        n_heads = self._positive("attention.head_count")
        n_kv = set(self._per_layer("attention.head_count_kv", n_layers, n_heads))
        if len(n_kv) != 1:
            raise GGUFError(f"{self.path}: per-layer KV head counts {sorted(n_kv)} are not supported for Gemma 3.")
        head_dim = self._positive("attention.key_length", hidden // n_heads)
        rope_scaling = None
        scaling_type = self._get("rope.scaling.type", str, None)
        factor = self._get("rope.scaling.factor", (int, float), 1.0)
        if scaling_type not in (None, "none") and factor != 1.0:
            if scaling_type != "linear":
                raise GGUFError(f"{self.path}: RoPE scaling {scaling_type!r} is not supported for Gemma 3 "
                                "(only 'linear').")
            rope_scaling = {"rope_type": "linear", "factor": float(factor)}
        # llama.cpp (and gemma_pytorch) scale attention by 1/sqrt(head_dim), except Gemma 3 27B (62
        # layers), which uses 1/sqrt(hidden/heads); the file does not store it.
        qpas = hidden // n_heads if n_layers == 62 else head_dim
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **c,
            "intermediate_size": self._positive("feed_forward_length"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv.pop(),
            "head_dim": head_dim,
            "layer_types": self._layer_types(n_layers, 6),
            "rope_theta": float(self._get("rope.freq_base", (int, float), 1_000_000.0)),
            "rope_local_base_freq": float(self._get("rope.freq_base_swa", (int, float), 10_000.0)),
            "rope_scaling": rope_scaling,
            "query_pre_attn_scalar": qpas,
            "attn_logit_softcapping": None,
        }

    def _gemma4_config(self) -> dict[str, Any]:
        """Keys as written by llama.cpp's Gemma 4 converter (convert_hf_to_gguf.py, Gemma4Model)."""
        c = self._common_config()
        L, D = c["num_hidden_layers"], c["hidden_size"]
        types = self._layer_types(L, None)
        full = [t == "full_attention" for t in types]
        heads = set(self._per_layer("attention.head_count", L))
        if len(heads) != 1:
            raise GGUFError(f"{self.path}: per-layer query head counts {sorted(heads)} are not supported.")
        kv = self._per_layer("attention.head_count_kv", L)
        kv_swa = {k for k, f in zip(kv, full) if not f}
        kv_full = {k for k, f in zip(kv, full) if f}
        if len(kv_swa) > 1 or len(kv_full) > 1:
            raise GGUFError(f"{self.path}: KV head counts {kv} vary within a layer type; the file is corrupt.")
        head_dim_full = self._positive("attention.key_length")
        head_dim = self._positive("attention.key_length_swa", head_dim_full)
        n_shared = self._get("attention.shared_kv_layers", int, 0)
        ffn = self._per_layer("feed_forward_length", L)
        base = ffn[0]
        double = ffn != [base] * L
        if double and ffn != [base if i < L - n_shared else 2 * base for i in range(L)]:
            raise GGUFError(f"{self.path}: feed_forward_length {ffn} is neither uniform nor double-wide on the "
                            f"{n_shared} KV-shared layers; the file is corrupt.")
        per_layer = self._get("embedding_length_per_layer_input", int, 0)
        ple = self.tensor_infos.get("per_layer_token_embd.weight")
        has_v = [f"blk.{i}.attn_v.weight" in self.tensor_infos for i in range(L)]
        has_k = [f"blk.{i}.attn_k.weight" in self.tensor_infos for i in range(L)]
        k_eq_v = any(f and k and not v for f, k, v in zip(full, has_k, has_v))
        moe = any(f"blk.{i}.ffn_gate_inp.weight" in self.tensor_infos for i in range(L))
        tok = self.tokenizer.get("tokens") or []
        # The stop tokens of Gemma 4 chat, as transformers' GGUF loader sets them (spec §4.2).
        eos = [c["eos_token_id"]] + [tok.index(t) for t in ("<turn|>", "<|tool_response>") if t in tok]
        config = {
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            **c,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "intermediate_size": base,
            "use_double_wide_mlp": double,
            "num_attention_heads": heads.pop(),
            "num_key_value_heads": kv_swa.pop() if kv_swa else kv[0],
            "head_dim": head_dim,
            "global_head_dim": head_dim_full,
            "num_global_key_value_heads": kv_full.pop() if kv_full else None,
            "attention_k_eq_v": k_eq_v,
            "layer_types": types,
            "num_kv_shared_layers": n_shared,
            "hidden_size_per_layer_input": per_layer,  # 0: no per-layer embeddings
            "vocab_size_per_layer_input": ple.shape[0] if ple is not None else c["vocab_size"],
            "rope_parameters": {
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": self._partial_rotary(),
                                   "rope_theta": float(self._get("rope.freq_base", (int, float), 1_000_000.0))},
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": float(self._get("rope.freq_base_swa", (int, float), 10_000.0))},
            },
            "enable_moe_block": moe,
        }
        if moe:
            router = next(self.tensor_infos[f"blk.{i}.ffn_gate_inp.weight"] for i in range(L)
                          if f"blk.{i}.ffn_gate_inp.weight" in self.tensor_infos)
            down = next((t for n, t in self.tensor_infos.items() if n.endswith(".ffn_down_exps.weight")), None)
            if down is None:
                raise GGUFError(f"{self.path}: a MoE router without merged expert tensors (ffn_gate_up_exps / "
                                "ffn_down_exps); split expert tensors are not supported yet.")
            config.update(num_experts=self._positive("expert_count", router.shape[0]),
                          top_k_experts=self._positive("expert_used_count"),
                          moe_intermediate_size=self._positive("expert_feed_forward_length", down.shape[-1]))
        return config

    def _partial_rotary(self) -> float:
        """llama.cpp encodes Gemma 4's proportional RoPE as per-frequency factors in `rope_freqs`: 1 for a
        rotated pair, 1e30 (frequency ~0, so no rotation) for the rest."""
        info = self.tensor_infos.get("rope_freqs.weight")
        head_dim = self._positive("attention.key_length")
        if info is None:
            return self._positive("rope.dimension_count", head_dim) / head_dim
        if info.shape != (head_dim // 2,):
            raise GGUFError(f"{self.path}: rope_freqs.weight has shape {list(info.shape)}, expected "
                            f"[{head_dim // 2}]; the file is corrupt.")
        factors = self._read(info)
        rotated = int((factors == 1.0).sum())
        if not bool(((factors == 1.0) | (factors >= 1e20)).all()) or not bool((factors[:rotated] == 1.0).all()):
            raise GGUFError(f"{self.path}: rope_freqs.weight holds factors other than 1 (rotated) then 1e30 "
                            "(not rotated); that RoPE variant is not supported.")
        return 2 * rotated / head_dim

    def _read(self, info: TensorInfo, dtype: torch.dtype = torch.float32, offset: float = 0.0) -> torch.Tensor:
        _check_dequantizable(info.ggml_type, f"{self.path}: tensor {info.name!r}")
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        try:
            return dequantize(raw, info.ggml_type, info.shape, dtype, offset)
        finally:
            del raw  # no view of the map may outlive the call, or close() fails

    # -- tensors --------------------------------------------------------------------------------
    def _expected(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """HF name -> shape for the tensors the config implies: (required, optional)."""
        c = self.config
        D, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
        H = c["num_attention_heads"]
        req = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
        opt: dict[str, tuple[int, ...]] = {}
        if not c["tie_word_embeddings"]:
            req["lm_head.weight"] = (V, D)
        g4 = c["model_type"] == "gemma4_text"
        P = c.get("hidden_size_per_layer_input") or 0
        if P:
            req.update({"model.embed_tokens_per_layer.weight": (c["vocab_size_per_layer_input"], L * P),
                        "model.per_layer_model_projection.weight": (L * P, D),
                        "model.per_layer_projection_norm.weight": (P,)})
        for i, t in enumerate(c["layer_types"]):
            pre = f"model.layers.{i}."
            full = t == "full_attention"
            hd = c["global_head_dim"] if g4 and full else c["head_dim"]
            kv = c["num_key_value_heads"]
            if g4 and full and c["num_global_key_value_heads"]:
                kv = c["num_global_key_value_heads"]
            shared = g4 and i >= L - c["num_kv_shared_layers"]
            ff = c["intermediate_size"] * (2 if g4 and shared and c["use_double_wide_mlp"] else 1)
            req.update({pre + n: s for n, s in {
                "self_attn.q_proj.weight": (H * hd, D), "self_attn.o_proj.weight": (D, H * hd),
                "self_attn.q_norm.weight": (hd,), "mlp.gate_proj.weight": (ff, D), "mlp.up_proj.weight": (ff, D),
                "mlp.down_proj.weight": (D, ff), "input_layernorm.weight": (D,),
                "post_attention_layernorm.weight": (D,), "pre_feedforward_layernorm.weight": (D,),
                "post_feedforward_layernorm.weight": (D,)}.items()})
            kv_names = {"self_attn.k_proj.weight": (kv * hd, D), "self_attn.k_norm.weight": (hd,)}
            if not (g4 and full and c["attention_k_eq_v"]):
                kv_names["self_attn.v_proj.weight"] = (kv * hd, D)
            # KV-shared layers read another layer's cache; some checkpoints still carry their unused K/V.
            (opt if shared else req).update({pre + n: s for n, s in kv_names.items()})
            if not g4:
                continue
            req[pre + "layer_scalar"] = (1,)
            if P:
                req.update({pre + "per_layer_input_gate.weight": (P, D), pre + "per_layer_projection.weight": (D, P),
                            pre + "post_per_layer_input_norm.weight": (D,)})
            if c["enable_moe_block"]:
                E, Ie = c["num_experts"], c["moe_intermediate_size"]
                req.update({pre + "router.proj.weight": (E, D), pre + "router.scale": (D,),
                            pre + "router.per_expert_scale": (E,), pre + "experts.gate_up_proj": (E, 2 * Ie, D),
                            pre + "experts.down_proj": (E, D, Ie), pre + "pre_feedforward_layernorm_2.weight": (D,),
                            pre + "post_feedforward_layernorm_1.weight": (D,),
                            pre + "post_feedforward_layernorm_2.weight": (D,)})
        return req, opt

    def _map_names(self) -> dict[str, tuple[str, bool]]:
        """HF name -> (GGUF name, stored as 1 + w), checked: nothing unknown, missing or mis-shaped."""
        required, optional = self._expected()
        names: dict[str, tuple[str, bool]] = {}
        for gname, info in self.tensor_infos.items():
            if gname == "rope_freqs.weight":  # Gemma 4's proportional-RoPE factors, already in the config
                continue
            hf = _hf_name(gname)
            want = required.get(hf) or optional.get(hf)
            if want is None:
                raise GGUFError(f"{self.path}: unexpected tensor {gname!r} for this {self.config['num_hidden_layers']}-"
                                f"layer {self.arch} model; the file holds something gemma4 does not know how to load.")
            if info.shape != want:
                raise GGUFError(f"{self.path}: tensor {gname!r} has shape {list(info.shape)}, expected "
                                f"{list(want)} from the file's metadata; the file is corrupt.")
            _check_dequantizable(info.ggml_type, f"{self.path}: tensor {gname!r}")
            # llama.cpp's Gemma 3 converter stores every *norm.weight as 1 + w (Gemma 4's as w).
            names[hf] = (gname, self.arch == "gemma3" and hf.endswith("norm.weight"))
        missing = sorted(set(required) - set(names))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise GGUFError(f"{self.path}: missing tensors {shown}; the file is incomplete.")
        return names

    def names(self) -> list[str]:
        """HF names of the tensors, in file order."""
        return list(self._names)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return self.tensor_infos[self._names[hf_name][0]].shape

    def tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor, dequantized to fp32 (norms un-shifted there), then cast to `dtype`."""
        gname, shifted = self._names[hf_name]
        return self._read(self.tensor_infos[gname], dtype, offset=1.0 if shifted else 0.0)

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._names:
            yield name, self.tensor(name, dtype)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # a view is still alive (e.g. held by a traceback); the map goes with it
            pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=None)
def _dequantizable(ggml_type: int) -> bool:
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(ggml_type)
    try:
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_dequantizable(ggml_type: int, where: str) -> None:
    if not _dequantizable(ggml_type):
        from gguf.constants import GGMLQuantizationType

        raise GGUFError(f"{where} is stored as {GGMLQuantizationType(ggml_type).name}, which the installed `gguf` "
                        "package cannot dequantize. Re-quantize the model (e.g. Q4_K_M, Q8_0, F16).")


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               offset: float = 0.0) -> torch.Tensor:
    """GGML blocks (flat uint8) -> a `shape` tensor of `dtype`, computed in fp32 minus `offset`.

    Row chunks of ~16M values keep the fp32 temporaries small next to the output."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    qtype = GGMLQuantizationType(ggml_type)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    raw = raw.reshape(rows, -1)
    out = torch.empty((rows, shape[-1]), dtype=dtype)
    step = max(1, (1 << 24) // shape[-1])
    for r0 in range(0, rows, step):
        block = raw[r0:r0 + step]
        values = quants.dequantize(block, qtype)  # F32: a read-only view of the map
        chunk = torch.from_numpy(values) if values.flags.writeable else torch.tensor(values, dtype=torch.float32)
        out[r0:r0 + step] = chunk - offset if offset else chunk
    return out.reshape(shape)


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/values of a .gguf header (validated), without touching tensor data or the architecture."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}. Check the path.")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise GGUFError(f"{path} is empty (0 bytes), not a GGUF file. Download or convert it again.")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return _parse_header(buf, str(path))[0]
            finally:
                buf.release()


def read_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a Gemma 3/4 .gguf: HF-style config, HF-named tensors dequantized to `dtype`, tokenizer metadata."""
    with GGUFFile(path) as f:
        rest = {k: v for k, v in f.metadata.items() if not k.startswith("tokenizer.")}
        return GGUFCheckpoint(config=f.config, tensors=dict(f.iter_tensors(dtype)), tokenizer=f.tokenizer,
                              metadata=rest)
