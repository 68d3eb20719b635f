"""Speculative decoding with an MTP drafter (engine/mtp.py over gemma4/model/drafter.py): the
adapter feeds the drafter what the reference path would (the target's store-layer K/V and last
hidden state), greedy output is the target's whatever the drafter's weights, and a drafter made
for another target is refused. Float64, as in test_speculative.py."""

import pytest
import torch
from test_speculative import _ids, _model, _run, _tokens
from testing_utils import random_drafter, random_model

from gemma4.engine.mtp import MTPDrafter
from gemma4.engine.sampling import SamplingParams
from gemma4.engine.sequence import GenerationRequest
from gemma4.engine.speculative import Speculation, SpeculationError, make_speculation
from gemma4.weights import CheckpointError

GREEDY = SamplingParams(temperature=0)
pytestmark = pytest.mark.usefixtures("one_thread")
DRAFTERS = {"tiny-e2b": "tiny-e2b-assistant", "tiny-31b": "tiny-31b-assistant", "tiny-12b": "tiny-12b-assistant"}


class Checked(MTPDrafter):
    """The adapter, each proposal checked against the drafter run on a cacheless forward of the
    row's tokens: the K/V of the store layers and the hidden state at p - 1 it should be fed."""

    calls = asked = 0

    def propose(self, engine, seqs, ks):
        steps, step = [], self.model.step

        def recorded(*args):
            out = step(*args)
            steps.append(out.logits)
            return out

        self.model.step = recorded
        try:
            drafts = super().propose(engine, seqs, ks)
        finally:
            del self.model.step
        lo = min(s.row for s in seqs)
        for s, k, d in zip(seqs, ks, drafts):
            p = len(s.tokens) - 1
            assert s.fed == p
            out = self.target.decode(torch.tensor([s.tokens[:p]]))
            tokens, logits = self.model.draft(self.target.model.embed, torch.tensor([s.tokens[-1]]), out.hidden[:, -1],
                                              out.shared_kv, torch.tensor([p]), k)
            n = len(d.tokens)  # k, or fewer where the drafter doubted the next token
            assert d.tokens == tokens[0, :n].tolist()
            if n < k:
                assert logits[0, n].softmax(-1).max() < self.min_confidence
            got = torch.stack([x[s.row - lo] for x in steps[: min(k, n + 1)]])
            torch.testing.assert_close(got, logits[0, : min(k, n + 1)], rtol=0, atol=1e-10)
            torch.testing.assert_close(s.spec.hidden, out.hidden[0, -1], rtol=0, atol=1e-10)
            Checked.calls += 1
            Checked.asked += k
        return drafts


@pytest.mark.parametrize("name,min_confidence", [("tiny-e2b", 0), ("tiny-31b", 0), ("tiny-gemma-3-270m", 0),
                                                 ("tiny-e2b", 0.3), ("tiny-31b", 0.1)])
def test_mtp_drafts_are_fed_what_the_reference_path_gives_and_greedy_output_is_unchanged(name, min_confidence):
    """Rows of different lengths, sliding rings of 4 + headroom 4 wrapping many times, k = 3 (the
    most a headroom of 4 allows an MTP drafter): every proposal equals the drafter run on a fresh
    forward's K/V and hidden state (a prefix of it, cut only before a token the drafter gives less
    than min_confidence), and the tokens equal plain greedy decoding. tiny-e2b: KV sharing and the
    sparse centroid head; tiny-31b: k_eq_v; tiny-gemma-3-270m: a Gemma 3 target."""
    model = _model(name)
    V = model.config.vocab_size
    prompts = [_tokens(V, 5, 31), _tokens(V, 13, 32), _tokens(V, 9, 33)]
    requests = [GenerationRequest(p, 24, GREEDY) for p in prompts]
    want = _ids(_run(model, requests)[0])
    drafter = Checked(random_drafter(model, DRAFTERS.get(name)), model, min_confidence=min_confidence)
    Checked.calls = Checked.asked = 0
    got, engine = _run(model, requests, Speculation(drafter, 3, adaptive=False), headroom=4)
    assert _ids(got) == want and Checked.calls > 20
    drafted = engine.speculation.stats.draft_tokens
    assert drafted == Checked.asked if min_confidence == 0 else 0 < drafted < Checked.asked


