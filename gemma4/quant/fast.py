"""The CPU decode fast path of a quantized model: its linears repacked for fbgemm, fused, the head rescored.

A quantized checkpoint run as stored calls one weight-only kernel per linear through
`QuantizedTensor.__torch_function__` (bf16 activations, ~130 calls a token on gemma-3-270m) and
reads its int8 LM head with `_weight_int8pack_mm`, which is compute-bound on a CPU: slower than the
float model's fp16 fast path (docs/benchmarks.md). `speed_up_quantized` (what `speed_up` does to a
quantized model) makes it the float path's shape, over the *stored* codes:
- q/k/v and gate/up fused into one linear each (`engine.fuse`'s classes), where their formats agree;
- int8 weights packed for fbgemm as stored (per-row scales: no second rounding) and multiplied
  with each activation row sent as two int8 rows, coarse and residual (`two_pass_int8`: ~1e-4
  relative error, batch-invariant);
- int4 weights through torch's int4 CPU kernel (`int4="int4pack"`, bf16 activations, half the
  bytes) or, `int4="int8"`, re-rounded per row to int8 for fbgemm;
- the tied head (an int8 table) scored by fbgemm in int8 (or, `head="int4"`, from an int4 copy),
  its `k` best recomputed exactly from the table in fp32 (`RescoredTable`), as the float path
  does with its fp32 table.
Column scales and rotations (tensor.py) are applied to the activations first, as stored.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..engine import cpu
from ..engine.fuse import FusedAttention, FusedMLP
from ..engine.attend import swap_attention
from ..engine.norm import swap_norms
from ..model.attention import Attention
from ..model.layers import MLP
from .tensor import QuantizedTensor, quantize_int4, quantize_int8, rotate

INT4_KERNELS = ("int4pack", "int8")


def _qt(linear: nn.Module | None) -> QuantizedTensor | None:
    """The 2-d quantized weight of a bias-free nn.Linear on the CPU, else None."""
    if type(linear) is not nn.Linear or linear.bias is not None:
        return None
    w = linear.weight
    return w if isinstance(w, QuantizedTensor) and len(w.shape) == 2 and w.device.type == "cpu" else None


def concat(parts: list[QuantizedTensor]) -> QuantizedTensor | None:
    """One QuantizedTensor with the rows of `parts` in order, or None unless they share their format
    (bits, group, rotation, column scales): then x W^T of the whole splits into the parts' outputs."""
    first = parts[0]
    same = all(p.bits == first.bits and p.group_size == first.group_size and p.rotation == first.rotation
               and p.shape[-1] == first.shape[-1] and torch.equal(p.col_scales, first.col_scales) for p in parts)
    if not same:
        return None
    out = QuantizedTensor((sum(p.shape[0] for p in parts), first.shape[-1]), first.bits, first.group_size,
                          first.dtype, "cpu", first.rotation)
    out.qweight = torch.cat([p.row_major_qweight() for p in parts])
    out.scales = torch.cat([p.scales for p in parts])
    if first.bits == 4:
        out.zeros = torch.cat([p.zeros for p in parts])
    out.col_scales = first.col_scales.clone()
    return out


def int8_codes(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], fp32 scales [N]) of the stored (column-scaled, rotated) weight: as stored
    for int8, rounded once more, per row, for int4."""
    if qt.bits == 8:
        return qt.qweight, qt.scales
    return quantize_int8(qt._raw(None, 0, qt.shape[0], torch.float32))


ACT_LEVELS = 127  # fbgemm's dynamic activations, with reduce_range: 7 bits, codes 0..127


def _two_pass(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase, sums: torch.Tensor,
              levels: float) -> torch.Tensor:
    M = x.shape[0]
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    u = (x - lo) / span
    coarse = torch.round(u * levels).div_(levels)
    r = u.sub_(coarse)
    rlo, rhi = torch.aminmax(r, dim=-1, keepdim=True)
    rspan = torch.where(rhi > rlo, rhi - rlo, torch.ones_like(rhi))
    y = torch.ops.quantized.linear_dynamic(torch.cat([coarse, r.sub_(rlo).div_(rspan)]), packed, True)
    # x = lo + span (coarse + rlo + rspan v), so x W^T = span (coarse W^T) + span rspan (v W^T) + (lo + span rlo) W 1
    return y[:M].mul_(span).addcmul_(y[M:], span * rspan).addcmul_(lo + span * rlo, sums)


def _scripted(fn):
    """`fn` compiled by TorchScript where this torch has it: its ~20 small ops then dispatch without
    Python (and the packed weight binds without the ~30 us Python toll, as in engine.cpu)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - a torch without TorchScript: plain Python, slower
        return fn


