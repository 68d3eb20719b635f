"""Soft tokens in the engine's prefill (gemma4/engine/media.py): placed where their placeholders
are, never split across chunks, keyed by content in the prefix cache, encoded once per content.

The encoder here is a fixed random tensor per key, so the checks are of the engine's bookkeeping:
prefill with spans against one full forward over the same merged embeddings, in float64.
"""

import pytest
import torch
from testing_utils import random_model

from gemma4.engine.core import Engine
from gemma4.engine.media import MediaInput, cut, keyed_tokens
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.sequence import GenerationRequest, Sequence

GREEDY = SamplingParams(temperature=0)
PLACEHOLDER = 7
pytestmark = pytest.mark.usefixtures("one_thread")


def _soft(key: str, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, key)))
    return torch.randn(n, d, generator=g, dtype=torch.float64)


class _Encoder:
    """Soft tokens per key, counting the calls (an image sent twice is encoded once)."""

    def __init__(self, d):
        self.d, self.calls = d, []

    def span(self, start, n, key, block=True):
        """An image-like span (block: kept whole in a chunk; text-only models ignore the groups), or
        with block=False an audio-like causal one."""
        def encode():
            self.calls.append(key)
            return _soft(key, n, self.d)
        return MediaInput(start, n, key, encode, block=block)


