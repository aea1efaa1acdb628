"""The ragged (CSR) layout every kernel works on, and its validation.

``offsets`` is int64 ``[n_traj + 1]``, non-decreasing from 0; trajectory ``i`` owns rows
``offsets[i]:offsets[i+1]`` of every flat per-turn array and row ``offsets[i] + t`` is its turn
``t``. ``group`` holds int64 codes ``0 .. ngroups-1``, one per trajectory. Validation happens
here, once; kernels trust what they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._errors import MicaInputError

__all__ = ["Ragged", "factorize", "ragged_from_lengths", "check_values", "fill_missing",
           "ON_MISSING"]


@dataclass(frozen=True)
class Ragged:
    offsets: np.ndarray  # int64 [n_traj + 1]
    group: np.ndarray  # int64 [n_traj], codes 0..ngroups-1
    ngroups: int

    @property
    def n_traj(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def factorize(labels, name="group"):
    """Integer codes for any labels (numbers or strings), in order of first appearance.

    Returns ``(codes int64, uniques)``.
    """
    a = np.asarray(labels)
    if a.ndim != 1:
        raise MicaInputError(f"must be one-dimensional, got shape {a.shape}", column=name,
                             rule="shape")
    if a.size == 0:
        return np.zeros(0, dtype=np.int64), a
    if a.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise MicaInputError("labels must not be NaN or infinite", column=name,
                                 row=int(bad[0]), rule="finite")
    if a.dtype == object:
        bad = [i for i, v in enumerate(a) if v is None]
        if bad:
            raise MicaInputError("labels must not be null", column=name, row=bad[0],
                                 rule="not null")
        a = a.astype(str)
    uniques, first, inverse = np.unique(a, return_index=True, return_inverse=True)
    # Renumber so codes follow first appearance (stable, like pandas.factorize).
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)].astype(np.int64), uniques[order]


def ragged_from_lengths(lengths) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def check_offsets(offsets) -> np.ndarray:
    o = np.asarray(offsets)
    if o.ndim != 1 or o.size == 0:
        raise MicaInputError(f"must be a 1-D array of length n_traj + 1 >= 1; got shape {o.shape}",
                             column="offsets", rule="shape")
    if o.dtype.kind not in "iu":
        if o.dtype.kind == "f" and np.all(np.isfinite(o)) and np.all(o == np.round(o)):
            pass
        else:
            raise MicaInputError(f"must hold integers; got dtype {o.dtype}", column="offsets",
                                 rule="dtype")
    o = o.astype(np.int64, copy=False)
    if o[0] != 0:
        raise MicaInputError(f"must start at 0; got {int(o[0])}", column="offsets", row=0,
                             rule="start at 0")
    steps = np.diff(o)
    bad = np.flatnonzero(steps <= 0) if not (steps > 0).all() else ()
    if len(bad):
        i = int(bad[0])
        raise MicaInputError(f"trajectory {i} has {int(steps[i])} turns; every trajectory needs "
                             f"at least one (offsets must be strictly increasing)",
                             column="offsets", row=i + 1, rule="strictly increasing")
    return np.ascontiguousarray(o)


def make_ragged(offsets, group) -> Ragged:
    o = check_offsets(offsets)
    n_traj = len(o) - 1
    g = np.asarray(group)
    if g.ndim != 1 or len(g) != n_traj:
        raise MicaInputError(f"needs one label per trajectory ({n_traj}); got shape {g.shape}",
                             column="group", rule="length")
    if g.dtype.kind in "iu" and (g.size == 0 or (g.min() >= 0 and g.max() < max(n_traj, 1) * 4 + 16)):
        # Small non-negative integer codes: keep them, compact unused ones away.
        used = np.zeros(int(g.max()) + 1 if g.size else 0, dtype=bool)
        used[g] = True
        remap = np.cumsum(used) - 1
        codes = remap[g].astype(np.int64)
        ngroups = int(used.sum())
    else:
        codes, uniques = factorize(g, "group")
        ngroups = len(uniques)
    return Ragged(o, np.ascontiguousarray(codes), ngroups)


def check_values(x, name, n, *, allow_negative=True, allow_missing=False):
    """Validate a flat per-row (or per-trajectory) float array; returns it as float32/float64.

    ``allow_missing`` lets NaN and infinities through (to be filled by ``fill_missing``)."""
    a = np.asarray(x)
    if a.ndim != 1 or len(a) != n:
        raise MicaInputError(f"needs shape ({n},); got {a.shape}", column=name, rule="length")
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise MicaInputError(f"must be numeric; got dtype {a.dtype}", column=name, rule="dtype")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    # Fast path first: the common all-finite case allocates no index array.
    bad = () if allow_missing or np.isfinite(a).all() else np.flatnonzero(~np.isfinite(a))
    if len(bad):
        v = a[bad[0]]
        raise MicaInputError(f"value {v} is not finite (NaN and infinities are rejected)",
                             column=name, row=int(bad[0]), rule="finite")
    if not allow_negative:
        # NaN compares False: left to fill_missing
        bad = np.flatnonzero(a < 0) if (a < 0).any() else ()
        if len(bad):
            raise MicaInputError(f"distance {a[bad[0]]} is negative (distances are >= 0)",
                                 column=name, row=int(bad[0]), rule="non-negative")
    return np.ascontiguousarray(a)


ON_MISSING = ("raise", "carry")


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
