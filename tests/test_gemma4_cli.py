"""The gemma4 command end to end (in-process), on the real gemma-3-270m."""

import copy
import io

import pytest
import torch

import gemma4.api
from gemma4.cli import main


@pytest.fixture
def real(monkeypatch, gemma3_270m):
    """The shared real model, copied: the commands repack a CPU model for speed, in place."""
    model = copy.deepcopy(gemma3_270m[0])
    monkeypatch.setattr(gemma4.api, "load", lambda *a, **k: gemma4.Loaded(model, *gemma3_270m[1:]))
    return model, gemma3_270m[1]


@pytest.mark.slow
def test_generate_raw_greedy_matches_the_reference(real, capsys):
    assert main(["generate", "The capital of France is", "--max-tokens", "12", "-v"]) == 0
    out, err = capsys.readouterr()
    # transformers' greedy continuation of this prompt on the same file (see tests/data) starts so:
    assert out.startswith("The capital of France is the capital of the country of France.")
    assert "generation: 12 tokens" in err


@pytest.mark.slow
def test_generate_reads_stdin_and_stops_on_stop_string(real, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("The capital of France is"))
    assert main(["generate", "--max-tokens", "30", "--stop", "country"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n").endswith("the capital of the ")


@pytest.mark.slow
def test_chat_session_commands(real, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/system Be brief.\nHello!\n/reset\n/bogus\n"))
    assert main(["chat", "--max-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "system prompt set" in err and "conversation cleared" in err and "unknown command" in err


@pytest.mark.slow
def test_generate_and_chat_with_a_compiled_step(real, capsys, monkeypatch):
    """--compile gives the same greedy text, and a chat keeps one engine (one compiled step, one
    prefix cache) across turns. Traced by aot_eager: inductor's C++ build of it is measured by hand
    (docs/benchmarks.md)."""
    import gemma4.engine.core as core

    sessions = []

    class Traced(core.Engine):
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs, compile_options={"backend": "aot_eager"})
            self.used = []
            sessions.append(self)

        def warm_up(self, batch=1):
            self.used.append(self)
            return super().warm_up(batch)

        def add(self, seq):
            self.used.append(self)
            return super().add(seq)

    monkeypatch.setattr(core, "Engine", Traced)
    torch._dynamo.reset()
    try:
        assert main(["generate", "The capital of France is", "--max-tokens", "12", "--compile"]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("The capital of France is the capital of the country of France.")
        assert "compiled in" in err and sessions[0].mode == "compile"
        first = "Tell me about the long history of the city of Paris, its river and its bridges."
        monkeypatch.setattr("sys.stdin", io.StringIO(first + "\nAnd again?\n"))
        assert main(["chat", "--max-tokens", "4", "--compile"]) == 0
        used = sessions[1].used
        assert len(used) == 3 and len(set(map(id, used))) == 1  # warm-up and two turns, one engine
        assert sessions[1].steps > 4  # it ran the turns
        assert sessions[1].prefix.hits > 0  # the second turn reused the first's K/V
    finally:
        torch._dynamo.reset()


def test_compile_with_quantized_weights_decodes_without_it(capsys):
    from argparse import Namespace

    from testing_utils import random_model

    from gemma4.commands.common import engine_from_args
    from gemma4.quant import quantize

    model = quantize(random_model("tiny-gemma-3-270m"), "int8", progress=False)
    assert engine_from_args(Namespace(compile=True), model) is None
    assert "quantized weights cannot be compiled yet" in capsys.readouterr().err
    assert engine_from_args(Namespace(compile=False), model) is None


def test_a_template_error_is_a_message_not_a_traceback(gemma3_270m, monkeypatch, capsys):
    """`generate --format chat` with a checkpoint whose template cannot render: one line naming
    the problem, exit status 1."""
    from gemma4.chat import ChatFormat, ChatTemplate

    bad = ChatFormat("gemma3", ChatTemplate("{{ raise_exception('no system turns here') }}", name="its template"))
    monkeypatch.setattr(gemma4.api, "load", lambda *a, **k: gemma4.Loaded(gemma3_270m[0], gemma3_270m[1], bad))
    assert main(["generate", "hi", "--format", "chat", "--exact", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "gemma4: error: its template rejected the conversation: no system turns here" in err
    assert "Traceback" not in err


def test_info_variant(capsys):
    assert main(["info", "--variant", "gemma-4-26b-a4b"]) == 0
    out = capsys.readouterr().out
    assert "25,233,141,760" in out and "experts            128, top-8" in out


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "gemma4: error:" in err and "does not exist" in err and "Traceback" not in err


def test_bad_sampling_flag_is_a_clear_error(capsys):
    assert main(["generate", "hi", "--temp", "-1"]) == 1
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--max-tokens" in out and "--think" in out and "Hugging Face Hub id" in out
