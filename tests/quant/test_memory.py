"""Memory: sizes of real variants counted from quantized shapes on meta, and peak RAM of loading."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gemma4.model import Gemma
from gemma4.quant import (
    estimate_nbytes,
    model_nbytes,
    quantize,
    save_quantized,
)
from gemma4.variants import variant


def meta_model(name: str) -> Gemma:
    with torch.device("meta"):
        return Gemma(variant(name))


def test_e4b_int4_takes_at_most_30_percent_of_bf16():
    """Every byte the saved file would hold (quantized buffers, float norms, scalars), counted from
    the quantized modules' shapes on meta; the embedding and the 2.8B-entry PLE table included."""
    model = meta_model("gemma-4-e4b")
    bf16 = 2 * sum(t.numel() for t in model.state_dict().values())
    assert bf16 == 2 * model.config.num_parameters() + 2 * 42  # + the 42 layer scalars
    estimate = estimate_nbytes(model, "int4", 64)
    quantize(model, "int4", 64)
    assert model.model.embed_tokens.weight.bits == 8  # the tied head: int8 under int4 (default_predicate)
    assert (model.model.embed_tokens_per_layer.weight.bits, model.model.embed_tokens_per_layer.weight.group_size) == (4, 128)
    size = model_nbytes(model)
    assert size == estimate
    assert size / bf16 <= 0.30, size / bf16  # 29.6%: 4 bits + a bf16 scale and zero per 64 (128 in the PLE table)


@pytest.mark.parametrize("name,scheme,bound", [("gemma-4-e2b", "int4", 0.30), ("gemma-4-26b-a4b", "int4", 0.30),
                                               ("gemma-4-e4b", "int8", 0.51), ("gemma-3-270m", "int8", 0.51)])
def test_other_variants_sizes(name, scheme, bound):
    model = meta_model(name)
    bf16 = 2 * sum(t.numel() for t in model.state_dict().values())
    assert estimate_nbytes(model, scheme, 64) / bf16 <= bound


LOAD_AND_TOUCH = textwrap.dedent("""
    import sys, torch
    import gemma4.quant
    from gemma4.model import Gemma
    from gemma4.variants import variant
    from gemma4 import load_model

    def status(key):  # kB -> bytes
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    with torch.device("meta"):  # warm up: torch's first meta-device use imports ~70 MB of code
        Gemma(variant("tiny-gemma-3-270m"))
    before = status("VmRSS")
    model = load_model(sys.argv[1])
    for t in model.state_dict().values():
        t.reshape(-1).view(torch.uint8).max()  # read every byte of every tensor (max: no widening copy)
    print(status("VmHWM") - before)
""")



def test_loading_a_quantized_checkpoint_peaks_near_its_file_size(tmp_path):
    """A ~100 MB int4 checkpoint of a 130M-parameter model (520 MB in fp32; its embedding int8):
    loading it and reading every tensor raises the peak RSS by about the file size, never by a
    float copy of anything."""
    raw = variant("tiny-gemma-3-270m").to_hf_dict() | {
        "vocab_size": 65536, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
        "layer_types": None, "head_dim": 128, "num_attention_heads": 8, "num_key_value_heads": 2}
    from gemma4.config import TextConfig

    config = TextConfig.from_hf_dict(raw)
    with torch.device("meta"):
        model = quantize(Gemma(config), "int4", 64)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for t in model.state_dict().values():  # random bytes: only sizes matter here
        t.copy_(torch.randint(0, 255, t.shape, generator=g, dtype=torch.uint8).view(t.dtype)
                if t.dtype == torch.uint8 else torch.rand(t.shape, generator=g).to(t.dtype))
    model.model.reset_buffers()
    out = save_quantized(model, tmp_path / "q")
    del model
    size = (out / "model.safetensors").stat().st_size
    fp32 = 4 * config.num_parameters()
    assert fp32 > 5 * size
    res = subprocess.run([sys.executable, "-c", LOAD_AND_TOUCH, str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    grew = int(res.stdout.split()[-1])
    # The mapped file's pages plus a little Python/allocator noise (measured: 72.3 MiB for a 68.7 MiB all-int4 file);
    # a float copy of even the embedding alone (268 MB in fp32) would blow this.
    assert grew <= 1.1 * size + 16 * 2**20, (grew / 2**20, size / 2**20)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["scheme"] == "int4"
