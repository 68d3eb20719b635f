"""The curl and openai-python examples of docs/serving.md, run against a live server."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import make_app, running_server

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def url(loaded):
    with running_server(make_app(loaded, model_name="gemma")) as base:
        yield base


@pytest.mark.parametrize("kind,code", BLOCKS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BLOCKS)])
def test_doc_example_runs(url, kind, code):
    code = code.replace("http://127.0.0.1:8000", url)
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if kind == "bash":
        assert '"error"' not in done.stdout and done.stdout.strip()
    if "stream" in code:
        assert "[DONE]" in done.stdout or kind == "python"


def test_examples_cover_curl_python_and_streaming():
    kinds = [k for k, _ in BLOCKS]
    assert "bash" in kinds and "python" in kinds
    assert any("stream=True" in c for k, c in BLOCKS if k == "python")
    assert any('"stream": true' in c for k, c in BLOCKS if k == "bash")
