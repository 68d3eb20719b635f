"""Every fast path against its slow path (STYLE habit 8), on tiny configs, CPU.

- the cache with whole-buffer attention (a compiled step's) or trimmed, rings wrapping, vs one
  full forward, past the sliding window and through KV sharing;
- the step traced whole by torch.compile (fullgraph: no graph break, so nothing stops a CUDA
  graph from capturing it) vs eager;
- grouped-mm and padded-bmm MoE vs the per-expert loop;
- chunked prefill vs one shot; PLE rows looked up outside the step vs inside;
- the generator on a kept engine vs a fresh one;
- fbgemm-packed fp16 linears, the rescored int8 head and the one-call norms (the CPU fast path)
  vs float, and on the real 270M vs the reference.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from test_cache import ALL
from testing_utils import random_model

from gemma4.engine.cache import ContextLengthError, KVCache
from gemma4.engine.core import Engine
from gemma4.engine.fuse import FusedAttention
from gemma4.engine.cpu import PackedLinear, RescoredHead, fbgemm_works, pack_linears, speed_up, top_indices
from gemma4.engine.generate import TokenGenerator
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.sequence import GenerationRequest
from gemma4.model.layers import Experts, grouped_mm_works

GREEDY = SamplingParams(temperature=0)
pytestmark = pytest.mark.usefixtures("one_thread")




def _ids(model, B, T, seed=3):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("trim", [True, False])
def test_static_cache_equals_dynamic_cache_and_full_forward(name, trim):
    """In float64, as test_cache's: the three agree to ~1e-14, so any slip in the slots shows."""
    model = random_model(name).double()
    T = 3 * model.config.sliding_window + 2
    ids = _ids(model, 2, T)
    f64 = torch.float64
    with torch.no_grad():
        full = model(ids)
        dynamic = KVCache(model.config, 2, T + 3, dtype=f64)
        static = KVCache(model.config, 2, T + 3, dtype=f64, static=not trim, headroom=1)  # rings that wrap
        got = {}
        for key, cache in (("dynamic", dynamic), ("static", static)):
            pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:7], cache=cache)]  # chunked prefill
            pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(7, T)]  # one token at a time
            got[key] = torch.cat(pieces, 1)
    torch.testing.assert_close(got["static"], full, rtol=0, atol=1e-10)
    torch.testing.assert_close(got["static"], got["dynamic"], rtol=0, atol=1e-10)


def _rows(engine, prompts):
    """Sequences holding `prompts` on the engine's rows (fed by the caller, not prefilled)."""
    seqs = [engine.new_sequence(GenerationRequest(list(p), 1)) for p in prompts]
    for s in seqs:
        engine.add(s)
    return seqs


def _step(engine, seqs, ids, t):
    """Logits of one step: row i feeds ids[i, t] at its next position (rows past len(seqs) inert)."""
    R = engine.rows
    tok = torch.zeros(R, 1, dtype=torch.long)
    pos = torch.full((R, 1), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        tok[i, 0], pos[i, 0] = ids[i, t], s.fed
    out = engine.step_logits(0, R, tok, pos)
    for s in seqs:
        s.fed += 1
        engine.cache.lengths[s.row] = s.fed
    return out[: len(seqs)]


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-26b-a4b", "tiny-gemma-3-270m"])
def test_engine_steps_equal_full_forward_with_rows_at_different_lengths(name):
    """A 3-row engine used for 2 rows at different lengths (row 0 is 4 tokens shorter: what left
    padding was): each row at its own positions and the inert third row change nothing."""
    model = random_model(name)
    ids = _ids(model, 2, 14)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    engine = Engine(model, rows=3, max_len=20, headroom=1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        seqs = _rows(engine, [ids[0, 4:6].tolist(), ids[1, :6].tolist()])
        first = engine.score(seqs, [ids[0, 4:6].tolist(), ids[1, :6].tolist()])
        got = [torch.stack([first[0][-1], first[1][-1]])]
        got += [_step(engine, seqs, ids, t) for t in range(6, 14)]
    got = torch.stack(got, 1)
    torch.testing.assert_close(got[0], full[0, [5, *range(6, 14)]], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], full[1, [5, *range(6, 14)]], rtol=0, atol=1e-4)


def _first_logprobs(engine_or_model, model, prompts, k=5):
    engine = engine_or_model if isinstance(engine_or_model, Engine) else None
    gen = TokenGenerator(model, prompts, [GREEDY] * len(prompts), [1] * len(prompts), set(), logprobs=k,
                         engine=engine)
    (steps,) = list(gen)
    return [s.top_logprobs for s in steps]


def test_chunked_prefill_equals_one_shot():
    """Through the engine's prefill: chunks of 5 (a run of two rows per forward) vs one chunk vs
    the full forward, compared on the first token's top-5 logprobs (the last position's logits)."""
    model = random_model("tiny-e4b")  # KV sharing: the one-shot prefill takes the logits_to_keep shortcut
    ids = _ids(model, 2, 23)
    one = _first_logprobs(Engine(model, rows=2, max_len=30, prefill_chunk=64), model, ids.tolist())
    chunked = _first_logprobs(Engine(model, rows=2, max_len=30, prefill_chunk=5), model, ids.tolist())
    want = torch.log_softmax(model(ids)[:, -1], -1).topk(5)
    for row in range(2):
        assert [t for t, _ in chunked[row]] == [t for t, _ in one[row]] == want.indices[row].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in chunked[row]]), torch.tensor([v for _, v in one[row]]),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor([v for _, v in one[row]]), want.values[row], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-e4b"])
