"""A quantized weight that stands in for a float tensor: `QuantizedTensor`.

Quantization here is a *parameter* swap: the float parameter `X` of a module (`q_proj.weight`,
`embed_tokens.weight`, `experts.gate_up_proj`) is replaced by a `QuantizedTensor` submodule of the
same name, whose buffers are saved as `X.qweight`, `X.scales` (and `X.zeros`). It implements
`__torch_function__`, so the unchanged model code keeps working on it:
- `F.linear(x, w)` (nn.Linear, the tied LM head) runs a quantized matmul,
- `F.embedding(ids, w)` (nn.Embedding) dequantizes just the looked-up rows,
- `w[e]` (stacked MoE experts [E, N, K]) is expert e's weight, again usable in `F.linear`,
- `w.shape` / `w.dtype` / `w.device` describe the float tensor it replaces (dtype = compute dtype),
- any other torch function sees the fully dequantized tensor (correct, slow, never on a hot path).

Formats (the last dim K is the matmul's input dim; leading dims [..., N] are rows):
- int8: symmetric per row (per output channel): `w = qweight * scales`; qweight int8 [..., N, K]
  in [-127, 127], scales float32 [..., N] (fp32: a bf16 scale would err by up to 1/4 of a step).
- int4: asymmetric per group of `group_size` along K: `w = (code - 8) * scales + zeros`, codes 0..15
  packed two per byte (`qweight` uint8 [..., N, K/2], even k in the low nibble), scales and zeros
  bf16 [..., N, K/group]. Asymmetric (min/max) uses all 16 levels on skewed groups, which symmetric
  int4 wastes; `zeros` is the value of code 8, near the group's centre, so rounding it to bf16
  costs little. This is also exactly the scale/zero form of PyTorch's int4 kernels.
- both: `col_scales` float32 [K] ([E, K] for stacked experts): the stored weight is w / col_scales
  (column-wise), so `w = dequant(...) * col_scales`. All ones except for weights with a few
  dominant input columns (`column_scales`); applied to the activations, not the weight, at run time.
- both, optionally: `rotation` b (0: none): the stored weight is (w / col_scales) @ H, with H the
  block-diagonal orthonormal Hadamard matrix of b x b blocks along K (H @ H = I), so
  `w = (dequant(...) @ H) * col_scales` and x W^T = (H (x * col_scales)) W'^T. Rotating spreads each
  group's outliers over its block, which GPTQ (gptq.py) turns into lower int4 error; at run
  time it costs one [.., K/b, b] @ [b, b] matmul on the activations. Recorded per tensor.
Quantizing computes codes against the bf16-rounded scales and zeros that are stored.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from . import kernels

INT4_GROUP_SIZES = (16, 32, 64, 128, 256)
ROTATION_BLOCKS = (0, 16, 32, 64, 128, 256)  # Hadamard block sizes along K (0: no rotation)
_CHUNK = 1 << 22  # elements per dequantized chunk: bounds temporaries (16 MiB in fp32)


def _row_chunks(rows: int, k: int):
    step = max(1, _CHUNK // max(k, 1))
    if step >= 64:
        step -= step % 64  # whole blocks of the int4 kernel layout (32 or 64 rows)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# ------------------------------------------------------------------------------------------------
# Quantize / dequantize (functions of plain tensors)


@functools.lru_cache(maxsize=None)
def hadamard(b: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The b x b Sylvester Hadamard matrix scaled to be orthonormal; it is symmetric, so H @ H = I."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {b}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(b)).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, b: int) -> torch.Tensor:
    """x [..., K] times the block-diagonal Hadamard matrix of b x b blocks (its own inverse)."""
    if not b:
        return x
    K = x.shape[-1]
    return (x.reshape(*x.shape[:-1], K // b, b) @ hadamard(b, x.dtype, x.device)).reshape(x.shape)


def _chunks_of(w: torch.Tensor, col_scales: torch.Tensor | None):
    """Yield (r0, r1, fp32 rows r0..r1 of w viewed as [R, K], divided by their column scales)."""
    K, N = w.shape[-1], (w.shape[-2] if w.dim() > 1 else 1)
    flat = w.reshape(-1, K)
    cols = None if col_scales is None else col_scales.float().reshape(-1, K)  # [R / N, K]
    for r0, r1 in _row_chunks(flat.shape[0], K):
        x = flat[r0:r1].float()
        if cols is not None:
            x = x / (cols[0] if cols.shape[0] == 1 else cols[torch.arange(r0, r1, device=w.device) // N])
        yield r0, r1, x


def quantize_int8(w: torch.Tensor, col_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (/ col_scales [..., K]) -> (qweight int8 [..., N, K], scales fp32 [..., N])."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device).view(-1, w.shape[-1])
    s = torch.empty(q.shape[0], dtype=torch.float32, device=w.device)
    for r0, r1, x in _chunks_of(w, col_scales):
        scale = x.abs().amax(-1) / 127
        s[r0:r1] = scale
        q[r0:r1] = torch.round(x / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(w.shape), s.view(w.shape[:-1])


def quantize_int4(w: torch.Tensor, group_size: int, col_scales: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] (/ col_scales) -> (qweight uint8 [..., N, K/2], scales, zeros bf16 [..., N, K/group])."""
    K = w.shape[-1]
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the row length {K}")
    R, G = w.numel() // K, K // group_size
    q = torch.empty(R, K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(R, G, dtype=torch.bfloat16, device=w.device)
    zeros = torch.empty(R, G, dtype=torch.bfloat16, device=w.device)
    for r0, r1, x in _chunks_of(w, col_scales):
        x = x.view(r1 - r0, G, group_size)
        s, z = int4_grid(x)
        scales[r0:r1], zeros[r0:r1] = s, z
        q[r0:r1] = pack_nibbles(int4_codes(x, s[..., None], z[..., None]).view(r1 - r0, K))
    lead = w.shape[:-1]
    return q.view(*lead, K // 2), scales.view(*lead, G), zeros.view(*lead, G)


def int4_grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (scale, zero) of each group x [..., g] (its last dim): 16 levels from its min to its max."""
    lo, hi = x.amin(-1), x.amax(-1)
    s = ((hi - lo) / 15).to(torch.bfloat16)
    return s, (lo + 8 * s.float()).to(torch.bfloat16)  # zero: the value of code 8


def int4_codes(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 of x on the grid (scales, zeros broadcast against x); zero scales give code 8."""
    sf = torch.where(scales > 0, scales, 1.0).float()
    return torch.round((x - zeros.float()) / sf + 8).clamp_(0, 15).to(torch.uint8)


SKEWED_COLUMNS = 2.0


def column_scales(w: torch.Tensor) -> torch.Tensor:
    """Scales [..., K] that equalise w's input columns before quantizing, or ones if they need none.

    Where a few columns are much larger than the rest (max column RMS >= 2x the median: the token
    embedding of gemma-3-270m has three columns at 4-8x), each row's scale is set by those columns
    and the rest lose precision. Dividing column k by c_k = sqrt(rms_k) (normalised to mean 1)
    before quantizing and multiplying it back after halves the embedding's int8 error (1.7% ->
    0.85% relative RMS) and cuts its int4 error by a fifth; balanced weights (every linear layer
    measured) gain nothing, so they keep ones. Applied to the activations, it costs one multiply.
    """
    K, N = w.shape[-1], w.shape[-2]
    sq = torch.zeros(w.numel() // (N * K), K, dtype=torch.float64, device=w.device)
    for r0, r1, x in _chunks_of(w, None):
        idx = torch.arange(r0, r1, device=w.device) // N
        sq.index_add_(0, idx, x.double().pow(2))
    rms = (sq / N).sqrt().float().view(*w.shape[:-2], K)
    med = rms.median(-1, keepdim=True).values.clamp(min=torch.finfo(torch.float32).tiny)
    if not bool((rms.amax(-1, keepdim=True) >= SKEWED_COLUMNS * med).any()):
        return torch.ones_like(rms)
    c = rms.clamp(min=med * 1e-3).sqrt()
    return c / c.mean(-1, keepdim=True)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., K] -> [..., K/2], even positions in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [n, K] (uint8 0..15), scales/zeros [n, K/g] -> float [n, K] in `dtype` (math in fp32)."""
    n, K = codes.shape
    G = scales.shape[-1]
    w = (codes.view(n, G, K // G).float() - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(n, K).to(dtype)


# ------------------------------------------------------------------------------------------------


class _TensorLike:
    """`__torch_function__` shared by QuantizedTensor and its per-expert slices."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, _TensorLike) and not isinstance(x, _TensorLike):
                out = w.linear(x)
                return out if bias is None else out + _dense(bias)
        if func is F.embedding:
            ids, w = args[0], args[1]
            max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
            if isinstance(w, _TensorLike) and not isinstance(ids, _TensorLike) and max_norm is None:
                return w.rows(ids)  # padding_idx only matters for gradients
        return func(*tree_map(_dense, args), **tree_map(_dense, kwargs))


def _dense(a):
    return a.dequantize() if isinstance(a, _TensorLike) else a


class QuantizedTensor(_TensorLike, nn.Module):
    """A weight of float shape [..., N, K], stored int8 (per row) or int4 (per group of K)."""

    def __init__(self, shape, bits: int, group_size: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, rotation: int = 0):
        super().__init__()
        shape = torch.Size(shape)
        lead, K = shape[:-1], shape[-1]
        if rotation not in ROTATION_BLOCKS or (rotation and K % rotation):
            raise ValueError(f"rotation must be one of {ROTATION_BLOCKS} and divide {K}, got {rotation}")
        if bits == 8:
            self.register_buffer("qweight", torch.empty(shape, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(lead, dtype=torch.float32, device=device))
            self.zeros = None
            group_size = None
        elif bits == 4:
            if group_size not in INT4_GROUP_SIZES or K % group_size:
                raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES} and divide {K}, got {group_size}")
            self.register_buffer("qweight", torch.empty(*lead, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(*lead, K // group_size, dtype=torch.bfloat16, device=device))
            self.register_buffer("zeros", torch.empty(*lead, K // group_size, dtype=torch.bfloat16, device=device))
        else:
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        # Per input column (per expert for stacked weights); all ones unless the columns are skewed.
        self.register_buffer("col_scales", torch.ones(*shape[:-2], K, dtype=torch.float32, device=device))
        self.shape, self.bits, self.group_size, self.dtype, self.rotation = shape, bits, group_size, dtype, rotation
        self.use_kernels = True  # let `linear` pick a fast kernel when one applies (see kernels.py)
        self._layout = None  # None: row-major nibbles; an int: int4 CPU kernel layout with that row block
        self._cache: dict[str, torch.Tensor] = {}  # kernel-side scale tensors, derived, never saved

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, group_size: int | None = None,
                   col_scales: torch.Tensor | None = None) -> QuantizedTensor:
        """Quantize `w` (round to nearest); `col_scales` [..., K] defaults to `column_scales(w)`.
        Rotated tensors come from GPTQ only (gptq.py): rounded to nearest, rotation measured erratic."""
        qt = cls(w.shape, bits, group_size, w.dtype, w.device)
        c = column_scales(w) if col_scales is None else col_scales.float()
        if bool((c == 1).all()):
            c = None
        else:
            qt.col_scales = c.contiguous()
        parts = quantize_int8(w, c) if bits == 8 else quantize_int4(w, group_size, c)
        for name, t in zip(("qweight", "scales", "zeros"), parts):
            setattr(qt, name, t)
        return qt

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        r = f", rotation={self.rotation}" if self.rotation else ""
        return f"shape={tuple(self.shape)}, int{self.bits}{g}{r}, dtype={self.dtype}"

    def __getitem__(self, index: int) -> _Slice:
        if len(self.shape) < 3:
            raise IndexError("only stacked (3-d) quantized weights can be indexed")
        return _Slice(self, int(index))

    # -- storage ----------------------------------------------------------------------------------
    def _parts(self, index: int | None):
        """(qweight [R, .], scales [R] or [R, G], zeros [R, G] or None) of the weight or of expert `index`."""
        q, s, z = self.qweight, self.scales, self.zeros
        if index is not None:
            q, s, z = q[index], s[index], (z[index] if z is not None else None)
        q = q.reshape(-1, q.shape[-1])
        if self.bits == 8:
            return q, s.reshape(-1), None
        return q, s.reshape(-1, s.shape[-1]), z.reshape(-1, z.shape[-1])

    def codes(self, r0: int, r1: int, index: int | None = None) -> torch.Tensor:
        """int4 codes [r1 - r0, K] of rows r0..r1 (of expert `index`), whatever the layout."""
        q = self._parts(index)[0]
        if self._layout is None:
            return unpack_nibbles(q[r0:r1])
        b = self._layout
        if r0 % b == 0 and r1 % b == 0:  # whole blocks (a layout is only used when N % b == 0)
            return kernels.unpack_int4_cpu(q[r0:r1], b)
        return kernels.rows_int4_cpu(q, torch.arange(r0, r1, device=q.device), b)

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        """The float weight (or expert `index` of it) in the compute dtype."""
        rows = self._parts(index)[0].shape[0]
        w = rotate(self._raw(index, 0, rows, torch.float32), self.rotation)
        w = w.view(self.shape[1:] if index is not None else self.shape)
        c = self._cols(index)
        return (w if isinstance(c, float) else w * c.unsqueeze(-2)).to(self.dtype)

    def _raw(self, index: int | None, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows r0..r1 of the stored (column-scaled) weight, [r1 - r0, K] in `dtype`."""
        q, s, z = self._parts(index)
        if self.bits == 8:  # in the activations' dtype (e.g. fp32 activations of a bf16 model)
            return q[r0:r1].to(dtype) * s[r0:r1, None].to(dtype)
        return dequantize_int4(self.codes(r0, r1, index), s[r0:r1], z[r0:r1], dtype)

    def _cols(self, index: int | None) -> torch.Tensor | float:
        """Column scales ([..., K], or [K] of expert `index`), or 1.0 when all are one."""
        unit = self._cache.get("unit_cols")
        if unit is None:
            unit = self._cache["unit_cols"] = bool((self.col_scales == 1).all())
        if unit:
            return 1.0
        return self.col_scales if index is None else self.col_scales[index]

    # -- the two ops the model uses ---------------------------------------------------------------
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: dequantize only rows `ids` of a 2-d [V, D] weight -> [*ids.shape, D]."""
        if len(self.shape) != 2:
            raise ValueError("row lookups need a 2-d weight")
        flat = ids.reshape(-1)
        if self.bits == 8:
            w = self.qweight[flat].to(self.dtype) * self.scales[flat, None].to(self.dtype)
        else:
            codes = (kernels.rows_int4_cpu(self.qweight, flat, self._layout) if self._layout
                     else unpack_nibbles(self.qweight[flat]))
            w = dequantize_int4(codes, self.scales[flat], self.zeros[flat], self.dtype)
        return (rotate(w, self.rotation) * self._cols(None)).to(self.dtype).view(*ids.shape, self.shape[-1])

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x [..., K] @ W^T -> [..., N] in x's dtype; W is this weight or expert `index` of it."""
        K = self.shape[-1]
        x2 = x.reshape(-1, K)
        c = self._cols(index)
        if not isinstance(c, float):  # x W^T = (x * c) W'^T, with W' the stored, column-scaled weight
            x2 = (x2 * c).to(x.dtype)
        x2 = rotate(x2, self.rotation)  # ... = (H (x * c)) W'^T when W' is also rotated
        out = self._kernel_linear(x2, index) if self._kernel_ok(x2) else None
        if out is None:
            N = self._parts(index)[0].shape[0]
            if N * K <= _CHUNK:
                out = F.linear(x2, self._raw(index, 0, N, x.dtype))
            else:  # chunk over output rows so the dequantized weight never exists whole
                out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
                for r0, r1 in _row_chunks(N, K):
                    out[:, r0:r1] = F.linear(x2, self._raw(index, r0, r1, x.dtype))
        return out.to(x.dtype).view(*x.shape[:-1], -1)

    # -- fast kernels -----------------------------------------------------------------------------
    def _kernel_ok(self, x2: torch.Tensor) -> bool:
        # The kernels have no autograd: a QLoRA backward through x takes the plain path.
        return (self.use_kernels and x2.device.type == "cpu" and x2.shape[0] <= kernels.KERNEL_MAX_ROWS
                and x2.dtype in (torch.float32, torch.bfloat16) and not (x2.requires_grad and torch.is_grad_enabled()))

    def _kernel_linear(self, x2: torch.Tensor, index: int | None) -> torch.Tensor | None:
        if self.bits == 8:
            if not kernels.int8_cpu() or self.shape[-1] % kernels.INT8_K_MULTIPLE:
                return None
            s = self._cache.get("scales_bf16")
            if s is None:
                s = self._cache["scales_bf16"] = self.scales.to(torch.bfloat16)
            if self.qweight.data_ptr() % kernels.ALIGN:  # a view of a mapped file may not be: align once
                self.qweight = kernels.aligned(self.qweight)
            # An expert's slice of the aligned stack is aligned unless its N*K bytes are not a multiple.
            q = self.qweight if index is None else kernels.aligned(self.qweight[index])
            return kernels.int8_mm(x2, q, s if index is None else s[index])
        block = kernels.int4_cpu_block()
        N = self.shape[-2]
        if block is None or N % block or self.group_size not in kernels.INT4_KERNEL_GROUPS:
            return None
        if self._layout is None:
            self._to_kernel_layout(block)
        sz = self._cache.get("scale_zero")
        if sz is None:  # [..., K/g, N, 2] in bf16, as the kernel wants
            sz = self._cache["scale_zero"] = torch.stack([self.scales, self.zeros], -1).transpose(-3, -2).contiguous()
        q = self.qweight if index is None else self.qweight[index]
        return kernels.int4_mm(x2, q, self.group_size, sz if index is None else sz[index])

    def _to_kernel_layout(self, block: int) -> None:
        """Rewrite qweight, in place, in the CPU int4 kernel's layout (state_dict still saves row-major)."""
        q = self.qweight.reshape(-1, self.qweight.shape[-1])
        out = torch.empty_like(q)
        step = max(block, (_CHUNK // q.shape[1]) // block * block)
        for r0 in range(0, q.shape[0], step):
            out[r0:r0 + step] = kernels.pack_int4_cpu(unpack_nibbles(q[r0:r0 + step]), block)
        self.qweight = out.view(self.qweight.shape)
        self._layout = block

    def row_major_qweight(self) -> torch.Tensor:
        if self._layout is None:
            return self.qweight
        q = self.qweight.reshape(-1, self.qweight.shape[-1])
        return pack_nibbles(kernels.unpack_int4_cpu(q, self._layout)).view(self.qweight.shape)

    # -- nn.Module plumbing -----------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._layout is not None:
            destination[prefix + "qweight"] = self.row_major_qweight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, buf in self._buffers.items():
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype != buf.dtype:
                error_msgs.append(f"{prefix}{name} is stored as {t.dtype}, but int{self.bits} weights keep "
                                  f"{name} as {buf.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._layout = None
        self._cache.clear()

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` changes the compute dtype; devices move; the stored formats never change."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.qweight.device)).dtype
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = fn(buf).to(buf.dtype)
        self._cache.clear()
        return self


class _Slice(_TensorLike):
    """Expert `index` of a stacked QuantizedTensor: what `experts.gate_up_proj[e]` returns."""

    def __init__(self, parent: QuantizedTensor, index: int):
        self.parent, self.index = parent, index
        self.shape, self.dtype = parent.shape[1:], parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.parent.linear(x, self.index)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantize())

    def dequantize(self) -> torch.Tensor:
        return self.parent.dequantize(self.index)


def quantized_nbytes(shape, bits: int, group_size: int | None) -> int:
    """Bytes a weight of float `shape` takes quantized (buffers only), without building it."""
    n = math.prod(shape)
    rows = n // shape[-1]
    cols = 4 * math.prod(shape[:-2]) * shape[-1]
    if bits == 8:
        return n + 4 * rows + cols
    return n // 2 + 2 * 2 * rows * (shape[-1] // group_size) + cols
