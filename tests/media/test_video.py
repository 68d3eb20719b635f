"""Video: PyAV decoding and sampling equal to transformers' `read_video_pyav` + the released sampling
(32 frames, uniform), per-frame pixels as the reference video processor, and the prompt's timestamps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from media_helpers import (
    reference_functions, reference_gemma4_processor, tiny_backend, torchvision_available, write_clip,
)

av = pytest.importorskip("av", reason="PyAV is the optional `video` extra; install it with pip install 'gemma4[video]'")

from gemma4.media import expand_prompt, gemma4_video_inputs, load_video, process_prompt  # noqa: E402
from gemma4.media.video import sample_frame_indices  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4", frames=40, fps=10)


def reference_read(path, num_frames=32):
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    return read_video_pyav(str(path), lambda metadata: default_sample_indices_fn(metadata, num_frames=num_frames))


def test_frames_and_timestamps_equal_reference(clip):
    frames, metadata = reference_read(clip)
    video = load_video(clip)
    assert video.indices == list(metadata.frames_indices) == [i * 40 // 32 for i in range(32)]
    assert video.fps == metadata.fps == 10
    assert video.timestamps == list(metadata.timestamps)
    assert torch.equal(video.frames, torch.from_numpy(frames).permute(0, 3, 1, 2))


def test_video_pixels_equal_reference_helpers(clip):
    ref = reference_functions("models/gemma4/video_processing_gemma4.py",
                              {"convert_video_to_patches", "pad_to_max_patches"})
    video = load_video(clip)
    out = gemma4_video_inputs([video])
    assert out["num_frames_per_video"] == [32] and out["num_soft_tokens_per_video"] == [63]  # 64x48 -> 432x336: 9 x 7 soft tokens
    assert out["pixel_values_videos"].shape == (32, 630, 768)
    from gemma4.media.gemma4_image import resized

    x = resized(video.frames, 70).float() / 255
    rows, cols = x.shape[-2] // 16, x.shape[-1] // 16
    grid = torch.stack(torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy"), -1).reshape(-1, 2)
    values, positions = ref["pad_to_max_patches"](ref["convert_video_to_patches"](x, 16),
                                                  grid[None].repeat(32, 1, 1), 630)
    assert torch.equal(out["pixel_values_videos"], values)
    assert torch.equal(out["video_position_ids"], positions)


def test_unified_video_equals_reference_patch_merge(clip):
    """The 12B's video input: the reference's unified video processor merges 3x3 groups of 16-px patches."""
    ref = reference_functions("models/gemma4_unified/video_processing_gemma4_unified.py",
                              {"convert_video_to_patches", "patches_merge", "pad_to_max_patches"})
    video = load_video(clip)
    out = gemma4_video_inputs([video], unified=True)
    from gemma4.media.gemma4_image import resized

    x = resized(video.frames, 70).float() / 255
    rows, cols = x.shape[-2] // 16, x.shape[-1] // 16
    grid = torch.stack(torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy"), -1).reshape(-1, 2)
    merged, positions = ref["patches_merge"](ref["convert_video_to_patches"](x, 16), grid[None].repeat(32, 1, 1), 63)
    values, positions = ref["pad_to_max_patches"](merged, positions, 70)
    assert out["num_soft_tokens_per_video"] == [63] and out["pixel_values_videos"].shape == (32, 70, 6912)
    assert torch.equal(out["pixel_values_videos"], values)
    assert torch.equal(out["video_position_ids"], positions)


def test_video_prompt_equals_reference(clip):
    _, metadata = reference_read(clip)
    processor = reference_gemma4_processor(tiny_backend())
    expected = processor.replace_video_token({"num_soft_tokens_per_video": [63], "video_metadata": [metadata]}, 0)
    ours = expand_prompt("<|video|>", "gemma4", video_tokens=[63], timestamps=[list(metadata.timestamps)])
    assert ours.text == expected


def test_process_prompt_with_a_video_gives_one_span_per_frame(clip):
    from media_helpers import our_tokenizer

    out = process_prompt("<|turn>user\n<|video|> what?<turn|>\n", family="gemma4", videos=[clip],
                         tokenizer=our_tokenizer(tiny_backend()))
    assert len(out.spans) == 32 and {s.length for s in out.spans} == {63}
    assert [s.part for s in out.spans] == list(range(32)) and {s.kind for s in out.spans} == {"video"}
    assert out.mm_token_type_ids.count(2) == 32 * 63


def test_short_clip_keeps_every_frame(tmp_path):
    video = load_video(write_clip(tmp_path / "short.mp4", frames=5, fps=5))
    assert video.indices == [0, 1, 2, 3, 4] and video.frames.shape[0] == 5


def test_fps_sampling_option():
    assert sample_frame_indices(300, 30.0, fps=1.0) == list(range(0, 300, 30))
    assert len(sample_frame_indices(30 * 120, 30.0, fps=1.0, max_frames=60)) == 60
    assert sample_frame_indices(3, 30.0, fps=1.0) == [0]


@pytest.mark.skipif(not torchvision_available(), reason="torchvision not installed (optional)")
def test_video_bit_exact_with_torchvision_reference(clip):
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    frames, metadata = reference_read(clip)
    ref = Gemma4VideoProcessor(max_soft_tokens=70, num_frames=32)(
        [frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    out = gemma4_video_inputs([load_video(clip)])
    assert torch.equal(out["pixel_values_videos"], ref["pixel_values_videos"])
    assert torch.equal(out["video_position_ids"], ref["video_position_ids"])
    assert out["num_soft_tokens_per_video"] == ref["num_soft_tokens_per_video"].tolist()
    assert np.array_equal(out["num_frames_per_video"], ref["num_frames_per_video"])


@pytest.mark.skipif(not torchvision_available(), reason="torchvision not installed (optional)")
def test_unified_video_bit_exact_with_torchvision_reference(clip):
    from transformers.models.gemma4_unified.video_processing_gemma4_unified import Gemma4UnifiedVideoProcessor

    frames, metadata = reference_read(clip)
    ref = Gemma4UnifiedVideoProcessor(max_soft_tokens=70, num_frames=32)(
        [frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    out = gemma4_video_inputs([load_video(clip)], unified=True)
    assert torch.equal(out["pixel_values_videos"], ref["pixel_values_videos"])
    assert torch.equal(out["video_position_ids"], ref["video_position_ids"])
    assert out["num_soft_tokens_per_video"] == ref["num_soft_tokens_per_video"].tolist()


def test_container_without_frame_count_is_counted(tmp_path):
    """Matroska stores no frame count (PyAV reports 0): the frames are counted by decoding."""
    video = load_video(write_clip(tmp_path / "clip.mkv", frames=40, fps=10))
    assert video.indices == [i * 40 // 32 for i in range(32)] and video.fps == 10
