"""`gemma4 finetune`: the command line over `gemma4.train.finetune` (`gemma4.cli` passes its
arguments through; under torchrun, `python -m gemma4 finetune` runs it in every process).

It loads the base model, which `finetune` takes loaded. Defaults equal `TrainConfig`'s and
`LoraConfig`'s, which are read here rather than repeated.
"""

from __future__ import annotations

import argparse
import gc
import logging

import torch

from ..helptext import RawHelpFormatter
from ..train import LoraConfig, TrainConfig, finetune
from ..train.parallel import init_distributed
from ..train.trainer import MAX_AUTO_EPOCHS, MIN_STEPS
from ..train.rundir import check_out

DESCRIPTION = """\
Train a LoRA adapter (QLoRA with --quantize int4) on chat or text JSONL, on one device or, under
torchrun, on many (FSDP2). The adapter is written to --out in PEFT's format, so `gemma4 generate/
chat/serve --adapter DIR` and transformers + PEFT both load it.

Data, one JSON object per line:
  {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}],
   "tools": [...]}                       loss on the assistant turns only
  {"text": "..."}                        loss on every token
A bad line (not JSON, no assistant turn, longer than --max-length) is reported with its line
number and stops the run; --on-bad-data skip reports it and goes on."""

EPILOG = """\
examples:
  gemma4 finetune --data train.jsonl --val val.jsonl --out run1        # LoRA on the embedded gemma-3-270m
  gemma4 finetune --model google/gemma-3-1b-it --data train.jsonl --out run2 --quantize int4   # QLoRA
  gemma4 finetune --data train.jsonl --out run1 --save-every 50 --resume   # continue after a stop
  gemma4 finetune --data train.jsonl --out run1 --overwrite            # start run1 again
  gemma4 chat --adapter run1                                           # use it, unmerged
  torchrun --nproc-per-node 2 -m gemma4 finetune --data train.jsonl --out run3   # FSDP2, same flags
  gemma4 finetune --drafter --data prompts.txt --val held.txt --out drafter --max-steps 300 --lr 1e-3

--out gets adapter_config.json + adapter_model.safetensors, train_log.jsonl (loss, tokens/s per
step; validation loss) and checkpoint-NNNNNN/ directories (--save-every). A non-empty --out is
refused unless --resume continues its run (same data, model and options; the length may grow) or
--overwrite replaces it."""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    t, lc = TrainConfig(), LoraConfig()
    p.add_argument("--model", "-m", default=None, help="base checkpoint: a directory, a .gguf file or a Hub id; "
                   "default: the embedded gemma-3-270m")
    p.add_argument("--data", required=True, help="training JSONL: chat lines {'messages': [...], 'tools': [...]} "
                   "or text lines {'text': ...}")
    p.add_argument("--val", help="validation JSONL (same formats)")
    p.add_argument("--out", required=True, help="output directory: adapter, log, checkpoints; new or empty unless "
                   "--resume or --overwrite")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=lc.r, help=f"LoRA rank r (default {lc.r})")
    g.add_argument("--alpha", type=float, default=lc.alpha,
                   help=f"LoRA alpha: the update is scaled by alpha/r (default {lc.alpha:g})")
    g.add_argument("--dropout", type=float, default=lc.dropout, help="dropout on the adapter's input (default 0)")
    g.add_argument("--target-modules", default=",".join(lc.target_modules),
                   help="comma-separated module names, matched as dotted suffixes (PEFT's list form; "
                   "default: %(default)s)")
    g.add_argument("--target-regex", help="a regex that module names must fully match (PEFT's string form); "
                   "replaces --target-modules")
    g.add_argument("--target-parameters", default="",
                   help="expert tensors to adapt on MoE models, e.g. experts.gate_up_proj,experts.down_proj")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--quantize", choices=("int4", "int8"), default=t.quantize,
                   help="QLoRA: quantize the frozen base first with gemma4.quant; the adapters stay float")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=t.epochs,
                   help="passes over --data (default: 1, or on a small dataset enough for "
                        f"{MIN_STEPS} optimizer steps, at most {MAX_AUTO_EPOCHS}; the log says which)")
    g.add_argument("--max-steps", type=int, default=t.max_steps, help="overrides --epochs")
    g.add_argument("--batch-size", type=int, default=t.batch_size,
                   help="sequences per optimizer step, over all processes")
    g.add_argument("--micro-batch-size", type=int, default=t.micro_batch_size,
                   help="sequences per forward; batch-size / (micro-batch-size x processes) = accumulation steps")
    g.add_argument("--lr", type=float, default=t.lr, help=f"AdamW peak learning rate (default {t.lr:g})")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup-steps", type=int, default=t.warmup_steps,
                   help="linear warm-up steps before the cosine decay (default: --warmup-ratio of the steps)")
    g.add_argument("--warmup-ratio", type=float, default=t.warmup_ratio,
                   help="warm-up as a fraction of the steps, unless --warmup-steps is given "
                        f"(default {t.warmup_ratio:g})")
    g.add_argument("--min-lr-ratio", type=float, default=t.min_lr_ratio,
                   help="the cosine decay ends at lr x this (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=t.max_grad_norm, help="0 disables clipping")
    g.add_argument("--max-length", type=int, default=t.max_length,
                   help=f"tokens per sample; longer samples are bad data (default {t.max_length})")
    g.add_argument("--on-bad-data", choices=("skip", "error"), default=t.on_bad_data,
                   help="error (default): stop at the first bad line; skip: report each one and go on")
    g.add_argument("--dtype", choices=("auto", "bf16", "bfloat16", "fp32", "float32"), default=t.dtype,
                   help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep activations instead of recomputing them per layer: faster, more memory")
    g.add_argument("--ce-chunk-size", type=int, default=t.ce_chunk_size,
                   help="positions per cross-entropy chunk: bounds the fp32 logits held at once")
    g.add_argument("--eval-every", type=int, default=t.eval_every,
                   help="steps between validations (default 0: before and after training only)")
    g.add_argument("--eval-batch-size", type=int, default=t.eval_batch_size,
                   help="sequences per validation forward (default: --micro-batch-size)")
    g.add_argument("--save-every", type=int, default=t.save_every,
                   help="steps between resumable checkpoints in --out (default 0: none)")
    g.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest checkpoint in --out, or from the one given; refused if the "
                   "data, model or options differ from the checkpoint's (--max-steps/--epochs may grow)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in a used --out (removes only the files a run writes there)")
    g.add_argument("--export-merged", metavar="DIR", help="also write a merged full checkpoint to DIR")
    g.add_argument("--seed", type=int, default=t.seed, help="data order, adapter init and dropout")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU); 1 can be much faster on a busy shared CPU")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (loss, tokens/s, ETA)")
    g = p.add_argument_group("MTP drafter (speculative decoding; docs/speculative.md)")
    g.add_argument("--drafter", nargs="?", const="new", metavar="INIT",
                   help="train a drafter for --model instead of an adapter: a new one, or re-align the one at INIT; "
                   "the model answers --data's prompts greedily and the drafter learns its outputs; --out gets "
                   "the released layout, which --draft-model loads. Uses --max-steps/--epochs, --batch-size, --lr, "
                   "--max-length, --val (acceptance), --seed")
    g.add_argument("--draft-steps", type=int, default=3, help="k: chained draft steps trained (default 3)")
    g.add_argument("--drafter-new-tokens", type=int, default=64,
                   help="greedy tokens the model writes per prompt (default 64)")
    g.add_argument("--drafter-queries", type=int, default=32, help="positions trained per answer and step (default 32)")
    g.add_argument("--drafter-sparse", action="store_true", help="a new drafter gets the 2048-centroid sparse head")
    g.add_argument("--drafter-intermediate-size", type=int, default=None,
                   help="a new drafter's MLP width (default: the model's, at most 4 x its width)")
    g.add_argument("--adapter", default=None, help="a LoRA adapter of --model (merged first): train or re-align the "
                   "drafter for the fine-tuned model")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    targets = a.target_regex or tuple(s.strip() for s in a.target_modules.split(",") if s.strip())
    lora = LoraConfig(r=a.rank, alpha=a.alpha, dropout=a.dropout, target_modules=targets,
                      target_parameters=tuple(s.strip() for s in a.target_parameters.split(",") if s.strip()),
                      use_rslora=a.use_rslora)
    return TrainConfig(
        lora=lora, epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size,
        micro_batch_size=a.micro_batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        warmup_ratio=a.warmup_ratio, min_lr_ratio=a.min_lr_ratio, max_grad_norm=a.max_grad_norm or None,
        max_length=a.max_length, on_bad_data=a.on_bad_data, dtype=a.dtype, quantize=a.quantize,
        gradient_checkpointing=not a.no_gradient_checkpointing, ce_chunk_size=a.ce_chunk_size,
        eval_every=a.eval_every, eval_batch_size=a.eval_batch_size, save_every=a.save_every, resume=a.resume,
        overwrite=a.overwrite, export_merged=a.export_merged, seed=a.seed, progress=not a.no_progress,
    )


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.drafter:
        return _run_drafter(a)
    if a.adapter:
        raise SystemExit("finetune: --adapter names the fine-tuned model a drafter is trained for; it needs "
                         "--drafter (to continue a LoRA run, use --resume)")
    config = config_from_args(a)
    check_out(a.out, config.resume, config.overwrite)  # before minutes of loading; finetune checks again
    (model, tokenizer, chat_format), source = load_base(a.model, config)
    result = finetune(model, a.data, out=a.out, val=a.val, tokenizer=tokenizer, chat_format=chat_format,
                      config=config, source=source)
    if torch.distributed.is_initialized():  # under torchrun: leave the group cleanly, report once
        rank = torch.distributed.get_rank()
        # FSDP's mesh holds the group: free it while the interpreter is whole (gloo's threads torn
        # down at interpreter exit aborted a rank once in CI), and let no rank leave first.
        del model
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    val = f", validation loss {result.val_losses[0][1]:.4f} -> {result.val_losses[-1][1]:.4f}" if result.val_losses \
        else ""
    logging.getLogger(__name__).info(
        "trained %d steps, final loss %.4f%s, %.0f tokens/s; adapter in %s",
        result.steps, result.train_losses[-1] if result.train_losses else float("nan"), val, result.tokens_per_s,
        result.adapter_dir)
    return 0


