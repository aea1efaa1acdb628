"""Bucket statistics and z-scores (README, "Estimators"; docs/architecture.md, "Conventions").

``z_S(x) = (x - baseline_S) / (std_S + eps)`` over the bucket ``S`` holding ``x``. Buckets are
given as ``labels`` (int64 bucket id per element) and ``nbuckets``.

Statistics accumulate in float64 with a corrected two-pass scheme (Chan, Golub & LeVeque,
1983): ``mean0 = sum(x)/n``, then ``d = x - mean0``, ``c = sum(d)``, ``m2 = sum(d^2) - c^2/n``
and the centred value ``x - mean = d - c/n``. The correction ``c`` recovers the digits a plain
``sum/n`` loses when values ride on a large offset (``1e12 + small``); ``E[x^2] - E[x]^2`` is
never used.

The leave-one-out baseline ``(sum - x)/(n - 1)`` is computed as its exact rearrangement
``x - loo = n/(n-1) * (x - mean)``, which cancels nothing. ``std`` is the bucket's standard
deviation with ``ddof`` in both cases.

A bucket of one element has nothing to compare with: ``singleton="zero"`` gives 0,
``singleton="raw"`` applies the formula with mean 0 and std 1 (verl's GRPO), i.e.
``x / (1 + eps)`` under ``scale="std"`` and ``x`` under ``scale="none"``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bucket_moments", "bucket_zscore", "turn_labels", "scope_labels"]


def bucket_moments(values, labels, nbuckets):
    """Per-bucket ``(count, mean0, c, m2)`` of the corrected two-pass scheme (float64)."""
    x = np.asarray(values, dtype=np.float64)
    count = np.bincount(labels, minlength=nbuckets).astype(np.float64)
    total = np.bincount(labels, weights=x, minlength=nbuckets)
    safe = np.where(count > 0, count, 1.0)
    mean0 = total / safe
    d = x - mean0[labels]
    c = np.bincount(labels, weights=d, minlength=nbuckets)
    m2 = np.bincount(labels, weights=d * d, minlength=nbuckets) - c * c / safe
    return count, mean0, c, np.maximum(m2, 0.0)


def bucket_zscore(values, labels, nbuckets, *, baseline="mean", scale="std", ddof=1,
                  eps=1e-6, singleton="zero"):
    """z-score of every element within its bucket (float64, same shape as ``values``).

    Args:
      values: ``[n]`` numbers.
      labels: int64 ``[n]`` bucket ids in ``0 .. nbuckets-1``.
      baseline: ``"mean"`` or ``"loo"`` (leave-one-out mean of the others).
      scale: ``"std"`` or ``"none"`` (centre only, Dr.GRPO style).
      ddof: 0 or 1 (verl and TRL use 1).
      singleton: ``"zero"`` or ``"raw"``; see the module docstring.
    """
    x = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if x.size == 0:
        return np.zeros(0, dtype=np.float64)
    count, mean0, c, m2 = bucket_moments(x, labels, nbuckets)
    safe = np.where(count > 0, count, 1.0)
    centred = (x - mean0[labels]) - (c / safe)[labels]
    n = count[labels]
    multi = n > 1
    if baseline == "loo":
        centred = np.where(multi, centred * (n / np.where(multi, n - 1.0, 1.0)), centred)
    if scale == "std":
        denom = np.where(count - ddof > 0, count - ddof, 1.0)
        std = np.sqrt(m2 / denom)
        z = centred / (std[labels] + eps)
        raw = x / (1.0 + eps)
    else:
        z = centred
        raw = x
    return np.where(multi, z, raw if singleton == "raw" else 0.0)


def turn_labels(offsets, group, ngroups):
    """Bucket id of every row for scope ``turn``: one bucket per (group, turn index).

    Group ``g`` owns ids ``base[g] .. base[g] + L_g - 1`` where ``L_g`` is its longest
    trajectory. Returns ``(labels int64 [n_rows], nbuckets)``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    longest = np.zeros(ngroups, dtype=np.int64)
    np.maximum.at(longest, group, lengths)
    base = np.zeros(ngroups, dtype=np.int64)
    np.cumsum(longest[:-1], out=base[1:])
    starts = np.repeat(offsets[:-1], lengths)
    t = np.arange(int(offsets[-1]), dtype=np.int64) - starts
    return np.repeat(base[group], lengths) + t, int(longest.sum())


def scope_labels(scope, offsets, group, ngroups, *, per_trajectory=False, key=None, nkeys=0):
    """Bucket ids for a scope, per row (or per trajectory for ``group``/``batch``).

    ``key``: the layout's per-row key codes (one per (group, key) pair, see
    :class:`mica_core.layout.Ragged`), the buckets of scope ``key``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if scope == "key":
        if per_trajectory:
            raise ValueError("scope 'key' has no per-trajectory buckets")
        if key is None:
            raise ValueError("scope 'key' needs the layout's key codes")
        return np.asarray(key, dtype=np.int64), int(nkeys)
    if scope == "turn":
        if per_trajectory:
            raise ValueError("scope 'turn' has no per-trajectory buckets")
        return turn_labels(offsets, group, ngroups)
    if scope == "group":
        if per_trajectory:
            return np.asarray(group, dtype=np.int64), ngroups
        return np.repeat(np.asarray(group, dtype=np.int64), np.diff(offsets)), ngroups
    if scope == "batch":
        n = len(offsets) - 1 if per_trajectory else int(offsets[-1])
        return np.zeros(n, dtype=np.int64), 1
    raise ValueError(f"unknown scope {scope!r}")
