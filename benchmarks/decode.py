"""Decode speed of one model against its peers and against the memory-bandwidth roofline.

    python benchmarks/decode.py                                    # the embedded real gemma-3-270m, CPU
    python benchmarks/decode.py --weights float,fp16 --threads 1   # several weight formats, one run
    python benchmarks/decode.py --variant gemma-4-e2b --device cuda --mode cuda-graph,reduce-overhead
    python benchmarks/decode.py --variant gemma-4-26b-a4b --layers 6 --dtype bfloat16   # a smoke run
    python benchmarks/decode.py --model ./270m-int8 --weights fast --peers ""   # a quantized checkpoint, CLI path

What one run measures, for ours and for each peer, on the same device, dtype and prompt:
  prefill tok/s (a --prompt-len prompt, chunked), time to first token, batch-1 decode tok/s,
  batched decode throughput (--batch rows), and peak memory (CUDA: allocated; CPU: process RSS).
Peers: transformers' `generate` on the same config and dtype (the same weights when they fit
twice, else its own random ones: speed does not depend on the values), and llama.cpp through
llama-cpp-python on the real 270M GGUF (CPU, when importable and the model is the embedded one).
Roofline: the bytes one decode step must read (every weight once; of a lookup table (PLE) only
the rows; of MoE experts only the routed ones; plus the KV cache at the mean context) over a
bandwidth measured here: the larger of a large tensor copy (bytes read + written / time) and a
read-only sum, since decoding mostly reads. Each row is reported as a fraction of its roofline.

Random weights (`--variant`) are fine for speed. `--layers N` keeps the first N layers of a
variant (and the KV-sharing tail scaled down with it) for machines too small for the real one.
Timings take the median of --repeat runs; the load average is printed beside them, since a
busy CPU distorts everything (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma4.config import TextConfig  # noqa: E402
from gemma4.engine.generate import TokenGenerator  # noqa: E402
from gemma4.engine.sampling import SamplingParams  # noqa: E402
from gemma4.engine.sequence import GenerationRequest  # noqa: E402
from gemma4.engine.core import MODES, PREFILL_CHUNK, Engine  # noqa: E402
from gemma4.model import Gemma  # noqa: E402
from gemma4.model.layers import Experts  # noqa: E402
from gemma4.variants import variant_hf_config  # noqa: E402

GREEDY = SamplingParams(temperature=0)
WEIGHTS = ("float", "fp16", "fp16-all", "int8-dynamic", "int8", "int4", "fast", "fast-int4-head")


@dataclass
class Row:
    name: str
    prefill_tps: float = float("nan")
    ttft_s: float = float("nan")
    decode_tps: float = float("nan")
    batch_tps: float = float("nan")
    peak_gib: float = float("nan")
    weight_bytes: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bandwidth(device: torch.device, repeat: int) -> tuple[float, float]:
    """(copy, read) GB/s: a large tensor copy (bytes read + written over time) and a sum (bytes read).

    Decoding mostly reads, and a CPU reads faster than it copies (a copy also pays for the write
    and its cache-line fills), so the roofline uses the larger of the two."""
    n = (1 << 28 if device.type == "cuda" else 1 << 26)  # 1 GiB / 256 MiB of fp32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        times = []
        for _ in range(repeat + 1):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    nbytes = src.numel() * 4
    return 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9, nbytes / timed(src.sum) / 1e9


def load_avg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "n/a"


# ------------------------------------------------------------------------------------------------
# Models


def variant_config(name: str, layers: int | None) -> dict:
    raw = variant_hf_config(name)
    if layers:
        n = raw["num_hidden_layers"]
        shared = raw.get("num_kv_shared_layers") or 0
        raw["num_hidden_layers"] = layers
        raw["layer_types"] = list(raw["layer_types"][: layers - 1]) + ["full_attention"]
        if shared:  # keep the same fraction of KV-shared layers, at least one of each type computing K/V
            raw["num_kv_shared_layers"] = min(round(shared * layers / n), max(layers - raw["layer_types"].index(
                "full_attention") - 1, 0))
    return raw


@torch.no_grad()
def random_model(cfg: TextConfig, dtype: torch.dtype, device: torch.device, ple_on_host: bool) -> Gemma:
    """Real shapes, random weights, built straight on the device (no float32 detour)."""
    with torch.device("meta"):
        model = Gemma(cfg)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02 if "embed" in name else p.shape[-1] ** -0.5, generator=gen)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
    model = model.to(dtype)
    model.model.reset_buffers(device)
    if ple_on_host and cfg.hidden_size_per_layer_input:
        model.model.embed_tokens_per_layer.to("cpu")
    return model.eval()


def apply_weights(model: Gemma, fmt: str) -> Gemma:
    if fmt in ("fp16", "fp16-all", "int8-dynamic"):
        from gemma4.engine.cpu import pack_linears

        # fp16: the CPU default (fp16 linears, an int8 head rescored exactly at its top 64)
        body = fmt.removesuffix("-all")
        return pack_linears(model, body, head="rescored" if fmt == "fp16" else body)
    if fmt.startswith("fast"):  # what the CLI runs: speed_up (a quantized --model: gemma4.quant.speed_up_quantized)
        from gemma4.engine.cpu import speed_up
        from gemma4.quant import QuantizedTensor, speed_up_quantized

        if fmt == "fast-int4-head" and any(isinstance(m, QuantizedTensor) for m in model.modules()):
            speed_up_quantized(model, head="int4")
        else:
            speed_up(model)
        return model
    if fmt in ("int8", "int4"):
        from gemma4.quant import quantize

        return quantize(model, fmt, progress=False)
    return model


def weight_bytes_per_token(model: Gemma, batch: int) -> int:
    """Bytes of weights one decode step reads: every weight once, except that of a lookup-only table
    (the PLE table; the embedding when a packed copy serves as the head) only `batch` rows count,
    and of the MoE experts only the expected share some row routes to."""
    cfg = model.config
    routed = 1.0
    if cfg.enable_moe_block:
        routed = 1 - (1 - cfg.top_k_experts / cfg.num_experts) ** batch
    lookup_only = ["model.embed_tokens_per_layer"]
    if cfg.tie_word_embeddings and model.lm_head is not None:
        lookup_only.append("model.embed_tokens")
    total, seen = 0, set()
    for name, mod in model.named_modules():
        tensors = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        nbytes = sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() not in seen)
        seen.update(t.data_ptr() for t in tensors)
        nbytes += getattr(mod, "nbytes", 0) if not tensors else 0  # PackedLinear: opaque fbgemm weights
        table = next((t for t in lookup_only if name == t or name.startswith(t + ".")), None)
        if table is not None:
            if name == table:  # rows of the float (or quantized) table, at 1 byte per value at least
                w = mod.weight
                total += batch * w.shape[-1] * (w.element_size() if isinstance(w, torch.Tensor) else 1)
            continue
        experts = isinstance(mod, Experts) or (".experts." in name + "." and type(mod).__name__ == "QuantizedTensor")
        total += int(nbytes * (routed if experts else 1.0))
    return total


def kv_bytes_per_token(cfg: TextConfig, context: int, batch: int, elem: int) -> int:
    total = 0
    for spec in cfg.layers:
        if spec.shares_kv:
            continue
        slots = context if spec.window is None else min(context, spec.window)
        total += 2 * batch * spec.num_kv_heads * slots * spec.head_dim * elem
    return total


# ------------------------------------------------------------------------------------------------
# Ours


def time_generation(model, prompts, n: int, engine: Engine) -> tuple[float, float]:
    """(time to first token, decode tokens/s per row) of one greedy generation."""
    sync(engine.device)
    start = time.perf_counter()
    first = last = None
    for steps in TokenGenerator(model, prompts, [GREEDY] * len(prompts), [n] * len(prompts), set(), engine=engine):
        sync(engine.device)
        last = time.perf_counter()
        if first is None:
            first = last
    return first - start, (n - 1) / (last - first)


def time_prefill(engine: Engine, prompt: list[int]) -> float:
    """Prompt tokens/s of the engine's (chunked) prefill, first token sampled included."""
    seq = engine.new_sequence(GenerationRequest(prompt, 1, GREEDY))
    engine.add(seq)
    sync(engine.device)
    t = time.perf_counter()
    engine.prefill()
    sync(engine.device)
    return len(prompt) / (time.perf_counter() - t)