_two_pass_call = _scripted(_two_pass)


def two_pass_int8(x: torch.Tensor, packed: cpu.PackedLinear) -> torch.Tensor:
    """x [M, K] fp32 @ W^T for an int8 `packed` W, with activations to ~14 bits in int8 arithmetic.

    One int8 pass rounds each activation row to 7 bits (1.4% relative error on a Gaussian row:
    through 18 layers it moved gemma-3-270m's top logit by ~10). So each row u, mapped onto [0, 1]
    by its min and span, is sent as two rows: u rounded to fbgemm's grid (k / 127, on which
    fbgemm's own rounding is exact) and the residual u - that, mapped onto [0, 1] in turn. One
    GEMM of 2M rows reads the weight once; the two results add up to x W^T with the residual's
    rounding (1/127 of 1/127) as the only activation error, below bf16's 2^-9."""
    return _two_pass_call(x, packed.packed, packed.sums, float(ACT_LEVELS))


class QuantLinear(nn.Module):
    """y = x W^T for a QuantizedTensor W, by fbgemm on int8 codes or by W's own int4 kernel."""

    def __init__(self, qt: QuantizedTensor, int4: str = "int4pack", exact: bool = True):
        super().__init__()
        self.exact = exact  # two int8 passes over the activations (`two_pass_int8`), else one
        self.out_features, self.in_features = qt.shape
        self.rotation = qt.rotation
        self.cols = None if bool((qt.col_scales == 1).all()) else qt.col_scales.float()
        if qt.bits == 4 and int4 == "int4pack":
            self.packed, self.qt = None, qt  # its `linear` applies columns and rotation itself
        else:
            self.packed, self.qt = cpu.PackedLinear.from_int8(*int8_codes(qt)), None
        self.nbytes = self.packed.nbytes if self.qt is None else qt.qweight.numel()  # weight bytes a step reads

    def extra_repr(self) -> str:
        kind = "int4 kernel" if self.packed is None else "fbgemm int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self.qt.linear(x)
        if x.dtype != torch.float32:
            return self.forward(x.float()).to(x.dtype)
        if self.cols is not None:
            x = x * self.cols
        x = rotate(x, self.rotation)
        if not self.exact:
            return self.packed(x)
        return two_pass_int8(x.reshape(-1, self.in_features), self.packed).view(*x.shape[:-1], self.out_features)


HEAD_SCORES = ("int8", "int4")
HEAD_GROUP = 64


