"""The torch backend: every estimator on torch tensors, CPU or CUDA, on the input's device.

Two entry points share one implementation (:func:`compute`, the shared plan interpreter of
:mod:`mica_core._interpret` over :class:`TorchOps`), both reached from :mod:`mica_core.api`
after :mod:`mica_core.validate` has checked the input:

- :func:`run_tensors`, for torch tensors: returns tensors on the input's device.
- :func:`run`, for ``backend="torch"`` on host input: computes on the CPU and fills the
  caller's float64 arrays.

Layout. Rows are CSR as everywhere in mica (``offsets``, docs/architecture.md "The layout"). Per-trajectory scans work
on a turn-major padded copy ``P[t, i]`` (``max_turns x n_traj``, zeros past each trajectory's
end), so one step of the reverse recursion touches one contiguous row of ``P``. Bucket
statistics are segment reductions keyed by ``labels, nbuckets``: ``index_add_`` by default, a
stable sort plus ``torch.segment_reduce`` in deterministic mode.

Precision. Everything is computed in float64 (float32 on devices without float64, i.e. MPS,
where results carry float32 accuracy) and the outputs are cast to the input's float dtype at
the end: float32 in, float32 out; float64 in, float64 out; float16/bfloat16 give float32;
integers give float64.

Host synchronisation on CUDA. The computation itself never copies to the host and never
waits for the device. What does:

- ``validate=True`` (default): one device-to-host copy of a handful of scalars (the first
  offending row of each check, and the longest trajectory when ``max_turns`` is not given).
- ``max_turns=None`` with ``validate=False``: one copy, to learn the longest trajectory.
- ``group`` as a device tensor without ``ngroups``: ``torch.unique`` (one sync).
- ``offsets`` or ``group`` given as host data (lists, numpy, CPU tensors) for CUDA values: one
  host-to-device copy each.

The sync-free hot path: ``offsets`` and ``group`` as int64 tensors on the device, group codes
in ``0 .. ngroups-1`` with ``ngroups=`` and ``max_turns=`` given, and ``validate=False``.
Unvalidated bad input there gives wrong numbers or a device-side assertion, not an error.

Determinism. On the CPU every result is bitwise reproducible. On CUDA the default bucket sums
use ``index_add_`` (float atomics): the summation order varies from run to run and so do the
last bits (about 1e-16 relative in float64). ``deterministic=True``, or
``torch.use_deterministic_algorithms(True)`` when ``deterministic=None``, replaces them with a
stable sort by bucket and a fixed-order ``torch.segment_reduce``: bitwise reproducible on the
same device and software, somewhat slower. Counts are exact in both modes.

Every vectorized function here has a plain loop version beside it (suffix ``_loop``), used by
the tests as a second reference.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ._interpret import interpret

__all__ = [
    "bucket_sum",
    "bucket_zscore",
    "compute",
    "ragged_discounted_returns",
    "ragged_incremental_distance_reward",
    "ragged_outcome",
    "ragged_outcome_returns",
    "ragged_row_trajectory",
    "ragged_turn_index",
    "run",
    "run_tensors",
    "scope_labels",
    "TorchOps",
]


# ---------------------------------------------------------------------------------------------
# Work dtype and small helpers


def deterministic_default(deterministic):
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return bool(deterministic)


# ---------------------------------------------------------------------------------------------
# Ragged scans (per trajectory, keyed by offsets)


def ragged_row_trajectory(offsets, n_rows):
    """Trajectory id of every row, int64 ``[n_rows]`` (a cumulative count of row starts).

    Sync-free: ``n_rows`` comes from a shape, not from ``offsets[-1]``.
    """
    marks = torch.zeros(n_rows, dtype=torch.int64, device=offsets.device)
    inner = offsets[1:-1]
    if inner.numel():
        marks.index_add_(0, inner, torch.ones_like(inner))
    return torch.cumsum(marks, 0)


def ragged_row_trajectory_loop(offsets, n_rows):
    out = torch.empty(n_rows, dtype=torch.int64)
    o = offsets.tolist()
    for i in range(len(o) - 1):
        out[o[i]:o[i + 1]] = i
    return out.to(offsets.device)


def ragged_turn_index(offsets, traj):
    """Turn index ``t = row - offsets[traj(row)]`` of every row (int64)."""
    rows = torch.arange(traj.shape[0], dtype=torch.int64, device=traj.device)
    return rows - offsets.index_select(0, traj)


def ragged_turn_index_loop(offsets, n_rows):
    out = torch.empty(n_rows, dtype=torch.int64)
    o = offsets.tolist()
    for i in range(len(o) - 1):
        for row in range(o[i], o[i + 1]):
            out[row] = row - o[i]
    return out.to(offsets.device)


def ragged_incremental_distance_reward(distance, initial_distance, traj, t):
    """IDR ``r_t = D_{t-1} - D_t`` with ``D_{-1} = initial_distance`` (MICA §3.1).

    ``distance`` ``[n_rows]``, ``initial_distance`` ``[n_traj]``, ``traj`` and ``t`` the row's
    trajectory and turn index. The previous row is the previous turn except at ``t = 0``.
    """
    prev = torch.roll(distance, 1)
    return torch.where(t == 0, initial_distance.index_select(0, traj), prev) - distance


def ragged_incremental_distance_reward_loop(offsets, distance, initial_distance):
    out = torch.empty_like(distance)
    o = offsets.tolist()
    for i in range(len(o) - 1):
        prev = initial_distance[i]
        for row in range(o[i], o[i + 1]):
            out[row] = prev - distance[row]
            prev = distance[row]
    return out


def padded_positions(traj, t, n_traj):
    """Flat index of every row in the turn-major padded layout ``[max_turns, n_traj]``."""
    return t * n_traj + traj


def to_padded(values, pos, max_turns, n_traj):
    """Turn-major padded copy ``[max_turns, n_traj]`` of flat row values, zeros elsewhere."""
    p = values.new_zeros(max_turns * n_traj)
    p.index_put_((pos,), values)
    return p.view(max_turns, n_traj)


def padded_discounted_returns_(p, gamma):
    """In place on turn-major ``p [T, n]``: ``p[t] += gamma * p[t + 1]`` from ``t = T - 2`` down.

    Zeros past a trajectory's end make its last turn ``G = r`` without a mask.
    """
    for k in range(p.shape[0] - 2, -1, -1):
        p[k].add_(p[k + 1], alpha=gamma)
    return p


def ragged_discounted_returns(reward, pos, max_turns, n_traj, gamma):
    """Monte Carlo return to the trajectory's last turn, no bootstrap::

        G_t = r_t + gamma * G_{t+1},   G_{T-1} = r_{T-1}

    i.e. ``G_t = sum_{k>=t} gamma^(k-t) r_k``, by the reverse recursion over the turn axis of
    the padded layout (one vectorized step per turn index), never by ``gamma^-t`` rescaling.
    """
    p = padded_discounted_returns_(to_padded(reward, pos, max_turns, n_traj), float(gamma))
    return p.view(-1).index_select(0, pos)


def ragged_discounted_returns_loop(offsets, reward, gamma):
    out = torch.empty_like(reward)
    o = offsets.tolist()
    for i in range(len(o) - 1):
        g = 0.0
        for row in range(o[i + 1] - 1, o[i] - 1, -1):
            g = float(reward[row]) + gamma * g
            out[row] = g
    return out


def ragged_outcome(reward, pos, max_turns, n_traj):
    """Outcome ``R_i = sum_t r_t`` per trajectory: a column sum of the padded layout.

    A dense reduction, so deterministic on every device.
    """
    return to_padded(reward, pos, max_turns, n_traj).sum(0)


def ragged_outcome_loop(offsets, reward):
    o = offsets.tolist()
    return torch.stack([reward[o[i]:o[i + 1]].sum() for i in range(len(o) - 1)]) \
        if len(o) > 1 else reward.new_zeros(0)


def ragged_outcome_returns(outcome, offsets, pos, max_turns, gamma):
    """``gamma^(T_i-1-t) * R_i`` for every row: the return of a sparse reward paying ``R_i``
    on the last turn, by the same reverse recursion (no negative powers)."""
    n_traj = outcome.shape[0]
    last = (offsets[1:] - offsets[:-1] - 1) * n_traj + torch.arange(
        n_traj, dtype=torch.int64, device=outcome.device)
    p = outcome.new_zeros(max_turns * n_traj)
    p.index_put_((last,), outcome)
    padded_discounted_returns_(p.view(max_turns, n_traj), float(gamma))
    return p.index_select(0, pos)


def ragged_outcome_returns_loop(offsets, outcome, gamma):
    o = offsets.tolist()
    out = outcome.new_empty(o[-1])
    for i in range(len(o) - 1):
        v = float(outcome[i])
        for row in range(o[i + 1] - 1, o[i] - 1, -1):
            out[row] = v
            v *= gamma
    return out


# ---------------------------------------------------------------------------------------------
# Bucket statistics (keyed by labels, nbuckets)


class SortedBuckets:
    """A stable sort of rows by bucket: the fixed summation order of deterministic mode."""

    def __init__(self, labels, nbuckets):
        self.order = torch.sort(labels, stable=True).indices
        ones = torch.ones_like(labels)
        self.lengths = torch.zeros(nbuckets, dtype=torch.int64, device=labels.device)
        self.lengths.index_add_(0, labels, ones)  # integer sums: exact in any order

    def sum(self, values):
        return torch.segment_reduce(values.index_select(0, self.order), "sum",
                                    lengths=self.lengths, unsafe=True)


def bucket_sum(values, labels, nbuckets, sorted_buckets=None):
    """``out[b] = sum of values[labels == b]`` (``index_add_``, or fixed order when sorted)."""
    if nbuckets == 1:
        return values.sum().reshape(1)
    if sorted_buckets is not None:
        return sorted_buckets.sum(values)
    return values.new_zeros(nbuckets).index_add_(0, labels, values)


def bucket_sum_loop(values, labels, nbuckets):
    out = values.new_zeros(nbuckets)
    for i in range(values.shape[0]):
        out[labels[i]] += values[i]
    return out


def bucket_zscore(values, labels, nbuckets, *, baseline="mean", scale="std", ddof=1, eps=1e-6,
                  singleton="zero", deterministic=False):
    """z-score of every element within its bucket (README, "Estimators"), on the values' device.

    ``z = (x - baseline_b) / (std_b + eps)`` with the corrected two-pass moments of
    :mod:`mica_core.normalize` (``mean0 = sum/n``; ``d = x - mean0``; ``c = sum d``;
    ``m2 = sum d^2 - c^2/n``; centred value ``d - c/n``), leave-one-out as the exact
    rearrangement ``x - loo = n/(n-1) (x - mean)``; a bucket of one gives 0 (``singleton=
    "zero"``) or ``x/(1+eps)`` (``"raw"``, mean 0 and std 1; ``x`` under ``scale="none"``).

    Args:
      values: float ``[n]`` (float64 on devices that have it).
      labels: int64 ``[n]`` bucket ids in ``0 .. nbuckets-1``.
      deterministic: fixed summation order (see the module docstring).
    """
    x = values
    if x.shape[0] == 0:
        return x.new_zeros(0)
    sb = SortedBuckets(labels, nbuckets) if deterministic and nbuckets > 1 else None
    count = bucket_sum(torch.ones_like(x), labels, nbuckets, sb)
    safe = torch.where(count > 0, count, 1.0)
    mean0 = bucket_sum(x, labels, nbuckets, sb) / safe
    d = x - mean0.index_select(0, labels)
    c = bucket_sum(d, labels, nbuckets, sb)
    m2 = torch.clamp_min(bucket_sum(d * d, labels, nbuckets, sb) - c * c / safe, 0.0)
    centred = d - (c / safe).index_select(0, labels)
    n = count.index_select(0, labels)
    multi = n > 1
    if baseline == "loo":
        centred = torch.where(multi, centred * (n / torch.where(multi, n - 1.0, 1.0)), centred)
    if scale == "std":
        denom = torch.where(count - ddof > 0, count - ddof, 1.0)
        std = torch.sqrt(m2 / denom)
        z = centred / (std.index_select(0, labels) + eps)
        raw = x / (1.0 + eps)
    else:
        z = centred
        raw = x
    return torch.where(multi, z, raw if singleton == "raw" else torch.zeros_like(x))


def bucket_zscore_loop(values, labels, nbuckets, *, baseline="mean", scale="std", ddof=1,
                       eps=1e-6, singleton="zero"):
    """One bucket at a time with torch's own mean and std: the reference for the above."""
    out = torch.zeros_like(values)
    for b in range(nbuckets):
        idx = (labels == b).nonzero().flatten()
        if idx.numel() == 0:
            continue
        x = values[idx]
        n = x.numel()
        if n == 1:
            if singleton == "raw":
                out[idx] = x / (1.0 + eps) if scale == "std" else x
            continue
        mean = x.mean()
        base = mean if baseline == "mean" else (x.sum() - x) / (n - 1)
        z = x - base
        if scale == "std":
            z = z / (x.std(correction=ddof) + eps)
        out[idx] = z
    return out


