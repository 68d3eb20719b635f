"""Memory and scale-out wrappers applied from outside the model: activation checkpointing, FSDP2.

Neither edits the model's code nor renames its parameters:
- `checkpoint_layers` gives each decoder layer an instance-level `forward` that runs the class's
  forward under `torch.utils.checkpoint` (non-reentrant), so only the layer inputs are kept and
  the layer is recomputed in backward. The shared `masks` dict is filled by the first forward and
  read by the recompute; KV-shared layers receive their producer's K/V as ordinary inputs.
- `shard` applies FSDP2 (`fully_shard`) to every decoder layer and then to the loss module at the
  root, whose forward runs both `model.decode` and the tied LM head, so the root's parameters
  (embedding, final norm) are gathered for both. bf16 training under FSDP keeps fp32 parameters
  and casts them to bf16 for compute (`MixedPrecisionPolicy`), gradients reduced in fp32.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing per decoder layer (undo with `uncheckpoint_layers`)."""
    for layer in model.model.layers:
        if "forward" in vars(layer):
            continue
        plain = layer.forward  # the class's forward, bound to this layer

        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def uncheckpoint_layers(model: nn.Module) -> None:
    for layer in model.model.layers:
        vars(layer).pop("forward", None)


def shard(loss_module: nn.Module, model: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over the process group: one unit per decoder layer, the rest at the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Decoder layers return K/V as views (transposes) for the KV-shared layers; nothing modifies them
    # in place, which is the hazard FSDP2 warns about for every view output.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    kwargs = {}
    if compute_dtype is not None and compute_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    # The root keeps its parameters gathered from forward to the end of backward: the chunked CE
    # recomputes logits with the tied embedding during backward.
    fully_shard(loss_module, reshard_after_forward=False, **kwargs)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