def bench_ours(model: Gemma, args, prompt: list[int], label: str, mode: str) -> Row:
    device = next(model.parameters()).device
    row = Row(label)
    need = len(prompt) + args.new_tokens + 1
    reset_peak(device)
    engine = Engine(model, max_len=need, mode=mode, prefill_chunk=args.prefill_chunk)
    t = time.perf_counter()
    time_generation(model, [prompt], 3, engine)  # warm-up: compile / capture, allocator
    row.extra["warmup_s"] = round(time.perf_counter() - t, 1)
    pre, ttft, tps = [], [], []
    for _ in range(args.repeat):
        pre.append(time_prefill(engine, prompt))
        a, b = time_generation(model, [prompt], args.new_tokens, engine)
        ttft.append(a)
        tps.append(b)
    row.prefill_tps, row.ttft_s, row.decode_tps = statistics.median(pre), statistics.median(ttft), statistics.median(tps)
    row.peak_gib = peak_gib(device)
    del engine
    if args.batch > 1:
        engine = Engine(model, rows=args.batch, max_len=need, mode=mode, prefill_chunk=args.prefill_chunk)
        prompts = [prompt] * args.batch
        time_generation(model, prompts, 3, engine)
        row.batch_tps = args.batch * statistics.median(
            time_generation(model, prompts, args.new_tokens, engine)[1] for _ in range(args.repeat))
        row.peak_gib = max(row.peak_gib, peak_gib(device))
        del engine
    row.weight_bytes = weight_bytes_per_token(model, 1)
    return row