def scope_labels(scope, traj, t, group, ngroups, max_turns, *, per_trajectory=False,
                 key=None, nkeys=0):
    """Bucket ids for a scope: ``(labels int64, nbuckets)``.

    ``turn``: one bucket per (group, turn index), id ``group * max_turns + t`` (a dense table;
    ids no row uses stay empty). ``group``: the group code. ``batch``: one bucket. ``key``:
    the key codes per row (one per (group, key) pair), ``nkeys`` buckets.
    Per trajectory (``per_trajectory=True``, ``group``/``batch`` only): one label per trajectory.
    """
    if scope == "key":
        if per_trajectory or key is None:
            raise ValueError("scope 'key' needs per-row key codes")
        return key, int(nkeys)
    if scope == "turn":
        if per_trajectory:
            raise ValueError("scope 'turn' has no per-trajectory buckets")
        return group.index_select(0, traj) * max_turns + t, ngroups * max_turns
    if scope == "group":
        return (group if per_trajectory else group.index_select(0, traj)), ngroups
    if scope == "batch":
        n = group.shape[0] if per_trajectory else traj.shape[0]
        return torch.zeros(n, dtype=torch.int64, device=traj.device), 1
    raise ValueError(f"unknown scope {scope!r}")


# ---------------------------------------------------------------------------------------------
# The interpreter's operations, and the entry points


