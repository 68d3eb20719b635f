"""`gemma4 info --tp`'s per-rank numbers equal what a rank builds: parameters of the sharded model
built on meta, bytes of the engine's KV cache built on meta from the rank's geometry."""

from __future__ import annotations

import pytest
import torch

from gemma4.cli import main
from gemma4.engine.cache import DEFAULT_HEADROOM, KVCache
from gemma4.parallel.layout import Layout
from gemma4.parallel.memory import rank_kv_bytes, rank_parameters
from gemma4.parallel.plan import local_config, shard_model
from gemma4.variants import variant


@pytest.mark.parametrize(("name", "tp", "ep"), [
    ("gemma-4-31b", 8, 1), ("gemma-4-26b-a4b", 4, 2), ("gemma-4-e2b", 2, 1),
    ("tiny-31b", 4, 1), ("tiny-26b-a4b", 4, 4), ("tiny-e2b", 4, 1), ("tiny-e2b", 1, 1), ("tiny-gemma-3-270m", 2, 1),
])
def test_per_rank_numbers_match_the_meta_build(name, tp, ep):
    config = variant(name)
    context = min(4096, config.max_position_embeddings)
    for rank in range(tp):
        layout = Layout(tp, ep, rank)
        with torch.device("meta"):
            model = shard_model(config, layout)
            cache = KVCache(local_config(config, layout), 1, context, torch.bfloat16, "meta", static=True)
        assert rank_parameters(config, layout) == sum(p.numel() for p in model.parameters()), rank
        assert rank_kv_bytes(config, layout, context, DEFAULT_HEADROOM) == cache.nbytes(), rank
    if tp == 1:
        assert rank_parameters(config, Layout(1)) == config.num_parameters()


def test_info_prints_per_rank_memory(capsys):
    assert main(["info", "--variant", "gemma-4-31b", "--tp", "4", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "per rank (tp 4)   7,675,334,912 parameters: float32 28.59 GiB, bfloat16 14.30 GiB" in out
    assert "KV cache per rank  0.83 GiB for one sequence of 32768 tokens (bf16)" in out


def test_a_split_that_does_not_fit_is_refused(capsys):
    assert main(["info", "--variant", "gemma-4-31b", "--tp", "3"]) != 0
    assert "32 attention heads do not split evenly" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no experts"):
        rank_parameters(variant("gemma-4-31b"), Layout(2, 2, 0))


def test_bad_splits_say_what_fits():
    with pytest.raises(ValueError, match=r"use --tp in \[1, 2, 4, 8\]"):
        rank_parameters(variant("tiny-31b"), Layout(3, 1, 0))
    with pytest.raises(ValueError, match="must divide --tp"):
        Layout(4, 3, 0)
