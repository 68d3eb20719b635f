"""GPTQ: int4 linear layers that cancel their own rounding error, measured on a calibration text.

Round to nearest quantizes every weight alone. GPTQ (Frantar et al., 2022) quantizes a layer's
input columns one at a time and, after each, moves the columns not yet quantized so as to cancel
the error it just made on the layer's outputs, weighed by H = sum of x x^T over calibration inputs
x. Before that, each weight is rotated by a block Hadamard matrix (as in QuIP# and QuaRot), which
spreads a group's outliers over its block so that 16 levels fit it better; the activations take
the same rotation at run time (`QuantizedTensor.rotation`).

Decoder layers are done in order on cached hidden states: one float pass records the first
layer's inputs and every layer's other arguments; then each layer runs twice on the cached
stream, once with float weights to measure its linears' H and once quantized to make the next
layer's inputs, so later layers see (and correct for) the error of earlier ones, only one layer's
H is held at a time, and the cost is two layer passes per layer, not a forward pass per layer.
Embeddings, MoE experts, linears outside the decoder layers and whatever the predicate makes int8
are rounded to nearest as usual.

What H is measured on matters more than any setting here: GPTQ fits each layer to the inputs it
sees, and leaves the directions they do not use nearly unconstrained. On gemma-3-270m, int4 group 64,
calibrated on the shipped text (`CALIBRATION_TEXT`: varied ordinary English, ~9,800 tokens),
perplexity on the held-out prose texts (tests/data/eval) rose +4.3% to +8.0% on the essays and
+4.5% to +9.2% on the sketches over eight sign draws; calibrated on this repository's docs
(markdown, tables, commands) single draws rose +8% to +27%, against +98% rounded to nearest
(docs/benchmarks.md, "A calibration text of ordinary prose").

    model, tokenizer, _ = gemma4.load(path, dtype="float32")
    gptq_quantize(model, tokenizer.encode(CALIBRATION_TEXT.read_text()))
    save_quantized(model, "out/")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.decoder import DecoderLayer
from .quantize import Predicate, _swap, default_predicate, plan, quantize
from .tensor import ROTATION_BLOCKS, QuantizedTensor, int4_codes, int4_grid, pack_nibbles, rotate

# Ordinary English of many kinds, written for the project (data/README.md): GPTQ fits each layer to
# the inputs it is calibrated on, and the repository's docs, used before, fit prose badly.
CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
DEFAULT_ROTATION = 128
DEFAULT_DAMP = 0.1  # added to H's diagonal, as a fraction of its mean: keeps H invertible
# Sign patterns tried per linear (`gptq_best`). Calibrated on the shipped text, single draws put the
# 270M's int4 g64 rise on the essays at +4.3% to +8.0% (eight draws, mean +6.2%), and the best of 4
# by output error at +7.3% and +5.3%: no better than their draws' mean, at 1.5x the time.
DEFAULT_DRAWS = 1


class _Stop(Exception):
    """Raised when the last layer's inputs are recorded, to skip the rest of the forward pass."""


@torch.no_grad()
def gptq_quantize(model: nn.Module, ids: Sequence[int] | torch.Tensor, group_size: int = 64,
                  predicate: Predicate = default_predicate, rotation: int = DEFAULT_ROTATION,
                  damp: float = DEFAULT_DAMP, chunk: int = 512, draws: int = DEFAULT_DRAWS, seed: int = 0,
                  progress: bool | None = None) -> nn.Module:
    """Quantize a float `model` to int4 in place: GPTQ for its decoder layers' linears, calibrated
    on `ids` (1-d token ids of ordinary text, run in windows of `chunk`); returns the model.

    Each linear is solved under `draws` random sign patterns (numbered from `seed`) and keeps the
    one with the least error on its calibration outputs (`gptq_best`)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ValueError("calibration needs at least 2 tokens of text")
    if rotation not in ROTATION_BLOCKS:
        raise ValueError(f"rotation must be one of {ROTATION_BLOCKS}, got {rotation}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    todo = plan(model, "int4", group_size, predicate)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DecoderLayer)]
    device = next(model.parameters()).device
    stream = _record_inputs(model, [m for _, m in layers], ids.to(device), chunk)
    for prefix, layer in tqdm(layers, desc="GPTQ", unit="layer",
                              disable=None if progress is None else not progress, leave=False):
        linears = [(name, m) for name, m in layer.named_modules()
                   if type(m) is nn.Linear and todo.get(f"{prefix}.{name}.weight", {}).get("bits") == 4]
        hessians = _hessians(layer, linears, stream)
        for name, linear in linears:
            group = todo[f"{prefix}.{name}.weight"]["group_size"]
            block = _block(linear.in_features, rotation)
            tries = range(seed, seed + (draws if block else 1))  # unrotated: no signs, one solve
            qt = gptq_best(linear.weight, hessians.pop(name), group, block, damp, tries)
            _swap(model, f"{prefix}.{name}.weight", qt)
        for c in stream:  # on to the next layer, through this one's quantized weights
            c.run(layer)
    return quantize(model, "int4", group_size, predicate, progress=False)  # the rest: round to nearest


class _Chunk:
    """One calibration window on its way through the decoder: the hidden state entering the next
    layer, each layer's other arguments (recorded once: RoPE tables, masks, PLE inputs) and the
    latest K/V per layer type (what KV-sharing layers read)."""

    def __init__(self, h: torch.Tensor, args: list):
        self.h, self.args, self.kv, self.index = h, args, {}, 0

    def forward(self, layer: DecoderLayer):
        """The layer's (hidden state, K/V) on this window, without moving the window on."""
        spec, (args, kwargs) = layer.spec, self.args[self.index]
        return layer(self.h, *args, **kwargs, kv=self.kv.get(spec.type) if spec.shares_kv else None)

    def run(self, layer: DecoderLayer) -> None:
        """Move the window on through `layer`."""
        self.h, self.kv[layer.spec.type] = self.forward(layer)
        self.index += 1


