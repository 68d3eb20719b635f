"""The traps of a new user's first hour (issue 21), one test each, on a tiny model unless said.

The tiny checkpoint is the server tests' (tests/serve/serve_helpers.py): a random tiny-e2b with a
character-level tokenizer and no chat template, so it is also a base model by its own facts.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

import gemma4
from gemma4.cli import main


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The tiny model is latency-bound: one intra-op thread is faster on a busy machine."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from serve_helpers import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("first-hour") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny):
    return gemma4.load(tiny)


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a command gets as far as loading weights."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(gemma4.api, "load", load)


# -- the Python API agrees with the CLI --------------------------------------------------------------

def test_api_is_greedy_by_default_like_the_cli(tiny, loaded, capsys):
    model, tok, _ = loaded
    prompt = "The capital of France is"
    api = gemma4.generate(model, tok, prompt, max_tokens=8)
    assert api == gemma4.generate(model, tok, prompt, max_tokens=8, temperature=0)  # was a TypeError
    assert main(["generate", prompt, "--model", str(tiny), "--max-tokens", "8", "--exact"]) == 0
    assert capsys.readouterr().out == prompt + api + "\n"
    sampled = [gemma4.generate(model, tok, prompt, max_tokens=8, temperature=5.0, top_p=0.95, seed=s) for s in (1, 1)]
    assert sampled[0] == sampled[1]  # keywords reach the sampler: seeded draws repeat
    assert gemma4.generate(model, tok, prompt, max_tokens=8, temp=5.0, top_p=0.95, seed=1) == sampled[0]  # mlx-lm
    reply = gemma4.chat_reply(model, tok, [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert reply.completion_tokens <= 4
    with pytest.raises(TypeError, match="temprature"):
        gemma4.generate(model, tok, prompt, max_tokens=2, temprature=0.5)
    with pytest.raises(TypeError, match="not both"):
        gemma4.generate(model, tok, prompt, sampling=gemma4.SamplingParams(), temperature=0.5)


# -- a base model used for chat says so ----------------------------------------------------------------

def test_base_model_is_detected_from_checkpoint_facts(tiny, tmp_path):
    from gemma4.api import is_base_model
    from gemma4.weights import open_checkpoint

    assert is_base_model(open_checkpoint(tiny))  # no chat template
    it = tmp_path / "gemma-base-named-it"  # a name says nothing: the template does
    it.mkdir()
    for f in tiny.iterdir():
        (it / f.name).symlink_to(f)
    (it / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not is_base_model(open_checkpoint(it))


def test_embedded_gguf_is_a_base_model():
    """The embedded Q4_K_M GGUF: no `general.finetune`, no chat template (an -it GGUF has both)."""
    from gemma4.api import base_model_warning
    from gemma4.weights import open_checkpoint

    assert "instruction-tuned" in base_model_warning(open_checkpoint(gemma4.default_model_path()))


def test_chat_with_a_base_model_warns(tiny, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(tiny), "--max-tokens", "2", "--exact"]) == 0
    assert "gemma4: warning: this is a base (pretrained) model" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny), "--max-tokens", "2", "--format", "chat", "--exact"]) == 0
    assert "instruction-tuned checkpoint" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny), "--max-tokens", "2", "--exact"]) == 0  # raw: as it should
    assert "warning" not in capsys.readouterr().err


# -- messages, not tracebacks; options checked before loading -------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_a_message(no_load, capsys):
    assert main(["generate", "hi", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "gemma4: error: device 'cuda'" in err and "--device cpu" in err and "Traceback" not in err


def test_variant_names_any_case_and_a_suggestion(capsys):
    assert main(["info", "--variant", "Gemma-4-E2B"]) == 0
    assert "family             gemma4" in capsys.readouterr().out
    assert main(["info", "--variant", "gemma-4-e2"]) == 1
    assert "did you mean gemma-4-e2b?" in capsys.readouterr().err
    assert main(["info", "--variant", "gemma-5"]) == 1
    assert "gemma4: error: unknown variant 'gemma-5'" in capsys.readouterr().err


def test_options_are_checked_before_loading(no_load, capsys):
    assert main(["generate", "hi", "--max-tokens", "-1"]) == 1
    assert "--max-tokens must be at least 1" in capsys.readouterr().err
    assert main(["generate", "hi", "--think"]) == 1  # the embedded model is a Gemma 3: no thinking
    assert "--think: gemma3 models have no thinking mode" in capsys.readouterr().err


# -- conveniences -----------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("gemma4 ")


def test_prefill_progress(loaded):
    """A long prompt reports its prefill as it goes, and the text is the same as without."""
    from gemma4.commands.common import prefill_progress

    model, tok, _ = loaded
    ids = [tok.token_to_id("a")] * 400
    calls = []
    engine = gemma4.Engine(model, prefill_chunk=16)  # 128 tokens between two reports
    with_progress = gemma4.generate(model, tok, ids, max_tokens=2, engine=engine,
                                    on_prefill=lambda d, t: calls.append((d, t)))
    assert with_progress == gemma4.generate(model, tok, ids, max_tokens=2, engine=engine)
    assert calls == [(128, 400), (256, 400), (384, 400), (400, 400)]
    line = io.StringIO()
    report = prefill_progress(line)
    report(2048, 2400), report(2400, 2400)
    assert "prefill 2,400 / 2,400 prompt tokens" in line.getvalue() and line.getvalue().endswith("\n")


def test_chat_verbose_multiline_and_commands(tiny, capsys, monkeypatch):
    from gemma4.commands.chat import read_message

    lines = iter(["first \\", "second", '"""', "a", "", "b", '"""'])
    assert read_message(lambda _: next(lines)) == "first \nsecond"
    assert read_message(lambda _: next(lines)) == "a\n\nb"
    monkeypatch.setattr("sys.stdin", io.StringIO('one \\\ntwo\n"""\nthree\n"""\n'))
    assert main(["chat", "--model", str(tiny), "--max-tokens", "2", "-v", "--exact"]) == 0
    err = capsys.readouterr().err
    assert err.count("[prompt: ") == 2 and "tok/s" in err  # two messages, each with its stats


def test_help_describes_and_lists_only_released_variants(capsys):
    for command in ("chat", "info"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert len(out.split("options:")[0]) > 200, command  # a description, not only usage
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 256)" in " ".join(capsys.readouterr().out.split())
    assert main(["info", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "gemma-4-e2b" in names and not any(n.startswith("tiny-") for n in names)


# -- chat turns end at the turn's end ------------------------------------------------------------------------

def test_a_chat_turn_ends_at_any_special_token_outside_the_format():
    """A base model tuned on a few chats wrote `<unused71>` and went on: every special token a
    reply never contains ends the turn (and so never reaches the text)."""
    from types import SimpleNamespace

    from gemma4.api import turn_stop_ids
    from gemma4.chat import ChatFormat

    unused71 = 77  # as in the embedded gemma-3-270m's vocabulary, where ids 0-4 and 6-... are control tokens
    tok = SimpleNamespace(special_ids=frozenset({0, 1, 2, 3, 4, 48, 49, 50, 52, 100, 101, 105, 106, unused71}))
    stops = turn_stop_ids(ChatFormat("gemma3"), tok)
    assert {0, 1, 2, 3, 4, 105, 106, unused71} <= stops  # <pad> or <bos> in a reply: the turn is over too
    g4 = turn_stop_ids(ChatFormat("gemma4"), tok)
    assert {1, 106, 50, 105, unused71} <= g4
    assert not {48, 49, 52, 100, 101} & g4  # tool calls and thoughts are written inside a reply


# -- quantize ------------------------------------------------------------------------------------------------

def test_quantize_defaults_to_int8_and_int4_is_one_flag_away(monkeypatch, tmp_path):
    import gemma4.commands.quantize as q

    seen = []
    monkeypatch.setattr(q, "quantize_cli",
                        lambda model, out, scheme, group_size, **kw: seen.append((scheme, group_size)))
    for argv in ([], ["--group-size", "32"], ["--calibration"], ["--scheme", "int4"]):
        assert q.main(["--out", str(tmp_path / "q"), *argv]) == 0
    assert seen == [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 64)]
    with pytest.raises(ValueError, match="--group-size applies to int4 only"):
        q.main(["--out", str(tmp_path / "q"), "--scheme", "int8", "--group-size", "32"])


def test_requantizing_a_4_bit_gguf_says_it_cannot_help(capsys):
    from gemma4.commands.quantize import _gguf_note

    source = gemma4.default_model_path()
    _gguf_note(source, source.stat().st_size + 2**20, "int8")
    err = " ".join(capsys.readouterr().err.split())
    assert "already quantized" in err and "cannot bring back quality" in err and "larger than its" in err
    assert "google/gemma-3-270m" in err


# -- fine-tuning defaults --------------------------------------------------------------------------------------

def test_finetune_defaults_fit_a_small_dataset():
    """64 lines once gave 8 steps, all inside a 10-step warm-up: the adapter learned nothing."""
    from gemma4.train import TrainConfig
    from gemma4.train.trainer import MIN_STEPS, schedule

    steps, warmup, said = schedule(TrainConfig(), 48)
    assert steps >= MIN_STEPS and steps % 6 == 0 and 0 < warmup <= steps // 5
    assert "4 epochs, chosen for a small dataset" in said and f"warm-up {warmup}" in said
    assert schedule(TrainConfig(), 4000)[:2] == (500, 50)  # a large dataset: one epoch, 10% warm-up
    assert schedule(TrainConfig(epochs=1), 48)[0] == 6  # asked for: as asked
    assert schedule(TrainConfig(max_steps=3, warmup_steps=5), 48)[:2] == (3, 3)