# ------------------------------------------------------------------------------------------------
# Peers


def hf_model(raw: dict, dtype, device, ours: Gemma | None):
    import transformers

    raw = dict(raw)
    model_type = raw.pop("model_type")
    cls, cfg_cls = {"gemma4_text": (transformers.Gemma4ForCausalLM, transformers.Gemma4TextConfig),
                    "gemma3_text": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig)}[model_type]
    for key in ("architectures", "family"):
        raw.pop(key, None)
    config = cfg_cls(**raw)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    if ours is not None:  # the same weights: names are the checkpoint's on both sides
        missing, _ = model.load_state_dict(ours.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" and "rotary" not in k and "inv_freq" not in k]
        if missing:
            raise ValueError(f"transformers' model has weights ours lacks: {missing[:3]}")
    return model.eval()


@torch.inference_mode()
def bench_transformers(raw: dict, args, prompt: list[int], dtype, device, ours: Gemma | None) -> Row:
    row = Row("transformers generate")
    try:
        model = hf_model(raw, dtype, device, ours)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        row.note = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    ids = torch.tensor([prompt], device=device)

    def run(n: int, batch: int = 1) -> float:
        x = ids.expand(batch, -1)
        sync(device)
        t = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    reset_peak(device)
    run(2)
    one = [run(1) for _ in range(args.repeat)]
    full = [run(args.new_tokens) for _ in range(args.repeat)]
    row.ttft_s = statistics.median(one)
    row.prefill_tps = len(prompt) / row.ttft_s
    row.decode_tps = (args.new_tokens - 1) / (statistics.median(full) - row.ttft_s)
    if args.batch > 1:
        b1 = statistics.median(run(1, args.batch) for _ in range(args.repeat))
        bn = statistics.median(run(args.new_tokens, args.batch) for _ in range(args.repeat))
        row.batch_tps = args.batch * (args.new_tokens - 1) / (bn - b1)
    row.peak_gib = peak_gib(device)
    row.note = "same weights" if ours is not None else "own random weights"
    del model
    gc.collect()
    return row


AMX_OFF = ("CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
           "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF\" pip install --force-reinstall "
           "--no-deps llama-cpp-python")


def bench_llama_cpp(gguf: Path, args, prompt: list[int]) -> Row:
    """llama.cpp's figures, measured in a child process: a llama.cpp build can crash (on a Xeon VM
    its AMX matmul segfaulted on every prompt), and that must not take our rows down with it."""
    import multiprocessing

    row = Row("llama.cpp (llama-cpp-python)")
    threads = torch.get_num_threads()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_llama_cpp_child,
                        args=(str(gguf), prompt, args.new_tokens, args.repeat, threads, results))
    child.start()
    child.join()
    if results.empty():
        row.note = (f"not run: llama.cpp's process died (exit code {child.exitcode}). A build with AMX crashed "
                    f"so on a Xeon VM; on an AVX-512 CPU this rebuilds it without: {AMX_OFF}")
        return row
    out = results.get()
    if "error" in out:
        row.note = f"not run: {out['error']}"
        return row
    row.prefill_tps, row.ttft_s, row.decode_tps = out["prefill_tps"], out["ttft_s"], out["decode_tps"]
    row.weight_bytes = gguf.stat().st_size
    row.note = f"{gguf.name}, {threads} threads (includes llama-cpp-python's per-token Python)"
    return row


