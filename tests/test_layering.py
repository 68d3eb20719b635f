"""The package's layering (pyproject's [tool.importlinter] contracts), checked by import-linter:
no cycles between layers, the model imports nothing of engine/quant/train/serve, the engine
nothing of HTTP."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_are_kept():
    result = lint(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_them(tmp_path):
    """The same contracts on a copy of the package whose model imports the engine: both the layers
    contract and the model's forbidden-imports contract fail."""
    shutil.copytree(ROOT / "gemma4", tmp_path / "gemma4", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    decoder = tmp_path / "gemma4" / "model" / "decoder.py"
    decoder.write_text(decoder.read_text() + "\nfrom ..engine import cache  # noqa: E402,F401\n")
    result = lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "1 kept, 2 broken" in result.stdout and "gemma4.model.decoder -> gemma4.engine.cache" in result.stdout
