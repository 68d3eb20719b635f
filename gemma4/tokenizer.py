"""Text <-> ids for Gemma 3 and Gemma 4; the `tokenizers` library does the work.

Two sources give the same tokenizer:
- `Tokenizer.from_dir(path)`: a checkpoint's `tokenizer.json` (+ `tokenizer_config.json` for
  `add_bos_token` and the special-token names).
- `Tokenizer.from_gguf(path)`: rebuilt from the SentencePiece vocabulary llama.cpp stores in a GGUF
  (tokens, token types, optional merges). Gemma's vocabulary is a BPE with byte fallback: the
  normalizer turns " " into "▁", there is no dummy prefix, and the decoder maps "▁" back to " ",
  joins `<0xNN>` byte pieces into UTF-8 and fuses. The GGUF carries no merges for Gemma 3, so they
  are recovered from the vocabulary: every split of a piece into two pieces is a merge, ranked by the
  merged piece's id (the file's order is SentencePiece's merge order; its scores are not), ties
  broken longest-left-part first. Runs of spaces are stored as real spaces and respelled "▁▁...".
  Control tokens (`<bos>`, `<start_of_turn>`, ...) become special added tokens, so they are found
  whole in text; user-defined ones ("\\n\\n", "<b>", tab runs) become plain added tokens.

`encode` never relies on a post-processor: BOS is prepended here, once, when `add_bos` says so
(Gemma 3 PT: yes; IT checkpoints that set `add_bos_token: false`: no, their chat template writes it).
`detokenizer()` streams text token by token; see `Detokenizer`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

__all__ = ["Tokenizer", "Detokenizer", "TokenizerError"]

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Turn markers: Gemma 3 spelling, then Gemma 4's (same ids 105/106, different strings).
_TURN_START = ("<start_of_turn>", "<|turn>")
_TURN_END = ("<end_of_turn>", "<turn|>")
_EXTRA_STOPS = ("<|tool_response>",)  # Gemma 4 stops there too (spec §4.2)


class TokenizerError(ValueError):
    """A tokenizer source that cannot be used: missing files, or a vocabulary that is not Gemma's."""


class Tokenizer:
    """A Gemma tokenizer: `encode`, `decode`, special ids and a streaming `detokenizer()`."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        add_bos: bool = True,
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
    ):
        self._tok = tokenizer
        self.add_bos = add_bos
        self.bos_id = self._required(bos_token, "BOS")
        self.eos_id = self._required(eos_token, "EOS")
        self.pad_id = self._required(pad_token, "pad")
        self.unk_id = tokenizer.token_to_id(unk_token)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self.turn_start_id = self._first(_TURN_START)
        self.turn_end_id = self._first(_TURN_END)
        stops = [self.eos_id, self.turn_end_id, *(tokenizer.token_to_id(t) for t in _EXTRA_STOPS)]
        self.stop_ids = frozenset(i for i in stops if i is not None)
        # Byte-fallback pieces <0x00>..<0xFF>: the detokenizer holds these back until a full run is in.
        self.byte_ids = frozenset(i for b in range(256) if (i := tokenizer.token_to_id(f"<0x{b:02X}>")) is not None)

    def _required(self, token: str, role: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"the {role} token {token!r} is not in the vocabulary; this is not a Gemma tokenizer")
        return i

    def _first(self, names: Iterable[str]) -> int | None:
        return next((i for n in names if (i := self._tok.token_to_id(n)) is not None), None)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a checkpoint directory holding tokenizer.json (and optionally tokenizer_config.json)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json; pass a Hugging Face checkpoint directory "
                                 "(or build the tokenizer from a .gguf with Tokenizer.from_gguf).")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side reports JSON/model errors as plain Exception
            raise TokenizerError(f"{file} cannot be read by `tokenizers`: {e}") from None
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))

        def name(key: str, default: str) -> str:
            value = cfg.get(key) or default
            return value["content"] if isinstance(value, dict) else str(value)

        return cls(
            tok,
            add_bos=bool(cfg.get("add_bos_token", True)),
            bos_token=name("bos_token", "<bos>"),
            eos_token=name("eos_token", "<eos>"),
            pad_token=name("pad_token", "<pad>"),
            unk_token=name("unk_token", "<unk>"),
        )

    @classmethod
    def from_gguf(cls, source: Any) -> "Tokenizer":
        """From a .gguf path, a `GGUFCheckpoint`, its `.tokenizer` dict, or a `gguf.GGUFReader`."""
        meta = _gguf_tokenizer_metadata(source)
        tokens, types = meta.get("tokens"), meta.get("token_type")
        if not tokens or types is None or len(types) != len(tokens):
            raise TokenizerError("the GGUF has no usable vocabulary (tokenizer.ggml.tokens / token_type missing or "
                                 "of different lengths); it cannot be tokenized without one.")
        model = meta.get("model")
        if model not in ("llama", "gemma4"):
            raise TokenizerError(f"GGUF tokenizer model {model!r} is not Gemma's SentencePiece BPE "
                                 "('llama' for Gemma 3, 'gemma4'); gemma4 only tokenizes Gemma vocabularies.")
        tok = _build_gguf_bpe(list(tokens), list(types), meta.get("merges"))

        def name(key: str, default: str) -> str:
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else default

        return cls(
            tok,
            # llama.cpp sets add_bos for Gemma 4 too, but its chat template writes <bos> itself: follow
            # the reference (HF) tokenizer, which does not add it.
            add_bos=bool(meta.get("add_bos_token", True)) and model != "gemma4",
            bos_token=name("bos_token_id", "<bos>"),
            eos_token=name("eos_token_id", "<eos>"),
            pad_token=name("padding_token_id", "<pad>"),
            unk_token=name("unknown_token_id", "<unk>"),
        )

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`; special tokens written in it (`<start_of_turn>`) map to their ids.
        `add_bos=None` follows the checkpoint (`self.add_bos`)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(self._checked(ids), skip_special_tokens=skip_special_tokens)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def detokenizer(self, skip_special_tokens: bool = False) -> "Detokenizer":
        return Detokenizer(self, skip_special_tokens)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. to save it as tokenizer.json)."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})"


class Detokenizer:
    """Streams decoded text: `add(id)` returns the text that id completes, `flush()` the rest.

    Byte-fallback pieces (`<0xF0><0x9F><0x98><0x80>` = 😀) arrive one token at a time and only make
    a character together, and the decoder turns a run of bytes that is not valid UTF-8 into one
    U+FFFD per byte. So a run is held back until a non-byte token ends it (or `flush()`), then the
    run and that token are decoded together. `decode` maps each non-byte token independently
    ("▁" -> " ", added tokens as written), so the pieces concatenate to exactly `decode(all_ids)`,
    and no partial character is ever emitted. With `skip_special_tokens`, special ids are dropped
    before anything else, as `decode` drops them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._t = tokenizer
        self._skip = skip_special_tokens
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        t = self._t
        if not 0 <= token_id < t.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{t.vocab_size - 1})")
        if self._skip and token_id in t.special_ids:
            return ""
        self._pending.append(token_id)
        if token_id in t.byte_ids:
            return ""
        return self.flush()

    def flush(self) -> str:
        ids, self._pending = self._pending, []
        return self._t.backend.decode(ids, skip_special_tokens=self._skip) if ids else ""