def _llama_cpp_child(gguf: str, prompt: list[int], new_tokens: int, repeat: int, threads: int, results) -> None:
    try:
        from llama_cpp import Llama
    except ImportError:
        results.put({"error": "llama_cpp is not importable"})
        return
    try:
        llm = Llama(model_path=gguf, n_ctx=len(prompt) + new_tokens + 8, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
    except Exception as e:  # noqa: BLE001 - reported in the row
        results.put({"error": f"llama.cpp could not load {gguf}: {e}"})
        return
    pre, ttft, tps = [], [], []
    for _ in range(repeat + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = llm.sample(top_k=1, temp=0)
        t2 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = llm.sample(top_k=1, temp=0)
        t3 = time.perf_counter()
        pre.append(len(prompt) / (t1 - t0))
        ttft.append(t2 - t0)
        tps.append((new_tokens - 1) / (t3 - t2))
    results.put({"prefill_tps": statistics.median(pre[1:]), "ttft_s": statistics.median(ttft[1:]),
                 "decode_tps": statistics.median(tps[1:])})


# ------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--variant", help="a named variant (real shapes, random weights), e.g. gemma-4-e2b")
    src.add_argument("--model", default=None, help="checkpoint dir, .gguf or Hub id; default: the embedded 270M")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--weights", default="float", help=f"comma-separated, each one run: {', '.join(WEIGHTS)}")
    ap.add_argument("--mode", default=None, help=f"decode step, comma-separated: {', '.join(MODES)} "
                                                 "(default: eager on CPU, cuda-graph on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="rows of the batched-decode measurement (1: skip)")
    ap.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) CPU threads")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers of --variant")
    ap.add_argument("--ple-on-host", action="store_true", help="keep the PLE table in CPU memory (CUDA)")
    ap.add_argument("--peers", default="transformers,llama.cpp", help="comma-separated; '' for none")
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the embedded 270M's)")
    ap.add_argument("--json", default=None, help="write the results here")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = (args.mode or ("cuda-graph" if device.type == "cuda" else "eager")).split(",")
    formats = args.weights.split(",")
    for f in formats:
        if f not in WEIGHTS:
            ap.error(f"unknown --weights {f!r}; use {', '.join(WEIGHTS)}")
    peers = [p for p in args.peers.split(",") if p]

    gguf = None
    if args.variant:
        raw = variant_config(args.variant, args.layers)
        cfg = TextConfig.from_hf_dict(raw)

        def build() -> Gemma:
            return random_model(cfg, dtype, device, args.ple_on_host)

        label = args.variant + (f" (first {args.layers} layers)" if args.layers else "")
    else:
        import gemma4

        def build() -> Gemma:
            return gemma4.load(args.model, dtype=dtype, device=device)[0]

        if args.model is None:
            from gemma4.api import default_model_path

            gguf = default_model_path()
        elif str(args.model).endswith(".gguf"):
            gguf = Path(args.model)
        label = args.model or "gemma-3-270m (embedded Q4_K_M GGUF, dequantized)"
        cfg = None
    if args.gguf:
        gguf = Path(args.gguf)

    gen = torch.Generator().manual_seed(0)
    header = {
        "model": label, "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                                if device.type == "cuda" else platform.processor()
                                                                or platform.machine()),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "batch": args.batch, "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    copy_bw, read_bw = bandwidth(device, args.repeat)
    header["copy_bandwidth_gbs"], header["read_bandwidth_gbs"] = round(copy_bw, 1), round(read_bw, 1)
    roof_bw = max(copy_bw, read_bw)
    print(json.dumps(header, indent=1), flush=True)

    rows: list[Row] = []
    model = None
    for fmt in formats:
        for mode in modes:
            model = apply_weights(build(), fmt)
            cfg = model.config
            prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
            print(f"[{time.strftime('%H:%M:%S')}] ours: weights={fmt} mode={mode}  load {load_avg()}", flush=True)
            rows.append(bench_ours(model, args, prompt, f"ours ({fmt}, {mode})", mode))
            rows[-1].extra["load_avg"] = load_avg()
            if not (fmt == formats[-1] and mode == modes[-1]):
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    if "transformers" in peers:
        # Same weights if the model is float and two copies fit comfortably; else HF's own random init.
        reuse = formats[-1] == "float" and model is not None
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            reuse = reuse and size * 2.2 < free
        ours = model if reuse else None
        if ours is None:
            del model
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[{time.strftime('%H:%M:%S')}] transformers  load {load_avg()}", flush=True)
        rows.append(bench_transformers(cfg.to_hf_dict(), args, prompt, dtype, device, ours))
        float_rows = [r for r in rows if r.name.startswith("ours (float")]
        rows[-1].weight_bytes = float_rows[0].weight_bytes if float_rows else 0  # the same model's bytes
        rows[-1].extra["load_avg"] = load_avg()
    del model
    gc.collect()
    if "llama.cpp" in peers and device.type == "cpu" and gguf is not None:
        print(f"[{time.strftime('%H:%M:%S')}] llama.cpp  load {load_avg()}", flush=True)
        rows.append(bench_llama_cpp(gguf, args, prompt))
        rows[-1].extra["load_avg"] = load_avg()

    # Roofline: weights + KV at the mean decode context, over the measured bandwidth.
    context = args.prompt_len + args.new_tokens // 2
    elem = torch.finfo(dtype).bits // 8
    kv1 = kv_bytes_per_token(cfg, context, 1, elem)
    kvb = kv_bytes_per_token(cfg, context, args.batch, elem)
    print(f"\n{label} | {device} {header['device_name']} | {header['dtype']} | threads {header['threads']} | "
          f"prompt {args.prompt_len}, {args.new_tokens} new, batch {args.batch} | bandwidth: copy {copy_bw:.1f}, "
          f"read {read_bw:.1f} GB/s")
    print("| | prefill tok/s | TTFT ms | decode tok/s (B=1) | batched tok/s | peak GiB | bytes/token | "
          "roofline tok/s | of roofline | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for r in rows:
        nbytes = r.weight_bytes + kv1 if r.weight_bytes else 0
        roof = roof_bw * 1e9 / nbytes if nbytes else float("nan")
        frac = r.decode_tps / roof if nbytes else float("nan")
        print(f"| {r.name} | {r.prefill_tps:.0f} | {r.ttft_s * 1e3:.0f} | {r.decode_tps:.1f} | {r.batch_tps:.1f} | "
              f"{r.peak_gib:.2f} | {nbytes / 1e6:.0f} MB | {roof:.1f} | {frac:.0%} | {r.extra.get('load_avg', '')} |"
              + (f" {r.note}" if r.note else ""))
        out.append(r.__dict__ | {"bytes_per_token": nbytes, "roofline_tps": roof, "fraction_of_roofline": frac})
    if kvb:
        print(f"(KV cache read per step at context {context}: {kv1 / 1e6:.1f} MB at batch 1, "
              f"{kvb / 1e6:.1f} MB at batch {args.batch}; included above)")
    result = {"header": header, "rows": out}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
