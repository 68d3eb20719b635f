"""Every command line in README.md and docs/*.md, checked as written.

Each line of a bash/text code block that starts a command (`gemma4`, `python`, `torchrun`, `curl`,
...) is collected, `\\` continuations joined and comments dropped. Every line gets the cheap
check: its options parse with the command's own parser, and the repository files it names exist.
Lines that are fast run for real here; slow ones run in the `slow` tests (real weights); the rest
are listed in `WHY_NOT_RUN` with the reason (network, GPUs, a server, minutes of CPU, or
placeholders), and a line that fits no rule fails the test, so a new doc line cannot go unchecked.
The README's Python block runs as written (slow); docs/serving.md's curl and Python examples run
against a live server in tests/serve/test_docs.py.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("gemma4", "python", "python3", ".venv/bin/python", ".venv/bin/gemma4", "torchrun", "curl", "cat", "echo")


def command_lines() -> list[tuple[str, str]]:
    """(file:line, command) for every command line of every shell/text block."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"```(bash|sh|text)\n(.*?)```", text, re.S):
            first = text[: m.start(2)].count("\n") + 1
            pending, start = "", 0
            for i, raw in enumerate(m.group(2).splitlines()):
                line = _drop_comment(raw).rstrip()
                if not pending:
                    start = first + i
                pending += line.rstrip("\\").strip() + " "
                if line.endswith("\\"):
                    continue
                command, pending = pending.strip(), ""
                if command.split(" ", 1)[0] in STARTS or command.startswith("(command -v "):
                    found.append((f"{doc.relative_to(ROOT)}:{start}", command))
    return found


def _drop_comment(line: str) -> str:
    """The line without a trailing `# ...` comment (a `#` inside quotes stays)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


LINES = command_lines()

# Runs here, in process, as written (fast: config only).
RUN_FAST = [r"^gemma4 info --variant \S+( --tp \d+)?( --ep \d+)?( --context \d+)?$"]
# Runs as written on the real embedded model in the slow tests.
RUN_SLOW = [r'^gemma4 generate "The capital of France is"$',
            r'^echo "Once upon a time" \| gemma4 generate --temp 0.8 --top-p 0.95 --seed 1$',
            r'^gemma4 generate --speculative ngram -v "Repeat: a, b, c, a, b, c"$']
# Checked only (options parse, named files exist); why each is not run.
WHY_NOT_RUN = {
    r"^(\(command -v chromedriver .*\) && )?python3 -m venv \.venv":
        "installs packages and creates a venv: what CI's .ci/run does (checked against it)",
    r"google/|gemma-4-E2B-it|gemma-4-26b-a4b\b|gemma-3-270m-it-Q4_K_M\.gguf": "needs a download or a local checkpoint",
    r"\.\.\.|path/to|train\.jsonl --out run[234]": "placeholders for the reader's own files",
    r"^gemma4 chat\b": "interactive (tests/test_gemma4_cli.py and tests/test_first_hour.py drive chat sessions)",
    r"^(python -m )?gemma4(\.serve| serve)\b": "starts a server that runs until stopped (tests/serve/test_cli.py)",
    r"^gemma4 finetune\b": "minutes of CPU training (a tiny model trains in tests/train; real weights in "
                           "tests/train/test_train_real_270m.py)",
    r"^gemma4 (quantize|eval)\b": "minutes of CPU (tests/quant: tests/quant/test_quant_real_270m.py on real weights)",
    r"^gemma4 generate --adapter run1": "needs the adapter of the finetune line above it",
    r"^(\.venv/bin/)?python benchmarks/": "a benchmark: minutes, other engines, sometimes a GPU",
    r"^bash benchmarks/gpu\.sh": "needs a CUDA GPU (tests/test_benchmarks.py checks the runs it plans)",
    r"^cat ": "writes a file (calib.txt) for the benchmark after it",
    r"^curl ": "needs a running server: run by tests/serve/test_docs.py",
}


def plan(command: str) -> str:
    """'fast', 'slow' or the reason it is not run; KeyError for a line no rule covers."""
    if any(re.search(p, command) for p in RUN_FAST):
        return "fast"
    if any(re.search(p, command) for p in RUN_SLOW):
        return "slow"
    for pattern, reason in WHY_NOT_RUN.items():
        if re.search(pattern, command):
            return reason
    raise KeyError(command)


def _planned(command: str) -> str | None:
    try:
        return plan(command)
    except KeyError:  # reported by test_every_command_line_is_planned, not at collection
        return None


def parsers() -> dict[str, argparse.ArgumentParser]:
    from gemma4.commands import eval as eval_command, finetune, quantize
    from gemma4.serve.cli import parser as serve_parser

    return {"finetune": finetune.parser(), "quantize": quantize.parser(), "eval": eval_command.parser(),
            "serve": serve_parser()}


def check_cheaply(command: str) -> None:
    """Its options parse with the command's own parser; the repository files it names exist."""
    from gemma4.cli import build_parser

    if command.startswith("curl "):
        return  # its JSON body may span lines; tests/serve/test_docs.py runs the whole block
    for part in re.split(r"\s*(?:&&|\|)\s*", command):
        words = shlex.split(part)
        if not words:
            continue
        for w in words:
            if re.match(r"(tests|docs|benchmarks|gemma4)/\S+\.\w+$", w) or w in ("README.md", "pyproject.toml"):
                assert (ROOT / w).is_file(), f"{command}: {w} does not exist"
        if words[0] in ("gemma4", ".venv/bin/gemma4") or words[:3] == ["python", "-m", "gemma4.serve"]:
            argv = words[1:] if words[0] != "python" else ["serve", *words[3:]]
            if "..." in argv:
                continue  # a placeholder: nothing to parse
            if argv[0] in ("finetune", "quantize", "eval", "serve"):
                parsers()[argv[0]].parse_args(argv[1:])
            else:
                build_parser().parse_args(argv)
        elif words[0] in ("python", ".venv/bin/python") and words[1].startswith("benchmarks/"):
            script = (ROOT / words[1]).read_text()
            for flag in (w for w in words[2:] if w.startswith("--")):
                assert f'"{flag}"' in script, f"{command}: {words[1]} has no {flag}"
        elif words[:2] == ["torchrun", "--nproc-per-node"]:
            assert words[words.index("-m") + 1] == "gemma4"


