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
`resume` continues from (state.py). A used `out` is refused unless resumed or overwritten
(rundir.py); a checkpoint of another run (data, model, options: fingerprint.py) is not resumed.

A run is set up once (`_setup`: data, QLoRA quantization, adapters, sharding, optimizer, resumed
state), then driven step by step (`_train_step`, the arithmetic in step.py) with validations and
checkpoints between steps, and finished (`_finish`: final validation and adapter; export.py merges).
`finetune` takes a loaded model: loading a checkpoint (and the dtype/device choices under FSDP) is
the front end's work (gemma4/commands/finetune.py).
"""


from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from ..chat import ChatFormat
from ..model import Gemma
from ..weights.save import check_target
from .adapter import adapter_state_dict, load_adapter_weights, save_adapter
from .data import Example, epoch_batches, read_jsonl
from .export import export_merged
from .fingerprint import differences, fingerprint
from .lora import LoraConfig, apply_lora, lora_parameters, mark_only_lora_trainable
from .loss import CausalLMLoss
from .parallel import all_reduce_sum, barrier, checkpoint_layers, init_distributed, shard, uncheckpoint_layers
from .rundir import LOG_FILE, check_out, prepare_out, resume_point
from .state import ResumeError, checkpoint_dir, load_state, save_state
from .step import evaluate, lr_lambda, peak_memory, rank_share, run_micro_batches

log = logging.getLogger(__name__)

@dataclass
class TrainConfig:
    """Hyper-parameters and switches; each has a `gemma4 finetune` flag of the same name."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: float | None = None  # None: 1, or more on a small dataset (see `schedule`)
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # sequences per optimizer step, across all processes
    micro_batch_size: int = 2  # sequences per forward
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: warmup_ratio of the steps
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0
    max_length: int = 2048  # longer samples are bad data
    on_bad_data: str = "error"  # or "skip"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32": the base as `gemma4 finetune`
    # loads it, and the compute dtype under FSDP (see `torch_dtype`)
    quantize: str | None = None  # e.g. "int4": QLoRA over the quantized base (gemma4.quant)
    gradient_checkpointing: bool = True
    ce_chunk_size: int = 256
    eval_every: int = 0  # steps between validations (0: only before and after training)
    eval_batch_size: int | None = None  # sequences per validation forward (default: micro_batch_size)
    save_every: int = 0  # steps between checkpoints (0: only the final adapter)
    resume: bool | str = False  # True: latest checkpoint in `out`; or a checkpoint directory
    overwrite: bool = False  # replace the run in a used `out` (only the files a run writes are removed)
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

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return torch.bfloat16 if self.dtype in ("bf16", "bfloat16") else torch.float32


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


