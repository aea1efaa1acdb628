"""Which compiled backend ``backend="auto"`` runs, by input size.

Below :data:`NUMBA_MIN_ROWS` turns the single-threaded Cython kernels win: a parallel Numba
call pays for waking its thread pool, which at 12k turns costs more than the whole Cython
call. Above it the parallel Numba kernels win. The threshold is the crossover measured by
``python -m bench --threshold`` on a 2-core machine (see docs/performance.md); set the
environment variable ``MICA_NUMBA_MIN_ROWS`` to move it (``0``: always Numba when installed).

Nothing here imports numba: ``importlib.util.find_spec`` only looks for it.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

NUMBA_MIN_ROWS = 262_144


@lru_cache(maxsize=1)
def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def numba_min_rows() -> int:
    value = os.environ.get("MICA_NUMBA_MIN_ROWS")
    if value is None or not value.strip():
        return NUMBA_MIN_ROWS
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"MICA_NUMBA_MIN_ROWS must be an integer; got {value!r}") from None


def pick_backend(n_rows: int) -> str:
    """``"numba"`` for inputs of at least :func:`numba_min_rows` turns when numba is
    installed, else ``"cython"``."""
    if n_rows >= numba_min_rows() and numba_available():
        return "numba"
    return "cython"
