"""The Cython backend: the compiled kernels of ``mica_core._ext`` composed per plan."""

from __future__ import annotations

import numpy as np

try:
    from . import _ext
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "mica_core._ext (the compiled Cython kernels) is not built. Reinstall mica with a C "
        "compiler available (`pip install -e .` or `make test`), or pass backend='numpy'."
    ) from exc


def _f64(a):
    return None if a is None else np.ascontiguousarray(a, dtype=np.float64)


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv):
    offsets, group, ngroups = ragged.offsets, ragged.group, ragged.ngroups
    n, n_traj = ragged.n_rows, ragged.n_traj
    if plan.reward == "given":
        out_reward[:] = reward
    elif plan.reward == "idr":
        _ext.ragged_incremental_distance_reward(offsets, _f64(distance),
                                                _f64(initial_distance), out_reward)
    else:
        _ext.ragged_absolute_distance_reward(_f64(distance), out_reward)
    r = out_reward
    cache = {}

    def signal(name):
        if name not in cache:
            if name == "return":
                buf = out_return if plan.returns == "discounted" else np.empty(n)
                _ext.ragged_discounted_returns(offsets, r, plan.gamma, buf)
            elif name == "outcome":
                buf = np.empty(n_traj)
                _ext.ragged_outcome(offsets, r, buf)
            elif name == "outcome_return":
                buf = out_return if plan.returns == "outcome_discounted" else np.empty(n)
                _ext.ragged_outcome_returns(offsets, signal("outcome"), plan.gamma, buf)
            else:
                buf = r
            cache[name] = buf
        return cache[name]

    if plan.returns == "discounted":
        signal("return")
    elif plan.returns == "outcome":
        _ext.ragged_broadcast(offsets, signal("outcome"), out_return)
    else:
        signal("outcome_return")

    labels_cache = {}

    def labels(scope, per_traj):
        key = (scope, per_traj)
        if key not in labels_cache:
            if scope == "batch":
                labels_cache[key] = (np.zeros(n_traj if per_traj else n, dtype=np.int64), 1)
            elif scope == "group" and per_traj:
                labels_cache[key] = (group, ngroups)
            elif scope == "group":
                lab = np.empty(n, dtype=np.int64)
                _ext.ragged_group_labels(offsets, group, lab)
                labels_cache[key] = (lab, ngroups)
            else:
                lab = np.empty(n, dtype=np.int64)
                nb = _ext.ragged_turn_labels(offsets, group, ngroups, lab)
                labels_cache[key] = (lab, nb)
        return labels_cache[key]

    out_adv[:] = 0.0
    for comp in plan.components:
        values = signal(comp.signal)
        per_traj = comp.signal == "outcome" and comp.scope != "turn"
        if comp.signal == "outcome" and comp.scope == "turn":
            rows = np.empty(n)
            _ext.ragged_broadcast(offsets, values, rows)
            values = rows
        lab, nb = labels(comp.scope, per_traj)
        count, mean0, c, m2 = (np.empty(nb) for _ in range(4))
        _ext.bucket_moments(lab, values, count, mean0, c, m2)
        target = np.zeros(n_traj) if per_traj else out_adv
        _ext.bucket_zscore_accumulate(lab, values, count, mean0, c, m2, comp.weight,
                                      comp.baseline == "loo", comp.scale == "std", plan.ddof,
                                      plan.eps, plan.singleton == "raw", target)
        if per_traj:
            rows = np.empty(n)
            _ext.ragged_broadcast(offsets, target, rows)
            out_adv += rows
