"""The fast path's C kernels (kernels/cpu_kernels.c) against the model's own ops: the one-call
RMSNorm (`engine.norm`) and attention (`engine.attend`); the kernel build: compiled into a fresh
cache, reused from it, and absent without a compiler."""

import pytest
import torch
from test_cache import ALL
from testing_utils import random_model

from gemma4.engine import kernels
from gemma4.engine.norm import FastRMSNorm, swap_norms
from gemma4.model.layers import RMSNorm

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler here")


def _norm(dim: int, offset: float, with_weight: bool = True, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(dim, eps=1e-6, offset=offset, with_weight=with_weight)
    if with_weight:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return norm


@needs_kernels
@pytest.mark.parametrize("offset,with_weight", [(1.0, True), (0.0, True), (0.0, False)])
@pytest.mark.parametrize("shape", [(1, 1, 640), (2, 5, 256), (3, 100), (1, 4, 1, 17)])
def test_fast_norm_equals_the_model_norm(offset, with_weight, shape):
    """Gemma 3's zero-centred weight, Gemma 4's, the weightless v-norm; widths with and without a
    16-lane tail; values spanning 1e-3 to 1e3 as Gemma's residual stream does."""
    norm = _norm(shape[-1], offset, with_weight)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen) * torch.exp(torch.randn(*shape, generator=gen) * 3)
    fast = FastRMSNorm(norm)
    want = norm(x)
    got = fast(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7 * want.abs().max().item())
    x_view = torch.randn(shape[-1], 2 * 3, generator=gen).T[::2]  # a non-contiguous input
    torch.testing.assert_close(fast(x_view), norm(x_view), rtol=2e-6, atol=1e-6)
    wrong = FastRMSNorm(_norm(shape[-1], offset + 0.01, with_weight, seed=0)) if with_weight else None
    if wrong is not None:  # the test can fail: a weight off by 1% is seen
        assert not torch.allclose(wrong(x), want, rtol=1e-3, atol=0)


