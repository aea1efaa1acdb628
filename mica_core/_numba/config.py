"""JIT flags for every Numba kernel of mica_core, in one place.

- ``cache=True``: compiled code is written next to the sources (or to ``NUMBA_CACHE_DIR``), so
  a new process loads it instead of compiling again.
- ``fastmath=False``: no contraction into fused multiply-adds, no reciprocal approximations,
  no reassociation. The kernels mirror the numpy reference operation by operation and must
  give its bits (and a NaN must stay a NaN).
- ``error_model="numpy"``: a division by zero gives inf/NaN as in numpy instead of a Python
  exception, which keeps the checks out of the inner loops.
- ``boundscheck=False``: kernels trust their input (validation happens once, at the boundary).
"""

from __future__ import annotations

import numba

JIT_OPTIONS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy",
               "boundscheck": False}


def jit(fn=None, *, parallel=False):
    """``numba.njit`` with mica's flags (``parallel=True`` for kernels using ``prange``)."""
    def wrap(f):
        return numba.njit(parallel=parallel, **JIT_OPTIONS)(f)

    return wrap if fn is None else wrap(fn)
