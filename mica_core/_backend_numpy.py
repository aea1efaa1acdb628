"""The numpy backend: vectorized, readable; the in-package reference for the compiled ones."""

from __future__ import annotations

import numpy as np

from . import signals
from .normalize import bucket_zscore, scope_labels


def outcome_returns(offsets, outcome, gamma):
    """``gamma^(T-1-t) * R_i`` for every row (reverse recursion, no negative powers)."""
    lengths = np.diff(offsets)
    out = np.repeat(np.asarray(outcome, dtype=np.float64), lengths)
    ends = offsets[1:]
    for k in range(1, int(lengths.max()) if lengths.size else 0):
        rows = (ends - 1 - k)[lengths > k]
        out[rows] = gamma * out[rows + 1]
    return out


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 ``[n_rows]``) for ``plan``."""
    offsets, group, ngroups = ragged.offsets, ragged.group, ragged.ngroups
    if plan.reward == "given":
        r = np.asarray(reward, dtype=np.float64)
    elif plan.reward == "idr":
        r = signals.incremental_distance_reward(offsets, distance, initial_distance)
    else:
        r = signals.absolute_distance_reward(distance)
    out_reward[:] = r
    lengths = np.diff(offsets)
    cache = {}

    def signal(name):
        if name not in cache:
            if name == "return":
                cache[name] = signals.discounted_returns(offsets, r, plan.gamma)
            elif name == "outcome":
                cache[name] = signals.trajectory_outcome(offsets, r)
            elif name == "outcome_return":
                cache[name] = outcome_returns(offsets, signal("outcome"), plan.gamma)
            else:
                cache[name] = r
        return cache[name]

    if plan.returns == "discounted":
        out_return[:] = signal("return")
    elif plan.returns == "outcome":
        out_return[:] = np.repeat(signal("outcome"), lengths)
    else:
        out_return[:] = signal("outcome_return")

    out_adv[:] = 0.0
    for comp in plan.components:
        values = signal(comp.signal)
        per_traj = comp.signal == "outcome" and comp.scope != "turn"
        if comp.signal == "outcome" and comp.scope == "turn":
            values = np.repeat(values, lengths)
        labels, nb = scope_labels(comp.scope, offsets, group, ngroups, per_trajectory=per_traj)
        z = bucket_zscore(values, labels, nb, baseline=comp.baseline, scale=comp.scale,
                          ddof=plan.ddof, eps=plan.eps, singleton=plan.singleton)
        if per_traj:
            z = np.repeat(z, lengths)
        out_adv += comp.weight * z
