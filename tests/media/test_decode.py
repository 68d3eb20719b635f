"""Decoding rules (EXIF, alpha on white, first GIF frame, arrays) and 20+ bad inputs, each a MediaError."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from media_helpers import encode, make_images, our_tokenizer, tiny_backend

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from gemma4.media import (  # noqa: E402
    MediaError, Video, expand_prompt, gemma3_image_inputs, gemma4_image_inputs, gemma4_video_inputs, load_image,
    load_video, process_prompt,
)

IMAGES = make_images()


def test_media_error_is_a_value_error():
    assert issubclass(MediaError, ValueError)


def test_exif_orientation_is_applied():
    decoded = load_image(IMAGES["exif_rotated_jpeg_40x24"])
    assert decoded.shape == (3, 40, 24)  # stored 40 wide x 24 high, displayed rotated


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    decoded = load_image(encode(Image.fromarray(rgba)))
    assert decoded[:, 0, 0].tolist() == [10, 20, 30] and decoded[:, 1, 1].tolist() == [255, 255, 255]


def test_animated_gif_gives_its_first_frame():
    first = Image.open(__import__("io").BytesIO(IMAGES["animated_gif_30x20"])).convert("RGB")
    assert torch.equal(load_image(IMAGES["animated_gif_30x20"]), torch.from_numpy(np.array(first)).permute(2, 0, 1))


@pytest.mark.parametrize("kind", ["path", "pil", "numpy", "torch", "grey_numpy"])
def test_accepted_inputs_agree(tmp_path, kind):
    picture = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    expected = torch.from_numpy(picture).permute(2, 0, 1)
    if kind == "path":
        source = tmp_path / "p.png"
        source.write_bytes(encode(Image.fromarray(picture)))
    elif kind == "pil":
        source = Image.fromarray(picture)
    elif kind == "numpy":
        source = picture
    elif kind == "torch":
        source = torch.from_numpy(picture)
    else:
        source, expected = picture[..., 0], torch.from_numpy(picture[..., 0])[None].expand(3, -1, -1)
    assert torch.equal(load_image(source), expected)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "empty bytes": (b"", "empty"),
    "garbage bytes": (bytes(range(7, 250)) * 3, "not a readable image"),
    "plain text": (b"hello world\n", "not a readable image"),
    "html": (b"<html><body>nope</body></html>", "not a readable image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not a readable image"),
    "truncated png": (IMAGES["rgb_640x480_jpeg"][:0] + IMAGES["rgb_999x1000"][:2000], "cannot be decoded"),
    "truncated jpeg": (IMAGES["rgb_640x480_jpeg"][: len(IMAGES["rgb_640x480_jpeg"]) // 2], "cannot be decoded"),
    "png signature only": (b"\x89PNG\r\n\x1a\n", "not a readable image"),
    "gif header only": (b"GIF89a", "not a readable image"),
    "100000x100000 png header": (_png_header(100000, 100000), "pixels"),
    "10000x10000 png header": (_png_header(10000, 10000), "10000x10000 = 100,000,000 pixels, over the limit"),
    "int": (42, "unsupported image input"),
    "dict": ({"image": "x.png"}, "unsupported image input"),
    "float array": (np.zeros((4, 4, 3), dtype=np.float32), "must be uint8"),
    "two-channel array": (np.zeros((4, 4, 2), dtype=np.uint8), "HWC with 1, 3 or 4 channels"),
    "4-d array": (np.zeros((1, 4, 4, 3), dtype=np.uint8), "HWC with 1, 3 or 4 channels"),
    "empty array": (np.zeros((0, 4, 3), dtype=np.uint8), "no pixels"),
    "missing file": ("/nonexistent/dir/picture.png", "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_clear_error(case):
    source, message = BAD_IMAGES[case]
    with pytest.raises(MediaError, match=message):
        load_image(source)


def test_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_pixel_limit_is_a_parameter():
    with pytest.raises(MediaError, match="over the limit of 1,000"):
        load_image(IMAGES["rgb_97x131"], max_pixels=1000)


def test_bad_budget_and_bad_tensors():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(MediaError, match="one of"):
        gemma4_image_inputs([image], 100)
    with pytest.raises(MediaError, match="RGB uint8"):
        gemma4_image_inputs([image.float()])
    with pytest.raises(MediaError, match="RGB uint8"):
        gemma3_image_inputs([torch.zeros(4, 8, 8, dtype=torch.uint8)])
    with pytest.raises(MediaError, match="no images"):
        gemma4_image_inputs([])


def test_placeholder_count_mismatch():
    with pytest.raises(MediaError, match="2 <\\|image\\|> placeholder"):
        expand_prompt("<|image|><|image|>", "gemma4", image_tokens=[4])
    with pytest.raises(MediaError, match="0 <start_of_image> placeholder"):
        expand_prompt("no image here", "gemma3", num_crops=[0])


def test_unknown_family_and_video_for_gemma3():
    with pytest.raises(MediaError, match="unknown model family"):
        expand_prompt("x", "llama")
    with pytest.raises(MediaError, match="do not take video"):
        process_prompt("<start_of_image>", family="gemma3", videos=[Video(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 1.0, [0])])


def test_tokenizer_without_media_tokens():
    import tokenizers
    from tokenizers import models

    from gemma4.tokenizer import Tokenizer

    plain = tokenizers.Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, unk_token="<unk>"))
    with pytest.raises(MediaError, match="lacks the media tokens"):
        expand_prompt("<|image|>", "gemma4", image_tokens=[1], tokenizer=Tokenizer(plain))


# -- video ------------------------------------------------------------------------------------------
def _no_frames_clip(path):
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
        for packet in stream.encode():
            container.mux(packet)
    return path


def _audio_only(path):
    import av

    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("case", ["empty", "garbage", "no frames", "audio only", "missing", "int", "empty path"])
def test_bad_video_is_a_clear_error(tmp_path, case):
    pytest.importorskip("av", reason="PyAV is the optional `video` extra")
    source, message = {
        "empty": (b"", "empty"),
        "garbage": (b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 200, "cannot be decoded|no video stream|no frames"),
        "missing": (tmp_path / "nope.mp4", "not found"),
        "int": (7, "unsupported video input"),
    }.get(case, (None, None))
    if case == "no frames":
        source, message = _no_frames_clip(tmp_path / "none.mp4"), "no video stream|no frames|no decodable frames"
    elif case == "audio only":
        source, message = _audio_only(tmp_path / "sound.wav"), "no video stream"
    elif case == "empty path":
        source, message = tmp_path / "empty.mp4", "empty"
        source.write_bytes(b"")
    with pytest.raises(MediaError, match=message):
        load_video(source)


def test_video_without_frames_in_the_processor():
    with pytest.raises(MediaError, match="at least one decoded frame"):
        gemma4_video_inputs([Video(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), 10.0, [])])
    with pytest.raises(MediaError, match="at least one frame"):
        expand_prompt("<|video|>", "gemma4", video_tokens=[4], timestamps=[[]])


def test_errors_through_process_prompt_keep_their_message():
    with pytest.raises(MediaError, match="not a readable image"):
        process_prompt("<|image|>", family="gemma4", images=[b"junk"], tokenizer=our_tokenizer(tiny_backend()))
