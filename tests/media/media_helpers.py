"""Shared pieces of the media tests: a tiny tokenizer both sides use, the reference processors, images.

The reference processors need no weights, only a tokenizer that knows the media tokens. We build a small
byte-fallback BPE with `tokenizers` (the same kind as Gemma's), register the Gemma 4 and Gemma 3 media
tokens as special tokens, and hand the one backend object both to transformers (`GemmaTokenizer`) and
to our `gemma4.tokenizer.Tokenizer`, so prompt ids can be compared exactly.
"""

from __future__ import annotations

import ast
import io
import math
from pathlib import Path
from unittest import mock

import numpy as np
import torch

MEDIA_TOKENS = ["<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>",
                "<|turn>", "<turn|>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                "<start_of_turn>", "<end_of_turn>"]


def tiny_backend():
    import tokenizers
    from tokenizers import AddedToken, decoders, models, normalizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in list("abcdefghijklmnopqrstuvwxyzHT0123456789:▁\n") + ["▁a", "he", "re"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "a"), ("h", "e"), ("r", "e")]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                                          fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<pad>", "<eos>", "<bos>", "<unk>", *MEDIA_TOKENS]])
    tok.add_tokens([AddedToken("\n\n", normalized=False)])
    return tok


def our_tokenizer(backend):
    from gemma4.tokenizer import Tokenizer

    return Tokenizer(backend, add_bos=False)


def hf_tokenizer(backend, family: str):
    from transformers import GemmaTokenizer

    if family == "gemma4":
        extra = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    else:
        extra = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    return GemmaTokenizer(tokenizer_object=backend, extra_special_tokens=extra)


def reference_gemma4_processor(backend):
    """transformers' Gemma4Processor with the Pillow image processor (torchvision is not installed here;
    the video processor slot is filled by a stand-in, videos are compared piece by piece)."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a, **k: None):
        return Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                               image_processor=Gemma4ImageProcessorPil(), tokenizer=hf_tokenizer(backend, "gemma4"),
                               video_processor=object())


def gemma3_released_kwargs() -> dict:
    """The gemma-3-*-it preprocessor_config.json values."""
    return {"size": {"height": 896, "width": 896}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_rescale": True, "do_resize": True}


def reference_gemma3_processor(backend):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(**gemma3_released_kwargs()),
                           tokenizer=hf_tokenizer(backend, "gemma3"))


def torchvision_available() -> bool:
    """The reference's default (torchvision) processors, when torchvision imports; not a dependency."""
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception:
        return False
    return True


def reference_functions(relative: str, names: set[str]) -> dict:
    """Named top-level functions of a transformers source file, compiled alone: the unified and video
    modules import torchvision at the top, but these pure-torch helpers do not need it."""
    import transformers

    path = Path(transformers.__file__).parent / relative
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert {node.name for node in body} == names, f"reference functions missing in {relative}"
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


# -- images ---------------------------------------------------------------------------------------
def _noise(h, w, c, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def _smooth(h, w, seed):
    """A picture with structure (gradients + noise) so resampling differences show."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
    return np.clip(base + _noise(h, w, 3, seed) // 8, 0, 255).astype(np.uint8)


def encode(image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_images() -> dict[str, bytes]:
    """At least 20 encoded images of odd sizes and modes."""
    from PIL import Image

    rgb = lambda h, w, s: Image.fromarray(_smooth(h, w, s))  # noqa: E731
    images = {
        "rgb_1x1": encode(Image.fromarray(_noise(1, 1, 3, 1))),
        "rgb_2x3_tiny_png": encode(Image.fromarray(_noise(3, 2, 3, 2))),
        "rgb_47x300": encode(rgb(300, 47, 3)),
        "rgb_3000x17": encode(rgb(17, 3000, 4)),
        "rgb_5x2000": encode(rgb(2000, 5, 5)),
        "rgb_640x480_jpeg": encode(rgb(480, 640, 6), "JPEG", quality=90),
        "rgb_999x1000": encode(rgb(1000, 999, 7)),
        "rgb_768x768_no_resize": encode(rgb(768, 768, 8)),
        "rgb_48x48": encode(rgb(48, 48, 9)),
        "rgb_97x131": encode(rgb(131, 97, 10)),
        "grey_L_123x77": encode(Image.fromarray(_smooth(77, 123, 11)[..., 0])),
        "grey_L_jpeg_50x90": encode(Image.fromarray(_smooth(90, 50, 12)[..., 1]), "JPEG"),
        "bilevel_1_64x64": encode(Image.fromarray(_smooth(64, 64, 13)[..., 0]).convert("1")),
        "rgba_64x50": encode(Image.fromarray(np.concatenate([_smooth(50, 64, 14), _noise(50, 64, 1, 15)], -1))),
        "la_33x90": encode(Image.fromarray(np.stack([_smooth(90, 33, 16)[..., 0], _noise(90, 33, 0, 17)], -1))),
        "cmyk_80x60_jpeg": encode(Image.fromarray(_noise(60, 80, 4, 18), mode="CMYK"), "JPEG"),
        "cmyk_80x60_tiff": encode(Image.fromarray(_noise(60, 80, 4, 19), mode="CMYK"), "TIFF"),
        "palette_100x40": encode(rgb(40, 100, 20).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        "palette_transparent_70x70": _palette_transparent(),
        "exif_rotated_jpeg_40x24": _exif_rotated(),
        "animated_gif_30x20": _animated_gif(),
        "webp_75x45": encode(rgb(45, 75, 21), "WEBP", lossless=True),
    }
    return images


def _palette_transparent() -> bytes:
    from PIL import Image

    image = Image.fromarray(_smooth(70, 70, 22)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return encode(image, transparency=0)


def _exif_rotated() -> bytes:
    from PIL import Image

    image = Image.fromarray(_smooth(24, 40, 23))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def _animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.fromarray(_smooth(20, 30, 30 + i)).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale PNG and the 8-bit picture it should become (value / 257, rounded)."""
    from PIL import Image

    values = (np.random.default_rng(24).integers(0, 65536, (40, 52))).astype(np.uint16)
    data = encode(Image.fromarray(values))
    return data, np.rint(values / 257).astype(np.uint8)


def write_clip(path: Path, frames: int = 40, fps: int = 10, size=(64, 48), codec="mpeg4") -> Path:
    """A small synthetic clip written by PyAV: a moving gradient, `frames` frames at `fps`."""
    import av

    width, height = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            y, x = np.mgrid[0:height, 0:width]
            picture = np.stack([(x * 4 + i * 6) % 256, (y * 5) % 256, np.full_like(x, (i * 9) % 256)], -1)
            frame = av.VideoFrame.from_ndarray(picture.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# -- audio ----------------------------------------------------------------------------------------
SPEECH = Path(__file__).parent.parent / "data" / "audio" / "speech_16k.wav"


def speech_clip() -> torch.Tensor:
    """The shipped espeak-ng sentence: 5.8 s of 16 kHz mono float32 in [-1, 1]."""
    import soundfile

    samples, rate = soundfile.read(SPEECH, dtype="float32")
    assert rate == 16_000 and samples.ndim == 1
    return torch.from_numpy(samples)