def test_every_command_line_is_planned():
    assert len(LINES) >= 25, LINES
    unplanned = []
    for where, command in LINES:
        try:
            plan(command)
        except KeyError:
            unplanned.append(f"{where}: {command}")
    assert not unplanned, "command lines no rule covers (add to RUN_FAST, RUN_SLOW or WHY_NOT_RUN):\n" + \
        "\n".join(unplanned)


@pytest.mark.parametrize("where,command", LINES, ids=[w for w, _ in LINES])
def test_command_line(where, command, capsys):
    """The cheap check for every line; the fast ones also run, in process."""
    check_cheaply(command)
    if plan(command) == "fast":
        from gemma4.cli import main

        assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.strip()


def test_the_readme_install_commands_are_what_ci_runs():
    """Not run (a venv and downloads): the README's test line is `.ci/run`'s, and its generate line
    is checked and run (slow) like the others."""
    install = [c for _, c in LINES if "python3 -m venv .venv" in c]
    assert len(install) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert install[1].replace("pip install", "pip install -q") in ci
    assert "torch==2.13.0" in install[0] and install[0].endswith('generate "The capital of France is" --max-tokens 32')


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for _, c in LINES if _planned(c) == "slow"] +
                         [".venv/bin/gemma4 generate \"The capital of France is\" --max-tokens 32"])
def test_slow_command_runs_as_written(command):
    """On the real embedded model, as a user types it (`gemma4` is this interpreter's)."""
    gemma4 = f"{sys.executable} -m gemma4"
    shell = re.sub(r"(^|\| )(\.venv/bin/)?gemma4 ", lambda m: f"{m.group(1)}{gemma4} ", command)
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) > 5 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_readme_python_block_runs_as_written():
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(block) == 1
    done = subprocess.run([sys.executable, "-c", block[0]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "prompt tokens reused]" in done.stdout
