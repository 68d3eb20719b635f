"""Optional fast CPU kernels for quantized matmuls, behind capability probes.

PyTorch ships weight-only kernels on CPU: `aten._weight_int8pack_mm` (int8 weight [N, K] plus
per-row scales) and `aten._weight_int4pack_mm_for_cpu` (a blocked int4 layout plus per-group scale
and zero). Both are fast only with bf16 activations (their fp32 paths are scalar code: 5-20x slower
than an fp32 matmul on an AVX2 machine) and only for a few rows (decode): for 64 rows a
dequantize + fp32 matmul is faster. So a kernel is used when the input has at most
`KERNEL_MAX_ROWS` rows; activations are rounded to bf16 for it and the output cast back.

Every kernel is probed once per process against the plain path before it is used; a kernel that
is missing, fails or disagrees is simply not used. The int4 kernel's weight layout is a torch
implementation detail: we recognise it (blocks of BN rows, byte [n_blk, k, j] holding rows j and
j + BN/2 of the block as low/high nibble) by comparing with `_convert_weight_to_int4pack_for_cpu`
on a probe, and only then switch a weight to it, in place, so int4 weights are never held twice.
"""

from __future__ import annotations

import functools

import torch

# Largest number of activation rows sent to a kernel (measured on a 2-core AVX2 EPYC: at 8 rows
# the int8/int4 kernels beat dequantize + fp32 matmul by ~1.5x, at 64 rows they lose by ~1.5x).
KERNEL_MAX_ROWS = 16
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


@functools.cache
def int8_cpu() -> bool:
    """`_weight_int8pack_mm` runs on CPU with bf16 activations and matches a float matmul."""
    op = _op("_weight_int8pack_mm")
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen)
    q = torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int8)
    s = torch.rand(32, generator=gen) / 100
    try:
        got = op(x.bfloat16(), q, s.bfloat16()).float()
    except (RuntimeError, NotImplementedError):
        return False
    want = x @ (q.float() * s[:, None]).T
    return bool(torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item()))


def pack_int4_cpu(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Codes [R, K] (uint8 0..15, R % block == 0) -> the CPU kernel's layout, uint8 [R, K/2]."""
    R, K = codes.shape
    t = codes.view(R // block, block, K).transpose(1, 2)  # [n_blk, K, block]
    half = block // 2
    return (t[..., :half] | (t[..., half:] << 4)).reshape(R, K // 2)


def unpack_int4_cpu(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `pack_int4_cpu`: uint8 [R, K/2] -> codes [R, K]."""
    R, half_k = packed.shape
    t = packed.reshape(R // block, 2 * half_k, block // 2)  # [n_blk, K, block/2]
    return torch.cat([t & 15, t >> 4], dim=-1).transpose(1, 2).reshape(R, 2 * half_k)


def rows_int4_cpu(packed: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
    """Codes [n, K] of the given rows of a weight stored in the CPU kernel's layout."""
    R, half_k = packed.shape
    t = packed.reshape(R // block, 2 * half_k, block // 2)
    r = rows % block
    picked = t[rows // block, :, r % (block // 2)]  # [n, K]
    return (picked >> (4 * (r >= block // 2).to(torch.uint8))[:, None]) & 15


@functools.cache
def int4_cpu_block() -> int | None:
    """Row block of the CPU int4 kernel's layout if we recognise it and the kernel is right, else None."""
    convert, mm = _op("_convert_weight_to_int4pack_for_cpu"), _op("_weight_int4pack_mm_for_cpu")
    if convert is None or mm is None:
        return None
    gen = torch.Generator().manual_seed(0)
    try:
        for block in (64, 32, 16):
            # Two row counts, so that a layout whose block depends on N is not mistaken for ours.
            if all(_layout_matches(convert, n, block, gen) for n in (2 * block, 3 * block)):
                break
        else:
            return None
        codes = torch.randint(0, 16, (2 * block, 128), generator=gen, dtype=torch.uint8)
        x = torch.randn(3, 128, generator=gen)
        scale = torch.rand(128 // 32, 2 * block, generator=gen) / 100
        zero = torch.randn(128 // 32, 2 * block, generator=gen) / 100
        got = mm(x.bfloat16(), pack_int4_cpu(codes, block), 32, torch.stack([scale, zero], -1).bfloat16()).float()
    except (RuntimeError, NotImplementedError):
        return None
    w = (codes.float() - 8).view(2 * block, 4, 32) * scale.T[..., None] + zero.T[..., None]
    want = x @ w.view(2 * block, 128).T
    ok = torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    return block if ok else None


def _layout_matches(convert, n: int, block: int, gen: torch.Generator) -> bool:
    codes = torch.randint(0, 16, (n, 64), generator=gen, dtype=torch.int32)
    try:
        theirs = convert(codes, 1)
    except RuntimeError:
        return False
    return theirs.shape == (n, 32) and torch.equal(theirs, pack_int4_cpu(codes.to(torch.uint8), block))


# `_weight_int8pack_mm` on a Xeon with AVX-512 and AMX (torch 2.13) needs 16-byte aligned weight
# rows: for K % 16 != 0 it returned wrong values (1 row) or crashed the process (SIGSEGV, 2 or more
# rows), and so it did for 4 or more rows on a weight that was a view of a memory-mapped checkpoint
# at an offset of 8 mod 64. So such K take the plain path, and a weight is aligned before the call
# (torch's CPU allocator aligns to 64, so a copy is).
INT8_K_MULTIPLE = 16
ALIGN = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or an aligned copy of it if its data does not start on an ALIGN-byte boundary."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def int8_mm(x2d: torch.Tensor, qweight: torch.Tensor, scales_bf16: torch.Tensor) -> torch.Tensor:
    """x2d @ (qweight * scales)^T in bf16 activations; `qweight` must be `aligned` (see ALIGN)."""
    return torch.ops.aten._weight_int8pack_mm(x2d.to(torch.bfloat16).contiguous(), qweight, scales_bf16)


def int4_mm(x2d: torch.Tensor, packed: torch.Tensor, group: int, scale_zero: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16).contiguous(), packed, group, scale_zero)
