"""Thread counts fixed before numpy, BLAS or numba load (they read their environment once).

Benchmarks set their thread count explicitly (the machines are shared and noisy); `--threads N`
has to act before `import numpy`, so a script calls `pin_threads_from_argv` first, ahead of
argparse. This module imports nothing heavy, and neither does the package above it.
"""

from __future__ import annotations

import os

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                   "NUMBA_NUM_THREADS")


def threads_from_argv(argv: list[str], default: int) -> int:
    """The value of `--threads N` or `--threads=N` in argv, else `default`."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


def pin_threads_from_argv(argv: list[str], default: int) -> int:
    """Set every thread-count variable to `--threads` (or `default`); returns the count."""
    threads = threads_from_argv(argv, default)
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    return threads
