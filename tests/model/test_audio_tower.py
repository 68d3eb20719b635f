"""Audio through the production loader against transformers 5.23 in float32 (tiny random layouts of
tests/vision_refs.py): the E2B-like conformer tower and the 12B's frame projection, their soft-token
counts against the reference processor's, whole-model logits with audio (and with audio plus an
image), and cached decode after an audio prefill."""

from types import SimpleNamespace

import pytest
import torch
from vision_refs import IMAGE, hf_multimodal, images, loaded_layouts

from gemma4.engine.cache import KVCache
from gemma4.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a busy machine

AUDIO, BOA, EOA = 123, 122, 121  # the tiny variants' audio ids (gemma4.variants._TINY_IDS)
LAYOUTS = ("e2b", "12b")  # the conformer tower; the 12B's raw frames
WIDTH = {"e2b": 128, "12b": 640}  # mel bins; samples per 40 ms frame


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return loaded_layouts(tmp_path_factory, LAYOUTS)


def clips(layout: str, lengths: list[int], seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Processor-shaped input_features [N, T, width] and input_features_mask [N, T] (a valid prefix of
    each length). The padding frames hold noise too: only the mask may keep them out."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    x = torch.randn(len(lengths), T, WIDTH[layout], generator=g) * (2.0 if layout == "e2b" else 0.1)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def processor_count(layout: str, mask: torch.Tensor, i: int) -> int:
    """Placeholders the reference processor writes for clip i (its own `replace_audio_token`)."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    cls = Gemma4Processor if layout == "e2b" else Gemma4UnifiedProcessor
    tokens = SimpleNamespace(boa_token="", eoa_token="", audio_token="a")
    return len(cls.replace_audio_token(tokens, {"input_features_mask": mask}, i))


def reference_soft(ref, x, mask) -> torch.Tensor:
    out = ref.model.get_audio_features(x, mask)
    return out.pooler_output[out.attention_mask]


def audio_prompt(counts: list[int], seed: int = 2, image: int = 0) -> torch.Tensor:
    """[1, T]: text, per clip BOA + placeholders + EOA and text; then an image block of `image` tokens."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(1, 120, (3,), generator=g)]
    for n in counts:
        parts += [torch.tensor([BOA] + [AUDIO] * n + [EOA]), torch.randint(1, 120, (4,), generator=g)]
    if image:
        parts += [torch.tensor([125] + [IMAGE] * image + [124]), torch.randint(1, 120, (3,), generator=g)]
    return torch.cat(parts)[None]


# Odd lengths: 1 frame, a few, past one attention chunk (12 tokens = 48 frames), several chunks.
LENGTHS = {"e2b": [157, 61, 9, 1], "12b": [23, 5, 1]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_soft_tokens_match_reference(checkpoints, layout):
    """Padded clips in one batch: the valid soft tokens within 1e-4 of the reference's (measured ~1e-6),
    as many as the reference processor's placeholders; each clip alone gives its own tokens."""
    ref, ours = checkpoints[layout]
    x, mask = clips(layout, LENGTHS[layout])
    with torch.no_grad():
        expected = reference_soft(ref, x, mask)
        got = ours.embed_audio(x, mask)
        alone = [ours.embed_audio(x[i, :n], mask[i, :n]) for i, n in enumerate(LENGTHS[layout])]
    counts = [processor_count(layout, mask, i) for i in range(len(LENGTHS[layout]))]
    assert [a.shape[0] for a in alone] == counts and got.shape == (sum(counts), ours.config.hidden_size)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4
    torch.testing.assert_close(torch.cat(alone), got, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_processor_outputs_plug_in(checkpoints, layout):
    """The reference feature extractor's own outputs (two waveforms of odd lengths, padded together)
    go straight in: the processor's counts, the reference's soft tokens."""
    import numpy as np
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    ref, ours = checkpoints[layout]
    rng = np.random.default_rng(3)
    waves = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (5923, 17011)]
    extractor = Gemma4AudioFeatureExtractor() if layout == "e2b" else Gemma4UnifiedAudioFeatureExtractor()
    inputs = extractor(waves, sampling_rate=16000, return_tensors="pt")
    x, mask = inputs["input_features"], inputs["input_features_mask"]
    with torch.no_grad():
        expected = reference_soft(ref, x, mask)
        got = [ours.embed_audio(x[i], mask[i]) for i in range(2)]
    assert [g.shape[0] for g in got] == [processor_count(layout, mask, i) for i in range(2)]
    assert (torch.cat(got) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_our_processor_outputs_plug_in(checkpoints, layout):
    """gemma4.media's inputs go straight in, each clip from its own padded row, with exactly the
    soft-token count its prompt expansion wrote."""
    from gemma4.media import gemma4_audio_inputs

    _, ours = checkpoints[layout]
    g = torch.Generator().manual_seed(4)
    waves = [torch.randn(n, generator=g) * 0.1 for n in (161, 5923, 17011)]  # 161: the shortest clip
    inputs = gemma4_audio_inputs(waves, unified=layout == "12b")
    with torch.no_grad():
        counts = [ours.embed_audio(inputs["input_features"][i], inputs["input_features_mask"][i]).shape[0]
                  for i in range(len(waves))]
    assert counts == [int(n) for n in inputs["num_soft_tokens_per_audio"]]


def test_the_mask_matters(checkpoints):
    """Ignoring the mask lets the padding noise into a clip's last token (the subsampling conv reads
    one frame ahead); a hole in the mask zeroes that frame. Both break parity."""
    ref, ours = checkpoints["e2b"]
    x, mask = clips("e2b", [157, 61])
    n0 = processor_count("e2b", mask, 0)
    with torch.no_grad():
        expected = reference_soft(ref, x, mask)
        no_mask = ours.embed_audio(x)
        holed = mask.clone()
        holed[1, 59] = False  # an odd frame: no frame kept by the subsampling, so the count stays
        with_hole = ours.embed_audio(x, holed)
    second = expected[n0:]
    assert (no_mask[n0 : n0 + len(second)] - second).abs().max().item() > 1e-2
    assert with_hole.shape == expected.shape
    assert (with_hole[-1] - expected[-1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_with_audio_match_reference(checkpoints, layout):
    """Two clips in one prompt, input_features given to the reference: logits within 1e-4."""
    ref, ours = checkpoints[layout]
    lengths = LENGTHS[layout][:2]
    x, mask = clips(layout, lengths)
    counts = [processor_count(layout, mask, i) for i in range(2)]
    ids = audio_prompt(counts)
    with torch.no_grad():
        expected = ref(input_ids=ids, input_features=x, input_features_mask=mask).logits
        soft = [ours.embed_audio(x[i, :n], mask[i, :n]) for i, n in enumerate(lengths)]
        got = ours(**ours.media_inputs(ids, soft))
        swapped = ours(**ours.media_inputs(ids, soft[::-1]))  # same total, wrong order
        inputs = ours.media_inputs(ids, soft)
    assert "groups" not in inputs  # audio is causal: no bidirectional block
    assert (got - expected).abs().max().item() <= 1e-4
    assert (swapped - expected).abs().max().item() > 1e-2  # order matters, so this test can fail


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_with_audio_and_an_image_match_reference(checkpoints, layout):
    """Audio first, then an image: soft tokens in prompt order; the 12B's image block stays
    bidirectional, the audio causal."""
    ref, ours = checkpoints[layout]
    x, mask = clips(layout, LENGTHS[layout][1:2])
    count = processor_count(layout, mask, 0)
    media = {k: v[:1] for k, v in images(layout).items()}
    ids = audio_prompt([count], image=media["counts"][0])
    with torch.no_grad():
        expected = ref(input_ids=ids, input_features=x, input_features_mask=mask,
                       pixel_values=media["pixel_values"], image_position_ids=media["image_position_ids"],
                       mm_token_type_ids=(ids == IMAGE).long() + 3 * (ids == AUDIO).long()).logits
        soft = [ours.embed_audio(x, mask), ours.embed_media(media["pixel_values"], media["image_position_ids"])]
        inputs = ours.media_inputs(ids, soft)
        got = ours(**inputs)
    assert inputs["groups"].max() == 0 and (inputs["groups"] >= 0).sum() == media["counts"][0]
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_decode_after_audio_prefill_equals_full_forward(checkpoints, layout):
    """Prefill in chunks (one splits the clip: audio is causal, so any cut is fine), then decode token
    by token: equal to one full forward. float64, as tests/engine/test_cache.py."""
    _, ours = checkpoints[layout]
    model = ours.double()
    try:
        x, mask = clips(layout, LENGTHS[layout][1:2])
        with torch.no_grad():
            soft = model.embed_audio(x.double(), mask)
            ids = torch.cat([audio_prompt([soft.shape[0]]), torch.randint(1, 120, (1, 4))], 1)
            T = ids.shape[1]
            inputs = model.media_inputs(ids, [soft])
            full = model(**inputs)
            cache = KVCache(model.config, rows=1, max_len=T, dtype=torch.float64, headroom=1)
            middle = 3 + 1 + soft.shape[0] // 2  # text, BOA, half the clip
            pieces = []
            for a, b in [(0, 2), (2, middle), (middle, T - 4), *((t, t + 1) for t in range(T - 4, T))]:
                pieces.append(model(**{k: v[:, a:b] for k, v in inputs.items()}, cache=cache))
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)
    finally:
        ours.float()


def test_counts_must_match(checkpoints):
    _, ours = checkpoints["e2b"]
    x, mask = clips("e2b", [61])
    with torch.no_grad():
        soft = ours.embed_audio(x, mask)
    with pytest.raises(ValueError, match=f"holds {soft.shape[0] + 1} image/video/audio placeholder tokens"):
        ours.media_inputs(audio_prompt([soft.shape[0] + 1]), [soft])


def test_bad_audio_inputs_are_clear_errors(checkpoints):
    _, ours = checkpoints["e2b"]
    x, mask = clips("e2b", [20])
    with pytest.raises(ValueError, match=r"float \[N, frames, 128\] \(128 log-mel bins"):
        ours.embed_audio(torch.zeros(1, 20, 80), mask)
    with pytest.raises(ValueError, match=r"float \[N, frames, 128\]"):
        ours.embed_audio(torch.zeros(1, 0, 128))
    with pytest.raises(ValueError, match=r"float \[N, frames, 128\]"):
        ours.embed_audio(torch.zeros(1, 20, 128, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be bool \[N, frames\] = \[1, 20\]"):
        ours.embed_audio(x, mask[:, :10])
    with pytest.raises(ValueError, match="must be bool"):
        ours.embed_audio(x, mask.float())
    _, unified = checkpoints["12b"]
    with pytest.raises(ValueError, match=r"\[N, frames, 640\] \(640 raw samples"):
        unified.embed_audio(x, mask)


def test_a_model_without_audio_says_which_do(tmp_path):
    ref = hf_multimodal("31b")
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.audio_config is None
    with pytest.raises(ValueError, match="this model takes no audio: E2B, E4B and the 12B do"):
        model.embed_audio(torch.zeros(1, 10, 128))


def test_other_attention_geometry_matches_reference(tmp_path):
    """Chunks of 5 with 5 past and 2 future frames of context (released: 12, 12, 0) and a kernel-3
    light conv: the block context, the relative-position table and the window follow the config
    as the reference's do."""
    geometry = dict(attention_chunk_size=5, attention_context_left=6, attention_context_right=2, conv_kernel_size=3)
    ref = hf_multimodal("e2b", edit=lambda raw: raw["audio_config"].update(geometry))
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    x, mask = clips("e2b", [157, 61, 9])
    with torch.no_grad():
        expected = reference_soft(ref, x, mask)
        got = ours.embed_audio(x, mask)
        released = ours.audio_tower.layers[0].self_attn
        released.past, released.future = 12, 0  # the released window on this model: no longer the reference
        other = ours.embed_audio(x, mask)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (other - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_error_no_worse_than_reference(checkpoints, tmp_path, layout):
    """The accelerator dtype: fp32 features into bf16 weights run without dtype errors, and against
    the fp32 soft tokens ours in bf16 are at most 1.5x as far off as the reference's own bf16 ones
    plus one bf16 step (as the image towers' test)."""
    import copy

    ref, _ = checkpoints[layout]
    ref.save_pretrained(tmp_path)
    half = load_model(tmp_path, dtype=torch.bfloat16)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    x, mask = clips(layout, LENGTHS[layout][:2])
    with torch.no_grad():
        exact = reference_soft(ref, x, mask)
        ref_err = (reference_soft(ref16, x.bfloat16(), mask).float() - exact).abs().max().item()
        soft16 = half.embed_audio(x, mask)
        logits = half(**half.media_inputs(audio_prompt([processor_count(layout, mask, i) for i in range(2)]),
                                          [soft16]))
    assert soft16.dtype == torch.bfloat16 and logits.isfinite().all()
    our_err = (soft16.float() - exact).abs().max().item()
    assert our_err <= 1.5 * ref_err + exact.abs().max().item() * 2**-8, (our_err, ref_err)
