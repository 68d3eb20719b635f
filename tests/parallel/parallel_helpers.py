"""A pool of gloo worker processes, started once per test module, that runs named jobs on every rank.

Jobs are functions of this module; each gets the same arguments on every rank and returns rank 0's
result (ranks outside a smaller tp group idle through the job). Process groups are made once per
(tp, ep) and reused, as a real run makes them once.
"""

from __future__ import annotations

import os
import queue
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

WORLD = 4
TIMEOUT = 180  # seconds a job may take before the test fails (instead of hanging)


class Pool:
    def __init__(self, tmp: str, world: int = WORLD):
        ctx = mp.get_context("spawn")
        self.inbox = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        store = os.path.join(tmp, "store")
        self.procs = [ctx.Process(target=_worker, args=(r, world, store, self.inbox[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, job: str, *args):
        for q in self.inbox:
            q.put((job, args))
        results = {}
        for _ in self.inbox:
            try:
                rank, ok, value = self.outbox.get(timeout=TIMEOUT)
            except queue.Empty:
                raise TimeoutError(f"job {job} did not finish in {TIMEOUT}s on every rank") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed in {job}:\n{value}")
            results[rank] = value
        return results[0]

    def close(self):
        for q in self.inbox:
            q.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


_LAYOUTS: dict = {}


def _worker(rank, world, store, inbox, outbox):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT))
    while (item := inbox.get()) is not None:
        job, args = item
        try:
            outbox.put((rank, True, globals()[job](*args)))
        except BaseException:  # noqa: BLE001 - reported to the test
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def layout(tp: int, ep: int = 1):
    """This rank's Layout for (tp, ep) over ranks [0, tp), or None outside them (made once)."""
    from gemma4.parallel.layout import make_groups

    if (tp, ep) not in _LAYOUTS:
        _LAYOUTS[tp, ep] = make_groups(tp, ep)
    return _LAYOUTS[tp, ep]


def logits(path: str, tp: int, ep: int, ids: torch.Tensor):
    """Logits of a plain forward of the sharded model."""
    from gemma4.parallel.load import load_sharded

    lay = layout(tp, ep)
    if lay is None:
        return None
    model = load_sharded(path, lay, torch.float32)
    with torch.inference_mode():
        return model(ids)


def greedy(path: str, tp: int, ep: int, prompts: list[list[int]], n: int):
    """Greedy tokens of each prompt, generated together by the engine on the sharded model."""
    from gemma4.parallel.load import load_sharded

    lay = layout(tp, ep)
    if lay is None:
        return None
    model = load_sharded(path, lay, torch.float32)
    return run_greedy(model, prompts, n)


def run_greedy(model, prompts, n):
    from gemma4.engine.generate import Generation
    from gemma4.engine.sampling import SamplingParams
    from gemma4.engine.sequence import GenerationRequest

    requests = [GenerationRequest(p, max_tokens=n, sampling=SamplingParams(temperature=0.0)) for p in prompts]
    out = [[] for _ in prompts]
    for step in Generation(model, requests):
        for i, e in enumerate(step):
            if e is not None and e.token is not None:
                out[i].append(e.token)
    return out


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def load_memory(path: str, tp: int, ids: torch.Tensor):
    """Growth of this process's resident memory (bytes) over a load and one forward, which touches
    every weight: the sharded model's at `tp` ranks, or (tp = 0, rank 0) the plain one's. The
    current size, not ru_maxrss: a worker's lifetime peak comes from its start-up (~440 MB)."""
    import gc

    from gemma4.parallel.load import load_sharded
    from gemma4.weights import load_model

    from testing_utils import random_model

    lay = layout(tp) if tp else None
    if (lay is None and tp) or (not tp and torch.distributed.get_rank() != 0):
        return None
    with torch.inference_mode():  # first-forward costs (thread pools, kernel caches) paid before measuring
        random_model("tiny-31b")(ids)
    gc.collect()
    before = _rss_kb()
    model = load_sharded(path, lay, torch.float32) if tp else load_model(path, dtype=torch.float32)
    with torch.inference_mode():
        model(ids)
    grown = _rss_kb() - before
    del model
    gc.collect()
    return grown * 1024


def quantized(path: str, tp: int, ids: torch.Tensor, prompts: list[list[int]], n: int):
    """A quantized checkpoint at `tp` ranks: (logits, greedy tokens, bytes of `qweight` each part
    read of it as a slice, names of the quantized parts it read whole). Kernels off: the same
    dequantized math as the one-process reference."""
    from gemma4.parallel.load import load_sharded
    from gemma4.quant import set_kernels
    from gemma4.quant.shard import QuantizedSlices
    from gemma4.weights import safetensors

    lay = layout(tp)
    if lay is None:
        return None
    sliced, whole = {}, []
    mapped = safetensors._Mapped
    read_slice, call = mapped.read_slice, mapped.__call__

    def spy_slice(self, block):
        out = read_slice(self, block)
        sliced[self.name] = out.nbytes
        return out

    def spy_call(self):
        whole.append(self.name)
        return call(self)

    mapped.read_slice, mapped.__call__ = spy_slice, spy_call
    try:
        model = set_kernels(load_sharded(path, lay, torch.float32, quantized=QuantizedSlices), False)
    finally:
        mapped.read_slice, mapped.__call__ = read_slice, call
    with torch.inference_mode():
        out = model(ids)
    return out, run_greedy(model, prompts, n), sliced, whole


def group_timeouts(tp: int, ep: int):
    """Seconds a collective of each of this rank's groups (tp, ep, etp) waits before failing."""
    lay = layout(tp, ep)
    if lay is None:
        return None
    cpu = torch.device("cpu")
    return [g._get_backend(cpu).options._timeout.total_seconds() for g in (lay.tp_group, lay.ep_group, lay.etp_group)]
