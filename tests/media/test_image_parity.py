"""Processor parity with transformers 5.23 on 20+ images of odd sizes and modes.

Pixel values are compared with the reference's Pillow image processor within 2/255: the reference's
default (torchvision) processor resizes with torch's uint8 kernel, which we reproduce, and that kernel
and Pillow's round differently by up to 2 levels. Positions, soft-token counts and shapes are exact.
When torchvision happens to be importable the torchvision processors are compared bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from media_helpers import (
    gemma3_released_kwargs, make_images, reference_functions, sixteen_bit_png, torchvision_available,
)

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from gemma4.media import gemma3_image_inputs, gemma4_image_inputs, load_image, target_size  # noqa: E402

IMAGES = make_images()
PIL_TOLERANCE = 2 / 255 + 1e-6
needs_torchvision = pytest.mark.skipif(not torchvision_available(), reason="torchvision not installed (optional)")


def reference_input(name: str, data: bytes):
    """What a transformers user hands the processor: the opened image; EXIF applied as `load_image` does."""
    from transformers.image_utils import load_image as hf_load_image

    image = Image.open(io.BytesIO(data))
    return hf_load_image(image) if name.startswith("exif") else image


@pytest.fixture(scope="module")
def gemma4_pil():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


def test_at_least_twenty_images():
    assert len(IMAGES) >= 20


# Every image at budgets 70 and 280 (the default); 1120 on a few, to keep the suite fast.
GEMMA4_CASES = [(n, b) for b in (70, 280) for n in sorted(IMAGES)]
GEMMA4_CASES += [(n, 1120) for n in ("rgb_47x300", "rgb_3000x17", "rgb_1x1")]


@pytest.mark.parametrize("name, budget", GEMMA4_CASES)
def test_gemma4_matches_reference(gemma4_pil, name, budget):
    ours = gemma4_image_inputs([load_image(IMAGES[name])], budget)
    ref = gemma4_pil(reference_input(name, IMAGES[name]), max_soft_tokens=budget, return_tensors="pt")
    assert ours["pixel_values"].shape == ref["pixel_values"].shape == (1, 9 * budget, 768)
    assert ours["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["image_position_ids"], ref["image_position_ids"])
    assert ours["num_soft_tokens_per_image"] == ref["num_soft_tokens_per_image"].tolist()
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= PIL_TOLERANCE


def test_gemma4_batch_of_mixed_images(gemma4_pil):
    names = ["rgb_47x300", "cmyk_80x60_tiff", "animated_gif_30x20"]
    ours = gemma4_image_inputs([load_image(IMAGES[n]) for n in names], 140)
    ref = gemma4_pil([reference_input(n, IMAGES[n]) for n in names], max_soft_tokens=140, return_tensors="pt")
    assert torch.equal(ours["image_position_ids"], ref["image_position_ids"])
    assert ours["num_soft_tokens_per_image"] == ref["num_soft_tokens_per_image"].tolist()
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= PIL_TOLERANCE


def test_sixteen_bit_keeps_the_picture(gemma4_pil):
    """Our one deliberate difference: 16-bit images are scaled to 8 bits, where the reference clips."""
    data, eight_bit = sixteen_bit_png()
    decoded = load_image(data)
    assert torch.equal(decoded, torch.from_numpy(eight_bit)[None].expand(3, -1, -1))
    ours = gemma4_image_inputs([decoded], 280)
    ref = gemma4_pil(Image.fromarray(eight_bit), return_tensors="pt")
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= PIL_TOLERANCE
    clipped = gemma4_pil(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    assert (clipped[0, :10] == 1).float().mean() > 0.9  # the reference's picture is nearly all white


def test_target_size_equals_reference_rule():
    ref = reference_functions("models/gemma4_unified/image_processing_gemma4_unified.py",
                              {"get_aspect_ratio_preserving_size"})["get_aspect_ratio_preserving_size"]
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 100000), (100000, 1), (17, 3000), (3000, 17), (48, 48), (768, 768), (767, 769)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for budget in (70, 140, 280, 560, 1120):
        for h, w in sizes:
            assert target_size(h, w, budget) == ref(h, w, 16, budget * 9, 3), (h, w, budget)


@pytest.mark.parametrize("budget", [70, 280])
@pytest.mark.parametrize("name", ["rgb_47x300", "rgb_3000x17", "rgba_64x50", "rgb_768x768_no_resize", "rgb_1x1"])
def test_unified_matches_reference_patch_merge(name, budget):
    """The 12B input: our 48-px patches equal the reference's merge of 3x3 groups of 16-px patches
    (its pure-torch helpers, run on our resized image)."""
    ref = reference_functions("models/gemma4_unified/image_processing_gemma4_unified.py",
                              {"convert_image_to_patches", "patches_merge", "pad_along_first_dim"})
    image = load_image(IMAGES[name])
    ours = gemma4_image_inputs([image], budget, unified=True)
    base = gemma4_image_inputs([image], budget)
    n = base["num_soft_tokens_per_image"][0]
    rows, cols = int(base["image_position_ids"][0, :9 * n, 1].max()) + 1, int(base["image_position_ids"][0, :9 * n, 0].max()) + 1
    x = base["pixel_values"][0, :9 * n].reshape(rows, cols, 16, 16, 3).permute(4, 0, 2, 1, 3).reshape(3, rows * 16, cols * 16)
    teacher = ref["convert_image_to_patches"](x, 16)
    grid = torch.stack(torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy"), -1).reshape(-1, 2)
    merged, positions = ref["patches_merge"](teacher[None], grid[None], n)
    merged, positions = ref["pad_along_first_dim"](merged[0], positions[0], budget)
    assert ours["num_soft_tokens_per_image"] == [n]
    assert ours["pixel_values"].shape == (1, budget, 6912)
    assert torch.equal(ours["pixel_values"][0], merged)
    assert torch.equal(ours["image_position_ids"][0], positions)


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("name", ["rgb_47x300", "rgb_3000x17", "rgba_64x50", "palette_transparent_70x70"])
def test_gemma3_matches_reference(name, pan_and_scan):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ref = Gemma3ImageProcessorPil(**gemma3_released_kwargs())(
        reference_input(name, IMAGES[name]), do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2, return_tensors="pt")
    ours = gemma3_image_inputs([load_image(IMAGES[name])], pan_and_scan=pan_and_scan)
    assert ours["num_crops"] == ref["num_crops"].tolist()
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 2 * PIL_TOLERANCE  # (x - 127.5) / 127.5


def test_gemma3_pan_and_scan_makes_crops():
    image = torch.zeros(3, 300, 1200, dtype=torch.uint8)
    out = gemma3_image_inputs([image], pan_and_scan=True)
    assert out["num_crops"] == [4] and out["pixel_values"].shape == (5, 3, 896, 896)
    assert gemma3_image_inputs([image])["num_crops"] == [0]


# -- bit-exact against the torchvision processors (skipped unless torchvision is importable) ---------
@needs_torchvision
@pytest.mark.parametrize("budget", [70, 280])
def test_gemma4_bit_exact_with_torchvision_reference(budget):
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor

    proc = Gemma4ImageProcessor()
    for name, data in IMAGES.items():
        ours = gemma4_image_inputs([load_image(data)], budget)
        ref = proc(reference_input(name, data), max_soft_tokens=budget, return_tensors="pt")
        assert torch.equal(ours["pixel_values"], ref["pixel_values"]), name
        assert torch.equal(ours["image_position_ids"], ref["image_position_ids"]), name


@needs_torchvision
def test_unified_bit_exact_with_torchvision_reference():
    from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor

    proc = Gemma4UnifiedImageProcessor()
    for name, data in IMAGES.items():
        ours = gemma4_image_inputs([load_image(data)], 280, unified=True)
        ref = proc(reference_input(name, data), return_tensors="pt")
        assert torch.equal(ours["pixel_values"], ref["pixel_values"]), name
        assert torch.equal(ours["image_position_ids"], ref["image_position_ids"]), name
        assert ours["num_soft_tokens_per_image"] == ref["num_soft_tokens_per_image"].tolist()


@needs_torchvision
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_gemma3_bit_exact_with_torchvision_reference(pan_and_scan):
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

    proc = Gemma3ImageProcessor(**gemma3_released_kwargs())
    for name, data in IMAGES.items():
        ours = gemma3_image_inputs([load_image(data)], pan_and_scan=pan_and_scan)
        ref = proc(reference_input(name, data), do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=256,
                   pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2, return_tensors="pt")
        assert ours["num_crops"] == ref["num_crops"].tolist(), name
        assert torch.equal(ours["pixel_values"], ref["pixel_values"]), name
