"""JIT flags for every Numba kernel of mica_core, in one place.

- ``cache=True``: compiled code is written next to the sources (or to ``NUMBA_CACHE_DIR``), so
  a new process loads it instead of compiling again.
- ``fastmath``: contraction into fused multiply-adds, approximate reciprocals and functions,
  no signed zeros. Deliberately without ``nnan``/``ninf`` (a NaN must stay a NaN, and the
  singleton rule multiplies by 0) and without ``reassoc``: sums run in the written order, so
  the bits do not depend on vector width, data alignment or the number of threads.
- ``error_model="numpy"``: a division by zero gives inf/NaN as in numpy instead of a Python
  exception, which keeps the checks out of the inner loops (kernels never divide by zero on
  validated input).
- ``boundscheck=False``: kernels trust their input (validation happens once, at the boundary).
"""

from __future__ import annotations

import numba

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn"})

JIT_OPTIONS = {"cache": True, "nogil": True, "fastmath": set(FASTMATH), "error_model": "numpy",
                   "boundscheck": False}


def jit(fn=None, *, parallel=False, inline=False):
    """``numba.njit`` with mica's flags.

    ``parallel=True`` for the kernels using ``prange``. ``inline=True`` inlines a helper into
    its callers at the Numba IR level: a call between compiled functions passes arrays as new
    references (an atomic increment and decrement of the array's reference count per array
    argument), which per group costs more than the arithmetic and, with several threads
    touching the same arrays, makes them contend for one cache line.
    """
    def wrap(f):
        return numba.njit(parallel=parallel, inline="always" if inline else "never",
                          **JIT_OPTIONS)(f)

    return wrap if fn is None else wrap(fn)