def test_ple_rows_looked_up_outside_the_step(name):
    """With the PLE table 'elsewhere' (forced here), the compiled step gets its rows as an input: same logits."""
    model = random_model(name)
    ids = _ids(model, 1, 9)
    options = {"backend": "aot_eager"}
    inside = Engine(model, max_len=12, headroom=1, mode="compile", ple_on_host=False, compile_options=options)
    outside = Engine(model, max_len=12, headroom=1, mode="compile", ple_on_host=True, compile_options=options)
    assert outside.ple is not None and inside.ple is None
    torch._dynamo.reset()
    try:
        rows = [_rows(e, [ids[0, :4].tolist()]) for e in (inside, outside)]
        for e, seqs in zip((inside, outside), rows):
            e.score(seqs, [ids[0, :4].tolist()])
        for t in range(4, 9):
            a, b = (_step(e, seqs, ids, t) for e, seqs in zip((inside, outside), rows))
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_engine_context_is_a_clear_limit():
    """An engine's max_len is its context: a step past it is refused, a generation stops at it,
    and a prompt that leaves no room is a clear error."""
    model = random_model("tiny-gemma-3-270m")
    engine = Engine(model, max_len=6)
    (seq,) = _rows(engine, [[0] * 5])
    engine.score([seq], [[0] * 5])
    _step(engine, [seq], torch.zeros(1, 1, dtype=torch.long), 0)
    with pytest.raises(ContextLengthError, match="maximum context length is 6 tokens"):
        _step(engine, [seq], torch.zeros(1, 1, dtype=torch.long), 0)
    engine.cancel(seq)
    steps = [s for (s,) in TokenGenerator(model, [[2, 3, 4]], [GREEDY], [10], set(), engine=engine)]
    assert len(steps) == 3 and steps[-1].finish_reason == "length"
    with pytest.raises(ContextLengthError, match="maximum context length is 6 tokens"):
        TokenGenerator(model, [[2] * 6], [GREEDY], [10], set(), engine=engine)


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-26b-a4b", "tiny-gemma-3-4b"])
def test_generator_on_a_kept_engine_gives_the_same_tokens(name):
    model = random_model(name)
    prompts = [[2, 5, 6, 7], [2, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    engine = Engine(model, rows=2, max_len=32)

    def run(**kw):
        out = [[] for _ in prompts]
        gen = TokenGenerator(model, prompts, [GREEDY] * 2, [12, 9], set(), logprobs=2, **kw)
        for steps in gen:
            for row, s in zip(out, steps):
                if s:
                    row.append((s.token, s.logprob, [t for t, _ in s.top_logprobs]))
        return out

    def same(a, b):
        assert [[(t, top) for t, _, top in row] for row in a] == [[(t, top) for t, _, top in row] for row in b]
        assert [lp for row in a for _, lp, _ in row] == pytest.approx([lp for row in b for _, lp, _ in row], abs=1e-4)

    want = run()
    same(run(engine=engine), want)
    same(run(engine=engine), want)  # the engine is reused: nothing of the first run leaks


@pytest.mark.parametrize("name,dtype,backend", [("tiny-e2b", torch.float32, "aot_eager"),
                                                ("tiny-26b-a4b", torch.bfloat16, "eager")])
def test_compiled_step_is_one_graph_and_equals_eager(name, dtype, backend):
    """The step traced by torch.compile with fullgraph=True (a graph break would be an error); with
    aot_eager also through AOT functionalisation of the in-place cache writes. The traced graph is
    what inductor or CUDA graphs run. Not inductor itself: its C++ build takes over a minute on a
    2-core machine (checked by hand, see docs/benchmarks.md). No recompiles across steps. bf16
    MoE traces torch._grouped_mm (fake-tensor checks included); fp32 MoE the gathered experts.
    """
    model = random_model(name).to(dtype)
    ids = _ids(model, 2, 12)
    eager = Engine(model, rows=2, max_len=16, headroom=1)  # rings of window + 1 that wrap
    traced = Engine(model, rows=2, max_len=16, headroom=1, mode="compile", compile_options={"backend": backend})
    torch._dynamo.reset()
    try:
        rows = [_rows(e, ids[:, :6].tolist()) for e in (eager, traced)]
        for e, seqs in zip((eager, traced), rows):
            e.score(seqs, ids[:, :6].tolist())
        for t in range(6, 12):
            with torch.compiler.set_stance("fail_on_recompile" if t > 6 else "default"):
                got = _step(traced, rows[1], ids, t).float()
            want = _step(eager, rows[0], ids, t).float()
            # bf16: the traced graph's op order alone may move logits by a few ULPs (2^-8 relative).
            tol = 1e-4 if dtype == torch.float32 else 4 * want.abs().max().item() * 2**-8
            torch.testing.assert_close(got, want, rtol=0, atol=tol)
    finally:
        torch._dynamo.reset()


def test_compiled_step_refuses_quantized_weights():
    """Dynamo cannot trace QuantizedTensor weights: a clear error up front, not its trace; eager runs."""
    from gemma4.quant import quantize

    model = quantize(random_model("tiny-gemma-3-270m"), "int8", progress=False)
    with pytest.raises(ValueError, match="cannot trace quantized weights"):
        Engine(model, max_len=8, mode="compile")
    eager = Engine(model, max_len=8)
    eager.score(_rows(eager, [[1, 2, 3]]), [_ids(model, 1, 3)[0].tolist()])


# ---- MoE ---------------------------------------------------------------------------------------

def _experts(E=8, D=32, I=24, seed=0):
    torch.manual_seed(seed)
    ex = Experts(E, D, I)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, D**-0.5)
        ex.down_proj.normal_(0, I**-0.5)
    return ex


@pytest.mark.parametrize("impl", ["grouped", "gather"])
@pytest.mark.parametrize("N", [1, 3, 40])
def test_fused_moe_equals_the_loop(impl, N):
    if impl == "grouped" and not grouped_mm_works(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm is not available on this torch/CPU")
    ex = _experts()
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(N, 32, generator=gen)
    index = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(N)])
    weights = torch.rand(N, 2, generator=gen)
    ex.impl = impl
    with torch.no_grad():
        torch.testing.assert_close(ex(x, weights, index), ex.forward_loop(x, weights, index), rtol=0, atol=1e-5)


