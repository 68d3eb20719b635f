"""Norm tuning after quantization: it moves the quantized model toward the float one and touches
nothing but the norms."""

from types import SimpleNamespace

import pytest
import torch

from gemma4 import load_model  # reads quantized checkpoints too
from gemma4.model.layers import RMSNorm
from gemma4.quant import QuantizedTensor, quantize, save_quantized, set_kernels
from gemma4.quant.tune import dense_weights, record_targets, sample_windows, tune_norms

WINDOWS = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def mean_kl(model, reference, windows=WINDOWS) -> float:
    with torch.no_grad():
        return sum(torch.nn.functional.kl_div(torch.log_softmax(model(w), -1), torch.log_softmax(reference(w), -1),
                                              log_target=True, reduction="batchmean").item() / w.shape[1]
                   for w in windows) / len(windows)


@pytest.mark.parametrize("name", ["tiny-gemma-3-270m", "tiny-e2b"])  # e2b: soft-capped logits, PLE, KV sharing
def test_tuned_norms_bring_the_quantized_model_closer(tiny_checkpoint, tmp_path, name):
    _, path = tiny_checkpoint(name)
    reference = load_model(path)
    model = load_model(path)
    targets = record_targets(model, WINDOWS)
    pos = torch.tensor([0, 5, 23])
    with torch.no_grad():
        assert torch.allclose(targets.logits(2, pos), reference(WINDOWS[2])[:, pos], atol=1e-5)
    set_kernels(quantize(model, "int4", 32), False)
    with pytest.raises(ValueError, match="before quantizing"):
        record_targets(model, WINDOWS)
    before = mean_kl(model, reference)
    norms = {n for n, m in model.named_modules() if isinstance(m, RMSNorm) and m.weight is not None}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    curve = tune_norms(model, WINDOWS, targets, epochs=6, lr=1e-2, positions=16)
    after = mean_kl(model, reference)
    assert len(curve) == 6 and curve[-1] < curve[0]
    assert after < 0.8 * before, (before, after)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and changed <= {f"{n}.weight" for n in norms}  # only norm weights moved
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, QuantizedTensor)  # swapped back
    loaded = set_kernels(load_model(save_quantized(model, tmp_path / "q")), False)
    assert mean_kl(loaded, reference) == pytest.approx(after, rel=1e-5)


def test_dense_weights_compute_the_quantized_function(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-e2b")
    model = set_kernels(quantize(load_model(path), "int4", 32), False)
    with torch.no_grad():
        want = model(WINDOWS[0])
        with dense_weights(model):
            assert not any(isinstance(m, QuantizedTensor) for m in model.modules())
            got = model(WINDOWS[0])
    assert torch.allclose(got, want, atol=1e-5)
    assert isinstance(model.model.embed_tokens.weight, QuantizedTensor)


def test_sampled_windows_are_the_models_own_text(tiny_checkpoint):
    _, path = tiny_checkpoint("tiny-gemma-3-270m")
    model = load_model(path)
    tok = SimpleNamespace(bos_id=2)
    windows = sample_windows(model, tok, samples=3, window=10, seed=5)
    assert len(windows) == 3 and all(w.shape[0] == 1 and 1 < w.shape[1] <= 10 and w[0, 0] == 2 for w in windows)
    again = sample_windows(model, tok, samples=3, window=10, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(windows, again))
    assert not torch.equal(windows[0], windows[1][:, :windows[0].shape[1]])  # rows differ: their seeds do
    with pytest.raises(ValueError, match="2 windows but targets for 4"):
        tune_norms(model, WINDOWS[:2], record_targets(model, WINDOWS))
