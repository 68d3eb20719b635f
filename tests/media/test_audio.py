"""Audio decoding (WAV / FLAC / OGG / MP3, arrays, mono, 16 kHz), prompt ids equal to the reference
processors', chat parts, and bad inputs, each a MediaError that says what is wrong."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
import torch

from media_helpers import SPEECH, our_tokenizer, reference_gemma4_processor, speech_clip, tiny_backend

sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

from gemma4.media import MediaError, load_audio, media_parts, process_prompt  # noqa: E402

TEXT = "<bos><|turn>user\nhear <|audio|> and<|audio|>\n\n<turn|>\n<|turn>model\n"


@pytest.fixture(scope="module")
def speech():
    return speech_clip()


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


def encode(samples, rate=16_000, fmt="WAV", subtype="PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(samples), rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def encode_mp3(samples: np.ndarray, rate: int = 16_000) -> bytes:
    av = pytest.importorskip("av")
    if "libmp3lame" not in av.codecs_available and "mp3" not in av.codecs_available:
        pytest.skip("this PyAV build has no MP3 encoder")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp3") as container:
        stream = container.add_stream("libmp3lame" if "libmp3lame" in av.codecs_available else "mp3",
                                      rate=rate, layout="mono")
        step = stream.codec_context.frame_size or 1152
        for start in range(0, len(samples), step):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + step].astype(np.float32),
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# -- decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,subtype,tolerance", [("WAV", "PCM_16", 0.0), ("WAV", "FLOAT", 0.0),
                                                   ("WAV", "PCM_U8", 1 / 64), ("FLAC", "PCM_16", 0.0)])
def test_lossless_files_decode_to_the_samples(speech, fmt, subtype, tolerance):
    decoded = load_audio(encode(speech, fmt=fmt, subtype=subtype))
    assert decoded.dtype == torch.float32 and decoded.shape == speech.shape
    assert (decoded - speech).abs().max() <= tolerance


def same_sound(decoded: torch.Tensor, speech: torch.Tensor) -> float:
    n = min(len(decoded), len(speech))
    return float(np.corrcoef(decoded[:n].numpy(), speech[:n].numpy())[0, 1])


def test_ogg_vorbis_decodes(speech):
    decoded = load_audio(encode(speech, fmt="OGG", subtype="VORBIS"))
    assert decoded.shape == speech.shape and same_sound(decoded, speech) > 0.97


def test_mp3_decodes_through_pyav(speech):
    from unittest import mock

    import gemma4.media.audio as audio

    mp3 = encode_mp3(speech.numpy())
    with mock.patch.object(audio, "_decode_av", wraps=audio._decode_av) as through_av:
        decoded = load_audio(mp3)
    assert through_av.called  # even where libsndfile reads MP3: one decoder for MP3 everywhere
    assert abs(len(decoded) - len(speech)) <= 1152 and same_sound(decoded, speech) > 0.97


def test_sources_path_bytes_arrays_and_dicts_agree(speech):
    from_path = load_audio(SPEECH)
    assert torch.equal(from_path, speech)
    assert torch.equal(load_audio(str(SPEECH)), speech)
    assert torch.equal(load_audio(SPEECH.read_bytes()), speech)
    assert torch.equal(load_audio((speech, 16_000)), speech)
    assert torch.equal(load_audio({"array": speech.numpy(), "sampling_rate": 16_000}), speech)
    pcm = np.round(speech.numpy() * 32768).clip(-32768, 32767).astype(np.int16)
    assert torch.equal(load_audio((pcm, 16_000)), speech)  # int16 / 32768, as the WAV decoder scales


def test_channels_are_averaged(speech):
    stereo = np.stack([speech.numpy(), 0.5 * speech.numpy()], axis=1)  # (frames, channels)
    expected = 0.75 * speech
    assert torch.allclose(load_audio(encode(stereo, subtype="FLOAT")), expected, atol=1e-7)
    assert torch.allclose(load_audio((torch.from_numpy(stereo.T.copy()), 16_000)), expected, atol=1e-7)


@pytest.mark.parametrize("rate", [8_000, 44_100, 48_000])
def test_other_rates_resample_with_soxr(speech, rate):
    at_rate = soxr.resample(speech.numpy(), 16_000, rate)
    decoded = load_audio(encode(at_rate, rate, subtype="FLOAT"))
    expected = np.clip(soxr.resample(at_rate, rate, 16_000, quality="HQ"), -1, 1)
    assert np.array_equal(decoded.numpy(), expected)
    assert abs(len(decoded) - len(speech)) <= 2 and same_sound(decoded, speech) > 0.99


def test_eight_khz_stereo_float_works(speech):
    at_rate = soxr.resample(speech.numpy(), 16_000, 8_000)
    decoded = load_audio(encode(np.stack([at_rate, at_rate], 1), 8_000, subtype="FLOAT"))
    assert decoded.ndim == 1 and abs(len(decoded) - len(speech)) <= 2


# -- prompts ----------------------------------------------------------------------------------------
def test_prompt_ids_and_features_equal_reference(backend, speech):
    clips = [speech[:16_000], speech[5_000:38_333]]
    ref = reference_gemma4_processor(backend)(text=[TEXT], audio=[c.numpy() for c in clips],
                                              add_special_tokens=False, return_tensors="pt")
    tok = our_tokenizer(backend)
    ours = process_prompt(TEXT, family="gemma4", tokenizer=tok,
                          audios=[encode(clips[0]), {"array": clips[1].numpy(), "sampling_rate": 16_000}])
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert ours.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist()
    assert torch.equal(ours.audio_inputs["input_features_mask"], ref["input_features_mask"])
    assert (ours.audio_inputs["input_features"] - ref["input_features"]).abs().max() <= 5e-4
    audio_id, open_id, close_id = tok.token_to_id("<|audio|>"), tok.token_to_id("<|audio>"), tok.token_to_id("<audio|>")
    assert [(s.kind, s.item, s.part, s.row, s.length) for s in ours.spans] == [("audio", 0, 0, 0, 25),
                                                                               ("audio", 1, 0, 1, 52)]
    for span in ours.spans:
        assert set(ours.input_ids[span.start:span.end]) == {audio_id}
        assert ours.input_ids[span.start - 1] == open_id and ours.input_ids[span.end] == close_id


def test_audio_and_image_in_one_prompt_equal_reference(backend, speech):
    pytest.importorskip("PIL")
    from PIL import Image

    from media_helpers import make_images

    image = make_images()["rgb_47x300"]
    text = "<bos><|turn>user\n<|audio|> then <|image|> then<|audio|><turn|>\n"
    clips = [speech[:12_345], speech[:4_000]]
    ref = reference_gemma4_processor(backend)(text=[text], images=[[Image.open(io.BytesIO(image))]],
                                              audio=[c.numpy() for c in clips], add_special_tokens=False,
                                              return_tensors="pt")
    ours = process_prompt(text, family="gemma4", images=[image], audios=[(c, 16_000) for c in clips],
                          tokenizer=our_tokenizer(backend))
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert ours.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist()
    assert [(s.kind, s.item) for s in ours.spans] == [("audio", 0), ("image", 0), ("audio", 1)]


def test_unified_prompt_and_frames_equal_reference(backend, speech):
    from unittest import mock

    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor
    from transformers.processing_utils import ProcessorMixin

    from media_helpers import hf_tokenizer

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a, **k: None):
        processor = Gemma4UnifiedProcessor(feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
                                           image_processor=object(), tokenizer=hf_tokenizer(backend, "gemma4"),
                                           video_processor=object())
    clips = [speech[:16_000], speech[:33_333]]
    ref = processor(text=[TEXT], audio=[c.numpy() for c in clips], add_special_tokens=False, return_tensors="pt")
    ours = process_prompt(TEXT, family="gemma4", audios=[(c, 16_000) for c in clips],
                          tokenizer=our_tokenizer(backend), unified=True)
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert ours.mm_token_type_ids == ref["mm_token_type_ids"][0].tolist()
    assert torch.equal(ours.audio_inputs["input_features"], ref["input_features"])
    assert torch.equal(ours.audio_inputs["input_features_mask"], ref["input_features_mask"])
    assert [s.length for s in ours.spans] == [25, 53]


def test_audio_keys_hash_the_decoded_samples_and_settings(backend, speech):
    tok = our_tokenizer(backend)
    text = "<|audio|><|audio|><|audio|>"
    plain = process_prompt(text, family="gemma4", tokenizer=tok,
                           audios=[encode(speech), (speech, 16_000), (speech[:8_000], 16_000)])
    assert plain.audio_keys[0] == plain.audio_keys[1] != plain.audio_keys[2]
    unified = process_prompt("<|audio|>", family="gemma4", tokenizer=tok, audios=[(speech, 16_000)], unified=True)
    assert unified.audio_keys[0] != plain.audio_keys[0] and len(unified.audio_keys[0]) == 64


def test_chat_parts_in_order(speech):
    wav = encode(speech[:1_000])
    messages = [{"role": "user", "content": [
        {"type": "audio", "audio": str(SPEECH)},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "image", "image": b"png"},
        {"type": "audio", "audio": {"array": speech.numpy(), "sampling_rate": 16_000}},
        {"type": "audio", "audio": "data:audio/wav;base64," + base64.b64encode(wav).decode()},
    ]}]
    images, videos, audios = media_parts(messages)
    assert images == [b"png"] and videos == []
    assert audios[0] == str(SPEECH) and audios[1] == wav and audios[3] == wav
    assert audios[2]["sampling_rate"] == 16_000


def test_rendered_chat_with_audio_equals_reference(backend, speech):
    from gemma4.chat import ChatFormat

    wav = encode(speech[:20_000])
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "Transcribe this."}]}]
    text = ChatFormat("gemma4").render(messages)
    _, _, audios = media_parts(messages)
    ours = process_prompt(text, family="gemma4", audios=audios, tokenizer=our_tokenizer(backend))
    ref = reference_gemma4_processor(backend)(text=[text], audio=[speech[:20_000].numpy()],
                                              add_special_tokens=False, return_tensors="pt")
    assert ours.input_ids == ref["input_ids"][0].tolist() and len(ours.spans) == 1


# -- bad inputs -------------------------------------------------------------------------------------
def wav_with_codec_tag(tag: int) -> bytes:
    data = bytearray(encode(np.zeros(1_600)))
    data[20:22] = struct.pack("<H", tag)  # the fmt chunk's format tag
    return bytes(data)


def long_header_wav(seconds: int) -> bytes:
    """A real 8-bit 1 kHz WAV of `seconds` (7.2 MB for two hours): cheap to write, refused from its header."""
    return encode(np.zeros(seconds * 1_000, dtype=np.float32), 1_000, subtype="PCM_U8")


BAD = {
    "empty bytes": (b"", "empty"),
    "missing file": ("/no/such/clip.wav", "not found"),
    "zero samples": (encode(np.zeros(0, dtype=np.float32)), "no samples"),
    "not audio": (b"hello world" * 20, "not a readable audio file.*Format not recognised"),
    "truncated header": (encode(np.zeros(100))[:30], "not a readable audio file"),
    "unknown codec": (wav_with_codec_tag(0x7777), "codec is unknown or not supported"),
    "nan samples": ((np.array([0.1, np.nan] * 1_000, dtype=np.float32), 16_000), "NaN or infinite"),
    "inf samples": ((np.array([0.1, np.inf] * 1_000), 16_000), "NaN or infinite"),
    "ten channels": ((np.zeros((1_600, 10), dtype=np.float32), 16_000), "10 channels; at most 8"),
    "ten-channel file": (encode(np.zeros((1_600, 10), dtype=np.float32), subtype="FLOAT"), "10 channels"),
    "over two hours": ((np.zeros(7_201_000, dtype=np.uint8), 1_000), r"7,201\.0 s long.*7,200 s"),
    "array without rate": (np.zeros(1_600, dtype=np.float32), "needs its sample rate"),
    "zero rate": ((np.zeros(1_600, dtype=np.float32), 0), "sample rate must be a whole number"),
    "fractional rate": ((np.zeros(1_600, dtype=np.float32), 44_100.5), "sample rate must be a whole number"),
    "rate as text": ({"array": np.zeros(1_600), "sampling_rate": "fast"}, "sample rate must be a whole number"),
    "int pcm as float": ((np.full(1_600, 1_000.0), 16_000), r"must lie in \[-1, 1\].*32768"),
    "complex samples": ((np.zeros(1_600, dtype=np.complex64), 16_000), "int8/16/32, uint8 or float"),
    "3-d array": ((np.zeros((2, 2, 400)), 16_000), "1-D, or 2-D"),
    "a list": ([0.0] * 1_600, "unsupported audio input of type list"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_clear_error(name):
    source, message = BAD[name]
    with pytest.raises(MediaError, match=message):
        load_audio(source)


def test_a_long_file_is_refused_from_its_header():
    from unittest import mock

    data = long_header_wav(61)
    with mock.patch.object(sf.SoundFile, "blocks", side_effect=AssertionError("decoded")), \
            pytest.raises(MediaError, match=r"61\.0 s long, over the limit of 60 s; cut it into parts"):
        load_audio(data, max_seconds=60)


def test_two_hours_in_one_chat_part_is_refused_from_the_header(backend):
    with pytest.raises(MediaError, match=r"7,200\.0 s long.*at most 30 s.*gemma4 transcribe"):
        process_prompt("<|audio|>", family="gemma4", audios=[long_header_wav(7_200)], tokenizer=our_tokenizer(backend))


def test_thirty_one_seconds_in_chat_points_to_transcribe(backend):
    with pytest.raises(MediaError, match=r"31\.0 s long.*gemma4 transcribe"):
        process_prompt("<|audio|>", family="gemma4", audios=[(np.zeros(31 * 8_000, np.int16), 8_000)],
                       tokenizer=our_tokenizer(backend))


@pytest.mark.parametrize("case,kwargs,message", [
    ("too short", dict(audios=[(np.zeros(100, np.float32), 16_000)]), "too short"),
    ("more clips than placeholders", dict(audios=[(np.zeros(1_600, np.float32), 16_000)] * 2),
     r"1 <\|audio\|> placeholder\(s\) but 2 audio clip\(s\)"),
    ("gemma 3", dict(audios=[(np.zeros(1_600, np.float32), 16_000)], family="gemma3"), "Gemma 3 .* not take audio"),
])
def test_bad_prompt_audio(backend, case, kwargs, message):
    kwargs = {"family": "gemma4", **kwargs}
    with pytest.raises(MediaError, match=message):
        process_prompt("<|audio|>", tokenizer=our_tokenizer(backend), **kwargs)


@pytest.mark.parametrize("part,message", [
    ({"data": base64.b64encode(b"x").decode(), "format": "flac"}, r"format must be one of \('wav', 'mp3'\)"),
    ({"data": "not base64!", "format": "wav"}, "not valid base64"),
    ({"format": "wav"}, "needs"),
    ("just a string", "needs"),
    ({"data": "", "format": "mp3"}, "empty"),
])
def test_bad_input_audio_parts(part, message):
    with pytest.raises(MediaError, match=message):
        media_parts([{"role": "user", "content": [{"type": "input_audio", "input_audio": part}]}])
