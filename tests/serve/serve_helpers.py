"""A tiny served model, a real uvicorn server on 127.0.0.1:0, and a test-only output script hook.

The tiny model: the tiny-e2b geometry (PLE, KV sharing, sliding window 4) with a 384-token
vocabulary, random weights, saved as a checkpoint directory (config.json, model.safetensors,
tokenizer.json) and loaded back through the server's own loader. Its tokenizer is a real
`tokenizers` BPE built here: Gemma 4's special-token *strings* at small ids of their own, 256
byte-fallback pieces, and one piece per printable ASCII character. Nothing in the server uses
Gemma's fixed ids: stop ids, tool and thought markers are looked up by string in the tokenizer.

Random weights never write a tool call or a thought, so those paths are driven by `ScriptHook`:
a constraint hook (the `constraint_hook` seam of `build_app`) that forces a scripted token
sequence when the last message contains `#script-name`. Everything after the forced tokens
(parsing, deltas, finish reasons, usage) is the real server path.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import tokenizers
import torch
from tokenizers import AddedToken, decoders, normalizers
from tokenizers.models import BPE

from gemma4.config import TextConfig
from gemma4.model import Gemma
from gemma4.variants import variant_hf_config

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
           "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>", "<|channel>", "<channel|>", "<|turn>",
           "<turn|>"]
VOCAB = 384
MODEL_NAME = "tiny-gemma4"


def tiny_tokenizer(extra: list[str] = ()) -> tokenizers.Tokenizer:
    """`extra`: more special tokens, right after Gemma's (e.g. the image placeholders)."""
    specials = SPECIAL + list(extra)
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "\n"] + [chr(c) for c in range(33, 127)]
    pieces += [f"<unused{i}>" for i in range(VOCAB - len(pieces))]
    tok = tokenizers.Tokenizer(BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                                   byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


def tiny_hf_config() -> dict:
    return variant_hf_config("tiny-e2b") | {"vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB}


def tiny_model(seed: int = 0) -> Gemma:
    """Random weights with small embeddings, so greedy output varies instead of echoing the prompt."""
    torch.manual_seed(seed)
    model = Gemma(TextConfig.from_hf_dict(tiny_hf_config())).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.05 if "embed" in n else p.shape[-1] ** -0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def save_checkpoint(directory):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(tiny_hf_config()))
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return directory


class ForcedTokens:
    """Allows only the next scripted token, then nothing more is forced."""

    def __init__(self, ids, vocab):
        self.ids, self.vocab, self.i = ids, vocab, 0

    def allowed(self):
        if self.i >= len(self.ids):
            return None
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[self.ids[self.i]] = True
        return mask

    def advance(self, token):
        self.i += 1


class ScriptHook:
    """`#name` in the last message's text forces the tokens of SCRIPTS[name]."""

    SCRIPTS = {
        "weather-call": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>',
        "two-calls": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
                     '<|tool_call>call:get_time{zone:<|"|>CET<|"|>,precise:true}<tool_call|><|tool_response>',
        "bad-call": "<|tool_call>call:get_weather{city:oops<turn|>",
        "thought": "<|channel>thought\nThe user asks about Paris.<channel|>It is sunny in Paris.<turn|>",
        "open-thought": "<|channel>thought\n",
        "answer": "Sunny, 21 degrees.<turn|>",
        "emoji": "Caf\u00e9 \U0001F600 ok<turn|>",
    }

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, request, prompt_ids):
        text = ""
        if hasattr(request, "messages"):
            content = request.messages[-1].content
            text = content if isinstance(content, str) else json.dumps(content)
        elif isinstance(request.prompt, str):
            text = request.prompt
        for name, script in self.SCRIPTS.items():
            if f"#{name}" in text.split():
                return [ForcedTokens(self.tokenizer.encode(script, add_bos=False), VOCAB)]
        return []


def started_url(proc, timeout: float = 120) -> tuple[str, list[str]]:
    """The URL a `gemma4 serve` subprocess (stderr piped, text) says it listens on, and its log so
    far, which keeps growing: a thread goes on reading, since a full pipe would block the server."""
    url, log = None, []
    deadline = time.monotonic() + timeout
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "".join(log)
        log.append(line)
        if m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
            url = m.group(1)
    assert url, "".join(log)
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    return url, log


def save_reference(ref, directory, media_tokens: list[str]):
    """A transformers model saved as a checkpoint directory with this tiny tokenizer plus `media_tokens`."""
    ref.save_pretrained(directory)
    tiny_tokenizer(media_tokens).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return directory


def multimodal_reference(tmp_path_factory, variant: str, edit, media_tokens: list[str]):
    """(transformers model, its checkpoint directory) of the tiny multimodal `variant` ("e2b", "31b"...)
    whose config `edit` changes, with the tiny tokenizer plus `media_tokens`."""
    from vision_refs import hf_multimodal

    ref = hf_multimodal(variant, edit=edit)
    return ref, save_reference(ref, tmp_path_factory.mktemp(f"tiny-{variant}") / f"tiny-{variant}", media_tokens)


@contextlib.contextmanager
def exact_server(path, **config):
    """The server over the checkpoint at `path`, loaded in float32 (`exact`): yields (url, loaded)."""
    from gemma4.serve import load_checkpoint

    loaded = load_checkpoint(str(path), exact=True)
    with running_server(make_app(loaded, **config)) as url:
        yield url, loaded


@contextlib.contextmanager
def running_server(app):
    """Serve `app` with the server `gemma4 serve` runs (uvicorn, draining the app on shutdown) on
    127.0.0.1, port 0, in a thread; yields the base URL. Leaving the block shuts the server down."""
    import uvicorn

    from gemma4.serve.cli import Server

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2,
                            h11_max_incomplete_event_size=64 * 1024)
    server = Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def make_app(loaded, **config):
    from gemma4.serve import ServeConfig, build_app

    model, tokenizer, fmt = loaded
    config = {"model_name": MODEL_NAME, "max_model_len": 512, "max_tokens_default": 32, "shutdown_timeout": 2} | config
    return build_app(model, tokenizer, chat_format=fmt, config=ServeConfig(**config),
                     constraint_hook=ScriptHook(tokenizer))


def served(app):
    return app.state.gemma4.served
