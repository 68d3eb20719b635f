"""Images through a real `gemma4 serve` with the official openai client: a tiny random multimodal
checkpoint (31B-like: the vision encoder with standardize, image blocks bidirectional on sliding
layers) gives transformers' greedy tokens for the same prompt and pixels; concurrent image
requests give the tokens each gets alone; bad media are clear 400s and the server stays healthy."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from serve_helpers import SPECIAL, VOCAB, exact_server, make_app, multimodal_reference, running_server

MEDIA = ["<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio|>"]
IDS = {t: len(SPECIAL) + i for i, t in enumerate(MEDIA)}
BANNED = list(range(len(SPECIAL) + len(MEDIA)))  # special and media ids: random weights would pick them
STOPS = [SPECIAL.index("<eos>"), SPECIAL.index("<turn|>")]


def _edit(raw):
    raw["text_config"].update(vocab_size=VOCAB, eos_token_id=STOPS, bos_token_id=SPECIAL.index("<bos>"),
                              pad_token_id=0)
    raw.update(image_token_id=IDS["<|image|>"], video_token_id=IDS["<|video|>"], audio_token_id=IDS["<|audio|>"],
               boi_token_id=IDS["<|image>"], eoi_token_id=IDS["<image|>"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return multimodal_reference(tmp_path_factory, "31b", _edit, MEDIA)


@pytest.fixture(scope="module")
def server(checkpoint):
    with exact_server(checkpoint[1], max_batch=4) as served:
        yield served


def _png(seed: int, size=(150, 100)) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _messages(png: bytes, text="What is in the picture?"):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]


def _ask(url, messages, n=6):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model="tiny-gemma4", messages=messages, max_tokens=n, temperature=0,
                                       logit_bias={str(i): -100 for i in BANNED})
    return r.choices[0].message.content


def _reference(checkpoint, loaded, messages, n=6):
    """transformers' greedy continuation of the same prompt ids and pixels (our processor's)."""
    from gemma4.media import media_parts, process_prompt

    ref, _ = checkpoint
    _, tokenizer, fmt = loaded
    text = fmt.render(messages, add_generation_prompt=True)
    images, *_ = media_parts(messages)
    mm = process_prompt(text, family="gemma4", images=images, tokenizer=tokenizer, max_soft_tokens=70)
    ids = torch.tensor([mm.input_ids])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values=mm.image_inputs["pixel_values"],
                           image_position_ids=mm.image_inputs["image_position_ids"],
                           mm_token_type_ids=torch.tensor([mm.mm_token_type_ids]), max_new_tokens=n,
                           do_sample=False, suppress_tokens=BANNED, eos_token_id=STOPS, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def test_an_image_request_gives_the_reference_greedy_tokens(server, checkpoint):
    url, loaded = server
    messages = _messages(_png(1))
    assert _ask(url, messages) == _reference(checkpoint, loaded, messages)


def test_concurrent_image_requests_equal_each_alone(server):
    url, _ = server
    asks = [_messages(_png(i), f"Picture {i}?") for i in range(3)] + [_messages(_png(0), "Picture 0?")]
    alone = [_ask(url, m) for m in asks[:3]]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda m: _ask(url, m), asks))
    assert together == alone + [alone[0]]


@pytest.mark.parametrize("part,message", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "cannot read the media"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, "not valid base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,raw"}}, "only base64 data URLs"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "remote media URLs are disabled"),
    ({"type": "image_url", "image_url": {"url": "/etc/passwd"}}, "local media paths are disabled"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "local media paths are disabled"),
    ({"type": "image_url", "image_url": {"url": ""}}, "must be"),
    ({"type": "image_url", "image_url": "data:x"}, "must be"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "max"}},
     "detail must be"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64," + base64.b64encode(b"hello").decode()}},
     "cannot read the media"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "takes no audio"),  # 31B-like
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "cannot read the media"),
])
def test_bad_media_are_clear_400s(server, part, message):
    import httpx

    url, _ = server
    body = {"model": "tiny-gemma4", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200


def test_too_many_images_and_a_decompression_bomb(server):
    import httpx

    from PIL import Image

    url, _ = server
    png = _png(5, (8, 8))
    many = _messages(png)
    many[0]["content"] += many[0]["content"][1:] * 16
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-gemma4", "messages": many}, timeout=60)
    assert r.status_code == 400 and "at most 16" in r.json()["error"]["message"]
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    bomb = bytearray(out.getvalue())
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # the IHDR width and height: a 10-gigapixel header
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-gemma4", "messages": _messages(bytes(bomb))},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert httpx.get(url + "/health").status_code == 200


def test_a_text_only_model_refuses_images(loaded):
    from serve_helpers import served

    import httpx

    app = make_app(loaded)
    with running_server(app) as url:
        assert served(app).capabilities["image"] is False
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-gemma4", "messages": _messages(_png(1))},
                       timeout=60)
    assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]


def test_cli_and_python_api_take_images(checkpoint, tmp_path, capsys):
    """`gemma4 generate --image` and `chat_reply` with an image part give the server's greedy reply
    (the same engine path); the embedded text-only model refuses an image with one clear line."""
    import gemma4
    from gemma4.cli import main

    _, path = checkpoint
    picture = tmp_path / "picture.png"
    picture.write_bytes(_png(1))
    loaded = gemma4.load(str(path))
    messages = [{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    reply = gemma4.chat_reply(*loaded[:2], messages, chat_format=loaded.chat_format, max_tokens=4, image_tokens=70)
    assert reply.prompt_tokens > 70  # the image's soft tokens are in the prompt
    assert main(["generate", "--model", str(path), "--image", str(picture), "--image-tokens", "70", "--exact",
                 "--max-tokens", "4", "What is in the picture?"]) == 0
    assert capsys.readouterr().out.strip() == reply.content.strip()
    assert main(["generate", "--image", str(picture), "--max-tokens", "2", "What is this?"]) == 1
    assert "takes no images" in capsys.readouterr().err


def _clip(frames: int = 3) -> bytes:
    """A tiny MPEG-4 clip (PyAV), 1 frame a second."""
    import tempfile

    av = pytest.importorskip("av", reason="video needs PyAV (pip install 'gemma4[video]')")
    g = torch.Generator().manual_seed(7)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        with av.open(f.name, "w") as container:
            stream = container.add_stream("mpeg4", rate=1)
            stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv420p"
            for _ in range(frames):
                pixels = torch.randint(0, 256, (48, 96, 3), dtype=torch.uint8, generator=g).numpy()
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return Path(f.name).read_bytes()


def test_a_video_request_gives_the_reference_greedy_tokens(server, checkpoint):
    from gemma4.media import media_parts, process_prompt

    url, loaded = server
    clip = _clip()
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(clip).decode()}},
        {"type": "text", "text": "What happens?"}]}]
    got = _ask(url, messages)
    ref, _ = checkpoint
    _, tokenizer, fmt = loaded
    text = fmt.render(messages, add_generation_prompt=True)
    _, videos, _ = media_parts(messages)
    mm = process_prompt(text, family="gemma4", videos=videos, tokenizer=tokenizer)
    v = mm.video_inputs
    ids = torch.tensor([mm.input_ids])
    assert len(v["timestamps"][0]) == 3 and (ids == IDS["<|video|>"]).sum() > 3
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values_videos=v["pixel_values_videos"],
                           video_position_ids=v["video_position_ids"],
                           num_frames_per_video=torch.tensor(v["num_frames_per_video"]),
                           mm_token_type_ids=torch.tensor([mm.mm_token_type_ids]), max_new_tokens=6,
                           do_sample=False, suppress_tokens=BANNED, eos_token_id=STOPS, pad_token_id=0)
    assert got == tokenizer.decode(out[0, ids.shape[1]:].tolist())
