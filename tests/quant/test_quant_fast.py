"""The CPU fast path of quantized models (gemma4.quant.fast) against the plain quantized path."""

import pytest
import torch

from gemma4 import load_model
from gemma4.engine import cpu
from gemma4.engine.fuse import FusedMLP
from gemma4.quant import QuantizedTensor, quantize, speed_up_quantized
from gemma4.quant.fast import QuantLinear, RescoredTable, two_pass_int8

pytestmark = pytest.mark.skipif(not cpu.fbgemm_works("int8-dynamic"), reason="no fbgemm int8 kernels")

GEN = torch.Generator().manual_seed(0)


def rel(got, want):
    return ((got - want).norm() / want.norm()).item()


def activations(rows, k):
    x = torch.randn(rows, k, generator=GEN)
    x[:, :3] *= 30  # a few dominant columns, as in Gemma's hidden states
    return x


def test_two_pass_int8_is_near_exact_and_batch_invariant():
    w = torch.randn(96, 128, generator=GEN) / 10
    qt = QuantizedTensor.from_float(w, 8, col_scales=torch.ones(128))
    want_w = qt.dequantize()
    packed = cpu.PackedLinear.from_int8(qt.qweight, qt.scales)
    x = activations(5, 128)
    want = x @ want_w.T
    got = two_pass_int8(x, packed)
    one_pass = packed(x)
    assert rel(got, want) < 1e-3  # measured ~1e-4: the residual pass's rounding only
    assert rel(one_pass, want) > 10 * rel(got, want)  # what one 7-bit pass costs
    assert torch.equal(two_pass_int8(x[2:3], packed), got[2:3])  # a row's result does not depend on its batch


@pytest.mark.parametrize("bits, int4", [(8, "int4pack"), (4, "int4pack"), (4, "int8")])
def test_quant_linear_matches_the_plain_path(bits, int4):
    w = torch.randn(128, 256, generator=GEN) / 10
    w[:, 5] *= 8  # skewed columns: column scales that the activations must take first
    qt = QuantizedTensor.from_float(w, bits, 64 if bits == 4 else None)
    x = activations(3, 256)
    qt.use_kernels = False
    want = qt.linear(x)  # dequantized weight, fp32 activations
    qt.use_kernels = True
    got = QuantLinear(qt, int4)(x)
    # int4 kernel: bf16 activations (2^-9); int4 -> int8 re-rounds the weight once more (1/254 of a row's max)
    assert rel(got, want) < {8: 1e-3, 4: 2e-2 if int4 == "int8" else 5e-3}[bits]


@pytest.mark.parametrize("scores", ["int8", "int4"])
def test_rescored_table_is_exact_at_its_top(scores):
    table = QuantizedTensor.from_float(torch.randn(4096, 64, generator=GEN), 8)
    x = activations(2, 64)
    want = x @ table.dequantize().T
    head = RescoredTable(table, k=16, scores=scores)
    got = head(x)
    if scores == "int4":  # scores of an int4 copy, through torch's int4 kernel where it has one
        assert head.approx.qt.bits == 4
    top = want.topk(4, -1).indices  # the true best 4 are among the 16 best int8 scores here
    torch.testing.assert_close(got.gather(-1, top), want.gather(-1, top), rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_speed_up_quantized_model_keeps_its_logits(tiny_checkpoint, scheme):
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    model = quantize(load_model(path), scheme, 32)
    ids = torch.randint(0, 128, (2, 11), generator=GEN)
    with torch.no_grad():
        want = model(ids)
        assert cpu.speed_up(model)  # through the packer gemma4.quant registers with the engine
        got = model(ids)
    kinds = {type(m) for m in model.modules()}
    assert FusedMLP in kinds and isinstance(model.lm_head, RescoredTable)  # tiny k/v stay float: q alone
    assert rel(got, want) < 2e-2
    top = want.topk(8, -1).indices  # the rescored head's top is the quantized model's own
    torch.testing.assert_close(got.gather(-1, top), want.gather(-1, top), rtol=0, atol=5e-2)
    assert cpu.speed_up(model) and speed_up_quantized(model)  # idempotent: nothing left to pack
    with torch.no_grad():
        assert torch.equal(model(ids), got)


def test_speed_up_quantized_refuses_an_unknown_kernel_and_skips_float_models(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    model = load_model(path)
    with pytest.raises(ValueError, match="unknown int4 kernel 'int2'"):
        speed_up_quantized(model, int4="int2")
    assert not speed_up_quantized(model)
