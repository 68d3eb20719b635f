"""`finetune`: LoRA / QLoRA training on chat or text JSONL, on one device or many (FSDP2).

One optimizer step consumes `batch_size` sequences (the global batch, whatever the number of
processes), run as micro-batches of `micro_batch_size`; the micro-batches of a step are dealt to
the ranks in turn. Each micro-batch contributes (summed token CE) / (trained tokens of the whole
step), so gradient accumulation and data parallelism weight every trained token equally: one
micro-batch of 4 gives the same gradient as four of 1, and two processes the same as one. A rank
that gets fewer micro-batches than another runs a zero-weighted one, so FSDP's collectives match.

Layout of `out/`: the final adapter (`adapter_config.json`, `adapter_model.safetensors`, PEFT
format), `train_log.jsonl` (one record per step and per validation), and `checkpoint-NNNNNN/`
directories (adapter + `trainer_state.json` + `trainer_state.safetensors`, no pickles) that
`resume` continues from.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..chat import ChatFormat
from ..model import Gemma
from .adapter import adapter_state_dict, apply_adapter, load_adapter_weights, save_adapter
from .data import Batch, Example, collate, epoch_batches, read_jsonl
from .lora import LoraConfig, apply_lora, lora_parameters, mark_only_lora_trainable, unload_lora
from .loss import CausalLMLoss
from .parallel import all_reduce_sum, checkpoint_layers, init_distributed, shard, uncheckpoint_layers

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"  # step, losses, scheduler, config
TENSORS_FILE = "trainer_state.safetensors"  # AdamW moments, RNG state
RNG_KEY = "rng/cpu"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Hyper-parameters and switches; each has a `gemma4 finetune` flag of the same name."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # sequences per optimizer step, across all processes
    micro_batch_size: int = 2  # sequences per forward
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0
    max_length: int = 2048  # longer samples are bad data
    on_bad_data: str = "error"  # or "skip"
    dtype: str = "auto"  # when finetune loads the model: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"
    quantize: str | None = None  # e.g. "int4": QLoRA over the quantized base (gemma4.quant)
    gradient_checkpointing: bool = True
    ce_chunk_size: int = 256
    eval_every: int = 0  # steps between validations (0: only before and after training)
    eval_batch_size: int | None = None  # sequences per validation forward (default: micro_batch_size)
    save_every: int = 0  # steps between checkpoints (0: only the final adapter)
    resume: bool | str = False  # True: latest checkpoint in `out`; or a checkpoint directory
    export_merged: str | None = None  # also write a merged checkpoint there (merges a float model in place)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.on_bad_data not in ("skip", "error"):
            raise ValueError("on_bad_data must be 'skip' or 'error'")
        if self.dtype not in ("auto", "bf16", "bfloat16", "fp32", "float32"):
            raise ValueError(f"dtype must be auto, bf16 or fp32, not {self.dtype!r}")


@dataclass
class TrainResult:
    steps: int
    train_losses: list[float]  # per optimizer step: trained-token mean CE
    val_losses: list[tuple[int, float]]  # (step, loss)
    tokens_per_s: float
    peak_memory_bytes: int
    trainable_parameters: int
    elapsed_s: float
    adapter_dir: Path


# ------------------------------------------------------------------------------------------------


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[name]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _micro_batches(examples: list[Example], indices: list[int], size: int) -> list[list[Example]]:
    chosen = sorted((examples[i] for i in indices), key=len)  # similar lengths share a micro-batch
    return [chosen[i : i + size] for i in range(0, len(chosen), size)]


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_micro_batches(
    loss_module: torch.nn.Module,
    micro: list[Batch | tuple[Batch, float]],
    total_targets: int,
    *,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> float:
    """Forward + backward over micro-batches; gradients = d(sum of token CE / total_targets).

    Returns this process's summed CE. `scale` multiplies the loss before backward (the world size
    under FSDP, which averages gradients over ranks). A micro-batch may come as (batch, weight):
    weight 0 is a stand-in that only keeps a rank's collectives in step with the others.
    """
    local = 0.0
    for item in micro:
        batch, weight = item if isinstance(item, tuple) else (item, 1.0)
        b = batch.to(device)
        ce = loss_module(b.ids, b.positions, b.targets)
        (ce * (weight * scale / total_targets)).backward()
        local += float(ce.detach()) * weight
    return local


def evaluate(loss_module, examples: list[Example], micro_batch_size: int, *, rank: int = 0, world: int = 1,
             device: torch.device | str = "cpu", pad_id: int = 0) -> float:
    """Mean CE per trained token over `examples` (split across ranks)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [collate([examples[i] for i in order[s : s + micro_batch_size]], pad_id)
               for s in range(0, len(order), micro_batch_size)]
    total = 0.0
    was_training = loss_module.training
    loss_module.eval()
    with torch.no_grad():
        for k in range(math.ceil(len(batches) / world)):
            j = k * world + rank
            b = batches[min(j, len(batches) - 1)].to(device)
            ce = float(loss_module(b.ids, b.positions, b.targets))
            total += ce if j < len(batches) else 0.0
    loss_module.train(was_training)
    targets = sum(e.num_targets for e in examples)
    return all_reduce_sum([total], world, torch.device(device))[0] / targets


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*/" + STATE_FILE))
    return found[-1].parent if found else None


