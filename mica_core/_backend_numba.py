"""The Numba backend: the kernels of :mod:`mica_core._numba` (a parallel mirror of the Cython
kernels), driven by :func:`mica_core._fused.run_fused` exactly as the Cython backend drives
``mica_core._ext``.

Compiled code is cached on disk (``cache=True``), so only the very first call on a machine
compiles; a new process loads the cache. Threads: numba's pool, ``NUMBA_NUM_THREADS`` or
``num_threads`` here; the result is bit-identical whatever the thread count.
"""

from __future__ import annotations

from ._fused import run_fused

try:
    import numba
except ImportError as exc:  # pragma: no cover - exercised only without numba installed
    raise ImportError("backend='numba' needs numba: pip install 'mica-credit[numba]' (or use "
                      "backend='cython')") from exc

from . import _numba


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv, *,
        num_threads=None):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 ``[n_rows]``) for ``plan``.

    ``num_threads``: threads for this call (default: numba's current setting).
    """
    if num_threads is None:
        run_fused(_numba, plan, ragged, distance, initial_distance, reward, out_reward,
                  out_return, out_adv)
        return
    before = numba.get_num_threads()
    numba.set_num_threads(int(num_threads))
    try:
        run_fused(_numba, plan, ragged, distance, initial_distance, reward, out_reward,
                  out_return, out_adv)
    finally:
        numba.set_num_threads(before)
