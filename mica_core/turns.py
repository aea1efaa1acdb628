"""Per-row turn signals in, validated ragged input for :func:`mica_core.estimate` out: the one
adapter layer that mica's trainer integrations (verl, TRL) share.

A trainer hands mica rows (verl: one row per trajectory or one per turn; TRL: one completion
per trajectory) and, per row, turn signals under its own names. An integration maps its names
onto this module's (:data:`SIGNALS`) and calls:

1. :func:`collect`: per-row columns (distances, states, rewards, initial values, keys) and
   each row's number of turns -> a :class:`TurnBatch`: trajectories in CSR order (rows of
   one trajectory joined in order), their groups, the per-turn inputs of ``estimate``, and
   the map back to the rows. Every per-row value is checked here, errors naming the
   integration's field and the row.
2. :func:`estimate_turns`: ``estimate`` on that batch (optionally with per-turn rewards added,
   e.g. verl's KL penalty), with the two rules trainers need that the core does not make:
   rows without any turn (an empty or aborted response) get advantage 0 and are counted, and
   a trajectory alone in its rollout group gets the ``lone_rollout`` rule (below). The result
   comes back per turn in row-major order (all turns of row 0, then row 1, ...), which is
   what :func:`mica_core.tokens.broadcast_to_tokens` spreads over tokens.

``lone_rollout`` (a group that holds one trajectory):

- ``"zero"`` (default): every group-relative component (scopes ``turn``, ``group``, ``key``)
  is 0 for that trajectory; components of scope ``batch`` keep their value. The rollout group
  is the comparison set of GRPO-style estimators (docs/architecture.md, "Conventions"): with
  one rollout there is no other rollout of the same scenario to compare with, the same reason
  a bucket of one element gives 0 (``singleton="zero"``, README "Estimators"). Without this
  rule ``mica``'s ``z_group(r)`` would compare the trajectory's turns with each other.
- ``"within"``: the bucket definitions applied literally: ``z_group`` and ``z_key`` over the
  lone trajectory's own turns (``z_turn`` buckets hold one value each and give 0 anyway, or
  the value itself under ``singleton="raw"``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import validate as _v
from . import validate_rows as _rows
from .estimators import Estimator, get_estimator
from .options import LONE_ROLLOUT, check_option
from .signals import absolute_distance_reward, distance_from_state, incremental_distance_reward

__all__ = ["LONE_ROLLOUT", "SIGNALS", "TurnBatch", "TurnResult", "collect", "estimate_turns",
           "lone_trajectories"]

#: the per-row fields this layer reads, by mica's names; integrations map theirs onto these
SIGNALS = ("distance", "initial_distance", "state", "initial_state", "reward", "key")


class TurnBatch(NamedTuple):
    """Rows laid out as mica trajectories (see :func:`collect`).

    Attributes:
      counts: int64 ``[B]``, turns of each row (0: a row without turns, left out).
      offsets: int64 ``[n_traj + 1]``, the trajectories' turns in CSR order.
      group: ``[n_traj]`` group labels.
      to_rows: int64 ``[n_turns]``: turn ``j`` in row-major order (row 0's turns first) is
        turn ``to_rows[j]`` in CSR order.
      inputs: keyword arguments of ``estimate``: ``distance`` + ``initial_distance`` (or
        ``distance`` alone for ADR presets) or ``reward``, and ``key`` where the estimator
        needs one; empty when no signal was given (rewards then come from the caller).
      source: the integration's name of the field the signal came from, or None.
      empty_rows: int64 indices of the rows without turns.
    """

    counts: np.ndarray
    offsets: np.ndarray
    group: np.ndarray
    to_rows: np.ndarray
    inputs: dict
    source: str | None
    empty_rows: np.ndarray

    @property
    def n_turns(self) -> int:
        return int(self.offsets[-1])


class TurnResult(NamedTuple):
    """Per-turn float64 values in row-major order, and what the call counted."""

    reward: np.ndarray
    returns: np.ndarray
    advantage: np.ndarray
    empty_rows: int
    lone_rollouts: int


def _name(names, key):
    return (names or {}).get(key, key)


def _numbers(column, row, value, ndim, noun="row"):
    """Row ``row`` of a per-row field as a float64 array of ``ndim`` dimensions."""
    a = _rows.numbers(column, row, value, noun=noun)
    if ndim == 0 and a.shape == (1,):
        a = a.reshape(())
    if a.ndim != ndim:
        what = {0: "a number", 1: "a list of numbers, one per turn",
                2: "a list of state vectors [turns, K]"}[ndim]
        raise _rows.row_shape(column, row, what, a.shape, noun)
    bad = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0] if a.ndim else 1, -1)).all(axis=1))
    if bad.size:
        t = int(bad[0])
        raise _v.not_finite(column, row, a[t].tolist() if a.ndim else float(a))
    return a


def _column(fields, key, n, names, noun="row"):
    col = fields.get(key)
    if col is None:
        return None
    return _rows.entries(_name(names, key), col, n, noun=noun)


def _trajectories(counts, group, trajectory, order, names=None):
    """``(rows in CSR order, trajectory of each of those rows, labels per trajectory)``."""
    B = len(counts)
    keep = np.flatnonzero(counts > 0)
    if trajectory is None:
        return keep, np.arange(keep.size), np.asarray(group, dtype=object)[keep]
    codes, _ = _v.factorize(list(trajectory), "trajectory")
    pos = np.zeros(B, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    rows = keep[np.lexsort((keep, pos[keep], codes[keep]))]
    seen = {}
    for r in rows:
        c = codes[r]
        if c in seen and group[seen[c]] != group[r]:
            raise _v.trajectory_in_two_groups(_name(names, "group"), int(r))
        seen.setdefault(c, r)
    traj_codes, _ = _v.first_appearance_codes(codes[rows])
    first = np.r_[True, traj_codes[1:] != traj_codes[:-1]] if rows.size else np.zeros(0, bool)
    return rows, traj_codes, np.asarray(group, dtype=object)[rows[first]]


def collect(counts, group, fields: dict, *, estimator="mica", trajectory=None, order=None,
            names=None, state_options=None, row_name="row") -> TurnBatch:
    """Lay rows out as mica trajectories and check their per-turn signals.

    Args:
      counts: int ``[B]``, the turns of each row (from its tokens), or None: the lengths of
        the rows' signal lists (then required). Rows with 0 turns are left out of every
        trajectory (:func:`estimate_turns` gives them 0).
      group: ``[B]`` rollout-group label of each row.
      fields: ``{mica name: column with one entry per row}`` for the names of :data:`SIGNALS`;
        absent or None entries are not given. At most one of ``distance``, ``state``,
        ``reward``; with none the batch carries no per-turn signal (``inputs`` is empty but for
        ``key``). Per-turn entries hold one value per turn of the row (``state``: ``[turns,
        K]``); ``initial_*`` one per row, read from each trajectory's first row.
      estimator: the estimator the batch is for (decides IDR vs ADR, and whether a ``key`` is
        required).
      trajectory: optional ``[B]`` labels: rows with equal labels are one trajectory (verl's
        v1 rows, one per turn). Default: every row is its own trajectory.
      order: optional int ``[B]``: the rows' order within their trajectory.
      names: ``{mica name: the integration's field name}`` used in error messages.
      row_name: what a row is called in error rules (TRL: ``"completion"``).
      state_options: ``weights``, ``epsilon``, ``kind`` of :func:`mica_core.distance_from_state`.

    Raises:
      MicaInputError: naming the field and row: several signals, a missing value, a list whose
      length differs from the row's turns, a non-numeric or non-finite value, a negative
      distance, states of different widths, a missing initial value for IDR, a missing key for
      a keyed estimator, a trajectory whose rows have different groups.
    """
    est = get_estimator(estimator)
    present = [k for k in ("distance", "state", "reward") if fields.get(k) is not None]
    if len(present) > 1:
        raise _rows.several_signals(_name(names, present[1]), f"give one per-turn signal; got "
                                    f"{', '.join(_name(names, k) for k in present)}")
    source = present[0] if present else None
    group = np.asarray(_rows.host(group), dtype=object).reshape(-1)
    if counts is None:
        if source is None:
            raise _v.values_required()
        col = _column(fields, source, group.shape[0], names, row_name)
        counts = [_numbers(_name(names, source), b, col[b], 2 if source == "state" else 1,
                           row_name).shape[0] for b in range(group.shape[0])]
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    B = counts.shape[0]
    if group.shape[0] != B:
        raise _rows.labels_per_row(_name(names, "group"), B, group.shape[0])
    rows, traj, labels = _trajectories(counts, group, trajectory, order, names)
    per_traj = np.bincount(traj, weights=counts[rows], minlength=labels.shape[0])
    offsets = np.zeros(labels.shape[0] + 1, dtype=np.int64)
    np.cumsum(per_traj.astype(np.int64), out=offsets[1:])
    row_start = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(counts, out=row_start[1:])
    csr_turns = (np.concatenate([np.arange(row_start[b], row_start[b + 1]) for b in rows])
                 if rows.size else np.zeros(0, dtype=np.int64))
    to_rows = np.empty(int(row_start[-1]), dtype=np.int64)
    to_rows[csr_turns] = np.arange(csr_turns.size)
    first_rows = rows[np.r_[True, traj[1:] != traj[:-1]]] if rows.size else rows

    inputs: dict[str, Any] = {}

    def per_turn(key, ndim):
        col = _column(fields, key, B, names, row_name)
        out = []
        for b in rows:
            a = _numbers(_name(names, key), int(b), col[b], ndim, row_name)
            if a.shape[0] != counts[b]:
                raise _rows.values_per_turn(_name(names, key), int(b), a.shape[0], counts[b])
            out.append(a)
        return out

    def initial(key, shape):
        col = _column(fields, key, B, names, row_name)
        if col is None:
            return None
        vals = []
        for b in first_rows:
            a = _numbers(_name(names, key), int(b), col[b], len(shape), row_name)
            if a.shape != shape:
                raise _rows.initial_shape(_name(names, key), int(b), shape, a.shape)
            vals.append(a)
        return np.stack(vals) if vals else np.zeros((0, *shape))

    if source == "reward":
        vals = per_turn("reward", 1)
        inputs["reward"] = np.concatenate(vals) if vals else np.zeros(0)
    elif source is not None:
        kw = {k: v for k, v in (state_options or {}).items() if v is not None}
        if source == "distance":
            vals = per_turn("distance", 1)
            dist = np.concatenate(vals) if vals else np.zeros(0)
            for b, a in zip(rows, vals):
                if np.any(a < 0):
                    raise _v.negative_distance(_name(names, "distance"), int(b),
                                               float(a[a < 0][0]))
            d0 = initial("initial_distance", ())
            if d0 is not None and np.any(d0 < 0):
                k = int(np.flatnonzero(d0 < 0)[0])
                raise _v.negative_distance(_name(names, "initial_distance"),
                                           int(first_rows[k]), float(d0[k]))
        else:
            vals = per_turn("state", 2)
            width = vals[0].shape[1] if vals else 0
            for b, a in zip(rows, vals):
                if a.shape[1] != width:
                    raise _rows.state_width(_name(names, "state"), int(b), a.shape[1],
                                            int(rows[0]), width)
            dist = (distance_from_state(np.concatenate(vals), **kw) if vals else np.zeros(0))
            s0 = initial("initial_state", (width,))
            d0 = None if s0 is None else (distance_from_state(s0, **kw) if len(s0)
                                          else np.zeros(0))
        inputs["distance"] = np.asarray(dist, dtype=np.float64)
        if est.reward == "idr":
            if d0 is None:
                field = "initial_distance" if source == "distance" else "initial_state"
                raise _rows.initial_required(_name(names, field), _name(names, source))
            inputs["initial_distance"] = np.asarray(d0, dtype=np.float64)
    if any(c.scope == "key" for c in est.components):
        if fields.get("key") is None:
            raise _rows.keys_required(_name(names, "key"), est.name)
        col = _column(fields, "key", B, names, row_name)
        keys = []
        for b in rows:
            row = list(_rows.host(col[b]))
            if len(row) != counts[b]:
                raise _rows.values_per_turn(_name(names, "key"), int(b), len(row), counts[b],
                                            "keys")
            keys.extend(row)
        key = np.empty(len(keys), dtype=object)
        key[:] = keys
        inputs["key"] = key
    return TurnBatch(counts, offsets, labels, to_rows, inputs,
                     None if source is None else _name(names, source),
                     np.flatnonzero(counts == 0))


def lone_trajectories(batch: TurnBatch) -> np.ndarray:
    """bool ``[n_traj]``: the trajectories alone in their group."""
    codes, uniques = _v.factorize(list(batch.group))
    n = len(uniques)
    return np.bincount(codes, minlength=n)[codes] == 1 if codes.size else np.zeros(0, bool)


def estimate_turns(batch: TurnBatch, estimator="mica", *, reward=None, extra_reward=None,
                   lone_rollout="zero", **options) -> TurnResult:
    """:func:`mica_core.estimate` on a :class:`TurnBatch`, per turn in row-major order.

    Args:
      batch: from :func:`collect`.
      estimator: a registered name or an :class:`~mica_core.estimators.Estimator`.
      reward: float ``[n_turns]`` rewards in row-major order, used when the batch carries no
        signal (e.g. token rewards summed per turn).
      extra_reward: float ``[n_turns]`` in row-major order added to each turn's reward (verl's
        KL penalty); with distances, the preset's IDR or ADR is computed first
        (:func:`mica_core.incremental_distance_reward`, :func:`absolute_distance_reward`).
      lone_rollout: ``"zero"`` or ``"within"`` (module docstring); ``None`` follows
        ``singleton``: ``"within"`` under ``singleton="raw"``, else ``"zero"``.
      **options: ``estimate``'s options (``gamma``, ``weight``, ``eps``, ...).

    Returns:
      :class:`TurnResult`; rows without turns contribute nothing (their tokens get 0).
    """
    from .api import estimate

    lone_rollout = check_option("lone_rollout", lone_rollout)
    if lone_rollout is None:  # follows the singleton rule (module docstring)
        lone_rollout = "within" if options.get("singleton") == "raw" else "zero"
    est = get_estimator(estimator)
    inputs = dict(batch.inputs)
    key = inputs.pop("key", None)
    n = batch.n_turns

    def csr(values):  # row-major -> CSR order
        out = np.empty(n, dtype=np.float64)
        out[batch.to_rows] = np.asarray(_rows.host(values), dtype=np.float64).reshape(-1)
        return out

    if not inputs:
        if reward is None:
            raise _v.values_required()
        inputs = {"reward": csr(reward)}
    if extra_reward is not None:
        if "reward" not in inputs:
            d = inputs["distance"]
            inputs = {"reward": (absolute_distance_reward(d) if est.reward == "adr" else
                                 incremental_distance_reward(batch.offsets, d,
                                                             inputs["initial_distance"]))}
        inputs["reward"] = inputs["reward"] + csr(extra_reward)
    lone = lone_trajectories(batch)
    if n == 0:
        z = np.zeros(0)
        return TurnResult(z, z, z, int(batch.empty_rows.size), 0)
    res = estimate(batch.offsets, batch.group, estimator=est, key=key, **inputs, **options)
    adv = np.asarray(res.advantage, dtype=np.float64)
    if lone_rollout == "zero" and lone.any():
        on_lone = np.repeat(lone, np.diff(batch.offsets))
        kept = tuple(c for c in est.components if c.scope == "batch")
        if kept:
            part = Estimator(est.name + "[batch scope]", kept, reward=est.reward,
                             gamma=est.gamma, returns=est.returns)
            sub = estimate(batch.offsets, batch.group, estimator=part, **inputs, **options)
            adv = np.where(on_lone, sub.advantage, adv)
        else:
            adv = np.where(on_lone, 0.0, adv)
    back = batch.to_rows
    return TurnResult(np.asarray(res.reward, dtype=np.float64)[back],
                      np.asarray(res.returns, dtype=np.float64)[back], adv[back],
                      int(batch.empty_rows.size), int(lone.sum()))
