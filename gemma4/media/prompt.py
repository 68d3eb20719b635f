"""Expanding the media placeholders of a rendered chat prompt, as the reference processors do.

Gemma 4 (`gemma4.chat` writes `<|image|>` / `<|video|>` per media part):
- image: `<|image>` + n x `<|image|>` + `<image|>`, n = that image's soft-token count;
- video: per sampled frame `mm:ss <|image>` + n x `<|video|>` + `<image|>`, frames joined by a space;
- audio: `<|audio>` + n x `<|audio|>` + `<audio|>`, n = that clip's soft-token count (`<|audio|>` is both
  the placeholder and the soft token, as `<|image|>` is).
Gemma 3 (`<start_of_image>` per image part): `\\n\\n<start_of_image>` + 256 x `<image_soft_token>` +
`<end_of_image>\\n\\n`; with pan-and-scan crops, "Here is the original image {block} and here are some
crops to help you see better " followed by one block per crop joined by spaces.

Placeholders are matched to media in order of appearance, images, videos and audio counted separately. With a
tokenizer the expanded text is encoded once (so ids equal the reference's, which tokenizes the same
text) and `spans` give, for each image / crop / frame / audio clip, where its soft tokens sit in the ids: the engine
keeps one span whole in a prefill chunk, and each span is one bidirectional attention group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gemma4.chat.tokens import (
    AUDIO, AUDIO_CLOSE, AUDIO_OPEN, END_OF_IMAGE, IMAGE, IMAGE_CLOSE, IMAGE_OPEN, IMAGE_SOFT_TOKEN, START_OF_IMAGE,
    VIDEO,
)

from .errors import MediaError

__all__ = ["MediaSpan", "Expansion", "expand_prompt", "FAMILIES"]

FAMILIES = ("gemma4", "gemma3")


@dataclass(frozen=True)
class MediaSpan:
    """Soft tokens of one image, crop, video frame or audio clip: ids[start:start + length]."""

    kind: str  # "image", "video" or "audio"
    item: int  # which image / video / audio clip of the prompt (order of appearance)
    part: int  # frame of the video, or crop of a Gemma 3 image (0 = the whole image or clip)
    row: int  # the row of pixel_values / pixel_values_videos / input_features holding its input
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class Expansion:
    text: str
    ids: list[int] | None = None
    spans: list[MediaSpan] | None = None
    mm_token_type_ids: list[int] | None = None  # 0 text, 1 image, 2 video, 3 audio: the reference's layout


def expand_prompt(
    text: str,
    family: str,
    *,
    image_tokens: Sequence[int] = (),
    num_crops: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    timestamps: Sequence[Sequence[float]] = (),
    audio_tokens: Sequence[int] = (),
    tokenizer: Any = None,
    gemma3_soft_tokens: int = 256,
    encode: Any = None,
) -> Expansion:
    """Replace each placeholder in `text` by its media block; with `tokenizer`, also ids and spans.

    Gemma 4: `image_tokens[i]` soft tokens for the i-th `<|image|>`; the i-th `<|video|>` has
    `len(timestamps[i])` frames of `video_tokens[i]` soft tokens each; the i-th `<|audio|>` has
    `audio_tokens[i]` soft tokens. Gemma 3 (no audio): the i-th
    `<start_of_image>` has `num_crops[i]` crops (default 0) of `gemma3_soft_tokens` each.
    `tokenizer` is a gemma4 `Tokenizer` (or anything with `encode(text, add_bos=False)` and
    `token_to_id`); the text is encoded without adding BOS (a chat prompt carries its own), or by
    `encode(text) -> ids` when given (a server that keeps user-typed special tokens as plain text).
    """
    if family == "gemma4":
        out, plan = _expand_gemma4(text, image_tokens, video_tokens, timestamps, audio_tokens)
    elif family == "gemma3":
        if audio_tokens:
            raise MediaError("Gemma 3 models do not take audio")
        out, plan = _expand_gemma3(text, num_crops, gemma3_soft_tokens)
    else:
        raise MediaError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if tokenizer is None:
        return Expansion(out)
    ids = list(encode(out) if encode is not None else tokenizer.encode(out, add_bos=False))
    spans, types = _spans(ids, plan, family, tokenizer)
    return Expansion(out, ids, spans, types)


def _split(text: str, markers: Sequence[str]) -> list[str]:
    """`text` cut into text pieces and whole markers, in order."""
    pieces, start = [], 0
    while True:
        found = [(text.find(m, start), m) for m in markers]
        found = [(at, m) for at, m in found if at >= 0]
        if not found:
            pieces.append(text[start:])
            return pieces
        at, marker = min(found)
        pieces += [text[start:at], marker]
        start = at + len(marker)


def _expand_gemma4(text, image_tokens, video_tokens, timestamps, audio_tokens):
    if len(video_tokens) != len(timestamps):
        raise MediaError("give one soft-token count and one timestamp list per video")
    pieces = _split(text, (IMAGE, VIDEO, AUDIO))
    _check_count(pieces.count(IMAGE), len(image_tokens), IMAGE, "image")
    _check_count(pieces.count(VIDEO), len(video_tokens), VIDEO, "video")
    _check_count(pieces.count(AUDIO), len(audio_tokens), AUDIO, "audio clip")
    images, videos = iter(enumerate(image_tokens)), iter(enumerate(zip(video_tokens, timestamps)))
    clips = iter(enumerate(audio_tokens))
    out, plan, frame_row = [], [], 0  # plan: (kind, item, part, row, soft tokens) per span, in order
    for piece in pieces:
        if piece == IMAGE:
            item, n = next(images)
            out.append(IMAGE_OPEN + IMAGE * int(n) + IMAGE_CLOSE)
            plan.append(("image", item, 0, item, int(n)))
        elif piece == VIDEO:
            item, (n, stamps) = next(videos)
            if not stamps:
                raise MediaError("a video needs at least one frame")
            frames = []
            for frame, seconds in enumerate(stamps):
                frames.append(f"{int(seconds // 60):02d}:{int(seconds % 60):02d} "
                              + IMAGE_OPEN + VIDEO * int(n) + IMAGE_CLOSE)
                plan.append(("video", item, frame, frame_row, int(n)))
                frame_row += 1
            out.append(" ".join(frames))
        elif piece == AUDIO:
            item, n = next(clips)
            out.append(AUDIO_OPEN + AUDIO * int(n) + AUDIO_CLOSE)
            plan.append(("audio", item, 0, item, int(n)))
        else:
            out.append(piece)
    return "".join(out), plan


def _expand_gemma3(text, num_crops, soft_tokens):
    pieces = _split(text, (START_OF_IMAGE,))
    count = pieces.count(START_OF_IMAGE)
    crops = list(num_crops) if num_crops else [0] * count
    _check_count(count, len(crops), START_OF_IMAGE, "image")
    block = "\n\n" + START_OF_IMAGE + IMAGE_SOFT_TOKEN * soft_tokens + END_OF_IMAGE + "\n\n"
    out, plan, item, row = [], [], 0, 0
    for piece in pieces:
        if piece != START_OF_IMAGE:
            out.append(piece)
            continue
        extra = int(crops[item])
        if extra:
            out.append(f"Here is the original image {block} and here are some crops to help you see better "
                       + " ".join([block] * extra))
        else:
            out.append(block)
        for part in range(extra + 1):
            plan.append(("image", item, part, row, soft_tokens))
            row += 1
        item += 1
    return "".join(out), plan


def _check_count(in_text: int, given: int, marker: str, kind: str) -> None:
    if in_text != given:
        raise MediaError(f"the prompt has {in_text} {marker} placeholder(s) but {given} {kind}(s) were given; "
                         f"each {kind} needs exactly one placeholder")


def _spans(ids, plan, family, tokenizer):
    """Runs of soft-token ids, matched in order to the planned blocks; any mismatch is an error."""
    kinds = {kind for kind, *_ in plan}
    if family == "gemma4":
        soft = {tokenizer.token_to_id(IMAGE): "image", tokenizer.token_to_id(VIDEO): "video"}
        if "audio" in kinds:  # a tokenizer without audio tokens still serves images and video
            soft[tokenizer.token_to_id(AUDIO)] = "audio"
    else:
        soft = {tokenizer.token_to_id(IMAGE_SOFT_TOKEN): "image"}
    if None in soft:
        raise MediaError("the tokenizer lacks the media tokens of this family; is it a multimodal checkpoint's?")
    types_of = {"image": 1, "video": 2, "audio": 3}
    types = [types_of[soft[i]] if i in soft else 0 for i in ids]
    runs, i = [], 0
    while i < len(ids):
        if ids[i] in soft:
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            runs.append((soft[ids[i]], i, j - i))
            i = j
        else:
            i += 1
    got = [(kind, length) for kind, _, length in runs]
    want = [(kind, n) for kind, _, _, _, n in plan]
    if got != want:  # a soft token typed into the prompt text would land here
        raise MediaError("the prompt's media tokens do not line up with the media given: remove any literal "
                         "image/video/audio soft tokens from the message text")
    spans = [MediaSpan(kind, item, part, row, start, length)
             for (kind, item, part, row, _), (_, start, length) in zip(plan, runs)]
    return spans, types
