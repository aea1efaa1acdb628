"""What ``backend="auto"`` runs, and on how many threads.

``auto`` is always the Cython kernels: compiled ahead of time at install, so no call ever
waits for a compiler (the Numba backend compiles on its first call in a process without a
cache and is never picked here). Threads: below :data:`PARALLEL_MIN_ROWS` turns one thread
(waking a thread pool costs more than the whole call at 12k turns); above it every core this
process may use. ``python -m bench --sections threshold`` measures two threads winning from
about 17k turns on a quiet machine; the threshold sits higher so that a scheduler wait on a
shared machine cannot multiply a small call's time (docs/performance.md). Environment
variables:

- ``MICA_NUM_THREADS``: the most threads a call uses (default: the cores available to the
  process, ``os.sched_getaffinity``);
- ``MICA_PARALLEL_MIN_ROWS``: move the threshold (``0``: threads from the first turn).
"""

from __future__ import annotations

import os

PARALLEL_MIN_ROWS = 262_144

__all__ = ["PARALLEL_MIN_ROWS", "available_threads", "parallel_min_rows", "pick_backend",
           "threads_for"]


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None


def available_threads() -> int:
    """Cores this process may run on, capped by ``MICA_NUM_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    cap = _env_int("MICA_NUM_THREADS", 0)
    return max(1, min(cores, cap) if cap else cores)


def parallel_min_rows() -> int:
    return _env_int("MICA_PARALLEL_MIN_ROWS", PARALLEL_MIN_ROWS)


def threads_for(n_rows: int) -> int:
    """Threads for a call over ``n_rows`` turns: 1 below the threshold, else all available."""
    return available_threads() if n_rows >= parallel_min_rows() else 1


def pick_backend(n_rows: int) -> str:
    """The backend ``auto`` runs: the compiled Cython kernels, at every size."""
    return "cython"
