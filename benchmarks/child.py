"""One measurement in a fresh process, so the peak memory it reports is its own (audio.py, vision.py):
the script is run again with `--child ARGS...` and prints its result as JSON on its last line."""

from __future__ import annotations

import json
import subprocess
import sys


def measure_in_child(script: str, args: list, repeat: int, threads: int | None) -> dict:
    cmd = [sys.executable, script, "--child", *map(str, args), "--repeat", str(repeat)]
    if threads:
        cmd += ["--threads", str(threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
