"""The one-call CPU RMSNorm (`engine.norm`, kernels/cpu_kernels.c) against the model's RMSNorm, and
the kernel build: compiled into a fresh cache, reused from it, and absent without a compiler."""

import pytest
import torch
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
def test_a_compiled_step_traces_the_swapped_norms_as_torch_ops():
    """Under torch.compile the swapped norm is torch's rms_norm on the same weight (one graph, no
    ctypes call in it); eager runs the C kernel. They differ only in summation order (each norm
    within 2e-6 relative, above), which the random layers amplify to ~2e-5 of the logits."""
    from test_fast_paths import _ids, _rows, _step

    from gemma4.engine.core import Engine

    model = random_model("tiny-gemma-3-270m")
    swap_norms(model)
    ids = _ids(model, 1, 9)
    options = {"backend": "aot_eager", "fullgraph": True}
    torch._dynamo.reset()
    try:
        eager = Engine(model, max_len=12, headroom=1)
        traced = Engine(model, max_len=12, headroom=1, mode="compile", compile_options=options)
        rows = [_rows(e, [ids[0, :5].tolist()]) for e in (eager, traced)]
        for e, seqs in zip((eager, traced), rows):
            e.score(seqs, [ids[0, :5].tolist()])
        for t in range(5, 9):
            got, want = (_step(e, seqs, ids, t) for e, seqs in ((traced, rows[1]), (eager, rows[0])))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    finally:
        torch._dynamo.reset()
