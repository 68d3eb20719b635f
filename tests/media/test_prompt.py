"""Prompt expansion: ids equal the reference processors' on the same text; spans cover each image's soft tokens."""

from __future__ import annotations

import pytest

from media_helpers import (
    make_images, our_tokenizer, reference_gemma3_processor, reference_gemma4_processor, tiny_backend,
)

pytest.importorskip("PIL")
import io  # noqa: E402

from PIL import Image  # noqa: E402

from gemma4.media import MediaError, expand_prompt, process_prompt  # noqa: E402

IMAGES = make_images()
GEMMA4_TEXT = "<bos><|turn>user\nhere <|image|> and<|image|>\n\n<|image|>a<turn|>\n<|turn>model\n"
GEMMA3_TEXT = "<bos><start_of_turn>user\nhere <start_of_image> and<start_of_image><end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_gemma4_prompt_ids_equal_reference(backend, budget):
    names = ["rgb_47x300", "rgb_3000x17", "rgba_64x50"]
    ref = reference_gemma4_processor(backend)(
        text=[GEMMA4_TEXT], images=[[Image.open(io.BytesIO(IMAGES[n])) for n in names]],
        max_soft_tokens=budget, add_special_tokens=False, return_tensors="pt")
    tok = our_tokenizer(backend)
    ours = process_prompt(GEMMA4_TEXT, family="gemma4", images=[IMAGES[n] for n in names], tokenizer=tok,
                          max_soft_tokens=budget)
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert ours.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist()
    counts = ours.image_inputs["num_soft_tokens_per_image"]
    assert [s.length for s in ours.spans] == counts
    image_id, open_id, close_id = tok.token_to_id("<|image|>"), tok.token_to_id("<|image>"), tok.token_to_id("<image|>")
    for row, span in enumerate(ours.spans):
        assert (span.kind, span.item, span.part, span.row) == ("image", row, 0, row)
        assert set(ours.input_ids[span.start:span.end]) == {image_id}
        assert ours.input_ids[span.start - 1] == open_id and ours.input_ids[span.end] == close_id


def test_gemma4_unified_uses_the_same_prompt(backend):
    tok = our_tokenizer(backend)
    plain = process_prompt(GEMMA4_TEXT, family="gemma4", images=[IMAGES["rgb_47x300"]] * 3, tokenizer=tok)
    unified = process_prompt(GEMMA4_TEXT, family="gemma4", images=[IMAGES["rgb_47x300"]] * 3, tokenizer=tok,
                             unified=True)
    assert unified.input_ids == plain.input_ids
    assert unified.image_inputs["pixel_values"].shape == (3, 280, 6912)


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_gemma3_prompt_ids_equal_reference(backend, pan_and_scan):
    names = ["rgb_3000x17", "rgb_640x480_jpeg"]
    kwargs = dict(do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                  pan_and_scan_min_ratio_to_activate=1.2)
    ref = reference_gemma3_processor(backend)(
        text=[GEMMA3_TEXT], images=[[Image.open(io.BytesIO(IMAGES[n])) for n in names]],
        add_special_tokens=False, return_tensors="pt", **kwargs)
    ours = process_prompt(GEMMA3_TEXT, family="gemma3", images=[IMAGES[n] for n in names],
                          tokenizer=our_tokenizer(backend), pan_and_scan=pan_and_scan)
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert ours.mm_token_type_ids == ref["token_type_ids"][0].tolist()
    assert ours.image_inputs["pixel_values"].shape == ref["pixel_values"].shape
    assert [s.length for s in ours.spans] == [256] * ours.image_inputs["pixel_values"].shape[0]
    assert [s.row for s in ours.spans] == list(range(len(ours.spans)))
    if pan_and_scan:
        assert ours.image_inputs["num_crops"] == [0, 2]  # the 17-px-high strip is too thin to crop
        assert [(s.item, s.part) for s in ours.spans] == [(0, 0), (1, 0), (1, 1), (1, 2)]


def test_text_only_expansion_without_tokenizer():
    out = expand_prompt("x<|image|>y", "gemma4", image_tokens=[2])
    assert out.text == "x<|image><|image|><|image|><image|>y" and out.ids is None
    out = expand_prompt("<start_of_image>", "gemma3", gemma3_soft_tokens=2)
    assert out.text == "\n\n<start_of_image><image_soft_token><image_soft_token><end_of_image>\n\n"


def test_video_expansion_writes_timestamps():
    out = expand_prompt("v:<|video|>.", "gemma4", video_tokens=[2], timestamps=[[0.0, 61.5, 3599.9]])
    block = "<|image><|video|><|video|><image|>"
    assert out.text == f"v:00:00 {block} 01:01 {block} 59:59 {block}."


def test_literal_soft_token_in_user_text_is_an_error(backend):
    with pytest.raises(MediaError, match="do not line up"):
        expand_prompt("<start_of_image>x<image_soft_token>", "gemma3", gemma3_soft_tokens=2,
                      tokenizer=our_tokenizer(backend))
