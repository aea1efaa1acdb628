# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled CPU kernels of mica_core (built ahead of time into ``mica_core._ext``).

Two conventions, visible in the names: ``ragged_*`` scan trajectories given ``offsets``
(trajectory ``i`` owns rows ``offsets[i]:offsets[i+1]``); ``bucket_*`` reduce over
``labels`` with ``nbuckets``. Every kernel reads ``const`` memoryviews, runs without the GIL,
writes into caller-allocated ``out`` arrays and trusts its input (validation happens once, in
``mica_core.layout``). The numpy versions in ``mica_core.signals`` and
``mica_core.normalize`` define the semantics; these match them to 1e-12.
"""

from libc.math cimport sqrt

import numpy as np

ctypedef long long i64


def ragged_incremental_distance_reward(const i64[::1] offsets, const double[::1] distance,
                                       const double[::1] initial_distance, double[::1] out):
    """IDR ``out[t] = D_{t-1} - D_t`` with ``D_{-1} = initial_distance[i]``."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    cdef double prev
    with nogil:
        for i in range(n_traj):
            prev = initial_distance[i]
            for k in range(offsets[i], offsets[i + 1]):
                out[k] = prev - distance[k]
                prev = distance[k]


def ragged_absolute_distance_reward(const double[::1] distance, double[::1] out):
    """ADR ``out[t] = -D_t``."""
    cdef Py_ssize_t k
    with nogil:
        for k in range(distance.shape[0]):
            out[k] = -distance[k]


def ragged_discounted_returns(const i64[::1] offsets, const double[::1] reward, double gamma,
                              double[::1] out):
    """``G_t = r_t + gamma G_{t+1}``, ``G_{T-1} = r_{T-1}`` (reverse recursion)."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    cdef double acc
    with nogil:
        for i in range(n_traj):
            acc = 0.0
            for k in range(offsets[i + 1] - 1, offsets[i] - 1, -1):
                acc = reward[k] + gamma * acc
                out[k] = acc


def ragged_outcome(const i64[::1] offsets, const double[::1] reward, double[::1] out):
    """``R_i = sum_t r_t`` per trajectory (sequential sum, like ``np.bincount``)."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    cdef double acc
    with nogil:
        for i in range(n_traj):
            acc = 0.0
            for k in range(offsets[i], offsets[i + 1]):
                acc = acc + reward[k]
            out[i] = acc


def ragged_outcome_returns(const i64[::1] offsets, const double[::1] outcome, double gamma,
                           double[::1] out):
    """``gamma^(T-1-t) R_i`` per row, by the reverse recursion."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    cdef double acc
    with nogil:
        for i in range(n_traj):
            acc = outcome[i]
            for k in range(offsets[i + 1] - 1, offsets[i] - 1, -1):
                out[k] = acc
                acc = gamma * acc


def ragged_broadcast(const i64[::1] offsets, const double[::1] per_traj, double[::1] out):
    """``out[row] = per_traj[traj(row)]``."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    with nogil:
        for i in range(n_traj):
            for k in range(offsets[i], offsets[i + 1]):
                out[k] = per_traj[i]


def ragged_turn_labels(const i64[::1] offsets, const i64[::1] group, Py_ssize_t ngroups,
                       i64[::1] out):
    """Bucket id per row for scope ``turn`` (one bucket per group and turn index).

    Group ``g`` owns ids ``base[g] .. base[g] + L_g - 1``, ``L_g`` its longest trajectory.
    Returns the number of buckets.
    """
    cdef Py_ssize_t i, k, g, n_traj = offsets.shape[0] - 1
    cdef i64 total = 0, length
    cdef i64[::1] base = np.zeros(max(ngroups, 1), dtype=np.int64)
    cdef i64[::1] longest = np.zeros(max(ngroups, 1), dtype=np.int64)
    with nogil:
        for g in range(ngroups):
            longest[g] = 0
        for i in range(n_traj):
            length = offsets[i + 1] - offsets[i]
            if length > longest[group[i]]:
                longest[group[i]] = length
        for g in range(ngroups):
            base[g] = total
            total += longest[g]
        for i in range(n_traj):
            for k in range(offsets[i], offsets[i + 1]):
                out[k] = base[group[i]] + (k - offsets[i])
    return total


def ragged_group_labels(const i64[::1] offsets, const i64[::1] group, i64[::1] out):
    """Bucket id per row for scope ``group``: the trajectory's group code."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    with nogil:
        for i in range(n_traj):
            for k in range(offsets[i], offsets[i + 1]):
                out[k] = group[i]


def bucket_moments(const i64[::1] labels, const double[::1] values, double[::1] count,
                   double[::1] mean0, double[::1] c, double[::1] m2):
    """Corrected two-pass moments per bucket (see ``mica_core.normalize``).

    ``count``, ``mean0``, ``c``, ``m2`` have length ``nbuckets``; they are overwritten.
    """
    cdef Py_ssize_t k, b, n = values.shape[0], nb = count.shape[0]
    cdef double d
    with nogil:
        for b in range(nb):
            count[b] = 0.0
            mean0[b] = 0.0
            c[b] = 0.0
            m2[b] = 0.0
        for k in range(n):
            count[labels[k]] += 1.0
            mean0[labels[k]] += values[k]
        for b in range(nb):
            if count[b] > 0:
                mean0[b] = mean0[b] / count[b]
        for k in range(n):
            b = labels[k]
            d = values[k] - mean0[b]
            c[b] += d
            m2[b] += d * d
        for b in range(nb):
            if count[b] > 0:
                m2[b] = m2[b] - c[b] * c[b] / count[b]
                if m2[b] < 0.0:
                    m2[b] = 0.0


def bucket_zscore_accumulate(const i64[::1] labels, const double[::1] values,
                             const double[::1] count, const double[::1] mean0,
                             const double[::1] c, const double[::1] m2, double weight,
                             bint loo, bint scale_std, int ddof, double eps,
                             bint singleton_raw, double[::1] out):
    """``out[k] += weight * z(values[k])`` within its bucket (semantics of
    ``mica_core.normalize.bucket_zscore``)."""
    cdef Py_ssize_t k, b, n = values.shape[0]
    cdef double n_b, centred, std, z, denom
    with nogil:
        for k in range(n):
            b = labels[k]
            n_b = count[b]
            if n_b > 1:
                centred = (values[k] - mean0[b]) - c[b] / n_b
                if loo:
                    centred = centred * (n_b / (n_b - 1.0))
                if scale_std:
                    denom = n_b - ddof
                    std = sqrt(m2[b] / denom)
                    z = centred / (std + eps)
                else:
                    z = centred
            elif singleton_raw:
                z = values[k] / (1.0 + eps) if scale_std else values[k]
            else:
                z = 0.0
            out[k] += weight * z
