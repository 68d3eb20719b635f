"""benchmarks/gpu.sh, the one command for the GPU figures, must be runnable the moment a GPU is lent:
each run it plans parses with decode.py's own parser and names a released variant, and without a
GPU it stops at once with a line that says why."""

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from gemma4.variants import RELEASED

ROOT = Path(__file__).resolve().parents[1]


def _decode_parser():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.parser()


def test_gpu_plan_parses_and_covers_the_four_shapes():
    plan = subprocess.run(["bash", "benchmarks/gpu.sh", "--plan"], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = plan.stdout.splitlines()
    parser = _decode_parser()
    variants = []
    for line in lines:
        words = shlex.split(line)
        assert words[0] == "benchmarks/decode.py"
        args = parser.parse_args(words[1:])
        assert args.device == "cuda" and args.peers == "transformers" and args.variant in RELEASED
        variants.append(args.variant)
    assert variants == ["gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b", "gemma-4-31b"]


def test_gpu_script_without_a_gpu_says_so():
    if torch.cuda.is_available():
        return
    r = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
