"""The one interpreter of a resolved plan, shared by the numpy and torch backends.

A :class:`mica_core.estimators.Plan` says which reward to compute (IDR, ADR or given), what
the ``return`` output holds, and which weighted z-scored components make the advantage
(docs/architecture.md, "Conventions"). :func:`interpret` walks it once over an *operations namespace* bound to one
batch's layout, so the numpy backend (:class:`mica_core._backend_numpy.NumpyOps`) and the
torch backend (:class:`mica_core._backend_torch.TorchOps`) differ only in how each operation
is computed, never in what is computed. The compiled backends run the same plan fused in one
pass per group (``kernels/_ext.pyx``) and are tested against this path.

An operations namespace provides, for one batch (per-turn arrays ``[n_rows]``, per-trajectory
arrays ``[n_traj]``):

=================================  ==========================================================
``given_reward()``                 the rewards passed in
``incremental_distance_reward()``  ``r_t = D_{t-1} - D_t``, ``D_{-1}`` the initial distance
``absolute_distance_reward()``     ``r_t = -D_t``
``discounted_returns(r, gamma)``   ``G_t = r_t + gamma G_{t+1}`` to the trajectory's end
``trajectory_outcome(r)``          ``R_i = sum_t r_t`` per trajectory
``outcome_returns(R, gamma)``      ``gamma^(T_i-1-t) R_i`` per turn
``per_row(x)``                     a per-trajectory value on each of its turns
``scope_labels(scope, per_traj)``  ``(labels, nbuckets)`` of a scope (README, "Estimators", and
                                   ``key``: the layout's key buckets)
``bucket_zscore(x, labels, nb, ...)``  z within buckets
``zeros_like(x)``, ``add_scaled(acc, x, w)``  the advantage accumulator
=================================  ==========================================================
"""

from __future__ import annotations

__all__ = ["interpret"]


def interpret(plan, ops):
    """``(reward, returns, advantage)`` per turn for ``plan`` over ``ops``' batch."""
    if plan.reward == "given":
        r = ops.given_reward()
    elif plan.reward == "idr":
        r = ops.incremental_distance_reward()
    else:
        r = ops.absolute_distance_reward()
    cache = {"reward": r}

    def signal(name):
        if name not in cache:
            if name == "return":
                cache[name] = ops.discounted_returns(r, plan.gamma)
            elif name == "outcome":
                cache[name] = ops.trajectory_outcome(r)
            else:  # "outcome_return"
                cache[name] = ops.outcome_returns(signal("outcome"), plan.gamma)
        return cache[name]

    if plan.returns == "discounted":
        ret = signal("return")
    elif plan.returns == "outcome":
        ret = ops.per_row(signal("outcome"))
    else:
        ret = signal("outcome_return")

    adv = ops.zeros_like(r)
    for comp in plan.components:
        values = signal(comp.signal)
        # An outcome is one value per trajectory: at group/batch scope each trajectory counts
        # once in its bucket (GRPO); at turn and key scope once per turn in the bucket.
        per_traj = comp.signal == "outcome" and comp.scope in ("group", "batch")
        if comp.signal == "outcome" and not per_traj:
            values = ops.per_row(values)
        labels, nbuckets = ops.scope_labels(comp.scope, per_trajectory=per_traj)
        z = ops.bucket_zscore(values, labels, nbuckets, baseline=comp.baseline,
                              scale=comp.scale, ddof=plan.ddof, eps=plan.eps,
                              singleton=plan.singleton)
        if per_traj:
            z = ops.per_row(z)
        adv = ops.add_scaled(adv, z, comp.weight)
    return r, ret, adv