# ------------------------------------------------------------------------------------------------
# GGUF vocabulary -> tokenizers BPE


def _gguf_tokenizer_metadata(source: Any) -> dict[str, Any]:
    """The tokenizer metadata, prefix-stripped ("tokens", "token_type", "bos_token_id", ...)."""
    if isinstance(source, (str, os.PathLike)):
        from .weights.gguf import read_gguf_metadata

        source = read_gguf_metadata(source)
    elif hasattr(source, "tokenizer") and isinstance(source.tokenizer, dict):  # GGUFCheckpoint / GGUFFile
        return source.tokenizer
    elif hasattr(source, "fields"):  # gguf.GGUFReader
        source = {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
    if not isinstance(source, dict):
        raise TypeError(f"from_gguf takes a .gguf path, a GGUFCheckpoint, a metadata dict or a GGUFReader, "
                        f"not {type(source).__name__}")
    out = {}
    for key, value in source.items():
        for prefix in ("tokenizer.ggml.", "tokenizer."):
            if key.startswith(prefix):
                out[key[len(prefix):]] = value
                break
        else:
            out.setdefault(key, value)  # already stripped
    return out


def _build_gguf_bpe(tokens: list[str], types: list[int], merges: list[str] | None) -> tokenizers.Tokenizer:
    # Runs of spaces are user-defined pieces stored with real spaces; the model sees "▁" for " ".
    pieces = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {p: i for i, p in enumerate(pieces)}  # on a duplicate the later id wins, as in HF's conversion
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_vocab(pieces, vocab)
    unk = next((pieces[i] for i, ty in enumerate(types) if ty == _UNKNOWN), "<unk>")
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])

    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == _CONTROL]
    # User-defined pieces ("\n\n", "<b>") are matched whole in text, but not the respelled space runs,
    # which are ordinary BPE pieces once spaces read as "▁".
    user = [AddedToken(t, normalized=False, special=False)
            for t, p, ty in zip(tokens, pieces, types) if ty == _USER_DEFINED and t == p]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def _merges_from_vocab(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two vocabulary pieces, ranked by the merged piece's id, then by
    longer left part first (SentencePiece BPE merges in vocabulary order)."""
    ranked = []
    for i, piece in enumerate(pieces):
        if vocab.get(piece) != i or _BYTE_PIECE.fullmatch(piece):
            continue  # shadowed duplicate; byte pieces are never merge results
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((i, left, right))
    ranked.sort(key=lambda m: m[0])  # stable: keeps longest-left-first within a piece
    return [(left, right) for _, left, right in ranked]