@needs_kernels
def test_fast_norm_keeps_torch_for_other_dtypes_and_gradients():
    norm = _norm(64, 1.0)
    fast = FastRMSNorm(norm)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(fast(x), norm(x))  # the same torch op on the same weight
    x = torch.randn(3, 64, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None


@needs_kernels
def test_swap_norms_swaps_every_float_norm_and_keeps_the_output():
    model = random_model("tiny-gemma-3-270m")
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        count = sum(type(m) is RMSNorm for m in model.modules())
        assert swap_norms(model) == count > 0
        assert not any(type(m) is RMSNorm for m in model.modules())
        got = model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    # The swapped norms' weights stay parameters: a quantized checkpoint on the fast path has no
    # other, and the engine finds a model's device and dtype from its parameters.
    weighted = sum(n.endswith(".scale") for n, _ in model.named_parameters())
    assert weighted == sum(isinstance(m, FastRMSNorm) and m.scale is not None for m in model.modules()) > 0


def test_kernels_build_into_a_fresh_cache_and_are_reused(tmp_path, monkeypatch):
    if kernels.library() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("GEMMA4_KERNEL_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        built = list(tmp_path.glob("cpu_kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        kernels.library.cache_clear()
        assert kernels.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        kernels.library.cache_clear()


def test_without_a_compiler_the_norms_stay_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        model = random_model("tiny-gemma-3-270m")
        assert swap_norms(model) == 0
        assert any(type(m) is RMSNorm for m in model.modules())
    finally:
        kernels.library.cache_clear()


@needs_kernels
def test_a_compiled_step_traces_the_kernels_as_torch_ops():
    """Under torch.compile the swapped norm and attention are torch's ops on the same weights (one
    graph, no ctypes call in it); eager runs the C kernels. They differ only in summation order
    (each op within 2e-6 / 1e-5, below), which the random layers amplify to ~2e-5 of the logits."""
    from test_fast_paths import _ids, traced_equals_eager

    from gemma4.engine.attend import swap_attention

    model = random_model("tiny-gemma-3-270m")
    assert swap_norms(model) and swap_attention(model)
    ids = _ids(model, 1, 9)
    torch._dynamo.reset()
    try:
        logits = model(ids[:, :5])
        traced_equals_eager(model, ids, {"backend": "aot_eager", "fullgraph": True},
                            atol=1e-4 * logits.abs().max().item())
    finally:
        torch._dynamo.reset()


@needs_kernels
@pytest.mark.parametrize("B,H,Hkv,T,S,d", [(1, 4, 1, 1, 37, 256), (2, 8, 2, 5, 130, 64), (1, 2, 2, 3, 9, 24),
                                          (3, 6, 3, 16, 70, 128)])
def test_fast_attend_equals_attend_on_cache_views(B, H, Hkv, T, S, d):
    """K/V as the cache hands them over (narrowed views of longer buffers), masks with -inf (future,
    window, empty slots) and broadcast over the batch; grouped heads; a verify step's T rows."""
    from gemma4.engine.attend import fast_attend
    from gemma4.model.attention import attend, attention_mask

    gen = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, T, H, d, generator=gen).transpose(1, 2)  # the strides Attention.forward gives
    k = torch.randn(B, Hkv, S + 11, d, generator=gen)[:, :, :S]
    v = torch.randn(B, Hkv, S + 11, d, generator=gen)[:, :, :S]
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[:, -2:] = -1  # empty slots
    q_pos = torch.arange(S - 2 - T, S - 2).expand(B, T)
    for window in (None, 7):
        mask = attention_mask(q_pos, k_pos, window, torch.float32)
        want = attend(q, k, v, mask, 0.3)
        got = fast_attend(q, k, v, mask, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fast_attend(q, k, v, mask, 0.31), want, rtol=1e-3, atol=1e-4)  # scale is used
    one = attention_mask(q_pos[:1], k_pos[:1], None, torch.float32)  # a mask broadcast over the batch
    torch.testing.assert_close(fast_attend(q, k, v, one, 0.3), attend(q, k, v, one, 0.3), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_fast_attend_leaves_other_cases_to_attend():
    from gemma4.engine.attend import fast_attend
    from gemma4.model.attention import attend

    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    mask = torch.zeros(1, 1, 20, 30)
    assert torch.equal(fast_attend(q, k, v, mask, 0.25), attend(q, k, v, mask, 0.25))  # 20 rows: a prefill
    half = [t.to(torch.bfloat16) for t in (q[:, :, :2], k, v, mask[:, :, :2])]
    assert torch.equal(fast_attend(*half, 0.25), attend(*half, 0.25))


@needs_kernels
@pytest.mark.parametrize("name", ALL)
def test_fast_path_kernels_keep_the_engine_steps(name):
    """Every tiny variant (KV sharing, PLE, MoE, k = v, Gemma 3), two rows at different lengths: the
    engine's step logits on the fast path with and without the one-call norms and attention."""
    import copy

    from test_fast_paths import _ids, _rows, _step

    from gemma4.engine.attend import swap_attention
    from gemma4.engine.core import Engine
    from gemma4.engine.cpu import pack_linears

    for name in (name,):
        # head=None: the rescored head's logits outside its top 64 are int8 scores, and which tokens
        # make the 64 can flip on a last-bit change, which would hide or fake a difference here.
        model = pack_linears(random_model(name), head=None)
        fast = copy.deepcopy(model)
        assert swap_norms(fast) > 0 and swap_attention(fast) > 0
        ids = _ids(model, 2, 9)
        engines = [Engine(m, rows=2, max_len=12) for m in (model, fast)]
        rows = [_rows(e, [ids[0, :5].tolist(), ids[1, :3].tolist()]) for e in engines]
        for e, seqs in zip(engines, rows):
            e.score(seqs, [ids[0, :5].tolist(), ids[1, :3].tolist()])
        for t in range(5, 9):
            want, got = (_step(e, seqs, ids, t) for e, seqs in zip(engines, rows))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 4, 256), (2, 5, 1, 256), (1, 3, 8, 64), (3, 2, 2, 6)])
def test_fast_rope_equals_apply_rope(shape):
    from gemma4.engine.attend import fast_rope
    from gemma4.model.layers import apply_rope, rope_cos_sin

    B, T, heads, d = shape
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(B, T, heads, d, generator=gen) * 30
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rope_cos_sin(inv, torch.randint(0, 5000, (B, T), generator=gen), torch.float32)
    want = apply_rope(x, cos, sin)
    assert torch.equal(fast_rope(x, cos, sin), want)  # two products rounded, then the sum: as torch
    assert torch.equal(fast_rope(x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin), want)  # strided x
    assert not torch.allclose(fast_rope(x, sin, cos), want)
