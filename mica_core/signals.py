"""Per-turn signals of a conversation: distances, rewards and discounted returns.

Conventions (docs/architecture.md, "Conventions" and "The layout"). Trajectory ``i`` owns
rows ``offsets[i]:offsets[i+1]`` of every flat per-turn array; row ``offsets[i] + t`` is turn
``t``. ``D_{i,t}`` is the residual distance to the fully supported state after turn ``t`` and
``D_{i,-1}`` the distance before the first reply (``initial_distance``, one value per
trajectory).

These are the readable numpy versions. The compiled kernels in ``mica_core._ext`` and
``mica_core._numba`` compute the same quantities and are tested against them.
"""

from __future__ import annotations

import numpy as np

from .validate import check_potentials, check_states, potential_options

__all__ = [
    "distance_from_state",
    "incremental_distance_reward",
    "absolute_distance_reward",
    "discounted_returns",
    "trajectory_outcome",
    "outcome_returns",
    "turn_index",
]


def distance_from_state(state, weights=None, epsilon=1.0, kind="hinge"):
    """Distance from support state vectors to the fully supported target.

    ``kind="hinge"`` (EMPA's zone hinge, default)::

        D = sqrt(sum_k w_k * max(0, -epsilon - s_k)^2)

    so every axis at or above ``-epsilon`` is "in the zone" and contributes nothing.
    ``kind="norm"`` gives ``||s||_2`` (``weights`` still multiply the squares).

    Args:
      state: array ``[..., K]`` of axis values (deficits negative), finite and at most
        ``1e100`` in size (``mica_core.validate.MAX_MAGNITUDE``, the limit of every value).
      weights: ``[K]`` finite non-negative axis weights, default all ones.
      epsilon: width of the target zone below zero (finite, >= 0).
      kind: ``"hinge"`` or ``"norm"``.

    Returns:
      float64 array of shape ``state.shape[:-1]``.

    Raises:
      MicaInputError: a bad option, or a state value (or the distance it gives) that is not
        finite or too large, naming the row (the state vector's index, flattened).
    """
    p = potential_options(weights, epsilon, kind)
    s = np.asarray(state, dtype=np.float64)
    if s.ndim == 0:
        raise ValueError("state must have at least one axis (shape [..., K])")
    if p.weights is not None and p.weights.shape != (s.shape[-1],):
        raise ValueError(f"weights must have shape ({s.shape[-1]},), got {p.weights.shape}")
    check_states(s.reshape(-1), "state", max(s.shape[-1], 1))
    d = potential(s, p)
    check_potentials(d.reshape(-1), "state")
    return d


def potential(s, p):
    """:func:`distance_from_state` of float64 states ``s`` ``[..., K]`` and checked options
    ``p`` (:class:`mica_core.validate.Potential`), without checks."""
    w = np.ones(s.shape[-1]) if p.weights is None else p.weights
    deficit = np.maximum(0.0, -p.epsilon - s) if p.kind == "hinge" else s
    return np.sqrt(np.sum(w * deficit * deficit, axis=-1))


def turn_index(offsets):
    """Turn index ``t`` of every row: ``row - offsets[traj(row)]`` (int64, length ``offsets[-1]``)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    n = int(offsets[-1]) if len(offsets) else 0
    starts = np.repeat(offsets[:-1], lengths)
    return np.arange(n, dtype=np.int64) - starts


def incremental_distance_reward(offsets, distance, initial_distance):
    """IDR: ``r_t = D_{t-1} - D_t`` with ``D_{-1} = initial_distance`` (MICA §3.1).

    Args:
      offsets: int64 ``[n_traj + 1]``.
      distance: ``[n_turns]`` residual distance after each turn.
      initial_distance: ``[n_traj]`` distance before the first reply.

    Returns:
      float64 ``[n_turns]``. Summed over a trajectory it telescopes to
      ``D_{-1} - D_{T-1}``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    d = np.asarray(distance, dtype=np.float64)
    prev = np.empty_like(d)
    if d.size:
        prev[1:] = d[:-1]
        starts = offsets[:-1][np.diff(offsets) > 0]
        prev[starts] = np.asarray(initial_distance, dtype=np.float64)[np.diff(offsets) > 0]
    return prev - d


def absolute_distance_reward(distance):
    """ADR (ablation): ``r_t = -D_t``."""
    return -np.asarray(distance, dtype=np.float64)


def discounted_returns(offsets, reward, gamma):
    """Monte Carlo return to the trajectory's last turn, no bootstrap::

        G_t = r_t + gamma * G_{t+1},   G_{T-1} = r_{T-1}

    i.e. ``G_t = sum_{k>=t} gamma^(k-t) r_k``. Computed by the reverse recursion, vectorized
    over trajectories (one step per turn index), never by ``gamma^-t`` rescaling, which
    overflows for long trajectories and small gamma.

    Returns float64 ``[n_turns]``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    r = np.asarray(reward, dtype=np.float64)
    out = r.copy()
    if r.size == 0:
        return out
    lengths = np.diff(offsets)
    ends = offsets[1:]
    gamma = float(gamma)
    # Step k updates row end-1-k of every trajectory longer than k from the row after it.
    for k in range(1, int(lengths.max())):
        rows = (ends - 1 - k)[lengths > k]
        out[rows] += gamma * out[rows + 1]
    return out


def trajectory_outcome(offsets, reward):
    """Outcome ``R_i = sum_t r_t`` per trajectory (float64 ``[n_traj]``, 0 for empty ones)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    r = np.asarray(reward, dtype=np.float64)
    lengths = np.diff(offsets)
    traj = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(traj, weights=r, minlength=len(lengths)).astype(np.float64)


def outcome_returns(offsets, outcome, gamma):
    """The return of a sparse reward paying ``R_i`` on the last turn (REINFORCE++)::

        G_t = gamma^(T_i - 1 - t) * R_i

    by the reverse recursion from the last turn (no negative powers). Returns float64
    ``[n_turns]``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    out = np.repeat(np.asarray(outcome, dtype=np.float64), lengths)
    ends = offsets[1:]
    gamma = float(gamma)
    for k in range(1, int(lengths.max()) if lengths.size else 0):
        rows = (ends - 1 - k)[lengths > k]
        out[rows] = gamma * out[rows + 1]
    return out