def _prompt(vocab, n, seed, spans):
    ids = torch.randint(8, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    for s in spans:
        ids[s.start : s.end] = [PLACEHOLDER] * s.length
    return ids


def _reference(model, ids, spans):
    """Logits [T, V] of one full forward over the merged embeddings (placeholders looked up as id 0),
    each block span one bidirectional group where the model has them."""
    ids0 = torch.tensor(ids)
    for s in spans:
        ids0[s.start : s.end] = 0
    embeds = model.model.embed(ids0[None])
    groups = torch.full((1, len(ids)), -1, dtype=torch.long)
    for g, s in enumerate(spans):
        embeds[0, s.start : s.end] = _soft(s.key, s.length, embeds.shape[-1])
        if s.block:
            groups[0, s.start : s.end] = g
    with torch.no_grad():
        return model(ids0[None], inputs_embeds=embeds, groups=groups)[0]


def _prefill(engine, ids, spans, budget=None):
    """Prefill one request; the logits its first token was chosen from, and the chunk lengths."""
    seq = engine.new_sequence(GenerationRequest(ids, 4, GREEDY, media=tuple(spans)))
    seen, chunks = [], []
    choose = seq.choose
    seq.choose = lambda raw: (seen.append(raw.clone()), choose(raw))[1]
    forward = engine._forward
    engine._forward = lambda lo, hi, i, *a, **k: (chunks.append(i.shape[1]), forward(lo, hi, i, *a, **k))[1]
    engine.add(seq)
    while seq.prefilling:
        engine.prefill(budget)
    engine._forward = forward
    engine.release(seq)
    return seen[0], chunks, seq.cached


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-gemma-3-270m"])
def test_soft_tokens_in_chunked_prefill_equal_one_full_forward(name):
    """Two spans, one longer than a chunk (6 > 4): chunks stop before a span or take it whole, and
    the logits equal one forward over the whole merged prompt (E2B: PLE from id 0 and merged embeds)."""
    model = random_model(name).double()
    enc = _Encoder(model.config.hidden_size)
    spans = [enc.span(3, 6, "a"), enc.span(11, 2, "b")]
    ids = _prompt(model.config.vocab_size, 16, 1, spans)
    engine = Engine(model, max_len=32, prefill_chunk=4)
    logits, chunks, _ = _prefill(engine, ids, spans)
    assert chunks == [3, 6, 4, 3]  # [0,3) text, [3,9) the whole first span, [9,13) holds the second
    torch.testing.assert_close(logits, _reference(model, ids, spans)[-1], rtol=0, atol=1e-10)


def test_a_budget_smaller_than_a_span_takes_the_span_whole():
    model = random_model("tiny-gemma-3-270m").double()
    enc = _Encoder(model.config.hidden_size)
    spans = [enc.span(0, 5, "a")]
    ids = _prompt(model.config.vocab_size, 8, 2, spans)
    logits, chunks, _ = _prefill(Engine(model, max_len=16, prefill_chunk=4), ids, spans, budget=2)
    assert chunks == [5, 2, 1]
    torch.testing.assert_close(logits, _reference(model, ids, spans)[-1], rtol=0, atol=1e-10)


def test_prefix_cache_keys_media_by_content_and_never_resumes_inside_a_span():
    model = random_model("tiny-e4b").double()
    enc = _Encoder(model.config.hidden_size)
    V = model.config.vocab_size
    engine = Engine(model, rows=2, max_len=64, prefill_chunk=8, prefix_cache=256)
    spans = [enc.span(10, 12, "cat")]
    ids = _prompt(V, 40, 3, spans)
    _prefill(engine, ids, spans)
    # The same text and image: the blocks through the image are reused, and the image is not re-encoded.
    logits, _, cached = _prefill(engine, ids, spans)
    assert cached == 32 and enc.calls == ["cat"]
    torch.testing.assert_close(logits, _reference(model, ids, spans)[-1], rtol=0, atol=1e-10)
    # The same placeholder ids with another image: nothing is reused (block [0, 16) holds image positions).
    other = [enc.span(10, 12, "dog")]
    logits, _, cached = _prefill(engine, ids, other)
    assert cached == 0 and enc.calls == ["cat", "dog"]
    torch.testing.assert_close(logits, _reference(model, ids, other)[-1], rtol=0, atol=1e-10)
    # A prompt whose only reusable block ends inside the image ([10, 22) at 16) starts from 0.
    short = ids[:23]
    logits, _, cached = _prefill(engine, short, spans)
    assert cached == 0
    torch.testing.assert_close(logits, _reference(model, short, spans)[-1], rtol=0, atol=1e-10)


def test_span_helpers():
    s = MediaInput(4, 6, "k", lambda: None)
    assert cut([s], 0, 8) == 4 and cut([s], 4, 6) == 10 and cut([s], 0, 3) == 3 and cut([s], 0, 10) == 10
    keyed = keyed_tokens([1] * 12, [s])
    assert keyed[:4] == [1] * 4 and keyed[10:] == [1, 1] and all(t < 0 for t in keyed[4:10])
    assert keyed_tokens([1] * 12, [MediaInput(4, 6, "other", lambda: None)])[4:10] != keyed[4:10]
    with pytest.raises(ValueError, match="overlaps"):
        Sequence(GenerationRequest([1] * 12, 2, media=(s, MediaInput(8, 2, "x", lambda: None))), 100, 64)


def test_a_causal_span_is_chunked_like_text_and_resumed_inside():
    """An audio-like span (block=False) longer than a chunk is cut into chunks as text is, encoded
    once, and a later prompt resumes from the prefix cache inside it (block [0, 16) ends within the
    clip [3, 20)); logits equal one full forward. An image-like span there would not be resumed."""
    model = random_model("tiny-e2b").double()
    enc = _Encoder(model.config.hidden_size)
    spans = [enc.span(3, 17, "clip", block=False)]
    ids = _prompt(model.config.vocab_size, 24, 4, spans)
    engine = Engine(model, max_len=48, prefill_chunk=4, prefix_cache=256)
    logits, chunks, _ = _prefill(engine, ids, spans)
    assert chunks == [4] * 6 and enc.calls == ["clip"]
    torch.testing.assert_close(logits, _reference(model, ids, spans)[-1], rtol=0, atol=1e-10)
    longer = ids + [9, 10, 11]
    logits, _, cached = _prefill(engine, longer, spans)
    assert cached == 16 and enc.calls == ["clip"]
    torch.testing.assert_close(logits, _reference(model, longer, spans)[-1], rtol=0, atol=1e-10)
    assert cut(spans, 0, 8) == 8 and cut([MediaInput(3, 17, "x", lambda: None)], 0, 8) == 3


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    """Our tiny multimodal models (31B-like: image blocks on sliding layers; Gemma 3: on all), loaded
    from transformers' save_pretrained output, in float64."""
    from vision_refs import hf_multimodal

    from gemma4.weights import load_model

    out = {}
    for layout in ("31b", "gemma3"):
        path = tmp_path_factory.mktemp(layout)
        hf_multimodal(layout).save_pretrained(path)
        out[layout] = load_model(path, dtype=torch.float32).double()
    return out


@pytest.mark.parametrize("layout", ["31b", "gemma3"])
def test_images_in_the_engine_equal_one_full_forward(vision_models, layout):
    """Two images with bidirectional blocks, prefilled in chunks of 4 (each image whole in one
    forward): the engine's logits equal one forward over the model's own merge; the same prompt
    again reuses its cached prefix and encodes no image."""
    from vision_refs import IMAGE, images, prompt

    from gemma4.engine.media import MediaInput

    model = vision_models[layout]
    media = images(layout)
    ids = prompt(media["counts"], tail=8)[0].tolist()  # a block boundary (16) outside both images
    calls = []

    def encoder(i):
        def encode():
            calls.append(i)
            pos = media.get("image_position_ids")
            return model.embed_media(media["pixel_values"][i].double(), None if pos is None else pos[i])
        return encode

    starts = [t for t in range(len(ids)) if ids[t] == IMAGE and (t == 0 or ids[t - 1] != IMAGE)]
    spans = [MediaInput(s, n, f"image-{i}", encoder(i)) for i, (s, n) in enumerate(zip(starts, media["counts"]))]
    with torch.no_grad():
        soft = [model.embed_media(media["pixel_values"][i].double(),
                                  None if "image_position_ids" not in media else media["image_position_ids"][i])
                for i in range(2)]
        want = model(**model.media_inputs(torch.tensor([ids]), soft))[0, -1]
    engine = Engine(model, max_len=64, prefill_chunk=4, prefix_cache=256)
    logits, chunks, _ = _prefill(engine, ids, spans)
    assert all(c <= 4 or c in media["counts"] for c in chunks) and max(media["counts"]) in chunks
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-10)
    again, _, cached = _prefill(engine, ids, spans)
    torch.testing.assert_close(again, want, rtol=0, atol=1e-10)
    assert cached > 0 and calls == [0, 1]
