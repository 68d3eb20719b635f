"""Audio features equal transformers' Gemma 4 extractors on real speech at odd lengths and input rates.

The speech is tests/data/audio/speech_16k.wav (espeak-ng; see tests/data/README.md). Inputs at 8, 22.05,
44.1 and 48 kHz are made from it with soxr; both sides get the 16 kHz samples `load_audio` produced.

Bounds, measured on this clip: our log-mel equals the reference's own arithmetic run in float64 to 0.0
after the float32 cast (asserted within 1e-6). Against the reference as shipped, whose numpy FFT runs in
float32, the largest difference is 8e-5 to 1.1e-4 for 16-48 kHz inputs and 2.4e-4 for the 8 kHz one,
at near-silent bins (above 4 kHz for the 8 kHz input), where the FFT's float32 rounding (~1e-7 of a
frame's energy) is amplified up to 1000x by log(mel + 0.001); the 99.9th percentile is 2.5e-5 to 7.4e-5.
The reference run in float64 differs from itself run in float32 by the same amounts, so 1e-5 against
the shipped float32 output is not reachable by any float64 or differently-ordered float32 FFT; that
bound is asserted as 5e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from media_helpers import speech_clip

sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

from gemma4.media import MediaError, audio_token_count, gemma4_audio_inputs, load_audio  # noqa: E402

SHIPPED_BOUND, FLOAT64_BOUND = 5e-4, 1e-6


@pytest.fixture(scope="module")
def extractor():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


def reference_float64(extractor, clips):
    """The reference's own framing, window, filters and mask, run on float64 samples (its private step)."""
    length = -(-max(len(c) for c in clips) // 128) * 128
    features, masks = [], []
    for clip in clips:
        wave = np.zeros(length)
        wave[: len(clip)] = clip.numpy()
        mask = (np.arange(length) < len(clip)).astype(np.int32)
        mel, valid = extractor._extract_spectrogram(wave[None], mask)
        features.append(torch.from_numpy(mel * valid[:, None]).float())
        masks.append(torch.from_numpy(valid))
    return torch.stack(features), torch.stack(masks)


def check(extractor, clips):
    ours = gemma4_audio_inputs(clips)
    ref = extractor([c.numpy() for c in clips], return_tensors="pt")
    assert ours["input_features"].dtype == torch.float32 and ours["input_features_mask"].dtype == torch.bool
    assert ours["input_features"].shape == ref["input_features"].shape
    assert torch.equal(ours["input_features_mask"], ref["input_features_mask"])
    assert (ours["input_features"] - ref["input_features"]).abs().max() <= SHIPPED_BOUND
    features64, mask64 = reference_float64(extractor, clips)
    assert torch.equal(ours["input_features_mask"], mask64)
    assert (ours["input_features"] - features64).abs().max() <= FLOAT64_BOUND
    return ours


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_features_equal_reference_at_input_rates(extractor, rate):
    speech = speech_clip()
    at_rate = soxr.resample(speech.numpy(), 16_000, rate) if rate != 16_000 else speech.numpy()
    clip = load_audio((at_rate, rate))
    assert abs(len(clip) - len(speech)) <= 2
    check(extractor, [clip])


@pytest.mark.parametrize("samples", [1_601, 1_777, 16_000, 33_333, 79_999])
def test_features_equal_reference_at_odd_lengths(extractor, samples):
    ours = check(extractor, [speech_clip()[:samples]])
    assert ours["num_soft_tokens_per_audio"] == [audio_token_count(samples)]


def test_a_batch_of_clips_pads_to_the_longest_as_the_reference_does(extractor):
    speech = speech_clip()
    ours = check(extractor, [speech[:4_321], speech[1_000:60_000], speech[:16_001]])
    assert ours["num_soft_tokens_per_audio"] == [audio_token_count(n) for n in (4_321, 59_000, 16_001)]


def test_thirty_seconds_is_750_tokens_and_equals_reference(extractor):
    speech = speech_clip()
    clip = speech.repeat(-(-480_000 // len(speech)))[:480_000]
    ours = check(extractor, [clip])
    assert ours["num_soft_tokens_per_audio"] == [750] and ours["input_features"].shape == (1, 2999, 128)


def test_token_count_matches_the_reference_processor_rule():
    from media_helpers import reference_gemma4_processor, tiny_backend

    processor = reference_gemma4_processor(tiny_backend())
    for samples in (161, 300, 321, 481, 1_600, 1_601, 12_345, 160_000, 479_999, 480_000):
        assert audio_token_count(samples) == processor._compute_audio_num_tokens(np.zeros(samples), 16_000)
    assert audio_token_count(160) == 0


def test_unified_frames_equal_reference():
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    speech = speech_clip()
    clips = [speech[:1_000], speech[:16_000], speech[:641]]
    ours = gemma4_audio_inputs(clips, unified=True)
    ref = Gemma4UnifiedAudioFeatureExtractor()([c.numpy() for c in clips], return_tensors="pt")
    assert torch.equal(ours["input_features"], ref["input_features"])
    assert torch.equal(ours["input_features_mask"], ref["input_features_mask"])
    assert ours["num_soft_tokens_per_audio"] == [2, 25, 2]
    assert ours["num_soft_tokens_per_audio"] == [audio_token_count(len(c), unified=True) for c in clips]


@pytest.mark.parametrize("unified", [False, True])
def test_over_thirty_seconds_points_to_transcribe(unified):
    with pytest.raises(MediaError, match=r"30\.1 s long.*at most 30 s.*gemma4 transcribe"):
        gemma4_audio_inputs([torch.zeros(481_600)], unified=unified)


def test_too_short_for_one_token():
    with pytest.raises(MediaError, match="too short"):
        gemma4_audio_inputs([torch.zeros(160)])