def test_auto_experts_skip_grouped_mm_for_widths_it_cannot_take():
    """torch._grouped_mm wants rows of whole 16-byte multiples: an expert width of 6 in fp32 (24
    bytes) used to load and then crash in the forward; "auto" takes the loop for it."""
    ex = _experts(E=4, D=32, I=6)
    gen = torch.Generator().manual_seed(0)
    x, index = torch.randn(5, 32, generator=gen), torch.randint(0, 4, (5, 2), generator=gen)
    weights = torch.rand(5, 2, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ex(x, weights, index), ex.forward_loop(x, weights, index), rtol=0, atol=0)


def test_moe_model_same_logits_with_every_expert_impl():
    """Every expert implementation gives the loop's logits: in float64 (they agree to ~1e-15, so a
    wiring slip shows) where it runs, and grouped_mm, which has no float64, in fp32. In fp32 the
    gather path's summation order alone moved a logit by 1.05e-5 on an AVX-512 Xeon."""
    model = random_model("tiny-26b-a4b")
    ids = _ids(model, 2, 11)

    def logits(m, impl):
        for e in m.modules():
            if isinstance(e, Experts):
                e.impl = impl
        with torch.no_grad():
            return m(ids)

    wide = copy.deepcopy(model).double()
    for impl in ("gather", "auto"):
        torch.testing.assert_close(logits(wide, impl), logits(wide, "loop"), rtol=0, atol=1e-10)
    for impl in ("grouped", "auto"):
        torch.testing.assert_close(logits(model, impl), logits(model, "loop"), rtol=0, atol=1e-5)