def finetune(
    model: Gemma,
    train: str | Path | list[Example],
    *,
    out: str | Path,
    val: str | Path | list[Example] | None = None,
    tokenizer=None,
    chat_format: ChatFormat | None = None,
    config: TrainConfig | None = None,
    source: str | Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `model`, loaded with its tokenizer and chat format by
    `model, tokenizer, chat_format = gemma4.load(path)`; the adapter is written to `out`.

    `train` / `val` are JSONL files (chat or text lines, see gemma4.train.data) or pre-tokenized
    `Example`s. `tokenizer` needs `encode`, `bos_id`, `eos_id`, `pad_id`; `chat_format` renders
    chats (None: the family's built-in format). `source`: the checkpoint the model came from (path
    or Hub id), recorded as the adapter's base and read again by `export_merged` for QLoRA and FSDP
    runs. Under torchrun the same call trains with FSDP2 over all processes.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError("finetune takes a loaded model: model, tokenizer, chat_format = gemma4.load(path), then "
                        "finetune(model, ..., tokenizer=tokenizer, chat_format=chat_format, source=path)")
    if tokenizer is None:
        raise ValueError("finetune needs the model's tokenizer (pass tokenizer=...)")
    config = config or TrainConfig()
    chat_format = chat_format or ChatFormat(model.config.family)
    source = None if source is None else str(source)
    run = _setup(model, train, val, Path(out), tokenizer, chat_format, config, source)
    with run.log_file or contextlib.nullcontext():
        result = _finish(run, _train(run))
    if config.export_merged and run.rank == 0:
        # Merge in place when this process holds the whole float model; otherwise (sharded, or a
        # quantized QLoRA base) fold the saved adapter into a fresh float copy of the base.
        export_merged(model if _merges_in_place(config, run.world) else None, config.export_merged,
                      source=source, adapter_dir=run.out, tokenizer=tokenizer, chat_format=chat_format)
    return result


@dataclass
class _Run:
    """One run's state, built by `_setup` and carried from step to step."""

    config: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    model: Gemma
    loss_module: CausalLMLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_ex: list[Example]
    val_ex: list[Example] | None
    pad_id: int
    total_steps: int
    trainable: int
    source: str | None
    fingerprint: dict[str, Any]  # stored with each checkpoint (fingerprint.py)
    start: int = 0
    history: list[float] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    log_file: TextIO | None = None  # rank 0 only
    tokens_seen: int = 0
    train_time: float = 0.0
    _epoch: tuple[int, list[list[int]]] = (-1, [])

    def batch(self, step: int) -> list[int]:
        """Indices of the step's global batch; an epoch's order is drawn once, from the seed."""
        epoch, within = divmod(step, math.ceil(len(self.train_ex) / self.config.batch_size))
        if self._epoch[0] != epoch:
            lengths = [len(e) for e in self.train_ex]
            self._epoch = (epoch, epoch_batches(lengths, self.config.batch_size, seed=self.config.seed, epoch=epoch))
        return self._epoch[1][within]

    def record(self, entry: dict[str, Any]) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(entry) + "\n")
            self.log_file.flush()


# ------------------------------------------------------------------------------------------------
# Setup


def _setup(model: Gemma, train, val, out: Path, tokenizer, chat_format: ChatFormat, config: TrainConfig,
           source: str | None) -> _Run:
    """Everything before the first step, in the order that makes runs reproducible from the seed:
    data, QLoRA quantization, adapters (initialized from the seed), resumed adapter weights,
    checkpointing and sharding, optimizer, then the resumed optimizer, scheduler and RNG state.
    Nothing in `out` changes until all of it (and the check that a resumed checkpoint is this
    run's) has passed."""
    rank, world, device = init_distributed()
    torch.manual_seed(config.seed)
    say = log.warning if rank == 0 else (lambda *_: None)
    check_out(out, config.resume, config.overwrite)
    _check_export(config, out, world, source)
    train_ex = _examples(train, "training", tokenizer, chat_format, config, say)
    val_ex = _examples(val, "validation", tokenizer, chat_format, config, say) if val is not None else None
    total_steps, warmup, said = schedule(config, len(train_ex))
    say(said)
    resumed = resume_point(out, config.resume, say)
    fp = fingerprint(model, source, config, train, train_ex, val, val_ex)  # of the plain base
    if resumed is not None:
        _check_resume(*resumed, fp, total_steps, say)
    trainable = _add_adapters(model, config, resumed and resumed[0])
    loss_module = _loss_module(model, config, world, device)
    optimizer, scheduler = _optimizer(model, config, total_steps, warmup)
    run = _Run(config, out, rank, world, device, model, loss_module, optimizer, scheduler, train_ex, val_ex,
               getattr(tokenizer, "pad_id", 0), total_steps, trainable, source, fp)
    if resumed is not None:
        run.start, run.history, run.val_history = load_state(resumed[0], model, optimizer, scheduler, resumed[1])
        say(f"resuming from {resumed[0]} at step {run.start}")
    barrier(world)  # every process has picked its checkpoint before rank 0 drops later ones
    if rank == 0:
        continues = resumed is not None and resumed[0].parent.resolve() == out.resolve()
        prepare_out(out, overwrite=config.overwrite, step=run.start if continues else None, say=say)
        run.log_file = (out / LOG_FILE).open("a")
    return run


MIN_STEPS = 24  # optimizer steps a default run takes at least (by more epochs over a small dataset)
MAX_AUTO_EPOCHS = 10  # ... but not more passes than this over it


