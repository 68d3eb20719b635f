"""From chat messages to model inputs: media parts in placeholder order, data URLs, and the whole path
(render with gemma4.chat, expand with gemma4.media) against the reference processor."""

from __future__ import annotations

import base64
import io

import pytest

from media_helpers import (
    make_images, our_tokenizer, reference_gemma3_processor, reference_gemma4_processor, tiny_backend,
)

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from gemma4.chat import ChatFormat  # noqa: E402
from gemma4.media import MediaError, data_url_bytes, media_parts, process_prompt  # noqa: E402

IMAGES = make_images()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def conversation():
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image", "image": IMAGES["rgb_47x300"]},
            {"type": "image_url", "image_url": {"url": data_url(IMAGES["rgba_64x50"])}},
            {"type": "text", "text": "please."},
        ]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": [{"type": "image_url", "image_url": data_url(IMAGES["rgb_3000x17"])},
                                     {"type": "text", "text": "And this?"}]},
    ]


def test_media_parts_in_order():
    images, videos, audios = media_parts(conversation())
    assert images == [IMAGES["rgb_47x300"], IMAGES["rgba_64x50"], IMAGES["rgb_3000x17"]] and videos == audios == []


def test_gemma4_render_expand_equals_reference():
    backend = tiny_backend()
    messages = conversation()
    text = ChatFormat("gemma4").render(messages)
    images, *_ = media_parts(messages)
    ours = process_prompt(text, family="gemma4", images=images, tokenizer=our_tokenizer(backend))
    ref = reference_gemma4_processor(backend)(text=[text], images=[[Image.open(io.BytesIO(i)) for i in images]],
                                              add_special_tokens=False, return_tensors="pt")
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert len(ours.spans) == 3


def test_gemma3_render_expand_equals_reference():
    backend = tiny_backend()
    messages = conversation()[1:]
    text = ChatFormat("gemma3").render(messages)
    images, *_ = media_parts(messages)
    ours = process_prompt(text, family="gemma3", images=images, tokenizer=our_tokenizer(backend))
    ref = reference_gemma3_processor(backend)(text=[text], images=[[Image.open(io.BytesIO(i)) for i in images]],
                                              add_special_tokens=False, return_tensors="pt")
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert [s.length for s in ours.spans] == [256, 256, 256]


@pytest.mark.parametrize("url, message", [
    ("data:image/png,plain", "only base64"),
    ("data:image/png;base64,@@@not base64@@@", "not valid base64"),
    ("data:image/png;base64,", "empty"),
    ("image/png;base64,aGk=", "must look like"),
])
def test_bad_data_urls(url, message):
    with pytest.raises(MediaError, match=message):
        data_url_bytes(url)


def test_part_without_source():
    with pytest.raises(MediaError, match="no source"):
        media_parts([{"role": "user", "content": [{"type": "image"}]}])


def test_same_image_same_key():
    a = process_prompt("<|image|>", family="gemma4", images=[IMAGES["rgb_97x131"]])
    b = process_prompt("<|image|>", family="gemma4", images=[data_url_bytes(data_url(IMAGES["rgb_97x131"]))])
    c = process_prompt("<|image|>", family="gemma4", images=[IMAGES["rgb_97x131"]], max_soft_tokens=70)
    assert a.image_keys == b.image_keys != c.image_keys
