"""RMSNorm in one C call for eager CPU decoding (`speed_up` swaps it in; the model keeps its own).

torch's CPU `rms_norm` runs ~8 ops in eager mode and Gemma 3's zero-centred weight adds one more
(offset + w) per call; a decode step of gemma-3-270m has 109 norms, ~2.4 ms of a ~20 ms step. The
swapped module computes the same thing in one kernel call (kernels/cpu_kernels.c) and keeps the
precomputed weight; under torch.compile, or off the fast path's case (fp32 on the CPU), it runs
torch's own op on that weight, which inductor fuses anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import RMSNorm
from .kernels import library


class FastRMSNorm(nn.Module):
    """`RMSNorm` with its effective weight (offset + w) computed once and a one-call CPU kernel."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps = norm.eps
        w = None if norm.weight is None else norm.weight.detach().float() + norm.offset
        # A parameter (frozen), as the norm's weight was: code that finds a model's device and dtype
        # from its parameters still does on a quantized model, whose norms may be all it has.
        self.scale = None if w is None else nn.Parameter(w.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = None if torch.compiler.is_compiling() else library()  # a trace must not reach ctypes
        if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad:
            return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).type_as(x)
        x = x.contiguous()
        y = torch.empty_like(x)
        lib.rms_norm(x.data_ptr(), None if self.scale is None else self.scale.data_ptr(), y.data_ptr(),
                           x.numel() // x.shape[-1], x.shape[-1], self.eps)
        return y


def swap_norms(model: nn.Module) -> int:
    """Replace every `RMSNorm` of a CPU fp32 model by a `FastRMSNorm` (in place); the count swapped.
    Nothing is swapped where the kernels cannot be built."""
    if library() is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RMSNorm and (child.weight is None or child.weight.dtype == torch.float32):
                setattr(parent, name, FastRMSNorm(child))
                swapped += 1
    return swapped
