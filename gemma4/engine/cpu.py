"""Faster CPU decoding of a float model: linears repacked for fbgemm (PyTorch's x86 GEMM library).

Batch-1 decoding reads every weight once per token, so on a CPU its speed is memory bandwidth
over weight bytes: gemma-3-270m in fp32 reads ~1 GB per token, 60% of it the tied 262144 x 640
head. What halves the bytes without changing the output is fp16 *storage* with fp32 arithmetic:
fbgemm's fp16 GEMM converts weights on the fly (F16C) and keeps activations in fp32, so the only
error is the weights' rounding (2^-11 relative). PyTorch's other low-bit CPU kernels round the
activations instead (int8/int4 weight-only: to bf16, whose step is 2^-8 of values that reach
~100 in Gemma's final hidden states), and on AVX2 machines they are compute-bound, no faster
than fp32 (docs/benchmarks.md has the figures).

    pack_linears(model, "fp16")           # every nn.Linear and the tied head; in place
    pack_linears(model, "int8-dynamic")   # int8 weights x int8 activations (per row): fastest,
                                          # but it changes greedy output

Packed models are for inference: the packed weights are opaque fbgemm objects, not parameters
(state_dict no longer holds the linears). torch.compile cannot trace such objects, so the matmul
is an operator (`gemma4::fbgemm_linear`) that names its weight by a handle: a compiled decode
step (Engine(mode="compile")) calls it like any other kernel. The embedding lookup keeps
its float table; the head gets a packed copy of it.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .attend import swap_attention
from .fuse import fuse_projections
from .norm import swap_norms

FORMATS = ("fp16", "int8-dynamic")

# (packed weight, row sums of the int8 weight or None) by handle; each PackedLinear removes its
# entry when it is garbage-collected.
_PACKED: dict[int, tuple] = {}
_HANDLES = itertools.count()


# The matmul as an operator, so a compiled step can call it: defined with the low-level library
# API, whose dispatch costs a few microseconds, where `torch.library.custom_op`'s Python wrappers
# cost ~50 us per call (a decode step makes ~130 of them).
_LIB = torch.library.Library("gemma4", "FRAGMENT")
_LIB.define("fbgemm_linear(Tensor x, int handle, int out_features, bool int8) -> Tensor")


def _fbgemm_caller():
    """The fbgemm op calls, compiled by TorchScript where this torch has it: from Python, binding the
    packed weight argument costs ~33 us a call (more than a 640 x 1024 fp16 matmul), which the
    TorchScript interpreter does not pay: gemma-3-270m's compiled decode step saves ~4 ms a token.
    The int8 call's activation mapping runs in the same function (six small ops without Python's
    per-op cost: an MTP drafter's step has sixteen such linears)."""

    def call(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, packed)

    def call_int8(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase,
                  sums: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant row maps to 0
        # reduce_range: 7-bit activations, so fbgemm's int16 pair sums cannot saturate on AVX2
        return torch.ops.quantized.linear_dynamic((x - lo) / span, packed, True).mul_(span).addcmul_(lo, sums)

    try:
        with warnings.catch_warnings():  # deprecated, but nothing else calls a torchbind op from C++
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(call), torch.jit.script(call_int8)
    except Exception:  # noqa: BLE001 - a torch without TorchScript: the plain calls, slower
        return call, call_int8


_fbgemm_call, _fbgemm_call_int8 = _fbgemm_caller()


def _fbgemm_linear(x: torch.Tensor, handle: int, out_features: int, int8: bool) -> torch.Tensor:
    """x [..., K] fp32 @ the packed weight `handle` [N, K]^T -> [..., N] fp32.

    fbgemm quantizes int8 activations with one scale for the whole input, so a row's result (and
    the rescored head's candidates, hence a greedy pick) would depend on the other rows of its
    batch. Each row is mapped onto [0, 1] by its own min and span instead: every input then spans
    exactly [0, 1], so its quantization is the same whatever the batch, and
    x W^T = span * (x' W^T) + min * (W 1) undoes the map."""
    packed, sums = _PACKED[handle]
    return _fbgemm_call_int8(x, packed, sums) if int8 else _fbgemm_call(x, packed)


_LIB.impl("fbgemm_linear", _fbgemm_linear, "CPU")


@torch.library.register_fake("gemma4::fbgemm_linear", lib=_LIB)
def _(x: torch.Tensor, handle: int, out_features: int, int8: bool) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@functools.cache
def fbgemm_works(fmt: str) -> bool:
    """Whether this torch build has fbgemm's CPU kernels for `fmt` and they compute a matmul (probed once)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 64, generator=gen) / 8, torch.randn(3, 64, generator=gen)
    try:
        got = PackedLinear(w, fmt)(x)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    want = x @ w.T
    return bool(torch.allclose(got, want, rtol=0.05, atol=0.05 * want.abs().max().item()))


class PackedLinear(nn.Module):
    """y = x W^T with W [N, K] packed for fbgemm: fp16 weights (fp32 math), or int8 weights per
    output channel with int8 activations quantized per row ("int8-dynamic"; batch-invariant)."""

    def __init__(self, weight: torch.Tensor, fmt: str = "fp16"):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown packed format {fmt!r}; use one of {', '.join(FORMATS)}")
        w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.out_features, self.in_features = w.shape
        self.fmt, self.int8 = fmt, fmt == "int8-dynamic"
        if fmt == "fp16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        else:
            scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user type, not as fbgemm input
                warnings.simplefilter("ignore")
                q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self._pack_int8(q)
        self._register(w.numel() * (2 if fmt == "fp16" else 1))

    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scales: torch.Tensor) -> PackedLinear:
        """An "int8-dynamic" PackedLinear of an already quantized weight: int8 codes [N, K] (symmetric,
        in [-127, 127]) times per-row `scales` [N], packed as they are (no second rounding)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = qweight.shape
        self.fmt, self.int8 = "int8-dynamic", True
        s = scales.detach().double().clamp(min=1e-12).cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(qweight.detach().cpu().contiguous(), s,
                                                         torch.zeros_like(s, dtype=torch.long), 0)
        self._pack_int8(q)
        self._register(qweight.numel())
        return self

    def _pack_int8(self, q: torch.Tensor) -> None:
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        # W 1, to undo the activations' shift: integer row sums times the scales, without a float copy of W
        self.sums = (q.int_repr().sum(1, dtype=torch.int64).double() * q.q_per_channel_scales()).float()

    def _register(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.handle = next(_HANDLES)
        _PACKED[self.handle] = (self.packed, getattr(self, "sums", None))
        weakref.finalize(self, _PACKED.pop, self.handle, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return self.forward(x.float()).to(x.dtype)
        if x.dim() == 1:  # fbgemm takes rows; nn.Linear also takes one vector (e.g. the server's last hidden)
            return self.forward(x[None])[0]
        if torch.compiler.is_compiling():
            return torch.ops.gemma4.fbgemm_linear(x, self.handle, self.out_features, self.int8)
        return _fbgemm_linear(x, self.handle, self.out_features, self.int8)


class RescoredHead(nn.Module):
    """The LM head as int8 scores of the whole vocabulary, with the `k` best recomputed exactly.

    The head is most of a small model's bytes per token (gemma-3-270m: 168M of 268M parameters).
    Read as int8 it costs a quarter of fp32, but int8 activations move logits enough to change
    greedy picks. Only the top of the distribution decides greedy (and nearly all of a sampled
    pick), so the `k` best int8 candidates are recomputed in fp32 from the float weight, a gather
    of k rows: the returned logits are exact there and within int8 error elsewhere. The argmax
    equals the float model's unless the true best scores below the k-th int8 candidate.
    """

    def __init__(self, weight: torch.Tensor, k: int = 64):
        super().__init__()
        self.approx = PackedLinear(weight, "int8-dynamic")
        self.k = k
        self.weight = weight  # shared with the embedding (a tied head), not a copy; not a parameter

    def extra_repr(self) -> str:
        return f"rescored top k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.approx(x)
        index = top_indices(scores, self.k)
        exact = (self.weight[index] @ x.to(self.weight.dtype).unsqueeze(-1)).squeeze(-1)
        return scores.scatter(-1, index, exact.to(scores.dtype))


def top_indices(scores: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """The indices of the `k` largest of `scores` [..., V] along the last dim, unordered: `topk`'s
    set, ~4x faster on a CPU vocabulary (262144: 0.25 ms instead of 0.95 ms). Every one of the k
    largest lies in a block of `block` whose maximum is among the k largest block maxima, so topk
    runs over the block maxima, then over the k * block values of the blocks it picked."""
    V = scores.shape[-1]
    if V % block or V < 4 * k * block:
        return scores.topk(k, -1, sorted=False).indices
    blocks = scores.unflatten(-1, (-1, block))
    chosen = blocks.amax(-1).topk(k, -1, sorted=False).indices  # [..., k] block numbers
    values = blocks.gather(-2, chosen.unsqueeze(-1).expand(*chosen.shape, block)).flatten(-2)
    inner = values.topk(k, -1, sorted=False).indices  # [..., k] into the k * block values
    return chosen.gather(-1, inner // block) * block + inner % block


HEADS = ("rescored", *FORMATS)


def pack_linears(model: nn.Module, fmt: str = "fp16", head: str | None = "rescored", k: int = 64,
                 fuse: bool = True) -> nn.Module:
    """Swap every nn.Linear of a CPU float model for a PackedLinear (in place) and return the model.

    `fuse` first fuses each layer's q/k/v and gate/up linears (`engine.fuse`): each fbgemm
    call has a fixed cost of tens of us, and fusing saves 54 of gemma-3-270m's 126 calls a token.

    `head` packs a tied LM head too (as `model.lm_head`; the embedding keeps its float table):
    "rescored" (`RescoredHead`, greedy output unchanged), a packed format, or None (float).
    The default, fp16 weights and a rescored head, kept the 40-token greedy continuations of the
    real gemma-3-270m equal to float32's on every reference prompt (tests/engine/test_fast_paths.py).
    Raises if fbgemm's kernels are missing or wrong on this machine/torch build.
    """
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head format {head!r}; use one of {', '.join(HEADS)} or None")
    for f in {fmt, "int8-dynamic" if head == "rescored" else head} - {None}:
        if not fbgemm_works(f):
            raise RuntimeError(f"fbgemm {f} kernels are not available in this torch build/CPU; use the float model")
    if fuse:
        fuse_projections(model)
    jobs = {}  # (parent, attribute) -> a function that builds its replacement; the longest first
    if head and getattr(model, "lm_head", 1) is None:  # tied: the head multiplies by the embedding table
        table = model.model.embed_tokens.weight
        jobs[model, "lm_head"] = functools.partial(RescoredHead if head == "rescored" else PackedLinear, table,
                                                   k if head == "rescored" else head)
    for parent in list(model.modules()):
        if isinstance(parent, nn.Linear):  # e.g. a LoRA layer: its own factors stay trainable floats
            continue
        for name, child in list(parent.named_children()):
            w = child.weight if type(child) is nn.Linear else None
            if isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.is_floating_point():
                jobs[parent, name] = functools.partial(PackedLinear, w, fmt)
    # fbgemm packs on one core and releases the GIL: the body is packed while the head is (gemma-3-270m
    # on 2 cores: 5.9-6.8 s instead of 6.9-7.3 s, decode speed unchanged; slicing the head to pack it
    # in parallel saved 2 s more but cost ~1.5 ms per decode step).
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        built = list(pool.map(lambda make: make(), jobs.values()))
    for (parent, name), module in zip(jobs, built):
        setattr(parent, name, module)
    return model


# Fast paths for models whose weights are not float tensors, registered by the package that makes
# them (gemma4.quant: the engine may not import the layers above it). Each takes the model and
# returns True if it applied itself.
OTHER_PACKERS: list = []


def speed_up(model: nn.Module) -> bool:
    """Apply the CPU decode fast path to a float32 CPU model, in place, where fbgemm is available;
    True if applied: `pack_linears` defaults (fp16 linears, the rescored head), one-call norms and
    attention (`engine.norm`, `engine.attend`). Greedy output is unchanged (see pack_linears);
    sampled logits differ from float32 by fp16 weight rounding and, off the top 64, int8 error.
    A model of other weights (quantized) goes to the packers in OTHER_PACKERS
    (`gemma4.quant.speed_up_quantized`)."""
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return True  # packed already (e.g. a model loaded once and used by several commands)
    weight = model.model.embed_tokens.weight
    if not isinstance(weight, torch.Tensor):  # e.g. quantized: a packer registered by its package, if any
        return any(pack(model) for pack in OTHER_PACKERS)
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False  # a GPU or half-precision model
    if not (fbgemm_works("fp16") and fbgemm_works("int8-dynamic")):
        return False
    pack_linears(model)
    swap_norms(model)
    swap_attention(model)
    return True