def test_unknown_expert_impl_is_refused():
    with pytest.raises(ValueError, match="unknown experts impl"):
        Experts(4, 8, 8, impl="fast")


# ---- CPU: fbgemm-packed linears ------------------------------------------------------------------

needs_fbgemm = pytest.mark.skipif(not fbgemm_works("fp16"), reason="fbgemm fp16 kernels unavailable")


@needs_fbgemm
def test_packed_fp16_linear_is_the_fp16_rounded_weight_in_fp32_math():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=gen) / 8, torch.randn(5, 64, generator=gen)
    got = PackedLinear(w, "fp16")(x)
    torch.testing.assert_close(got, x @ w.half().float().T, rtol=0, atol=1e-5)  # activations not rounded
    assert (got - x @ w.T).abs().max() > 0  # and the weights are
    assert torch.equal(PackedLinear(w, "fp16")(x[1]), got[1])  # one vector, as nn.Linear takes it


@needs_fbgemm
@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-gemma-3-270m"])
def test_packed_model_equals_the_model_with_fp16_rounded_weights(name):
    """Packing changes nothing but the weights' rounding: the same logits as the float model whose
    linear weights (and, for the head only, the tied table) are rounded to fp16, to fp32 noise."""
    model = random_model(name)
    rounded = random_model(name)
    with torch.no_grad():
        for m in rounded.modules():
            if type(m) is torch.nn.Linear:
                m.weight.copy_(m.weight.half().float())
    ids = _ids(model, 2, 10)
    cap = model.config.final_logit_softcapping
    with torch.no_grad():
        z = torch.nn.functional.linear(rounded.decode(ids).hidden, rounded.model.embed_tokens.weight.half().float())
        want = torch.tanh(z / cap) * cap if cap else z
        pack_linears(model, "fp16", head="fp16")
        assert model.lm_head is not None and not any(type(m) is torch.nn.Linear for m in model.modules())
        got = model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@needs_fbgemm
def test_rescored_head_is_exact_at_its_top_k_and_close_elsewhere():
    """The int8 head's k best candidates carry the float head's logits exactly (so the float argmax
    whenever it is among them); the rest of the vocabulary carries int8-activation error only."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3000, 64, generator=gen) / 8
    x = torch.randn(2, 5, 64, generator=gen) * 4
    head = RescoredHead(table, k=16)
    want = x @ table.T
    got = head(x)
    top = head.approx(x).topk(16, -1).indices  # the candidates: the int8 scores' best 16
    torch.testing.assert_close(got.gather(-1, top), want.gather(-1, top), rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    err = (got - want).abs().max()
    assert 0 < err < 0.05 * want.abs().max()  # the rest is approximate, and not wildly so
    one = head(x[1, 2])  # one vector (the server's last hidden state); int8 scales are per call
    assert one.shape == (3000,) and one.argmax() == want[1, 2].argmax()
    torch.testing.assert_close(one.max(), want[1, 2].max(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown head format"):
        pack_linears(random_model("tiny-gemma-3-270m"), head="int2")


@pytest.mark.parametrize("shape", [(1, 262144), (3, 2, 65536), (2, 1000)])
def test_top_indices_is_topk_set(shape):
    """Blocked top-k picks the same set as torch.topk, batched over leading dims, with several
    winners in one block; a vocabulary of no whole number of blocks falls back to topk."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(shape, generator=gen)
    scores[..., 7] = 50.0  # a cluster of winners in one block and one far away
    scores[..., 9] = 49.0
    got = top_indices(scores, 64)
    want = scores.topk(64, -1).indices
    assert got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@needs_fbgemm
