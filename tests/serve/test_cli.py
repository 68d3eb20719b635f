"""`python -m gemma4.serve` as a process: flags and env, API key, clean exit on SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import httpx
from serve_helpers import started_url


def test_serve_cli_process(tiny_dir):
    env = dict(os.environ, GEMMA4_API_KEY="sk-env-key", GEMMA4_MAX_MODEL_LEN="256")
    command = [sys.executable, "-m", "gemma4.serve", "--model", str(tiny_dir), "--served-model-name", "tiny",
               "--port", "0", "--max-batch", "2", "--max-tokens-default", "4"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url, log = started_url(proc)
        assert "sk-env-key" not in "".join(log)  # the key is never logged
        for _ in range(600):
            if httpx.get(url + "/health", timeout=60).status_code == 200:
                break
            time.sleep(0.1)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-env-key"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        # The tiny checkpoint ships no chat template: a base model, said in the log and on each chat reply.
        assert "base (pretrained) model" in "".join(log)
        assert "instruction-tuned" in r.headers["x-gemma4-warning"]
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-env-key"}, timeout=60).json()
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 256
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0


def test_quantize_flag_and_env(tiny_dir, monkeypatch):
    """--quantize (or GEMMA4_QUANTIZE) reaches the loader: the served model is quantized while loading."""
    import argparse

    from gemma4.quant import QuantizedTensor, quantization_config
    from gemma4.serve import load_checkpoint
    from gemma4.serve.cli import add_serve_arguments

    assert add_serve_arguments(argparse.ArgumentParser()).parse_args(["--quantize", "int4"]).quantize == "int4"
    monkeypatch.setenv("GEMMA4_QUANTIZE", "int8")
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.quantize == "int8"
    model, _, _ = load_checkpoint(str(tiny_dir), quantize=args.quantize)
    # the linears are repacked for the CPU fast path (gemma4.quant.speed_up_quantized); the table stays quantized
    assert isinstance(model.model.embed_tokens.weight, QuantizedTensor)
    assert quantization_config(model)["scheme"] == "int8"


def test_exact_flag_and_env_and_the_cpu_fast_path(tiny_dir, monkeypatch):
    """A float32 CPU model is served through the CPU fast path by default (as `gemma4 generate` runs
    it); --exact (or GEMMA4_EXACT=1) keeps every weight float32."""
    import argparse

    from gemma4.engine.cpu import PackedLinear
    from gemma4.serve import load_checkpoint
    from gemma4.serve.cli import add_serve_arguments

    def parse(argv):
        return add_serve_arguments(argparse.ArgumentParser()).parse_args(argv)

    assert not parse([]).exact and parse(["--exact"]).exact
    monkeypatch.setenv("GEMMA4_EXACT", "1")
    assert parse([]).exact
    fast, _, _ = load_checkpoint(str(tiny_dir))
    exact, _, _ = load_checkpoint(str(tiny_dir), exact=True)
    assert any(isinstance(m, PackedLinear) for m in fast.modules())
    assert not any(isinstance(m, PackedLinear) for m in exact.modules())


def test_a_wrong_model_path_fails_at_start():
    """Not a server that stays up answering 503 with a traceback in its log: the loader's message
    and a non-zero exit, before any port is bound."""
    done = subprocess.run([sys.executable, "-m", "gemma4.serve", "--model", "/no/such/model", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "/no/such/model does not exist" in done.stderr and "Traceback" not in done.stderr
    assert "Uvicorn running" not in done.stderr


def test_serve_help_has_a_description_and_every_default():
    from gemma4.serve.cli import parser

    text = parser().format_help()
    assert "OpenAI-compatible HTTP API" in text and "examples:" in text
    for default in ("(default: 127.0.0.1)", "(default: 8000)", "(default: 8)", "(default: 1024)", "(default: 8192)"):
        assert default in " ".join(text.split()), default
