"""Tensor and expert parallelism over 2 and 4 gloo processes equal one process (fp32, 1e-5).

Tiny configs of every layout: E2B-like (PLE table vocab-parallel, KV sharing, one KV head
replicated over the ranks), 31B-like (k_eq_v; at tp 4 its 2 global KV heads are each replicated
over 2 ranks), 26B-like MoE (experts tensor-parallel, expert-parallel, and both), Gemma 3.
The tiny vocabulary (128) and widths do not always divide the ranks: uneven splits are covered.

Tolerance 1e-5 (max abs, logits up to ~12). The MoE model gets 3e-5: its expert sums run in
another order across ranks, and that model's fp32 logits are only that good anyway (one process:
2.1e-5 from float64; switching its own expert formulation, loop vs gather, moves them 1.5e-5).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from parallel_helpers import Pool, run_greedy
from testing_utils import hf_model

from gemma4.weights import load_model

ATOL = 1e-5
MOE_ATOL = 3e-5
IDS = torch.tensor([[2, 17, 99, 5, 64, 3, 120, 8, 45, 77, 12, 30], [2, 9, 9, 101, 4, 56, 33, 7, 88, 1, 19, 60]])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = Pool(str(tmp_path_factory.mktemp("pool")))
    yield p
    p.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    made = {}

    def get(name: str) -> str:
        if name not in made:
            hf_model(name).save_pretrained(root / name)
            made[name] = str(root / name)
        return made[name]

    return get


def test_each_rank_loads_its_share(pool, tmp_path):
    """Resident memory per rank over load + forward is about 1/tp of the weights (first in this
    module: the workers' heaps are fresh). An 11M-parameter model (45 MB in fp32): large enough
    that the weights, not the allocator, dominate. Measured: one process 44.9 MB, a rank of 2
    28.5-28.9 MB (half the weights, 22.5, plus the replicated norms and allocator slack)."""
    from testing_utils import random_model

    from gemma4.weights.save import save

    model = random_model("tiny-31b", hidden_size=256, intermediate_size=1024, vocab_size=4096)
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    path = str(save(tmp_path / "m", model))
    del model
    sharded = pool.run("load_memory", path, 2, IDS)
    plain = pool.run("load_memory", path, 0, IDS)
    mib = 2**20
    print(f"weights {weights / mib:.1f} MiB; one process {plain / mib:.1f} MiB; a rank of 2 {sharded / mib:.1f} MiB")
    assert plain > 0.8 * weights  # the measurement sees the weights
    assert sharded < 0.7 * plain, "a rank of 2 should hold about half of the weights"  # measured 0.64


@pytest.mark.parametrize(("name", "tp", "ep"), [
    ("tiny-e2b", 2, 1), ("tiny-e2b", 4, 1),
    ("tiny-31b", 2, 1), ("tiny-31b", 4, 1),
    ("tiny-gemma-3-270m", 4, 1),
    ("tiny-26b-a4b", 2, 1), ("tiny-26b-a4b", 2, 2), ("tiny-26b-a4b", 4, 2), ("tiny-26b-a4b", 4, 4),
])
def test_logits_equal_one_process(pool, checkpoints, name, tp, ep):
    path = checkpoints(name)
    want = load_model(path, dtype=torch.float32)(IDS)
    got = pool.run("logits", path, tp, ep, IDS)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    print(f"{name} tp={tp} ep={ep}: max |diff| {err:.2e}")
    assert err < (MOE_ATOL if "26b" in name else ATOL), f"{name} tp={tp} ep={ep}: max |diff| {err:.2e}"


@pytest.mark.parametrize(("name", "tp", "ep"),
                         [("tiny-e2b", 2, 1), ("tiny-gemma-3-270m", 2, 1), ("tiny-26b-a4b", 4, 2)])
def test_greedy_generation_equal(pool, checkpoints, name, tp, ep):
    """Two prompts of different lengths decoded together by the engine: the same tokens."""
    path = checkpoints(name)
    prompts = [IDS[0, :5].tolist(), IDS[1].tolist()]
    want = run_greedy(load_model(path, dtype=torch.float32), prompts, 8)
    assert pool.run("greedy", path, tp, ep, prompts, 8) == want


QUANTIZED = {"int8": ("tiny-31b", 64), "int4": ("tiny-e2b", 32)}  # scheme: (model, int4 group)


@pytest.fixture(scope="module")
def quantized_checkpoints(checkpoints, tmp_path_factory):
    from gemma4.quant import quantize, save_quantized

    root = tmp_path_factory.mktemp("quantized")
    return {scheme: str(save_quantized(quantize(load_model(checkpoints(name), dtype=torch.float32), scheme, group),
                                       root / scheme)) for scheme, (name, group) in QUANTIZED.items()}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoint_equals_one_process(pool, quantized_checkpoints, scheme):
    """int8 (per-row scales) tiny-31b and int4 tiny-e2b (groups of 32: its 96-wide MLP is cut in
    whole groups, 64 + 32 columns) at 2 ranks: the logits of the same checkpoint in one process
    within 1e-5 (the same dequantized weights; only the row-parallel sums change order; kernels off
    on both sides), the same greedy tokens, and rank 0 read only its slices of
    the codes of every sharded weight (replicated ones stay memory-mapped views, as in one process)."""
    from gemma4.api import load_model as load_quantized
    from gemma4.parallel.layout import Layout
    from gemma4.parallel.plan import ranges
    from gemma4.quant import set_kernels
    from gemma4.weights import open_checkpoint
    from gemma4.weights.safetensors import open_tensors, shard_files

    path = quantized_checkpoints[scheme]
    prompts = [IDS[0, :5].tolist(), IDS[1].tolist()]
    one = set_kernels(load_quantized(path, dtype=torch.float32), False)
    want = one(IDS)
    got, tokens, sliced, whole = pool.run("quantized", path, 2, IDS, prompts, 6)
    err = (got - want).abs().max().item()
    print(f"{scheme} tp=2: max |diff| {err:.2e}")
    assert err < ATOL
    assert tokens == run_greedy(one, prompts, 6)
    config = open_checkpoint(path).config
    codes = {name: math.prod(shape) for name, _, shape in open_tensors(shard_files(Path(path)))
             if name.endswith(".qweight") and ranges(config, Layout(2), name.removesuffix(".qweight"), shape)}
    assert not codes.keys() & set(whole), "a rank read a whole quantized weight that is sharded"
    assert sliced.keys() >= codes.keys()
    share = sum(sliced[n] for n in codes) / sum(codes.values())
    print(f"rank 0 read {share:.3f} of the codes")
    assert share == 0.5 if scheme == "int8" else 0.5 < share < 0.6  # int4: 2 of the MLPs' 3 groups


def test_quantized_split_that_cuts_groups_is_refused(quantized_checkpoints):
    """At 4 ranks the tiny-e2b's o_proj (64 inputs) would give each rank 16: half of an int4 group."""
    from gemma4.parallel.layout import Layout
    from gemma4.parallel.load import load_sharded
    from gemma4.quant.shard import QuantizedSlices
    from gemma4.weights.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"--tp 4 does not fit .*groups of 32.*Use --tp in \[1, 2\]"):
        load_sharded(quantized_checkpoints["int4"], Layout(4), torch.float32, quantized=QuantizedSlices)
    with pytest.raises(CheckpointError, match="load it with gemma4.load"):
        load_sharded(quantized_checkpoints["int8"], Layout(2), torch.float32)


def test_every_group_times_out_like_the_world(pool):
    """A collective waiting on a hung peer fails after layout.DEFAULT_TIMEOUT in every group: torch
    gives a new group 30 minutes unless told (tp 2 of 4 ranks: the tp group is not the world's)."""
    from gemma4.parallel.layout import DEFAULT_TIMEOUT

    assert pool.run("group_timeouts", 2, 2) == [DEFAULT_TIMEOUT.total_seconds()] * 3