def _run_drafter(a: argparse.Namespace) -> int:
    from ..api import default_model_path, load
    from ..train.drafter import DrafterTrainConfig, train_drafter
    from ..weights.save import check_target

    check_target(a.out)  # before minutes of loading
    config = DrafterTrainConfig(steps=a.max_steps, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                                draft_steps=a.draft_steps, max_new_tokens=a.drafter_new_tokens,
                                queries=a.drafter_queries,
                                max_length=a.max_length, sparse=a.drafter_sparse, seed=a.seed,
                                intermediate_size=a.drafter_intermediate_size, progress=not a.no_progress)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, chat_format = load(str(a.model or default_model_path()), device=device, adapter=a.adapter)
    if device == "cpu":  # the model's answers and states come from the path `generate` decodes with
        from ..engine.cpu import speed_up

        speed_up(model)
    result = train_drafter(model, tokenizer, chat_format, a.data, a.out, val=a.val, config=config,
                           init=None if a.drafter == "new" else a.drafter)
    logging.getLogger(__name__).info("trained %d steps in %.0f s, loss %.4f -> %.4f; drafter in %s", result.steps,
                                     result.seconds, result.losses[0], result.losses[-1], result.out)
    return 0


def load_base(model: str | None, config: TrainConfig):
    """(`gemma4.load`'s model, tokenizer, chat format; the source) for training on this process.
    Under FSDP (torchrun, several processes) each loads fp32 on CPU: the weights are then sharded
    and cast per layer for compute (MixedPrecisionPolicy); alone, it loads in the compute dtype."""
    from ..api import default_model_path, load

    _, world, device = init_distributed()
    source = str(model if model is not None else default_model_path())
    if world > 1:
        return load(source, dtype=torch.float32, device="cpu"), source
    return load(source, dtype=config.torch_dtype(device), device=device), source


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


def parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="gemma4 finetune", description=DESCRIPTION, epilog=EPILOG,
                                                 formatter_class=RawHelpFormatter))