class TorchOps:
    """The interpreter's operations (:mod:`mica_core._interpret`) on trusted tensors.

    ``offsets`` int64 ``[n_traj + 1]`` and ``group`` int64 codes ``[n_traj]`` in
    ``0 .. ngroups-1`` on one device; ``max_turns`` at least the longest trajectory; value
    tensors in the work dtype (:func:`mica_core.validate_tensors.work_dtype`).
    """

    def __init__(self, offsets, group, ngroups, max_turns, distance=None,
                 initial_distance=None, reward=None, *, deterministic=False, key=None,
                 nkeys=0):
        values = reward if reward is not None else distance
        self.offsets, self.group, self.ngroups = offsets, group, int(ngroups)
        self.T = int(max_turns)
        self.n_traj = offsets.shape[0] - 1
        self.traj = ragged_row_trajectory(offsets, values.shape[0])
        self.t = ragged_turn_index(offsets, self.traj)
        self.pos = padded_positions(self.traj, self.t, self.n_traj)
        self.distance, self.initial_distance, self.reward = distance, initial_distance, reward
        self.deterministic = deterministic
        self.key, self.nkeys = key, nkeys

    def given_reward(self):
        return self.reward

    def incremental_distance_reward(self):
        return ragged_incremental_distance_reward(self.distance, self.initial_distance,
                                                  self.traj, self.t)

    def absolute_distance_reward(self):
        return -self.distance

    def discounted_returns(self, r, gamma):
        return ragged_discounted_returns(r, self.pos, self.T, self.n_traj, gamma)

    def trajectory_outcome(self, r):
        return ragged_outcome(r, self.pos, self.T, self.n_traj)

    def outcome_returns(self, outcome, gamma):
        return ragged_outcome_returns(outcome, self.offsets, self.pos, self.T, gamma)

    def per_row(self, x):
        return x.index_select(0, self.traj)

    def scope_labels(self, scope, *, per_trajectory=False):
        return scope_labels(scope, self.traj, self.t, self.group, self.ngroups, self.T,
                            per_trajectory=per_trajectory, key=self.key, nkeys=self.nkeys)

    def bucket_zscore(self, values, labels, nbuckets, **options):
        return bucket_zscore(values, labels, nbuckets, deterministic=self.deterministic,
                             **options)

    @staticmethod
    def zeros_like(x):
        return torch.zeros_like(x)

    @staticmethod
    def add_scaled(acc, x, weight):
        return acc.add_(x, alpha=weight)