def test_speed_up_packs_float32_and_quantized_cpu_models_only_and_leaves_adapters_float():
    from gemma4.quant import quantize
    from gemma4.quant.fast import RescoredTable
    from gemma4.train.lora import LoraConfig, apply_lora, lora_modules

    assert not speed_up(random_model("tiny-gemma-3-270m").to(torch.bfloat16))
    quantized = quantize(random_model("tiny-gemma-3-270m"), "int8", progress=False)
    assert speed_up(quantized) and isinstance(quantized.lm_head, RescoredTable)  # gemma4.quant's own packer
    steps = list(TokenGenerator(quantized, [[2, 5, 9]], [GREEDY], [3], set()))  # and the engine still runs it
    assert len(steps) == 3 and all(s[0].token is not None for s in steps)
    model = random_model("tiny-gemma-3-270m")
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]))
    for _, m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.5)
    ids = _ids(model, 1, 8)
    with torch.no_grad():
        want = model(ids)
        assert speed_up(model)
        got = model(ids)
    assert isinstance(model.lm_head, RescoredHead)
    head = model.lm_head
    assert speed_up(model) and model.lm_head is head  # a second call keeps the packed model as it is
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, PackedLinear)  # not adapted: fused, packed
    assert not isinstance(layer.self_attn, FusedAttention) and isinstance(layer.self_attn.k_proj, PackedLinear)  # q is adapted
    adapted = list(lora_modules(model))
    assert adapted and all(type(m.lora_A) is torch.nn.Linear and type(m.lora_B) is torch.nn.Linear
                           and isinstance(m.weight, torch.nn.Parameter) for _, m in adapted)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


@needs_fbgemm
def test_packed_linears_trace_into_a_compiled_step():
    """The fbgemm matmul is an operator, so a packed model's step still traces as one graph; and
    a step compiled before packing (which swaps and fuses modules) is not reused after it."""
    model = random_model("tiny-gemma-3-270m")
    ids = _ids(model, 1, 9)
    options = {"backend": "aot_eager"}
    torch._dynamo.reset()
    try:
        before = Engine(model, max_len=12, mode="compile", compile_options=options)
        (seq,) = _rows(before, [ids[0, :5].tolist()])
        before.score([seq], [ids[0, :5].tolist()])
        _step(before, [seq], ids, 5)
        pack_linears(model)  # fp16 linears, q/k/v and gate/up fused, rescored int8 head
        traced_equals_eager(model, ids, options, atol=1e-5)
    finally:
        torch._dynamo.reset()


def traced_equals_eager(model, ids, options: dict, atol: float) -> None:
    """The compiled step's logits against eager's, four steps after a 5-token prefix of ids[0]."""
    eager = Engine(model, max_len=12, headroom=1)  # rings of window + 1 that wrap, as in the traced step
    traced = Engine(model, max_len=12, headroom=1, mode="compile", compile_options=options)
    rows = [_rows(e, [ids[0, :5].tolist()]) for e in (eager, traced)]
    for e, seqs in zip((eager, traced), rows):
        e.score(seqs, [ids[0, :5].tolist()])
    for t in range(5, 9):
        got, want = (_step(e, seqs, ids, t) for e, seqs in ((traced, rows[1]), (eager, rows[0])))
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_pack_refuses_unknown_format():
    with pytest.raises(ValueError, match="unknown packed format"):
        PackedLinear(torch.zeros(4, 4), "int3")


@pytest.mark.slow
@needs_fbgemm
def test_real_270m_fp16_packed_greedy_equals_reference():
    """The CPU fast path as the CLI runs it (`speed_up`: fp16 linears, rescored int8 head, one-call
    norms) on the real gemma-3-270m: all reference prompts in one batch, 40 greedy tokens each,
    identical to transformers' float32 greedy ids (tests/data/gemma3_270m_reference.json). Int8
    activations in the linears change these ids from the first tokens on; an int8 head without
    rescoring changes them too."""
    import gemma4
    from gemma4.engine.kernels import library
    from gemma4.engine.norm import FastRMSNorm

    ref = json.loads((Path(__file__).parents[1] / "data" / "gemma3_270m_reference.json").read_text())
    model = gemma4.load()[0]
    assert speed_up(model)
    assert (library() is None) or sum(isinstance(m, FastRMSNorm) for m in model.modules()) == 18 * 6 + 1
    prompts = [p["prompt_ids"] for p in ref["prompts"]]
    out = [[] for _ in prompts]
    engine = Engine(model, rows=len(prompts), max_len=max(map(len, prompts)) + 40)
    for steps in TokenGenerator(model, prompts, [GREEDY] * len(prompts), [40] * len(prompts), set(), engine=engine):
        for row, s in zip(out, steps):
            if s:
                row.append(s.token)
    assert out == [p["greedy_ids"] for p in ref["prompts"]]
