"""A tensor-parallel rank's slices of a quantized checkpoint (formats in tensor.py).

gemma4.parallel says which slice of each float weight a rank holds (`parallel.plan.ranges`); this
maps that slice onto the stored parts of a quantized weight, so that a rank reads only its rows or
input columns of `qweight` and their scales:
- rows (column-parallel q/k/v, gate/up, the vocabulary): the same rows of every part but
  `col_scales`, which is per input column and so read whole;
- input columns (row-parallel o_proj, down_proj): the same columns of `qweight` (int4: two a
  byte) and of `col_scales`; int8's per-row `scales` whole; int4's per-group `scales` and `zeros`
  for the rank's groups only, so a split must fall on a group boundary (and on a rotation block's,
  for rotated weights). The MLP widths are therefore cut in whole groups (`Layout.unit`: the ranks
  may get a group more or less); a head's columns are whole groups already. Where a split still
  cuts a group, the checkpoint is refused for that --tp, naming the ones that fit.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..config import TextConfig
from ..parallel.layout import Layout
from ..parallel.plan import check, ranges
from .quantize import prepare_quantized

Block = dict[int, tuple[int, int]]
PARTS = ("qweight", "scales", "zeros", "col_scales")
_MLP_DOWN = re.compile(r"\.(mlp\.down_proj\.weight|experts\.down_proj)$")  # input columns: MLP width


class QuantizedSlices:
    """The hooks `parallel.load.load_sharded` takes for a quantized checkpoint (`qconfig` is its
    `quantization_config`): `prepare` swaps the quantized tensors in, on the whole model (where it
    also checks that the split cuts no group) and on the rank's; `blocks` gives a stored part's slice."""

    def __init__(self, qconfig: dict, config: TextConfig, layout: Layout):
        self.qconfig, self.config, self.layout = qconfig, config, layout
        self.tensors: dict[str, dict] = (qconfig.get("tensors") or {}) if isinstance(qconfig, dict) else {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def prepare(self, model: nn.Module, qconfig: dict, dtype: torch.dtype) -> set[str]:
        """The loader's `prepare` hook: on the whole model (first call) it records each quantized
        weight's float shape and refuses a split that cuts a group; then as `prepare_quantized`."""
        if not self.shapes:
            params = dict(model.named_parameters())
            self.shapes = {n: tuple(params[n].shape) for n in self.tensors if n in params}
            self.layout.unit = math.lcm(1, *(_unit(spec) for n, spec in self.tensors.items() if _MLP_DOWN.search(n)))
            check_split(self.config, self.layout, self.tensors, self.shapes)
        return prepare_quantized(model, qconfig, dtype)

    def blocks(self, name: str) -> list[Block] | None:
        """The rank's blocks of stored part `name` (`X.qweight`, ...; [] = whole), or None when
        `name` is not part of a quantized weight."""
        weight, _, part = name.rpartition(".")
        spec = self.tensors.get(weight)
        if spec is None or part not in PARTS:
            return None
        shape = self.shapes[weight]
        return part_blocks(ranges(self.config, self.layout, weight, shape), part, len(shape), spec)


def part_blocks(blocks: list[Block], part: str, ndim: int, spec: dict) -> list[Block]:
    """The blocks of stored `part` of a weight of `ndim` float dims, given the weight's blocks."""
    k = ndim - 1  # the input dim: row-parallel splits cut it
    out = []
    for block in blocks:
        b: Block = {}
        for dim, (lo, hi) in block.items():
            if part == "col_scales":  # [..., K]: no row dim
                if dim < k - 1:
                    b[dim] = (lo, hi)
                elif dim == k:
                    b[k - 1] = (lo, hi)
            elif dim < k:
                b[dim] = (lo, hi)
            elif part == "qweight":
                b[dim] = (lo // 2, hi // 2) if spec["bits"] == 4 else (lo, hi)
            elif spec["bits"] == 4:  # scales, zeros [..., N, K / group]
                g = spec["group_size"]
                b[dim] = (lo // g, hi // g)
            # int8 scales [..., N]: one per whole row, whichever columns this rank holds
        if b and b not in out:
            out.append(b)
    return out


def _unit(spec: dict) -> int:
    """The input columns a split must keep together: an int4 group, a rotation block, a byte."""
    unit = math.lcm(spec.get("group_size") or 1, spec.get("rotation") or 1)
    return math.lcm(unit, 2) if spec["bits"] == 4 else unit


def _cut(config: TextConfig, layout: Layout, tensors: dict, shapes: dict) -> str | None:
    """What the split of `layout.tp` ranks cuts mid-group, or None."""
    for name, spec in tensors.items():
        unit, shape = _unit(spec), shapes.get(name)
        if unit == 1 or shape is None:
            continue
        for r in range(layout.tp):
            here = Layout(layout.tp, layout.ep, r, unit=layout.unit)
            for block in ranges(config, here, name, shape):
                lo, hi = block.get(len(shape) - 1, (0, 0))
                if lo % unit or hi % unit:
                    kind = f"int4 in groups of {spec['group_size']}" if spec["bits"] == 4 else "int8"
                    rot = f", rotated in blocks of {spec['rotation']}," if spec.get("rotation") else ""
                    return (f"{name} is {kind}{rot} along its {shape[-1]} inputs, and rank {r} of {layout.tp} "
                            f"would hold inputs {lo}..{hi}, which splits a block of {unit} inputs")
    return None


def check_split(config: TextConfig, layout: Layout, tensors: dict, shapes: dict) -> None:
    """Refuse a --tp whose row-parallel splits cut an int4 group or a rotation block, naming the
    --tp values that keep them whole."""
    why = _cut(config, layout, tensors, shapes)
    if why is None:
        return
    fits = []
    for n in range(1, config.num_attention_heads + 1):
        candidate = Layout(n, layout.ep if n % layout.ep == 0 else 1, unit=layout.unit)
        try:
            check(config, candidate)
        except ValueError:
            continue
        if _cut(config, candidate, tensors, shapes) is None:
            fits.append(n)
    raise ValueError(f"--tp {layout.tp} does not fit this quantized checkpoint: {why}. Use --tp in {fits}, "
                     "or quantize with a smaller --group-size")