def int4_copy(table: QuantizedTensor) -> QuantizedTensor:
    """An int4 (groups of HEAD_GROUP) copy of a 2-d table's stored weight, same columns and rotation,
    built a chunk of rows at a time."""
    N, K = table.shape
    out = QuantizedTensor((N, K), 4, HEAD_GROUP, table.dtype, "cpu", table.rotation)
    qs, ss, zs = [], [], []
    step = max(64, (1 << 20) // K // 64 * 64)
    for r0 in range(0, N, step):
        q, sc, z = quantize_int4(table._raw(None, r0, min(N, r0 + step), torch.float32), HEAD_GROUP)
        qs.append(q), ss.append(sc), zs.append(z)
    out.qweight, out.scales, out.zeros = torch.cat(qs), torch.cat(ss), torch.cat(zs)
    out.col_scales = table.col_scales.clone()
    return out


class RescoredTable(nn.Module):
    """The tied head over an int8 (or int4) token table: fbgemm int8 scores of the whole
    vocabulary, the `k` best recomputed exactly (fp32 activations against the table's own rows).

    The returned logits are the quantized model's own at those k and within int8-activation
    error elsewhere, so the argmax is the weight-only model's unless its best scores below
    the k-th int8 candidate (the float path's `RescoredHead`, over the stored table)."""

    def __init__(self, table: QuantizedTensor, k: int = 64, scores: str = "int8"):
        super().__init__()
        if scores not in HEAD_SCORES:
            raise ValueError(f"unknown head scores {scores!r}; use one of {', '.join(HEAD_SCORES)}")
        # "int4": scores from an int4 copy of the table (groups of 64; + ~32% of the table's memory),
        # read at half the bytes of int8 by torch's int4 kernel; the rescored top is exact either way.
        int4 = scores == "int4" and table.shape[-1] % HEAD_GROUP == 0  # else int8 scores
        self.approx = QuantLinear(int4_copy(table) if int4 else table, int4="int4pack", exact=False)
        self.table, self.k = table, k  # shared with the embedding lookup, not a copy

    def extra_repr(self) -> str:
        return f"rescored top k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.approx(x)
        index = cpu.top_indices(scores, self.k)
        exact = (self.table.rows(index).float() @ x.float().unsqueeze(-1)).squeeze(-1)
        return scores.scatter(-1, index, exact.to(scores.dtype))


def _fuse(module: nn.Module, cls: type, fused_name: str, names: list[str], int4: str) -> bool:
    parts = [_qt(getattr(module, n)) for n in names]
    if any(p is None for p in parts):
        return False
    whole = concat(parts)
    if whole is None:
        return False
    sizes = [p.shape[0] for p in parts]
    for n in names:
        setattr(module, n, None)
    setattr(module, fused_name, QuantLinear(whole, int4))
    module.__class__ = cls
    if cls is FusedAttention:
        module.qkv_sizes = sizes
    return True


def speed_up_quantized(model: nn.Module, int4: str = "int4pack", k: int = 64, head: str = "int8") -> bool:
    """Put a CPU model's quantized linears (and a quantized tied head) on the fast kernels and its
    norms and attention on the one-call kernels (`engine.norm`, `engine.attend`), in place; True if
    the model had any quantized linears. A no-op (False) without fbgemm's int8 kernels or quantized
    weights."""
    if int4 not in INT4_KERNELS:
        raise ValueError(f"unknown int4 kernel {int4!r}; use one of {', '.join(INT4_KERNELS)}")
    if not any(isinstance(m, QuantizedTensor) and m.device.type == "cpu" for m in model.modules()):
        return False
    if not cpu.fbgemm_works("int8-dynamic"):
        return False
    for module in list(model.modules()):
        if type(module) is Attention:  # the projections it has, as engine.fuse names them
            names = ["q_proj"] + ([] if module.spec.shares_kv else ["k_proj"] + ["v_proj"] * (module.v_proj is not None))
            if len(names) > 1:
                _fuse(module, FusedAttention, "qkv_proj", names, int4)
        elif type(module) is MLP:
            _fuse(module, FusedMLP, "gate_up_proj", ["gate_proj", "up_proj"], int4)
    for parent in list(model.modules()):
        if isinstance(parent, (nn.Linear, QuantizedTensor)):
            continue
        for name, child in list(parent.named_children()):
            qt = _qt(child)
            if qt is not None:
                setattr(parent, name, QuantLinear(qt, int4))
    table = getattr(getattr(model, "model", None), "embed_tokens", None)
    table = getattr(table, "weight", None)
    if getattr(model, "lm_head", 1) is None and isinstance(table, QuantizedTensor) and len(table.shape) == 2:
        model.lm_head = RescoredTable(table, k, head)
    swap_norms(model)  # as the float fast path does
    swap_attention(model)
    return True


cpu.OTHER_PACKERS.append(speed_up_quantized)
