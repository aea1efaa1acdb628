"""The Cython backend: the fused kernels of ``mica_core._ext`` (compiled ahead of time at
install, parallel over rollout groups with OpenMP).

A plan runs as (see ``kernels/_ext.pyx``):

1. ``ragged_group_segments``: one segment of trajectories per group; the rollouts of a group
   are usually adjacent and then no reordering happens, else a counting sort by group code.
2. ``fused_group_advantages``: one pass per group for rewards, returns, the statistics of
   every ``turn``/``group`` component and their share of the advantage; groups spread over
   ``num_threads`` threads, each group computed by one thread in a fixed order.
3. Only for components with scope ``batch``: ``bucket_batch_moments`` merges the groups'
   partial moments in group order, then ``fused_batch_advantages`` adds their terms.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from . import _compiled
from ._autoselect import threads_for
from .estimators import RETURNS, REWARDS, SCOPES, SIGNALS

__all__ = ["EncodedPlan", "encode_plan", "plan_codes", "run"]


def plan_codes() -> dict:
    """The compiled kernels' plan codes (``_ext.plan_codes()``), checked against the names
    :mod:`mica_core.estimators` uses: one table of names in Python, one of codes in the
    kernels, and an ImportError naming the difference if they ever disagree."""
    codes = _compiled.require().plan_codes()
    names = {"signal": SIGNALS, "scope": SCOPES, "reward": REWARDS + ("given",),
             "returns": RETURNS}
    for part, expected in names.items():
        if set(codes[part]) != set(expected):
            raise ImportError(
                f"mica_core._ext encodes {part} names {sorted(codes[part])} but "
                f"mica_core.estimators defines {sorted(expected)}: rebuild the kernels "
                "(`pip install -e .` or `make setup`)")
    return codes


# Checked once, at import (on a broken install without the kernels, at first use instead).
_CODES = plan_codes() if _compiled.ext is not None else None

_EMPTY_F64 = np.zeros(0, dtype=np.float64)
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_EMPTY_I64 = np.zeros(0, dtype=np.int64)


class EncodedPlan(NamedTuple):
    """A :class:`mica_core.estimators.Plan` as the kernels read it."""

    reward_kind: int
    returns_kind: int
    gamma: float
    spec: np.ndarray  # int64 [ncomp, 4]: signal, scope, loo, scale by std
    weight: np.ndarray  # float64 [ncomp]
    eps: float
    ddof: int
    singleton_raw: bool
    need_return: bool  # some component or the return output uses G_t
    need_oret: bool  # ... gamma^(T-1-t) R_i
    need_outcome: bool  # ... R_i
    has_batch: bool
    has_local: bool  # some component has scope turn, group or key
    has_key: bool  # some component has scope key


@lru_cache(maxsize=512)
def encode_plan(plan) -> EncodedPlan:
    codes = _CODES or plan_codes()
    comps = plan.components
    spec = np.array([[codes["signal"][c.signal], codes["scope"][c.scope], c.baseline == "loo",
                      c.scale == "std"] for c in comps], dtype=np.int64).reshape(len(comps), 4)
    weight = np.array([c.weight for c in comps], dtype=np.float64)
    spec.setflags(write=False)
    weight.setflags(write=False)
    signals = {c.signal for c in comps}
    return EncodedPlan(
        reward_kind=codes["reward"][plan.reward],
        returns_kind=codes["returns"][plan.returns],
        gamma=float(plan.gamma),
        spec=spec,
        weight=weight,
        eps=float(plan.eps),
        ddof=int(plan.ddof),
        singleton_raw=plan.singleton == "raw",
        need_return="return" in signals or plan.returns == "discounted",
        need_oret="outcome_return" in signals or plan.returns == "outcome_discounted",
        need_outcome=bool(signals & {"outcome", "outcome_return"}) or plan.returns == "outcome",
        has_batch=any(c.scope == "batch" for c in comps),
        has_local=any(c.scope != "batch" for c in comps),
        has_key=plan.needs_key,
    )


def _values(a):
    """A kernel-ready float32/float64 contiguous array (other dtypes become float64)."""
    if type(a) is np.ndarray and a.dtype in _KERNEL_DTYPES and a.flags.c_contiguous:
        return a  # the usual case, validated upstream: no conversion, no new array
    a = np.asarray(a)
    if a.dtype != np.float32 and a.dtype != np.float64:
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def run(plan, ragged, distance, initial_distance, reward, out_reward, out_return, out_adv, *,
        num_threads=None):
    """Fill ``out_reward``, ``out_return``, ``out_adv`` (float64 ``[n_rows]``) for ``plan``.

    ``distance``, ``initial_distance`` and ``reward`` may be float32 or float64; statistics
    accumulate in float64. ``num_threads``: OpenMP threads for this call (default: by size,
    :func:`mica_core._autoselect.threads_for`); the result is bit-identical for any count.
    """
    kernels = _compiled.require()
    n_traj, ngroups = ragged.n_traj, ragged.ngroups
    if n_traj == 0:
        return
    enc = encode_plan(plan)
    n = ragged.n_rows
    threads = threads_for(n) if num_threads is None else max(1, int(num_threads))
    values = _values(reward if enc.reward_kind == 2 else distance)
    # One value per trajectory: float64 always (cheap), which halves the compiled variants;
    # the per-turn values stay as given (float32 is read as float32).
    if enc.reward_kind != 0:
        initial = _EMPTY_F64
    elif (type(initial_distance) is np.ndarray and initial_distance.dtype == np.float64
          and initial_distance.flags.c_contiguous):
        initial = initial_distance
    else:
        initial = np.ascontiguousarray(initial_distance, dtype=np.float64)
    offsets = ragged.offsets
    order = np.empty(n_traj, dtype=np.int64)
    seg_start = np.empty(ngroups + 1, dtype=np.int64)
    contiguous, max_len = kernels.ragged_group_segments(offsets, ragged.group, ngroups, order,
                                                        seg_start)
    if contiguous:
        order = _EMPTY_I64
    if enc.returns_kind == 0:
        sig_return = out_return
    else:
        sig_return = np.empty(n) if enc.need_return else _EMPTY_F64
    if enc.returns_kind == 2:
        sig_oret = out_return
    else:
        sig_oret = np.empty(n) if enc.need_oret else _EMPTY_F64
    outcome = np.empty(n_traj) if enc.need_outcome else _EMPTY_F64
    ncomp = len(enc.weight)
    batch_part = np.empty(ngroups * ncomp * 4) if enc.has_batch else _EMPTY_F64
    key = key_stats = None
    if enc.has_key:
        key = ragged.key
        key_stats = np.zeros(ncomp * 4 * max(ragged.nkeys, 1))
    kernels.fused_group_advantages(
        offsets, order, seg_start, values, initial, enc.reward_kind, enc.returns_kind,
        enc.gamma, enc.spec, enc.weight, enc.eps, enc.ddof, enc.singleton_raw, int(max_len),
        out_reward, out_return, sig_return, sig_oret, outcome, out_adv, batch_part, threads,
        key, key_stats)
    if enc.has_batch:
        batch_params = np.zeros(3 * ncomp)
        kernels.bucket_batch_moments(batch_part, enc.spec, enc.eps, enc.ddof,
                                     enc.singleton_raw, batch_params)
        kernels.fused_batch_advantages(offsets, enc.spec, enc.weight, batch_params, out_reward,
                                       sig_return, sig_oret, outcome, not enc.has_local,
                                       out_adv, threads)
