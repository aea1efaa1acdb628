"""Numba kernels of the interpreter's operations: a line-by-line mirror of the numpy reference.

Each kernel restates one function of :mod:`mica_core.signals` or :mod:`mica_core.normalize`
(pandas' ``core/_numba/kernels`` pattern: small kernels keyed by ``offsets`` or by ``labels,
nbuckets``, writing into caller-allocated ``out`` arrays), with the same operations in the
same order, so the Numba backend agrees with the numpy backend bit for bit
(``tests/test_backends.py``). Per-trajectory scans run their trajectories in parallel
(``prange``: each row's value is computed by one thread in a fixed order, so the thread count
changes no bit); bucket sums run in row order, as ``numpy.bincount`` does.

The fused, fast path is the Cython kernels (``kernels/_ext.pyx``); docs/performance.md says
why the two are not the same code.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import jit

__all__ = [
    "bucket_zscore",
    "ragged_discounted_returns",
    "ragged_incremental_distance_reward",
    "ragged_outcome",
    "ragged_outcome_returns",
]


@jit(parallel=True)
def ragged_incremental_distance_reward(offsets, distance, initial_distance, out):
    """``out[t] = D_{t-1} - D_t`` with ``D_{-1} = initial_distance[i]``
    (:func:`mica_core.signals.incremental_distance_reward`)."""
    for i in prange(offsets.shape[0] - 1):
        a, b = offsets[i], offsets[i + 1]
        out[a] = float(initial_distance[i]) - float(distance[a])
        for k in range(a + 1, b):
            out[k] = float(distance[k - 1]) - float(distance[k])


@jit(parallel=True)
def ragged_discounted_returns(offsets, reward, gamma, out):
    """``G_t = r_t + gamma G_{t+1}`` to the trajectory's last turn, by the reverse recursion
    (:func:`mica_core.signals.discounted_returns`)."""
    for i in prange(offsets.shape[0] - 1):
        a, b = offsets[i], offsets[i + 1]
        out[b - 1] = reward[b - 1]
        for k in range(b - 2, a - 1, -1):
            out[k] = reward[k] + gamma * out[k + 1]


@jit(parallel=True)
def ragged_outcome(offsets, reward, out):
    """``R_i = sum_t r_t``, summed in row order from 0
    (:func:`mica_core.signals.trajectory_outcome`)."""
    for i in prange(offsets.shape[0] - 1):
        acc = 0.0
        for k in range(offsets[i], offsets[i + 1]):
            acc += reward[k]
        out[i] = acc


@jit(parallel=True)
def ragged_outcome_returns(offsets, outcome, gamma, out):
    """``gamma^(T_i-1-t) R_i``, from the last turn backwards
    (:func:`mica_core.signals.outcome_returns`)."""
    for i in prange(offsets.shape[0] - 1):
        a, b = offsets[i], offsets[i + 1]
        out[b - 1] = outcome[i]
        for k in range(b - 2, a - 1, -1):
            out[k] = gamma * out[k + 1]


@jit
def bucket_zscore(x, labels, nbuckets, loo, scale_std, ddof, eps, singleton_raw, out):
    """z of every element within its bucket (:func:`mica_core.normalize.bucket_zscore`):
    the corrected two-pass moments, leave-one-out as ``n/(n-1) (x - mean)``, singletons 0 or
    raw. Bucket sums run in row order, as ``numpy.bincount``'s."""
    n = x.shape[0]
    count = np.zeros(nbuckets)
    total = np.zeros(nbuckets)
    for k in range(n):
        count[labels[k]] += 1.0
        total[labels[k]] += x[k]
    safe = np.empty(nbuckets)
    mean0 = np.empty(nbuckets)
    for b in range(nbuckets):
        safe[b] = count[b] if count[b] > 0 else 1.0
        mean0[b] = total[b] / safe[b]
    c = np.zeros(nbuckets)
    q = np.zeros(nbuckets)
    for k in range(n):
        d = x[k] - mean0[labels[k]]
        c[labels[k]] += d
        q[labels[k]] += d * d
    shift = np.empty(nbuckets)
    std = np.empty(nbuckets)
    for b in range(nbuckets):
        m2 = max(q[b] - c[b] * c[b] / safe[b], 0.0)
        shift[b] = c[b] / safe[b]
        std[b] = np.sqrt(m2 / (count[b] - ddof if count[b] - ddof > 0 else 1.0))
    for k in range(n):
        b = labels[k]
        nb = count[b]
        centred = (x[k] - mean0[b]) - shift[b]
        if nb > 1.0:
            if loo:
                centred = centred * (nb / (nb - 1.0))
            out[k] = centred / (std[b] + eps) if scale_std else centred
        elif singleton_raw:
            out[k] = x[k] / (1.0 + eps) if scale_std else x[k]
        else:
            out[k] = 0.0
