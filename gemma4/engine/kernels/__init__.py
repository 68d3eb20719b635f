"""The fast path's C kernels (cpu_kernels.c): compiled at first use with the system's C compiler
(cc -O3 -march=native -ffp-contract=off, well under a second), cached per source, compiler and CPU, loaded with ctypes.

Written by hand only where no library kernel serves, each replacing several eager torch ops of a
decode step by one call: RMSNorm (`engine.norm`; torch's CPU rms_norm is ~8 ops), rotate-half
RoPE (6 ops) and attention of a few query rows (`engine.attend`; torch's small batched matmuls
cost 30-60 us each). Without a compiler the callers keep torch's ops
(`library()` is None).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]


def cache_dir() -> Path:
    """Where compiled kernels are kept: $GEMMA4_KERNEL_CACHE, else $XDG_CACHE_HOME/gemma4/kernels."""
    if os.environ.get("GEMMA4_KERNEL_CACHE"):
        return Path(os.environ["GEMMA4_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemma4" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, compiler and CPU; None where they cannot be built."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.system() != "Linux":
        log.debug("cpu kernels: no C compiler (or not Linux)")
        return None
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode() + _cpu_flags().encode()
                         + platform.machine().encode())
    target = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: processes may race
                out = Path(tmp) / target.name
                run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], capture_output=True,
                                     text=True, timeout=120)
                if run.returncode:
                    log.debug("cpu kernels: %s failed: %s", cc, run.stderr[-2000:])
                    return None
                os.replace(out, target)
        except (OSError, subprocess.SubprocessError) as error:
            log.debug("cpu kernels: cannot build in %s: %s", target.parent, error)
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        log.debug("cpu kernels: cannot load %s: %s", target, error)
        return None
    lib.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]
    lib.rms_norm.restype = None
    lib.attend_few.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 6 + [ctypes.c_float] + [ctypes.c_long] * 9
    lib.attend_few.restype = None
    lib.rope.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    lib.rope.restype = None
    return lib
