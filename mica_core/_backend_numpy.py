"""The numpy backend: vectorized, readable; the in-package reference for the compiled ones.

Its operations are the named functions of :mod:`mica_core.signals` and
:mod:`mica_core.normalize`, run by the shared plan interpreter (:mod:`mica_core._interpret`).
"""

from __future__ import annotations

import numpy as np

from . import signals
from ._interpret import interpret
from .normalize import bucket_zscore, scope_labels

__all__ = ["NumpyOps", "run"]


class NumpyOps:
    """The interpreter's operations on numpy arrays for one validated batch (float64)."""

    def __init__(self, ragged, distance=None, initial_distance=None, reward=None):
        self.offsets, self.group, self.ngroups = ragged.offsets, ragged.group, ragged.ngroups
        self.key, self.nkeys = ragged.key, ragged.nkeys
        self.lengths = np.diff(self.offsets)
        self.distance, self.initial_distance, self.reward = distance, initial_distance, reward

    def given_reward(self):
        return np.asarray(self.reward, dtype=np.float64)

    def incremental_distance_reward(self):
        return signals.incremental_distance_reward(self.offsets, self.distance,
                                                   self.initial_distance)

    def absolute_distance_reward(self):
        return signals.absolute_distance_reward(self.distance)

    def discounted_returns(self, r, gamma):
        return signals.discounted_returns(self.offsets, r, gamma)

    def trajectory_outcome(self, r):
        return signals.trajectory_outcome(self.offsets, r)

    def outcome_returns(self, outcome, gamma):
        return signals.outcome_returns(self.offsets, outcome, gamma)

    def per_row(self, x):
        return np.repeat(x, self.lengths)

    def scope_labels(self, scope, *, per_trajectory=False):
        return scope_labels(scope, self.offsets, self.group, self.ngroups,
                            per_trajectory=per_trajectory, key=self.key, nkeys=self.nkeys)

    @staticmethod
    def bucket_zscore(values, labels, nbuckets, **options):
        return bucket_zscore(values, labels, nbuckets, **options)

    @staticmethod
    def zeros_like(x):
        return np.zeros_like(x, dtype=np.float64)

    @staticmethod
    def add_scaled(acc, x, weight):
        acc += weight * x
        return acc


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 ``[n_rows]``) for ``plan``."""
    r, ret, adv = interpret(plan, NumpyOps(ragged, distance, initial_distance, reward))
    out_reward[:] = r
    out_return[:] = ret
    out_adv[:] = adv
