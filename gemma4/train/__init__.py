"""Fine-tuning: LoRA / QLoRA as module swaps, PEFT-format adapters, a trainer that scales with FSDP2.

    from gemma4.train import LoraConfig, TrainConfig, finetune, apply_adapter
    model, tokenizer, chat = gemma4.load("path/to/base")
    finetune(model, "train.jsonl", val="val.jsonl", out="run1", tokenizer=tokenizer, chat_format=chat,
             source="path/to/base", config=TrainConfig(lora=LoraConfig(r=16, alpha=32), epochs=2))
    model = apply_adapter(gemma4.load_model("path/to/base"), "run1")      # inference, unmerged
    model, tokenizer, chat = gemma4.load("path/to/base", adapter="run1")  # the same (also --adapter)
"""

from .adapter import adapter_state_dict, apply_adapter, load_adapter_weights, read_adapter_config, save_adapter
from .data import Batch, DataError, Example, collate, read_jsonl
from .lora import (
    LoraConfig,
    LoRAError,
    apply_lora,
    lora_modules,
    lora_parameters,
    mark_only_lora_trainable,
    merge,
    unload_lora,
    unmerge,
)
from .loss import CausalLMLoss, chunked_cross_entropy
from .parallel import checkpoint_layers, uncheckpoint_layers
from .export import export_merged
from .state import ResumeError
from .step import evaluate, run_micro_batches
from .trainer import TrainConfig, TrainResult, finetune

__all__ = [
    "Batch",
    "CausalLMLoss",
    "DataError",
    "Example",
    "LoRAError",
    "LoraConfig",
    "ResumeError",
    "TrainConfig",
    "TrainResult",
    "adapter_state_dict",
    "apply_adapter",
    "apply_lora",
    "checkpoint_layers",
    "chunked_cross_entropy",
    "collate",
    "evaluate",
    "export_merged",
    "finetune",
    "load_adapter_weights",
    "lora_modules",
    "lora_parameters",
    "mark_only_lora_trainable",
    "merge",
    "read_adapter_config",
    "read_jsonl",
    "run_micro_batches",
    "save_adapter",
    "uncheckpoint_layers",
    "unload_lora",
    "unmerge",
]