def _record_inputs(model: nn.Module, layers: list[DecoderLayer], ids: torch.Tensor, chunk: int) -> list[_Chunk]:
    """A float forward pass per window that records the first layer's hidden state and every
    layer's other arguments, stopping before the last layer runs."""
    chunks: list[_Chunk] = []

    def hook(i: int):
        def pre(module, args, kwargs):
            if i == 0:
                chunks.append(_Chunk(args[0], []))
            chunks[-1].args.append((args[1:], {k: v for k, v in kwargs.items() if k != "kv"}))
            if i == len(layers) - 1:
                raise _Stop
        return pre

    hooks = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for s in range(0, ids.numel(), chunk):
            try:
                model.decode(ids[None, s:s + chunk])  # hidden states only: no head
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return chunks


def _hessians(layer: DecoderLayer, linears: list[tuple[str, nn.Linear]], stream: list[_Chunk]) -> dict[str, torch.Tensor]:
    """{linear name: sum of x^T x over its inputs x} as `stream` runs through `layer` (not advanced)."""
    sums: dict[str, torch.Tensor] = {}
    shared: list[tuple[torch.Tensor, torch.Tensor]] = []  # q/k/v (gate/up) share one input: one product

    def record(name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            h = next((h for seen, h in shared if seen is x), None)
            if h is None:
                x2 = x.reshape(-1, x.shape[-1]).float()
                h = x2.T @ x2
                shared.append((x, h))  # holding x keeps its storage from being reused this chunk
            sums[name] = sums[name] + h if name in sums else h.clone()
        return hook

    hooks = [linear.register_forward_hook(record(name)) for name, linear in linears]
    try:
        for c in stream:
            shared.clear()
            c.forward(layer)
    finally:
        for h in hooks:
            h.remove()
    return sums


def _block(k: int, rotation: int) -> int:
    """The largest Hadamard block up to `rotation` that divides the row length k (0: none)."""
    return next((b for b in sorted(ROTATION_BLOCKS, reverse=True) if b <= rotation and b and k % b == 0), 0)


def gptq_best(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, rotation: int,
              damp: float, draws: Sequence[int]) -> QuantizedTensor:
    """The `gptq_tensor` over the sign draws `draws` whose error E = Q - W costs the least on the
    calibration outputs: trace(E H E^T) = sum over inputs x of |x E^T|^2."""
    best, least = None, float("inf")
    for draw in draws:
        qt = gptq_tensor(weight, hessian, group_size, rotation, damp, draw=draw)
        if len(draws) == 1:
            return qt
        e = qt.dequantize().float() - weight.detach().float()
        cost = ((e @ hessian.float()) * e).sum().item()
        if cost < least:
            best, least = qt, cost
    return best


def gptq_tensor(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, rotation: int = 0,
                damp: float = DEFAULT_DAMP, block: int = 128, draw: int = 0) -> QuantizedTensor:
    """int4 `QuantizedTensor` of a [N, K] weight by GPTQ, given H = sum x^T x [K, K] of its inputs.

    With a rotation, `draw` numbers the pattern of random signs taken (reproducibly)."""
    N, K = weight.shape
    # Random signs before the rotation (stored as column scales of +-1), as QuIP# does: without
    # them every block's first Hadamard column is a plain sum of its inputs.
    gen = torch.Generator().manual_seed(K + 1000003 * draw)
    signs = (torch.randint(0, 2, (K,), generator=gen) * 2 - 1).float()
    signs = signs.to(weight.device) if rotation else torch.ones(K, device=weight.device)
    w = rotate(weight.detach().float() * signs, rotation).clone()  # updated in place below
    h = hessian.float() * signs[:, None] * signs
    h = rotate(rotate(h, rotation).T, rotation).clone()  # R^T D H D R (R symmetric)
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_cholesky(h, damp)
    block = max(block, group_size)
    codes = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, K // group_size, dtype=torch.bfloat16, device=w.device)
    zeros = torch.empty_like(scales)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        wb, err = w[:, b0:b1].clone(), torch.empty(N, b1 - b0, device=w.device)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:  # the group's grid, from its weights as updated so far
                g = col // group_size
                scales[:, g], zeros[:, g] = int4_grid(wb[:, i:i + group_size])
                s, z = scales[:, g].float(), zeros[:, g].float()
            c = int4_codes(wb[:, i], s, z)
            codes[:, col] = c
            err[:, i] = (wb[:, i] - ((c.float() - 8) * s + z)) / hb[i, i]
            wb[:, i:] -= err[:, i:i + 1] * hb[i, i:]
        w[:, b1:] -= err @ hinv[b0:b1, b1:]  # carry the block's error to the later columns
    qt = QuantizedTensor((N, K), 4, group_size, weight.dtype, weight.device, rotation)
    qt.qweight, qt.scales, qt.zeros, qt.col_scales = pack_nibbles(codes), scales, zeros, signs
    return qt


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping H's diagonal (more, if H is still singular)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = torch.diagonal(h).mean()
    for scale in (1, 10, 100):
        chol, info = torch.linalg.cholesky_ex(h + damp * scale * mean * eye)
        if not info:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise ValueError("the calibration inputs' Hessian is singular even after damping; calibrate on more text")