def schedule(config: TrainConfig, examples: int) -> tuple[int, int, str]:
    """(optimizer steps, warm-up steps, the sentence that says how they were chosen).

    A run with neither --epochs nor --max-steps takes one epoch, or on a small dataset enough
    epochs for MIN_STEPS steps (at most MAX_AUTO_EPOCHS): 48 examples in batches of 8 would
    otherwise give 6 steps, too few for the adapter to learn anything. The warm-up is
    `warmup_ratio` of the steps unless --warmup-steps says otherwise, so it never eats the run."""
    per_epoch = max(1, math.ceil(examples / config.batch_size))
    if config.max_steps:
        total, how = config.max_steps, "--max-steps"
    elif config.epochs is not None:
        total, how = max(1, math.ceil(config.epochs * per_epoch)), f"--epochs {config.epochs:g}"
    else:
        epochs = min(MAX_AUTO_EPOCHS, max(1, math.ceil(MIN_STEPS / per_epoch)))
        total = epochs * per_epoch
        how = (f"{epochs} epochs, chosen for a small dataset: at least {MIN_STEPS} steps" if epochs > 1
               else "1 epoch") + "; --epochs or --max-steps to choose"
    if config.warmup_steps is not None:
        warmup = min(config.warmup_steps, total)
        warm = f"--warmup-steps {config.warmup_steps}"
    else:
        warmup = max(1, round(config.warmup_ratio * total)) if config.warmup_ratio > 0 else 0
        warm = f"{config.warmup_ratio:g} of the steps"
    said = (f"{examples} training examples in batches of {config.batch_size}: {per_epoch} steps an epoch; "
            f"training {total} steps ({how}), warm-up {warmup} ({warm}), peak lr {config.lr:g}")
    return total, warmup, said


def _check_resume(directory: Path, meta: dict[str, Any], fp: dict[str, Any], total_steps: int, say) -> None:
    """Refuse to continue another run's checkpoint, or one past this run's end."""
    if "fingerprint" not in meta:
        say(f"{directory} has no fingerprint (an older checkpoint): its data, model and options are not checked")
    elif found := differences(meta["fingerprint"], fp):
        raise ResumeError(f"{directory} is not this run's checkpoint: {'; '.join(found)}. Resume with its data, "
                          "model and options, or start a new run (--overwrite replaces the one in --out)")
    if meta["step"] > total_steps:
        raise ResumeError(f"{directory} is at step {meta['step']}, past this run's end at step {total_steps}: "
                          "raise --max-steps or --epochs")


def _merges_in_place(config: TrainConfig, world: int) -> bool:
    """Whether this process holds the whole float model, so the export can merge it directly."""
    return world == 1 and not config.quantize


def _check_export(config: TrainConfig, out: Path, world: int, source: str | None) -> None:
    """Refuse, before training, a merged export that could only fail after it."""
    if not config.export_merged:
        return
    target = check_target(config.export_merged, "--export-merged")
    if target.resolve() == out.resolve():
        raise ValueError(f"--export-merged {target} is the adapter's directory (--out); choose another one")
    if source is None and not _merges_in_place(config, world):
        raise ValueError("export_merged of a QLoRA or FSDP run merges into the float base read again: pass "
                         "finetune(..., source=<the checkpoint the model was loaded from>)")


def _examples(data, what: str, tokenizer, chat_format: ChatFormat, config: TrainConfig, say) -> list[Example]:
    if isinstance(data, (str, Path)):
        return read_jsonl(data, tokenizer, chat_format, max_length=config.max_length,
                          on_bad_data=config.on_bad_data, report=say)
    data = list(data)
    if not data or any(e.num_targets == 0 for e in data):
        raise ValueError(f"{what} examples must be non-empty, each with at least one trained token")
    return data


def _add_adapters(model: Gemma, config: TrainConfig, resume_dir: Path | None) -> int:
    """Quantize the frozen base (QLoRA), add the adapters; returns the trainable parameter count."""
    if config.quantize:
        from ..quant import quantize  # QLoRA: the frozen base is quantized, the adapters are not

        quantize(model, scheme=config.quantize)
    apply_lora(model, config.lora)
    trainable = mark_only_lora_trainable(model)
    if resume_dir is not None:
        load_adapter_weights(model, resume_dir)  # before sharding: plain tensors
    return trainable