# ------------------------------------------------------------------------------------------------


def finetune(
    model: Gemma | str | Path | None,
    train: str | Path | list[Example],
    *,
    out: str | Path,
    val: str | Path | list[Example] | None = None,
    tokenizer=None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `model` (a loaded Gemma; a checkpoint dir, .gguf or Hub id; None: the
    embedded gemma-3-270m).

    `train` / `val` are JSONL files (chat or text lines, see gemma4.train.data) or pre-tokenized
    `Example`s. With a model object, pass its `tokenizer` (it needs `encode`, `bos_id`, `eos_id`,
    `pad_id`; its `chat_format` attribute, if any, renders chats). Under torchrun the same call
    trains with FSDP2 over all processes.
    """
    config = config or TrainConfig()
    out = Path(out)
    rank, world, device = init_distributed()
    torch.manual_seed(config.seed)
    say = log.warning if rank == 0 else (lambda *_: None)

    source = None
    if not isinstance(model, torch.nn.Module):
        from ..api import default_model_path, load

        source = str(model if model is not None else default_model_path())
        load_dtype = _dtype(config.dtype, device)
        # Under FSDP the fp32 weights are sharded and cast per layer for compute (MixedPrecisionPolicy).
        model, tokenizer = load(source, dtype=torch.float32 if world > 1 else load_dtype,
                                device="cpu" if world > 1 else device)
    if tokenizer is None:
        raise ValueError("finetune needs the model's tokenizer (pass tokenizer=...)")
    chat_format = getattr(tokenizer, "chat_format", None) or ChatFormat(model.config.family)
    pad_id = getattr(tokenizer, "pad_id", 0)

    def load_data(data, what: str) -> list[Example]:
        if isinstance(data, (str, Path)):
            return read_jsonl(data, tokenizer, chat_format, max_length=config.max_length,
                              on_bad_data=config.on_bad_data, report=say)
        data = list(data)
        if not data or any(e.num_targets == 0 for e in data):
            raise ValueError(f"{what} examples must be non-empty, each with at least one trained token")
        return data

    train_ex = load_data(train, "training")
    val_ex = load_data(val, "validation") if val is not None else None

    if config.quantize:
        from ..quant import quantize  # QLoRA: the frozen base is quantized, the adapters are not

        quantize(model, scheme=config.quantize)
    apply_lora(model, config.lora)
    trainable = mark_only_lora_trainable(model)
    resume_dir = _latest_checkpoint(out) if config.resume is True else (Path(config.resume) if config.resume else None)
    if config.resume is True and resume_dir is None:
        say(f"no checkpoint in {out} to resume from: starting from step 0")
    if resume_dir is not None:
        load_adapter_weights(model, resume_dir)  # before sharding: plain tensors
    if config.gradient_checkpointing:
        checkpoint_layers(model)
    loss_module = CausalLMLoss(model, config.ce_chunk_size)
    compute_dtype = _dtype(config.dtype, device)
    if world > 1:
        shard(loss_module, model, compute_dtype)
        loss_module.to(device)
    loss_module.train()

    steps_per_epoch = math.ceil(len(train_ex) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total_steps, config.min_lr_ratio))

    start, history, val_history = 0, [], []
    if resume_dir is not None:
        start, history, val_history = _load_state(resume_dir, model, optimizer, scheduler)
        say(f"resuming from {resume_dir} at step {start}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log_file = (out / LOG_FILE).open("a" if start else "w") if rank == 0 else None

    def record(entry: dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    def validate(step: int) -> None:
        if val_ex is None:
            return
        loss = evaluate(loss_module, val_ex, config.eval_batch_size or config.micro_batch_size, rank=rank,
                        world=world, device=device, pad_id=pad_id)
        val_history.append((step, loss))
        record({"step": step, "val_loss": loss})

    if start == 0:
        validate(0)
    lengths = [len(e) for e in train_ex]
    epoch_cache: dict[int, list[list[int]]] = {}
    bar = tqdm(total=total_steps, initial=start, desc="finetune", unit="step",
               disable=rank != 0 or not config.progress, dynamic_ncols=True)
    tokens_seen, train_time, t_begin = 0, 0.0, time.perf_counter()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: epoch_batches(lengths, config.batch_size, seed=config.seed, epoch=epoch)}
        indices = epoch_cache[epoch][within]
        micro = _micro_batches(train_ex, indices, config.micro_batch_size)
        total_targets = sum(train_ex[i].num_targets for i in indices)
        mine = [(collate(m, pad_id), 1.0) for m in micro[rank::world]]
        filler = mine[0][0] if mine else collate(micro[0], pad_id)
        mine += [(filler, 0.0)] * (math.ceil(len(micro) / world) - len(mine))
        local = run_micro_batches(loss_module, mine, total_targets, scale=float(world), device=device)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        n_tokens = sum(len(train_ex[i]) for i in indices)
        loss = all_reduce_sum([local], world, device)[0] / total_targets
        history.append(loss)
        dt = time.perf_counter() - t0
        tokens_seen += n_tokens
        train_time += dt
        tps = tokens_seen / train_time
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", refresh=False)
        bar.update(1)
        record({"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": n_tokens,
                "tokens_per_s": tps, "elapsed_s": time.perf_counter() - t_begin})
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:
            validate(done)
        if config.save_every and done % config.save_every == 0 and done < total_steps:
            _save_state(out / f"checkpoint-{done:06d}", model, optimizer, scheduler, config, done, history,
                        val_history, rank, source)
    bar.close()
    if not val_history or val_history[-1][0] != total_steps:
        validate(total_steps)
    # Hand the model back ready for inference: no dropout, no checkpointing wrappers.
    uncheckpoint_layers(model)
    model.eval()
    state = adapter_state_dict(model)
    if rank == 0:
        save_adapter(model, out, config.lora, base_model_name_or_path=source, state=state)
    if log_file is not None:
        log_file.close()
    result = TrainResult(
        steps=total_steps, train_losses=history, val_losses=val_history,
        tokens_per_s=tokens_seen / train_time if train_time else 0.0, peak_memory_bytes=_peak_memory(device),
        trainable_parameters=trainable, elapsed_s=time.perf_counter() - t_begin, adapter_dir=out,
    )
    if config.export_merged and rank == 0:
        # Merge in place when this process holds the whole float model; otherwise (sharded, or a
        # quantized QLoRA base) fold the saved adapter into a fresh float copy of the base.
        in_place = world == 1 and not config.quantize
        export_merged(model if in_place else None, config.export_merged, source=source, adapter_dir=out,
                      tokenizer=tokenizer)
    return result


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _save_state(directory: Path, model, optimizer, scheduler, config: TrainConfig, step: int, history,
                val_history, rank: int, source: str | None) -> None:
    """Adapter + trainer state. Every rank calls this (gathering shards is collective); rank 0 writes.

    Nothing is pickled: tensors (AdamW moments and step counts, keyed by parameter name, and the RNG
    state) go to `trainer_state.safetensors`, the rest (step, losses, scheduler, optimizer
    hyper-parameters, config) to `trainer_state.json`.
    """
    from safetensors.torch import save_file

    state = adapter_state_dict(model)
    tensors, groups = _optimizer_state(model, optimizer)
    if rank != 0:
        return
    save_adapter(model, directory, config.lora, base_model_name_or_path=source, state=state)
    tensors[RNG_KEY] = torch.get_rng_state()
    save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": "pt"})
    meta = {"step": step, "history": history, "val_history": val_history, "scheduler": scheduler.state_dict(),
            "optimizer_param_groups": groups, "config": {k: v for k, v in asdict(config).items() if k != "lora"}}
    (directory / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _optimizer_state(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as whole CPU tensors named "optim/<parameter>/<key>" (the same file for 1 or N
    processes), and the param groups' hyper-parameters (JSON)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"optim/{names[id(p)]}/{k}"] = _whole(torch.as_tensor(v))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, groups


def _whole(v: torch.Tensor) -> torch.Tensor:
    return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous().clone()


def _load_state(directory: Path, model, optimizer, scheduler):
    from safetensors.torch import load_file

    meta = json.loads((directory / STATE_FILE).read_text())
    tensors = load_file(str(directory / TENSORS_FILE))
    names = {id(p): n for n, p in model.named_parameters()}
    for group, saved_group in zip(optimizer.param_groups, meta["optimizer_param_groups"], strict=True):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items()})
        for p in group["params"]:
            prefix = f"optim/{names[id(p)]}/"
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not entry:
                raise ValueError(f"{directory}: no optimizer state for {names[id(p)]}; another LoRA configuration?")
            optimizer.state[p] = {k: _like(v, p) for k, v in entry.items()}
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors[RNG_KEY])
    return meta["step"], list(meta["history"]), [tuple(v) for v in meta["val_history"]]


def _like(v, p: torch.Tensor):
    """A saved whole tensor laid out like parameter p (sharded like it under FSDP)."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return v.to(p.device)


# ------------------------------------------------------------------------------------------------
# Merged export


def export_merged(
    model: Gemma | None,
    directory: str | Path,
    *,
    source: str | None = None,
    adapter_dir: str | Path | None = None,
    tokenizer=None,
) -> Path:
    """Write a full checkpoint (HF layout, safetensors, config.json) with the adapter folded in.

    Either `model` (float, LoRA applied: merged in place and unwrapped) or `source` + `adapter_dir`
    (the float base is loaded again and the adapter merged into it: the way for QLoRA and FSDP
    runs, whose training copy is quantized or sharded). Loadable by `gemma4.weights.load_model`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        from ..weights import load_model

        if source is None or adapter_dir is None:
            raise ValueError("export_merged needs a model, or the base checkpoint and the adapter directory")
        model = apply_adapter(load_model(source), adapter_dir)
    unload_lora(model, merge_weights=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    src = Path(source) if source else None
    if src is not None and src.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "generation_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, directory / name)
    elif tokenizer is not None and hasattr(tokenizer, "backend"):
        tokenizer.backend.save(str(directory / "tokenizer.json"))
        tok_cfg: dict[str, Any] = {"add_bos_token": bool(getattr(tokenizer, "add_bos", True))}
        template = getattr(getattr(tokenizer, "chat_format", None), "template", None)
        if template is not None:
            tok_cfg["chat_template"] = template.source
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return directory
