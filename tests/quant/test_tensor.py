"""QuantizedTensor: the quantizers' error bounds, the stand-in behaviour, fast kernels vs plain path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gemma4.quant import QuantizedTensor, kernels
from gemma4.quant.tensor import (
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)


def weight(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[..., 3] += 0.4  # an outlier column, and a skewed group, as real weights have
    return w


def test_int8_error_is_at_most_half_a_step_per_row():
    w = weight(64, 96)
    w[5] = 0  # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (64,)
    assert q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert (q[5] == 0).all()


@pytest.mark.parametrize("group", [16, 32, 64])
def test_int4_error_is_at_most_half_a_step_per_group(group):
    w = weight(48, 128)
    q, s, z = quantize_int4(w, group)
    assert q.shape == (48, 64) and s.shape == z.shape == (48, 128 // group) and s.dtype == torch.bfloat16
    codes = unpack_nibbles(q)
    deq = (codes.float().view(48, -1, group) - 8) * s.float()[..., None] + z.float()[..., None]
    err = (deq - w.view(48, -1, group)).abs()
    # Half a step, plus what rounding scale and zero to bf16 can move the grid's ends (8 steps).
    slack = s.float() * 8 * 2**-8 + z.float().abs() * 2**-8
    assert (err <= (s.float() / 2 + slack)[..., None] + 1e-7).all()


def test_int4_weights_on_the_grid_round_trip_exactly():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    codes[:, 0], codes[:, 1] = 0, 15  # every group of 64 spans the whole code range
    s = (torch.rand(32, 1, generator=g) / 10).to(torch.bfloat16)
    z = (torch.randn(32, 1, generator=g) / 10).to(torch.bfloat16)
    w = (codes.float() - 8) * s.float() + z.float()
    q, _, _ = quantize_int4(w, 64)
    assert torch.equal(unpack_nibbles(q), codes)
    assert torch.equal(QuantizedTensor.from_float(w, 4, 64).dequantize(), w)


def test_nibble_packing_order():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [[0x21, 0x43]]  # even index in the low nibble
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_stands_in_for_the_float_weight(bits):
    """nn.Linear, nn.Embedding (and the tied head's F.linear) run unchanged on a QuantizedTensor."""
    w = weight(96, 64)
    qt = QuantizedTensor.from_float(w, bits, 32)
    dense = qt.dequantize()
    lin = nn.Linear(64, 96, bias=True)
    bias = lin.bias.detach().clone()
    del lin.weight
    lin.weight = qt
    emb = nn.Embedding(96, 64)
    del emb.weight
    emb.weight = qt
    x = torch.randn(2, 20, 64)
    ids = torch.tensor([[0, 5, 95], [3, 3, 1]])
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, dense, bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(emb(ids), dense[ids])
        # Any other op sees the dequantized tensor.
        torch.testing.assert_close(torch.sum(qt), dense.sum())
    assert qt.shape == (96, 64) and qt.dtype == torch.float32 and qt.device.type == "cpu"
    assert set(lin.state_dict()) == {"bias", "weight.qweight", "weight.scales", "weight.col_scales"} | (
        {"weight.zeros"} if bits == 4 else set())


def test_to_dtype_changes_compute_dtype_not_storage():
    qt = QuantizedTensor.from_float(weight(32, 64), 4, 32)
    lin = nn.Linear(64, 32, bias=False)
    del lin.weight
    lin.weight = qt
    lin.to(torch.bfloat16)
    assert qt.dtype == torch.bfloat16
    assert qt.qweight.dtype == torch.uint8 and qt.scales.dtype == torch.bfloat16
    with torch.no_grad():
        assert lin(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_gradients_flow_to_the_input_through_the_plain_path():
    """QLoRA-style use: the base weight is frozen, the activations need gradients."""
    qt = QuantizedTensor.from_float(weight(32, 64), 4, 32)
    x = torch.randn(1, 64, requires_grad=True)
    F.linear(x, qt).sum().backward()
    torch.testing.assert_close(x.grad[0], qt.dequantize().sum(0))


# ------------------------------------------------------------------------------------------------
# Fast kernels against the plain path. Kernel activations are bf16, so agreement is at bf16 level:
# relative error of the outputs ~2^-8, checked as 1% of the output's scale.


def close_at_bf16(fast, plain):
    scale = plain.abs().max().item()
    assert (fast - plain).abs().max().item() <= 0.01 * scale, ((fast - plain).abs().max().item(), scale)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_kernel_matches_plain_path(bits, group):
    w = weight(256, 256)
    x = torch.randn(kernels.KERNEL_MAX_ROWS, 256)
    fast = QuantizedTensor.from_float(w, bits, group)
    plain = QuantizedTensor.from_float(w, bits, group)
    plain.use_kernels = False
    with torch.no_grad():
        for rows in (1, 5, kernels.KERNEL_MAX_ROWS):
            close_at_bf16(fast.linear(x[:rows]), plain.linear(x[:rows]))
        # more rows than a kernel takes: the plain path, exactly
        assert torch.equal(fast.linear(torch.cat([x, x])), plain.linear(torch.cat([x, x])))
    if bits == 4 and kernels.int4_cpu_block():
        assert fast._layout == kernels.int4_cpu_block()  # the kernel ran and switched the layout in place
    # Whatever the layout, lookups, dequantization and the saved tensors are the same.
    ids = torch.tensor([0, 31, 32, 255, 100])
    assert torch.equal(fast.rows(ids), plain.rows(ids))
    assert torch.equal(fast.dequantize(), plain.dequantize())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))


