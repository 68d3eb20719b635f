"""Media parts of chat messages, in the order the prompt renderers write their placeholders.

`media_parts` walks OpenAI-style messages (content lists with `image` / `image_url` / `video` /
`video_url` / `audio` / `input_audio` parts) and returns the image, video and audio sources in order of
appearance, so the i-th `<|image|>` of the rendered prompt pairs with the i-th image (and likewise for
`<|video|>` and `<|audio|>`). OpenAI's `{"type": "input_audio", "input_audio": {"data": <base64>,
"format": "wav" | "mp3"}}` gives the decoded bytes; the decoder finds the format from the bytes, so
`format` is only checked to be one of those two. `data:` URLs are decoded here; any other URL or path string
is returned as is, for the caller's policy (a server must not read local paths or fetch remote URLs
unless told to).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import MediaError

__all__ = ["media_parts", "data_url_bytes"]


AUDIO_FORMATS = ("wav", "mp3")  # what OpenAI's input_audio parts may say


def media_parts(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any], list[Any]]:
    """(images, videos, audios): each part's source (bytes for data URLs and base64 audio, else the value
    given: a path, URL, `(array, rate)` or `{"array", "sampling_rate"}`)."""
    images, videos, audios = [], [], []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for part in content:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind in ("image", "image_url"):
                images.append(_source(part, kind))
            elif kind in ("video", "video_url"):
                videos.append(_source(part, kind))
            elif kind == "input_audio":
                audios.append(_input_audio(part.get("input_audio")))
            elif kind == "audio":
                audios.append(_source(part, kind))
    return images, videos, audios


def _source(part: Mapping[str, Any], kind: str) -> Any:
    value = next((part[key] for key in (kind, "image", "image_url", "video", "video_url", "audio", "url", "path")
                  if part.get(key) is not None), None)
    if isinstance(value, Mapping) and "array" not in value:  # OpenAI: {"type": "image_url", "image_url": {"url": ...}}
        value = value.get("url")
    if value is None:
        raise MediaError(f"a {kind!r} content part has no source: give its data, path or URL")
    if isinstance(value, str) and value.startswith("data:"):
        return data_url_bytes(value)
    return value


def _input_audio(value: Any) -> bytes:
    if not isinstance(value, Mapping) or not isinstance(value.get("data"), str):
        raise MediaError('an "input_audio" part needs {"data": <base64 audio>, "format": "wav" or "mp3"}')
    fmt = value.get("format")
    if fmt is not None and fmt not in AUDIO_FORMATS:
        raise MediaError(f'input_audio format must be one of {AUDIO_FORMATS} (got {fmt!r})')
    data = value["data"]
    if data.startswith("data:"):
        return data_url_bytes(data)
    try:
        decoded = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the input_audio data is not valid base64") from None
    if not decoded:
        raise MediaError("the input_audio data is empty")
    return decoded


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:<mime>;base64,<data>` URL."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:"):
        raise MediaError("a data URL must look like data:<type>;base64,<data>")
    if not header.endswith(";base64"):
        raise MediaError("only base64 data URLs are supported (data:<type>;base64,<data>)")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL's payload is not valid base64") from None
    if not data:
        raise MediaError("the data URL is empty")
    return data