def compute(plan, offsets, group, ngroups, max_turns, distance=None, initial_distance=None,
            reward=None, *, deterministic=False, key=None, nkeys=0):
    """Run a resolved plan on trusted tensors; returns ``(reward, returns, advantage)``,
    three tensors ``[n_rows]`` in the work dtype on the inputs' device (see
    :class:`TorchOps` for the arguments)."""
    values = reward if reward is not None else distance
    if values.shape[0] == 0:
        e = values.new_zeros(0)
        return e, e.clone(), e.clone()
    return interpret(plan, TorchOps(offsets, group, ngroups, max_turns, distance,
                                    initial_distance, reward, deterministic=deterministic,
                                    key=key, nkeys=nkeys))


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 numpy ``[n_rows]``) for ``plan``.

    The ``backend="torch"`` path for validated host input: computes on the CPU in float64.
    """
    offsets = torch.from_numpy(np.ascontiguousarray(ragged.offsets, dtype=np.int64))
    group = torch.from_numpy(np.ascontiguousarray(ragged.group, dtype=np.int64))
    lengths = np.diff(ragged.offsets)
    max_turns = int(lengths.max()) if lengths.size else 1

    def t64(a):
        if a is None:
            return None
        with warnings.catch_warnings():  # read-only arrays (from Arrow): never written to
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(a, dtype=np.float64))

    key = None if ragged.key is None else torch.from_numpy(
        np.ascontiguousarray(ragged.key, dtype=np.int64))
    r, ret, adv = compute(plan, offsets, group, ragged.ngroups, max_turns, t64(distance),
                          t64(initial_distance), t64(reward),
                          deterministic=deterministic_default(None), key=key,
                          nkeys=ragged.nkeys)
    out_reward[:] = r.numpy()
    out_return[:] = ret.numpy()
    out_adv[:] = adv.numpy()


def run_tensors(plan, inputs, *, deterministic=None):
    """``(reward, returns, advantage)`` tensors for validated torch input
    (:class:`mica_core.validate_tensors.TorchInputs`), cast to its output dtype."""
    r, ret, adv = compute(plan, inputs.offsets, inputs.group, inputs.ngroups, inputs.max_turns,
                          inputs.distance, inputs.initial_distance, inputs.reward,
                          deterministic=deterministic_default(deterministic), key=inputs.key,
                          nkeys=inputs.nkeys)
    if inputs.out_dtype != r.dtype:
        r, ret, adv = r.to(inputs.out_dtype), ret.to(inputs.out_dtype), adv.to(inputs.out_dtype)
    return r, ret, adv
