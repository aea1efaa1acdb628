"""The Numba backend: the shared plan interpreter (:mod:`mica_core._interpret`) over the Numba
kernels of :mod:`mica_core._numba`, a line-by-line mirror of the numpy reference functions.

Its results equal ``backend="numpy"`` bit for bit; per-trajectory scans run in parallel
(numba's thread pool: ``NUMBA_NUM_THREADS``, or ``num_threads`` here), which changes no bit.
Compiled code is cached on disk (``cache=True``): only the first call on a machine compiles
(seconds), a new process loads the cache. ``backend="auto"`` never picks this backend.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError as exc:  # pragma: no cover - exercised only without numba installed
    raise ImportError("backend='numba' needs numba: pip install 'mica-credit[numba]' (or use "
                      "backend='cython')") from exc

from . import _numba
from ._backend_numpy import NumpyOps
from ._interpret import interpret

__all__ = ["NumbaOps", "run"]


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


class NumbaOps(NumpyOps):
    """:class:`mica_core._backend_numpy.NumpyOps` with its arithmetic in Numba kernels
    (labels and per-row broadcasts are integer work and stay in numpy)."""

    def incremental_distance_reward(self):
        out = np.empty(len(self.distance))
        _numba.ragged_incremental_distance_reward(self.offsets, self.distance,
                                                  self.initial_distance, out)
        return out

    def discounted_returns(self, r, gamma):
        out = np.empty(len(r))
        _numba.ragged_discounted_returns(self.offsets, _f64(r), float(gamma), out)
        return out

    def trajectory_outcome(self, r):
        out = np.empty(len(self.offsets) - 1)
        _numba.ragged_outcome(self.offsets, _f64(r), out)
        return out

    def outcome_returns(self, outcome, gamma):
        out = np.empty(int(self.offsets[-1]))
        _numba.ragged_outcome_returns(self.offsets, _f64(outcome), float(gamma), out)
        return out

    @staticmethod
    def bucket_zscore(values, labels, nbuckets, *, baseline="mean", scale="std", ddof=1,
                      eps=1e-6, singleton="zero"):
        x = _f64(values)
        out = np.empty(len(x))
        if len(x):
            _numba.bucket_zscore(x, np.ascontiguousarray(labels, dtype=np.int64),
                                 int(nbuckets), baseline == "loo", scale == "std", int(ddof),
                                 float(eps), singleton == "raw", out)
        return out


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv, *,
        num_threads=None):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 ``[n_rows]``) for ``plan``.

    ``num_threads``: threads for this call (default: numba's current setting), at most
    numba's pool size (``NUMBA_NUM_THREADS``).
    """
    def fill():
        r, ret, adv = interpret(plan, NumbaOps(ragged, distance, initial_distance, reward))
        out_reward[:] = r
        out_return[:] = ret
        out_adv[:] = adv

    if num_threads is None:
        fill()
        return
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        fill()
    finally:
        numba.set_num_threads(before)
