"""Weight-only int8 / int4 quantization as a parameter swap driven by a predicate.

    from gemma4.quant import quantize, save_quantized, quantize_checkpoint
    model = quantize(load_model(path), scheme="int4", group_size=64)   # in memory
    save_quantized(model, "out/")              # config.json (+ quantization_config) + model.safetensors
    model = load_model("out/")                 # rebuilt on meta, tensors assigned as stored
    model = quantize_checkpoint("x.gguf", "int8")   # files -> quantized, one tensor at a time
    # int4 by GPTQ, then the norms fitted to the float model (`quantize --calibration F --tune-samples 16`):
    windows = sample_windows(model, tokenizer); targets = record_targets(model, windows)
    gptq_quantize(model, calibration_ids); tune_norms(model, windows, targets)

Saved names: a float weight `X` (e.g. `model.layers.0.self_attn.q_proj.weight`,
`model.layers.0.experts.gate_up_proj`) becomes `X.qweight`, `X.scales` and, for int4, `X.zeros`;
formats in tensor.py, the recorded config in quantize.py.
"""

from .calibrate import activation_scales
from .checkpoint import quantize_checkpoint
from .fast import speed_up_quantized
from .gptq import gptq_quantize
from .quantize import (
    default_predicate,
    estimate_nbytes,
    model_nbytes,
    plan,
    quantization_config,
    quantize,
    save_quantized,
    set_kernels,
)
from .tensor import QuantizedTensor
from .tune import record_targets, sample_windows, tune_norms

__all__ = [
    "QuantizedTensor",
    "activation_scales",
    "default_predicate",
    "estimate_nbytes",
    "gptq_quantize",
    "model_nbytes",
    "plan",
    "quantization_config",
    "quantize",
    "quantize_checkpoint",
    "record_targets",
    "sample_windows",
    "save_quantized",
    "set_kernels",
    "speed_up_quantized",
    "tune_norms",
]
