"""The torch backend: every estimator on torch tensors, CPU or CUDA, on the input's device.

Two entry points share one implementation (:func:`compute`):

- :func:`estimate`, reached from :func:`mica_core.estimate` when an input is a torch tensor;
  it validates, factorizes groups and returns tensors on the input's device.
- :func:`run`, reached from ``mica_core.api.run_plan`` for ``backend="torch"`` on numpy input
  that is already validated; it computes on the CPU and fills the caller's float64 arrays.

Layout. Rows are CSR as everywhere in mica (``offsets``, design §5). Per-trajectory scans work
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

from ._errors import MicaInputError
from .estimators import resolve

__all__ = [
    "bucket_sum",
    "bucket_zscore",
    "compute",
    "estimate",
    "ragged_discounted_returns",
    "ragged_incremental_distance_reward",
    "ragged_outcome",
    "ragged_outcome_returns",
    "ragged_row_trajectory",
    "ragged_turn_index",
    "run",
    "scope_labels",
]


# ---------------------------------------------------------------------------------------------
# Work dtype and small helpers


def work_dtype(device) -> torch.dtype:
    """float64 wherever the device has it; MPS has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


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
    """z-score of every element within its bucket (design §3), on the values' device.

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


def scope_labels(scope, traj, t, group, ngroups, max_turns, *, per_trajectory=False):
    """Bucket ids for a scope: ``(labels int64, nbuckets)``.

    ``turn``: one bucket per (group, turn index), id ``group * max_turns + t`` (a dense table;
    ids no row uses stay empty). ``group``: the group code. ``batch``: one bucket.
    Per trajectory (``per_trajectory=True``, ``group``/``batch`` only): one label per trajectory.
    """
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
# The shared implementation


def compute(plan, offsets, group, ngroups, max_turns, distance=None, initial_distance=None,
            reward=None, *, deterministic=False):
    """Run a resolved plan on trusted tensors; returns ``(reward, returns, advantage)``.

    Args:
      plan: :class:`mica_core.estimators.Plan`.
      offsets: int64 ``[n_traj + 1]``; group: int64 codes ``[n_traj]`` in ``0 .. ngroups-1``;
        all on one device.
      max_turns: an int at least the longest trajectory (the padded length).
      distance / initial_distance / reward: float tensors in the work dtype.

    Returns three tensors ``[n_rows]`` in the work dtype on the inputs' device.
    """
    values = reward if reward is not None else distance
    n_rows = values.shape[0]
    n_traj = offsets.shape[0] - 1
    if n_rows == 0:
        e = values.new_zeros(0)
        return e, e.clone(), e.clone()
    traj = ragged_row_trajectory(offsets, n_rows)
    t = ragged_turn_index(offsets, traj)
    if plan.reward == "given":
        r = reward
    elif plan.reward == "idr":
        r = ragged_incremental_distance_reward(distance, initial_distance, traj, t)
    else:
        r = -distance
    T = int(max_turns)
    pos = padded_positions(traj, t, n_traj)
    cache = {}

    def signal(name):
        if name not in cache:
            if name == "reward":
                cache[name] = r
            elif name == "return":
                cache[name] = ragged_discounted_returns(r, pos, T, n_traj, plan.gamma)
            elif name == "outcome":
                cache[name] = ragged_outcome(r, pos, T, n_traj)
            else:  # outcome_return
                cache[name] = ragged_outcome_returns(signal("outcome"), offsets, pos, T,
                                                     plan.gamma)
        return cache[name]

    if plan.returns == "discounted":
        ret = signal("return")
    elif plan.returns == "outcome":
        ret = signal("outcome").index_select(0, traj)
    else:
        ret = signal("outcome_return")

    adv = torch.zeros_like(r)
    for comp in plan.components:
        v = signal(comp.signal)
        per_traj = comp.signal == "outcome" and comp.scope != "turn"
        if comp.signal == "outcome" and comp.scope == "turn":
            v = v.index_select(0, traj)
        labels, nb = scope_labels(comp.scope, traj, t, group, ngroups, T,
                                  per_trajectory=per_traj)
        z = bucket_zscore(v, labels, nb, baseline=comp.baseline, scale=comp.scale,
                          ddof=plan.ddof, eps=plan.eps, singleton=plan.singleton,
                          deterministic=deterministic)
        if per_traj:
            z = z.index_select(0, traj)
        adv.add_(z, alpha=comp.weight)
    return r, ret, adv


# ---------------------------------------------------------------------------------------------
# Entry point for numpy input (api.run_plan with backend="torch")


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 numpy ``[n_rows]``) for ``plan``.

    Same interface as ``_backend_numpy.run``; computes on the CPU in float64.
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

    r, ret, adv = compute(plan, offsets, group, ragged.ngroups, max_turns, t64(distance),
                          t64(initial_distance), t64(reward),
                          deterministic=deterministic_default(None))
    out_reward[:] = r.numpy()
    out_return[:] = ret.numpy()
    out_adv[:] = adv.numpy()


# ---------------------------------------------------------------------------------------------
# Entry point for torch input (mica_core.estimate)


def _is_tensor(x):
    return isinstance(x, torch.Tensor)


def _values_tensor(x, name, n, device, wdt):
    """Shape and dtype checks on the host (no data access); returns the work-dtype tensor."""
    if not _is_tensor(x):
        a = np.asarray(x)
        if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
            raise MicaInputError(f"must be numeric; got dtype {a.dtype}", column=name,
                                 rule="dtype")
        x = torch.as_tensor(a)
    if x.ndim != 1 or (n is not None and x.shape[0] != n):
        raise MicaInputError(f"needs shape ({n},); got {tuple(x.shape)}", column=name,
                             rule="length")
    if x.dtype == torch.bool or x.is_complex():
        raise MicaInputError(f"must be numeric; got dtype {x.dtype}", column=name, rule="dtype")
    return x.to(device=device, dtype=wdt)


def _out_dtype(values, initial_distance):
    """The numpy path's rule: float32 values give float32 unless ``initial_distance`` is
    float64; float64 and integers give float64; float16/bfloat16 give float32."""
    def kind(x):
        if x is None:
            return None
        dt = x.dtype if _is_tensor(x) else np.asarray(x).dtype
        if dt in (torch.float32, torch.float16, torch.bfloat16, np.float32, np.float16):
            return "f32"
        return "f64"
    k = kind(values)
    if k == "f32" and kind(initial_distance) != "f64":
        return torch.float32
    return torch.float64


def _offsets_tensor(offsets, device):
    """Offsets as int64 on ``device``. Tensors (any device) are checked later with the other
    device-side checks; host data (lists, numpy) is checked here, on the host."""
    if _is_tensor(offsets):
        o = offsets
        if o.ndim != 1 or o.shape[0] == 0:
            raise MicaInputError(f"must be a 1-D array of length n_traj + 1 >= 1; got shape "
                                 f"{tuple(o.shape)}", column="offsets", rule="shape")
        if o.is_floating_point() or o.dtype == torch.bool or o.is_complex():
            raise MicaInputError(f"must hold integers; got dtype {o.dtype}", column="offsets",
                                 rule="dtype")
        return o.to(device=device, dtype=torch.int64), None
    from .layout import check_offsets

    host = check_offsets(offsets)
    return torch.from_numpy(host).to(device), host


def _group_tensor(group, n_traj, device, ngroups):
    """Group codes int64 on ``device`` and their count.

    Tensors (any device): codes as given when ``ngroups`` is passed (checked later with the other
    device checks), else ``torch.unique`` (one sync). Anything else: factorized on the host.
    """
    if _is_tensor(group):
        if group.ndim != 1 or group.shape[0] != n_traj:
            raise MicaInputError(f"needs one label per trajectory ({n_traj}); got shape "
                                 f"{tuple(group.shape)}", column="group", rule="length")
        if ngroups is not None:
            if group.is_floating_point() or group.dtype == torch.bool or group.is_complex():
                raise MicaInputError(f"codes with ngroups= must be integers; got dtype "
                                     f"{group.dtype}", column="group", rule="dtype")
            return group.to(device=device, dtype=torch.int64), int(ngroups), True
        if group.is_floating_point():
            bad = (~torch.isfinite(group)).nonzero()
            if bad.numel():
                raise MicaInputError("labels must not be NaN or infinite", column="group",
                                     row=int(bad[0, 0]), rule="finite")
        uniq, codes = torch.unique(group, return_inverse=True)
        return codes.to(device=device, dtype=torch.int64), int(uniq.shape[0]), False
    from .layout import make_ragged

    g = group
    if ngroups is not None:
        g = np.asarray(g)
        if g.ndim != 1 or len(g) != n_traj:
            raise MicaInputError(f"needs one label per trajectory ({n_traj}); got shape "
                                 f"{g.shape}", column="group", rule="length")
        if g.dtype.kind not in "iu":
            raise MicaInputError(f"codes with ngroups= must be integers; got dtype {g.dtype}",
                                 column="group", rule="dtype")
        bad = np.flatnonzero((g < 0) | (g >= ngroups))
        if bad.size:
            raise MicaInputError(f"code {g[bad[0]]} is outside 0 .. ngroups-1 = "
                                 f"{int(ngroups) - 1}", column="group", row=int(bad[0]),
                                 rule="codes in range")
        return torch.from_numpy(g.astype(np.int64)).to(device), int(ngroups), False
    ragged = make_ragged(np.arange(n_traj + 1), g)  # factorizes; offsets here are a stand-in
    return torch.from_numpy(ragged.group).to(device), ragged.ngroups, False


def _first_index(bad):
    """Index of the first True in ``bad`` as a 0-d tensor (``len(bad)`` when none); no sync."""
    n = bad.shape[0]
    idx = torch.arange(n, dtype=torch.int64, device=bad.device)
    return torch.where(bad, idx, n).min() if n else torch.zeros((), dtype=torch.int64,
                                                                 device=bad.device)


def _device_checks(checks, offsets, lengths, max_turns_needed):
    """Evaluate every device-side check with one host copy; raise on the first failure."""
    scalars = [c[1] for c in checks]
    if max_turns_needed:
        scalars.append(lengths.max() if lengths.numel() else
                       torch.ones((), dtype=torch.int64, device=offsets.device))
    if not scalars:
        return None
    got = torch.stack([s.to(torch.int64) for s in scalars]).tolist()  # the one sync
    for (kind, _, sentinel, raise_fn), v in zip(checks, got):
        if v != sentinel:
            raise_fn(v)
    return got[-1] if max_turns_needed else None


def estimate(offsets, group, *, distance=None, initial_distance=None, reward=None,
             estimator="mica", gamma=None, weight=0.5, eps=1e-6, ddof=1, baseline="mean",
             scale="std", singleton="zero", ngroups=None, max_turns=None, validate=True,
             deterministic=None):
    """:func:`mica_core.estimate` on torch tensors; outputs on the values' device.

    Options beyond ``mica_core.estimate`` (the sync-free path on CUDA, see the module
    docstring):

      ngroups: with ``group`` an int64 tensor of codes ``0 .. ngroups-1``, skips factorizing.
      max_turns: an upper bound on trajectory length (the padded length); skips measuring it.
      validate: ``False`` skips the device-side checks (finite values, non-negative
        distances, offsets, codes in range, ``max_turns`` large enough) and their sync.
      deterministic: fixed-order bucket sums on CUDA; ``None`` follows
        ``torch.are_deterministic_algorithms_enabled()``.

    Returns :class:`mica_core.EstimateResult` of tensors.
    """
    from .api import EstimateResult

    values_in = reward if reward is not None else distance
    if reward is not None and (distance is not None or initial_distance is not None):
        raise MicaInputError("pass either reward or distance (+ initial_distance), not both",
                             column="reward", rule="exclusive inputs")
    if values_in is None:
        raise MicaInputError("one of distance or reward is required", column="distance",
                             rule="required")
    plan = resolve(estimator, reward_given=reward is not None, gamma=gamma, weight=weight,
                   eps=eps, ddof=ddof, baseline=baseline, scale=scale, singleton=singleton)
    if plan.reward == "idr" and reward is None and initial_distance is None:
        raise MicaInputError("IDR needs initial_distance (one value per trajectory)",
                             column="initial_distance", rule="required")

    tensors = [x for x in (values_in, initial_distance, offsets) if _is_tensor(x)]
    if _is_tensor(values_in):
        device = values_in.device
    elif tensors:
        device = tensors[0].device
    else:
        device = torch.device("cpu")
    wdt = work_dtype(device)
    out_dt = _out_dtype(values_in, initial_distance if reward is None else None)

    o, host_offsets = _offsets_tensor(offsets, device)
    n_traj = o.shape[0] - 1
    vname = "reward" if reward is not None else "distance"
    n_rows = values_in.shape[0] if _is_tensor(values_in) else len(np.asarray(values_in))
    v = _values_tensor(values_in, vname, None, device, wdt)
    if host_offsets is not None and int(host_offsets[-1]) != n_rows:
        raise MicaInputError(f"needs shape ({int(host_offsets[-1])},) (offsets[-1]); got "
                             f"({n_rows},)", column=vname, rule="length")
    d0 = None
    if initial_distance is not None and reward is None:
        d0 = _values_tensor(initial_distance, "initial_distance", n_traj, device, wdt)
    g, ng, device_codes = _group_tensor(group, n_traj, device, ngroups)
    if ngroups is not None and int(ngroups) < 1 and n_traj > 0:
        raise MicaInputError(f"ngroups must be >= 1; got {ngroups}", column="group",
                             rule="codes in range")

    lengths = o[1:] - o[:-1]
    if host_offsets is not None:
        diffs = np.diff(host_offsets)
        longest = int(diffs.max()) if diffs.size else 1
        if max_turns is None:
            max_turns = longest
        elif validate and longest > int(max_turns):
            i = int(np.flatnonzero(diffs > int(max_turns))[0])
            _raise(f"trajectory {i} has {int(diffs[i])} turns, more than max_turns="
                   f"{int(max_turns)}", "offsets", i + 1, "max_turns")
    checks = []
    if validate:
        checks = _value_checks(v, vname, d0, reward is None)
        if host_offsets is None:
            checks += _offsets_checks(o, lengths, n_rows)
        if device_codes:
            checks += _group_checks(g, ng)
        if max_turns is not None and host_offsets is None:
            mt = int(max_turns)
            checks.append(("max_turns", _first_index(lengths > mt), n_traj,
                           lambda i, mt=mt: _raise(f"trajectory {i} has more turns than "
                                                   f"max_turns={mt}", "offsets", i + 1,
                                                   "max_turns")))
    measured = _device_checks(checks, o, lengths, max_turns is None)
    if max_turns is None:
        max_turns = measured
    max_turns = max(int(max_turns), 1)

    dist = None if reward is not None else v
    rew = v if reward is not None else None
    r, ret, adv = compute(plan, o, g, ng, max_turns, dist, d0, rew,
                          deterministic=deterministic_default(deterministic))
    if out_dt != r.dtype:
        r, ret, adv = r.to(out_dt), ret.to(out_dt), adv.to(out_dt)
    return EstimateResult(r, ret, adv)


def _raise(message, column, row, rule):
    raise MicaInputError(message, column=column, row=row, rule=rule)


def _value_checks(v, name, d0, distances):
    """``(kind, first-bad-index tensor, no-failure sentinel, raise_fn)`` for each value check."""
    checks = []

    def finite(x, col):
        def fail(i):
            _raise(f"value {float(x[i].cpu())} is not finite (NaN and infinities are "
                   f"rejected)", col, i, "finite")
        return ("finite", _first_index(~torch.isfinite(x)), x.shape[0], fail)

    def nonneg(x, col):
        def fail(i):
            _raise(f"distance {float(x[i].cpu())} is negative (distances are >= 0)", col, i,
                   "non-negative")
        return ("non-negative", _first_index(x < 0), x.shape[0], fail)

    checks.append(finite(v, name))
    if distances:
        checks.append(nonneg(v, name))
    if d0 is not None:
        checks.append(finite(d0, "initial_distance"))
        checks.append(nonneg(d0, "initial_distance"))
    return checks


def _offsets_checks(o, lengths, n_rows):
    n_traj = lengths.shape[0]
    first = o[0]

    def start_fail(v):
        _raise(f"must start at 0; got {int(o[0].cpu())}", "offsets", 0, "start at 0")

    def step_fail(i):
        _raise(f"trajectory {i} has {int(lengths[i].cpu())} turns; every trajectory needs at "
               f"least one (offsets must be strictly increasing)", "offsets", i + 1,
               "strictly increasing")

    def end_fail(v):
        _raise(f"offsets[-1] = {v} but the values have {n_rows} rows", "offsets", n_traj,
               "length")

    return [("start", first, 0, start_fail),
            ("steps", _first_index(lengths <= 0), n_traj, step_fail),
            ("end", o[-1], n_rows, end_fail)]


def _group_checks(g, ngroups):
    def fail(i):
        _raise(f"code {int(g[i].cpu())} is outside 0 .. ngroups-1 = {ngroups - 1}", "group", i,
               "codes in range")
    return [("codes", _first_index((g < 0) | (g >= ngroups)), g.shape[0], fail)]
