"""Soft tokens in a prompt: images, video frames and audio clips as the engine sees them.

The processor (gemma4.media) expands each image in a prompt into a run of placeholder tokens; a
`MediaInput` says where that run is, which content fills it (a digest of the input) and how to
compute its soft tokens (the model's encoder, run when prefill reaches the span). The engine
then keeps three rules in one place:

- a prefill chunk never splits a bidirectional span, so the tokens of one image see each other in
  one forward (the model's bidirectional image blocks; `Sequence.chunk`); a causal span (an audio
  clip, up to 750 soft tokens) is cut into chunks like text, so it never stalls decoding for long;
- the prefix cache keys a span's positions by its content, not by the placeholder id that every
  image shares (`keyed_tokens`), and never resumes inside a bidirectional span;
- an input sent again (same digest) is encoded once (`EncoderCache`).
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MediaInput:
    """`length` soft tokens at prompt indices [start, start + length), from one input.

    key: a digest of the input and its processing (same key = same soft tokens); encode: computes
    the soft tokens [length, hidden] in the text model's width; block: the model attends among
    them both ways (an image or a video frame; an audio clip is causal)."""

    start: int
    length: int
    key: str
    encode: Callable[[], torch.Tensor]
    block: bool = True

    @property
    def end(self) -> int:
        return self.start + self.length


def check_spans(spans: Sequence[MediaInput], prompt_len: int) -> None:
    """Spans must lie inside the prompt, in order, without overlap."""
    at = 0
    for s in spans:
        if s.length <= 0 or s.start < at or s.end > prompt_len:
            raise ValueError(f"media span [{s.start}, {s.end}) is empty, overlaps another or leaves the "
                             f"{prompt_len}-token prompt: spans must be ordered runs of placeholder tokens")
        at = s.end


def cut(spans: Sequence[MediaInput], start: int, end: int) -> int:
    """The end of a chunk [start, end) moved so that it splits no bidirectional span: back to the
    span's start, or, when the span begins the chunk, on to its end (a chunk holds a whole image).
    Causal spans are split anywhere: their tokens see only earlier ones, as text does."""
    for s in spans:
        if s.block and s.start < end < s.end:
            return s.start if s.start > start else s.end
    return end


def resumable(spans: Sequence[MediaInput], n: int) -> bool:
    """Whether a prompt may be resumed at n (its first n tokens from the prefix cache): not inside a
    bidirectional span (a causal span's positions are keyed by content and offset, like text)."""
    return not any(s.block and s.start < n < s.end for s in spans)


def keyed_tokens(tokens: list[int], spans: Sequence[MediaInput]) -> list[int]:
    """`tokens` with each span's placeholders replaced by ids from its content key (negative, so
    never a real token): equal prefixes then mean equal text and equal media."""
    if not spans:
        return tokens
    out = list(tokens)
    for s in spans:
        base = int.from_bytes(hashlib.blake2b(s.key.encode(), digest_size=7).digest(), "big")
        out[s.start : s.end] = [-1 - ((base + i) % (1 << 60)) for i in range(s.length)]
    return out


class EncoderCache:
    """Soft tokens by content key, least recently used first out, at most `max_bytes` held."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, span: MediaInput) -> torch.Tensor:
        soft = self._items.get(span.key)
        if soft is not None:
            self._items.move_to_end(span.key)
            self.hits += 1
            return soft
        self.misses += 1
        soft = span.encode()
        if soft.dim() != 2 or soft.shape[0] != span.length:
            raise ValueError(f"an encoder gave soft tokens of shape {tuple(soft.shape)} for a span of "
                             f"{span.length} placeholders: the processor and the model disagree on the count")
        size = soft.numel() * soft.element_size()
        if size <= self.max_bytes:
            self._items[span.key] = soft
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return soft


def media_inputs(model, processed) -> tuple[MediaInput, ...]:
    """The engine's inputs for a processed prompt (`gemma4.media.process_prompt`): one per image,
    crop, video frame or audio clip, whose soft tokens the model's encoder computes from its own row
    of inputs when prefill reaches it, keyed by the processor's content hash. Audio is causal
    (`block=False`): the reference gives audio tokens no bidirectional group."""
    out = []
    for sp in processed.spans or ():
        if sp.kind == "audio":
            inputs = processed.audio_inputs
            mask = inputs.get("input_features_mask")
            encode = functools.partial(_encode_audio, model, inputs["input_features"][sp.row],
                                       None if mask is None else mask[sp.row])
            out.append(MediaInput(sp.start, sp.length, f"audio:{processed.audio_keys[sp.item]}", encode,
                                  block=False))
            continue
        if sp.kind == "image":
            inputs, keys, name = processed.image_inputs, processed.image_keys, "image"
            pixels = inputs["pixel_values"][sp.row]
        else:
            inputs, keys, name = processed.video_inputs, processed.video_keys, "video"
            pixels = inputs["pixel_values_videos"][sp.row]
        pos = inputs.get(f"{name}_position_ids")
        encode = functools.partial(_encode, model, pixels, None if pos is None else pos[sp.row])
        out.append(MediaInput(sp.start, sp.length, f"{sp.kind}:{keys[sp.item]}:{sp.part}", encode))
    return tuple(out)


def _encode(model, pixels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    param = next(model.parameters())
    pixels = pixels.to(param.device, param.dtype if param.is_floating_point() else torch.float32)
    return model.embed_media(pixels, None if positions is None else positions.to(param.device))


def _encode_audio(model, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One clip's soft tokens: `model.embed_audio` on its row of features (and mask), batch of one."""
    param = next(model.parameters())
    features = features[None].to(param.device, param.dtype if param.is_floating_point() else torch.float32)
    return model.embed_audio(features, None if mask is None else mask[None].to(param.device))