def _loss_module(model: Gemma, config: TrainConfig, world: int, device: torch.device) -> CausalLMLoss:
    if config.gradient_checkpointing:
        checkpoint_layers(model)
    loss_module = CausalLMLoss(model, config.ce_chunk_size)
    if world > 1:
        shard(loss_module, model, config.torch_dtype(device))
        loss_module.to(device)
    loss_module.train()
    return loss_module


def _optimizer(model: Gemma, config: TrainConfig, total_steps: int, warmup: int):
    """AdamW over the adapters (after sharding: their DTensors), warm-up then cosine decay."""
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup, total_steps, config.min_lr_ratio))
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------------
# Steps, validation, checkpoints


def _train(run: _Run) -> float:
    """The steps from `run.start` on, validations and checkpoints between them; returns the start time."""
    c = run.config
    if run.start == 0:
        _validate(run, 0)
    bar = tqdm(total=run.total_steps, initial=run.start, desc="finetune", unit="step",
               disable=run.rank != 0 or not c.progress, dynamic_ncols=True)
    t_begin = time.perf_counter()
    for step in range(run.start, run.total_steps):
        t0 = time.perf_counter()
        loss, n_tokens = _train_step(run, step)
        run.history.append(loss)
        run.tokens_seen += n_tokens
        run.train_time += time.perf_counter() - t0
        tps = run.tokens_seen / run.train_time
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", refresh=False)
        bar.update(1)
        run.record({"step": step + 1, "loss": loss, "lr": run.scheduler.get_last_lr()[0], "tokens": n_tokens,
                    "tokens_per_s": tps, "elapsed_s": time.perf_counter() - t_begin})
        done = step + 1
        if c.eval_every and done % c.eval_every == 0 and done < run.total_steps:
            _validate(run, done)
        if c.save_every and done % c.save_every == 0 and done < run.total_steps:
            save_state(checkpoint_dir(run.out, done), run.model, run.optimizer, run.scheduler, c, done,
                       run.history, run.val_history, run.rank, run.source, run.fingerprint)
    bar.close()
    return t_begin


def _train_step(run: _Run, step: int) -> tuple[float, int]:
    """One optimizer step over the step's global batch (this rank's share of its micro-batches).
    Returns (the trained-token mean CE over all ranks, the batch's tokens)."""
    c = run.config
    indices = run.batch(step)
    total_targets = sum(run.train_ex[i].num_targets for i in indices)
    mine = rank_share(run.train_ex, indices, c.micro_batch_size, run.rank, run.world, run.pad_id)
    local = run_micro_batches(run.loss_module, mine, total_targets, scale=float(run.world), device=run.device)
    if c.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], c.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss = all_reduce_sum([local], run.world, run.device)[0] / total_targets
    return loss, sum(len(run.train_ex[i]) for i in indices)


def _validate(run: _Run, step: int) -> None:
    if run.val_ex is None:
        return
    c = run.config
    loss = evaluate(run.loss_module, run.val_ex, c.eval_batch_size or c.micro_batch_size, rank=run.rank,
                    world=run.world, device=run.device, pad_id=run.pad_id)
    run.val_history.append((step, loss))
    run.record({"step": step, "val_loss": loss})


def _finish(run: _Run, t_begin: float) -> TrainResult:
    """The last validation, the final adapter (every rank gathers, rank 0 writes) and the result."""
    if not run.val_history or run.val_history[-1][0] != run.total_steps:
        _validate(run, run.total_steps)
    # Hand the model back ready for inference: no dropout, no checkpointing wrappers.
    uncheckpoint_layers(run.model)
    run.model.eval()
    state = adapter_state_dict(run.model)
    if run.rank == 0:
        save_adapter(run.model, run.out, run.config.lora, base_model_name_or_path=run.source, state=state)
    return TrainResult(
        steps=run.total_steps, train_losses=run.history, val_losses=run.val_history,
        tokens_per_s=run.tokens_seen / run.train_time if run.train_time else 0.0,
        peak_memory_bytes=peak_memory(run.device), trainable_parameters=run.trainable,
        elapsed_s=time.perf_counter() - t_begin, adapter_dir=run.out,
    )