def test_int8_kernel_on_a_weight_off_a_64_byte_boundary():
    """A view of a memory-mapped checkpoint may start anywhere: on an AVX-512/AMX Xeon the int8 kernel
    crashed the process on such a weight for >= 4 rows, so it is aligned (once) before the call."""
    fast = QuantizedTensor.from_float(weight(256, 256), 8)
    plain = QuantizedTensor.from_float(weight(256, 256), 8)
    plain.use_kernels = False
    base = torch.empty(8 + fast.qweight.numel(), dtype=torch.int8)
    base[8:] = fast.qweight.reshape(-1)
    fast.qweight = base[8:].view(fast.qweight.shape)  # as the loader's views of the file can be
    assert fast.qweight.data_ptr() % kernels.ALIGN
    x = torch.randn(kernels.KERNEL_MAX_ROWS, 256)
    with torch.no_grad():
        close_at_bf16(fast.linear(x), plain.linear(x))
    assert fast.qweight.data_ptr() % kernels.ALIGN == 0 and torch.equal(fast.qweight, plain.qweight)
    odd = base[8:].view(plain.qweight.shape)
    assert kernels.aligned(odd) is not odd and torch.equal(kernels.aligned(odd), odd)


@pytest.mark.parametrize("K", [24, 40])
def test_int8_rows_of_other_than_16k_bytes_take_the_plain_path(K):
    """There the int8 kernel returned wrong values or crashed (AVX-512 Xeon): the plain path runs."""
    fast = QuantizedTensor.from_float(weight(64, K), 8)
    plain = QuantizedTensor.from_float(weight(64, K), 8)
    plain.use_kernels = False
    with torch.no_grad():
        for rows in (1, 2, 7):
            x = torch.randn(rows, K)
            assert torch.equal(fast.linear(x), plain.linear(x))


@pytest.mark.parametrize("bits", [8, 4])
def test_stacked_experts_kernel_matches_plain(bits):
    w = weight(3, 64, 128)
    fast = QuantizedTensor.from_float(w, bits, 64)
    plain = QuantizedTensor.from_float(w, bits, 64)
    plain.use_kernels = False
    x = torch.randn(2, 128)
    with torch.no_grad():
        for e in range(3):
            close_at_bf16(F.linear(x, fast[e]), F.linear(x, plain[e]))
            torch.testing.assert_close(F.linear(x, plain[e]), F.linear(x, plain.dequantize()[e]))
    assert fast[1].shape == (64, 128)


def test_kernel_probes_run_on_this_machine():
    """Not a requirement (other CPUs may lack them), but on x86/ARM CPU builds of torch >= 2.6 both
    kernels exist; a probe that silently failed here would leave the fast path untested."""
    assert kernels.int8_cpu()
    assert kernels.int4_cpu_block() in (16, 32, 64)


def test_column_scales_only_for_skewed_columns_and_they_cut_the_error():
    balanced = torch.randn(256, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    assert torch.equal(QuantizedTensor.from_float(balanced, 8).col_scales, torch.ones(128))
    skewed = balanced.clone()
    skewed[:, [3, 70]] *= 8  # two dominant columns, as in gemma-3-270m's embedding
    for bits in (8, 4):
        scaled = QuantizedTensor.from_float(skewed, bits, 32)
        plain = QuantizedTensor.from_float(skewed, bits, 32, col_scales=torch.ones(128))
        assert not torch.equal(scaled.col_scales, torch.ones(128))
        err = lambda qt: (qt.dequantize() - skewed).pow(2).mean().item()
        assert err(scaled) < 0.7 * err(plain)
        x = torch.randn(20, 128)  # 20 rows: more than a kernel takes, the plain path
        with torch.no_grad():
            torch.testing.assert_close(F.linear(x, scaled), x @ scaled.dequantize().T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scaled.rows(torch.tensor([7, 0])), scaled.dequantize()[[7, 0]])
    stacked = torch.stack([skewed, balanced])
    qt = QuantizedTensor.from_float(stacked, 8)
    qt.use_kernels = False  # exact comparisons below (kernels vs plain: tests above)
    assert qt.col_scales.shape == (2, 128)
    torch.testing.assert_close(qt.dequantize()[1], qt[1].dequantize())
    x = torch.randn(3, 128)
    for e in range(2):
        with torch.no_grad():
            torch.testing.assert_close(F.linear(x, qt[e]), x @ qt.dequantize()[e].T, rtol=1e-4, atol=1e-5)
