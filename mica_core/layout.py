"""The ragged (CSR) layout every kernel works on.

``offsets`` is int64 ``[n_traj + 1]``, strictly increasing from 0; trajectory ``i`` owns rows
``offsets[i]:offsets[i+1]`` of every flat per-turn array and row ``offsets[i] + t`` is its turn
``t``. ``group`` holds int64 codes ``0 .. ngroups-1``, one per trajectory. ``key``, when the
estimator has a component with scope ``key``, holds int64 codes ``0 .. nkeys-1`` per row, one
code per (group, user key) pair: rows share a key bucket only within their group. Layouts are
built and checked in :mod:`mica_core.validate`, once; kernels trust what they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .options import ON_MISSING

__all__ = ["Ragged", "ragged_from_lengths", "fill_missing", "ON_MISSING"]


@dataclass(frozen=True)
class Ragged:
    offsets: np.ndarray  # int64 [n_traj + 1]
    group: np.ndarray  # int64 [n_traj], codes 0..ngroups-1
    ngroups: int
    key: np.ndarray | None = None  # int64 [n_rows], codes 0..nkeys-1 of (group, key) pairs
    nkeys: int = 0

    @property
    def n_traj(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def ragged_from_lengths(lengths) -> np.ndarray:
    """Offsets ``[n_traj + 1]`` (int64, from 0) of trajectories with the given lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets




def fill_missing(values, offsets, initial=None):
    """Replace NaN/inf/null per-turn values (``on_missing="carry"``).

    A missing distance carries the previous turn's distance forward (the initial distance on
    turn 0), so the turn earns an IDR of 0; a missing reward (``initial=None``) becomes 0.
    Returns a new array when anything was replaced; the input is never modified.
    """
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return values
    out = np.array(values, dtype=values.dtype, copy=True)
    if initial is None:
        out[bad] = 0.0
        return out
    trajs = np.searchsorted(offsets, bad, side="right") - 1
    for row, i in zip(bad.tolist(), trajs.tolist()):  # in row order, so fills chain forward
        out[row] = initial[i] if row == offsets[i] else out[row - 1]
    return out
