"""Images, video and audio in chat requests: where their bytes may come from, and their processing.

A request's `image_url` / `video_url` parts are `data:` URLs by default, `input_audio` parts base64
data (OpenAI's shape; at most 30 s a clip, the models' limit). A local path (or
`file://` URL) is read only under `--allowed-media-dir`; an `http(s)` URL is fetched only with
`--allow-remote-media`, with httpx, within the same size limit and a time limit. Everything runs in
the worker thread that prepares the request, before it takes a slot; every refusal is a 400 that
says what to do. The vision encoder itself runs later, in the engine's prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import NO_AUDIO
from ..engine.media import MediaInput, media_inputs
from ..media import DEFAULT_BUDGET, MediaError, media_parts, process_prompt
from .errors import bad_request, sanitize

if TYPE_CHECKING:
    from .app import ServeConfig, ServedModel

_MEDIA_PARTS = ("image_url", "image", "video_url", "video", "input_audio", "audio")
DETAIL_TOKENS = {"low": 70, "auto": None, "high": 1120}  # OpenAI's `detail` -> a soft-token budget


@dataclass
class MediaPolicy:
    max_items: int = 16  # images, videos and audio clips in one request
    allowed_dir: Path | None = None  # local files readable by path
    allow_remote: bool = False  # http(s) URLs fetched by the server
    fetch_timeout: float = 10.0  # seconds for one remote download
    max_bytes: int = 20 * 1024 * 1024  # one input, however it arrives


def has_media(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") in _MEDIA_PARTS for p in m["content"])
        for m in messages)


def budget(messages: list[dict]) -> int:
    """The request's image budget: the largest `detail` asked for (OpenAI's low / auto / high)."""
    asked = [DETAIL_TOKENS.get(p["image_url"].get("detail") or "auto") for m in messages
             if isinstance(m.get("content"), list) for p in m["content"]
             if isinstance(p, dict) and isinstance(p.get("image_url"), dict)]
    asked = [a for a in asked if a is not None]
    return max(asked) if asked else DEFAULT_BUDGET


def prepare(text: str, messages: list[dict], served: ServedModel, config: ServeConfig, encode
            ) -> tuple[list[int], tuple[MediaInput, ...]]:
    """(prompt ids, engine media) for a rendered chat prompt whose messages hold images, video or audio."""
    policy = config.media
    try:
        images, videos, audios = media_parts(messages)
        count = len(images) + len(videos) + len(audios)
        if count > policy.max_items:
            raise bad_request(f"{count} images, videos and audio clips in one request; at most "
                              f"{policy.max_items} (--max-media-items)", param="messages")
        images = [_fetch(x, policy) for x in images]
        videos = [_fetch(x, policy) for x in videos]
        audios = [_fetch(x, policy) for x in audios]
        return process(text, served, encode, images=images, videos=videos, audios=audios,
                       tokens=budget(messages))
    except MediaError as error:
        raise bad_request(f"cannot read the media: {sanitize(str(error))}", param="messages") from None


def process(text: str, served: ServedModel, encode, *, images=(), videos=(), audios=(), tokens: int = DEFAULT_BUDGET
            ) -> tuple[list[int], tuple[MediaInput, ...]]:
    """Media already in hand (bytes, or decoded audio) -> (prompt ids, engine media); a 400 when the model
    lacks the tower they need. MediaError passes through for the caller's wording."""
    model = served.model
    vision = getattr(model, "vision_config", None)
    if (images or videos) and vision is None:
        raise bad_request("this model takes no images or video (a text-only checkpoint, or served with "
                          "--text-only): send text only", param="messages")
    if audios and not served.capabilities["audio"]:
        raise bad_request(NO_AUDIO, param="messages")
    mm = process_prompt(text, family=model.config.family, images=images, videos=videos, audios=audios,
                        tokenizer=served.tokenizer, max_soft_tokens=tokens,
                        unified=vision is not None and vision.kind == "unified", encode=encode)
    return mm.input_ids, media_inputs(model, mm)


def _fetch(source: Any, policy: MediaPolicy) -> Any:
    """Bytes of one input: data URLs are already bytes; paths and URLs only as the policy allows."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) > policy.max_bytes:
            raise bad_request(f"a media input of {len(source)} bytes; at most {policy.max_bytes}",
                              param="messages")
        return bytes(source)
    if not isinstance(source, str):
        raise bad_request("a media part must carry a data: URL, a URL or a path string", param="messages")
    if source.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise bad_request("remote media URLs are disabled on this server (--allow-remote-media turns them "
                              "on); send a data: URL", param="messages")
        return _download(source, policy)
    path = source.removeprefix("file://")
    if policy.allowed_dir is None:
        raise bad_request("local media paths are disabled on this server (--allowed-media-dir DIR allows a "
                          "folder); send a data: URL", param="messages")
    root = policy.allowed_dir.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise bad_request("a media path outside --allowed-media-dir", param="messages")
    if not target.is_file():
        raise bad_request(f"no such media file under --allowed-media-dir: {sanitize(path)[:200]}", param="messages")
    if target.stat().st_size > policy.max_bytes:
        raise bad_request(f"a media file over {policy.max_bytes} bytes", param="messages")
    return target.read_bytes()


def _download(url: str, policy: MediaPolicy) -> bytes:
    import httpx

    data, deadline = bytearray(), time.monotonic() + policy.fetch_timeout
    try:
        with httpx.stream("GET", url, timeout=policy.fetch_timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                raise bad_request(f"fetching a media URL gave HTTP {r.status_code}", param="messages")
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > policy.max_bytes:
                    raise bad_request(f"a media URL gave over {policy.max_bytes} bytes", param="messages")
                if time.monotonic() > deadline:
                    raise bad_request(f"a media URL took over {policy.fetch_timeout:g} s", param="messages")
    except httpx.HTTPError as error:
        raise bad_request(f"cannot fetch a media URL: {type(error).__name__}", param="messages") from None
    return bytes(data)