def test_mtp_k_is_bounded_by_the_headroom_less_its_reach_and_read_from_the_checkpoint(tmp_path):
    from gemma4.weights.drafter import save_drafter

    model = random_model("tiny-e2b")
    drafter = random_drafter(model, "tiny-e2b-assistant")
    with pytest.raises(SpeculationError, match="between 1 and 3"):
        _run(model, [GenerationRequest([1, 2], 4, GREEDY)], Speculation(MTPDrafter(drafter, model), 4), headroom=4)
    path = save_drafter(tmp_path / "drafter", drafter)
    config = (path / "generation_config.json")
    config.write_text('{"num_assistant_tokens": 6}')
    spec = make_speculation(model, draft_model=str(path))
    assert isinstance(spec.drafter, MTPDrafter) and spec.k == 6
    assert make_speculation(model, draft_model=str(path), draft_tokens=2).k == 2
    out = _run(model, [GenerationRequest([1, 2, 3], 8, GREEDY)], spec)[0]
    assert len(_ids(out)[0]) == 8


def test_a_drafter_for_another_target_is_refused_clearly(tmp_path):
    from gemma4.weights.drafter import save_drafter

    model = random_model("tiny-e2b")
    other = random_drafter(random_model("tiny-31b"), "tiny-31b-assistant")
    with pytest.raises(CheckpointError, match="not made for this target"):
        MTPDrafter(other, model)
    path = save_drafter(tmp_path / "other", other)
    with pytest.raises(CheckpointError, match="not made for this target"):
        make_speculation(model, draft_model=str(path))


def test_on_the_cpu_fast_path_the_drafter_is_packed_and_drafts_from_its_vocabulary(tmp_path):
    """A target packed by `speed_up` gets a packed drafter, and a drafter saved with a draft
    vocabulary scores only it and each row's own tokens (`ShortlistHead`): every draft comes from
    there, its argmax equals the full head's restricted to those tokens, and greedy output is the
    packed target's own."""
    from gemma4.engine.cpu import PackedLinear, fbgemm_works, speed_up
    from gemma4.engine.mtp import ShortlistHead
    from gemma4.weights.drafter import save_drafter, save_vocabulary

    if not (fbgemm_works("fp16") and fbgemm_works("int8-dynamic")):
        pytest.skip("no fbgemm kernels in this torch build")
    model = random_model("tiny-gemma-3-270m", embed_std=0.05)
    V = model.config.vocab_size
    path = save_drafter(tmp_path / "drafter", random_drafter(model))
    vocabulary = list(range(1, V, 2))
    save_vocabulary(path, vocabulary)
    prompts = [_tokens(V, 6, 41), _tokens(V, 11, 42)]
    requests = [GenerationRequest(p, 20, GREEDY) for p in prompts]
    assert speed_up(model)
    want = _ids(_run(model, requests)[0])
    spec = make_speculation(model, draft_model=str(path), draft_tokens=3)
    drafter = spec.drafter
    drafter.min_confidence = 0  # random weights doubt every draft: draft all k, to see where they come from
    assert isinstance(drafter.head, ShortlistHead)
    assert any(isinstance(m, PackedLinear) for m in drafter.model.modules())
    seen, propose = [], drafter.propose

    def checked(engine, seqs, ks):
        drafts = propose(engine, seqs, ks)
        for s, d in zip(seqs, drafts):
            allowed = set(vocabulary) | set(s.tokens)
            assert set(d.tokens) <= allowed
            seen.extend(d.tokens)
        return drafts

    drafter.propose = checked
    got, engine = _run(model, requests, spec)
    assert _ids(got) == want and len(seen) > 20
    # The head's pick is the full head's argmax over the allowed tokens.
    z = torch.randn(2, drafter.model.config.text.hidden_size)
    drafter.head.start([prompts[0], prompts[1]], [0, 1], 2)
    full = drafter.model.logits(z)
    for r, prompt in enumerate(prompts):
        allowed = torch.tensor(sorted(set(vocabulary) | set(prompt)))
        assert drafter.head(z)[0][r] == int(allowed[full[r, allowed].argmax()])
