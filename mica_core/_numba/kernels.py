"""Numba mirror of the fused kernels in ``kernels/_ext.pyx``.

Same kernel names, argument order and semantics as ``mica_core._ext`` (read the module
docstring there for the algorithm and its numerics); the difference is that the group pass
and the batch pass run their groups (trajectories) in parallel with ``prange``. Each group is
computed by one thread with the same sequence of operations whatever the number of threads,
and cross-group sums run serially in group order, so the bits of the result do not depend on
the thread count.

Two habits keep the loops as fast as the C ones:

- Row and scratch indices are unsigned (``U = np.uint64``). Numba wraps negative signed
  indices around (``a[-1]``), a test per access that stops LLVM from vectorizing the loop;
  an unsigned index cannot be negative, so the test disappears. (Mixed signed/unsigned
  arithmetic would promote to float64 in Numba, hence the explicit ``U(...)`` constants.)
- Helpers are inlined (``jit(inline=True)``) and never receive re-bound or sliced arrays, so
  no array reference counting happens per group (see :mod:`mica_core._numba.config`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import jit

U = np.uint64
U0, U1, U2, U3, U4, U5, U6, U7 = (U(k) for k in range(8))

# Plan encoding (mica_core._backend_cython.encode_plan).
SIG_REWARD, SIG_RETURN, SIG_OUTCOME, SIG_OUTCOME_RETURN = 0, 1, 2, 3
SCOPE_TURN, SCOPE_GROUP, SCOPE_BATCH = 0, 1, 2
REWARD_IDR, REWARD_ADR, REWARD_GIVEN = 0, 1, 2
RETURNS_DISCOUNTED, RETURNS_OUTCOME, RETURNS_OUTCOME_DISCOUNTED = 0, 1, 2
SPEC_SIGNAL, SPEC_SCOPE, SPEC_LOO, SPEC_STD = 0, 1, 2, 3

# Groups (trajectories) per parallel task: enough to amortize a task's scratch allocation,
# few enough to balance skewed groups over the threads.
GROUPS_PER_TASK = 64
TRAJ_PER_TASK = 4096


@jit
def ragged_group_segments(offsets, group, ngroups, order, seg_start):
    """Segments of trajectories, one per group, and the longest trajectory.

    When every group's trajectories are adjacent, writes the run boundaries to ``seg_start``
    and leaves ``order`` alone; otherwise a stable counting sort by group code fills
    ``order``. Returns ``(contiguous, max_len)``.
    """
    n_traj = offsets.shape[0] - 1
    runs = 0
    max_len = 0
    for i in range(n_traj):
        length = offsets[i + 1] - offsets[i]
        if length > max_len:
            max_len = length
        if i == 0 or group[i] != group[i - 1]:
            if runs < ngroups:
                seg_start[runs] = i
            runs += 1
    contiguous = runs == ngroups
    if contiguous:
        seg_start[ngroups] = n_traj
    else:
        for g in range(ngroups + 1):
            seg_start[g] = 0
        for i in range(n_traj):
            seg_start[group[i] + 1] += 1
        for g in range(ngroups):
            seg_start[g + 1] += seg_start[g]
        for i in range(n_traj):
            g = group[i]
            order[seg_start[g]] = i
            seg_start[g] += 1
        pos = 0
        for g in range(ngroups):
            nxt = seg_start[g]
            seg_start[g] = pos
            pos = nxt
        seg_start[ngroups] = n_traj
    return contiguous, max_len


@jit(inline=True)
def _bucket_params(n, mean0, c, m2sum, loo, scale_std, ddof, eps, singleton_raw):
    """``(mean0, shift, mult)`` with ``z = ((x - mean0) - shift) * mult`` for one bucket."""
    if n > 1.0:
        m2 = m2sum - c * c / n
        if m2 < 0.0:
            m2 = 0.0
        f = n / (n - 1.0) if loo else 1.0
        if scale_std:
            f = f / (np.sqrt(m2 / (n - ddof)) + eps)
        return mean0, c / n, f
    if singleton_raw:
        return 0.0, 0.0, (1.0 / (1.0 + eps) if scale_std else 1.0)
    return mean0, 0.0, 0.0


@jit(inline=True)
def _turn_bucket_params(glen, scratch, inv, ones, base, max_len, loo, scale_std, eps,
                        singleton_raw):
    """``_bucket_params`` over the turn buckets of one component, in place: its per-turn
    arrays start at ``scratch[base]``, ``scratch[base + max_len]``, ``scratch[base + 2
    max_len]``; the bucket sizes are ``scratch[0:glen]`` and ``scratch[inv:]`` holds four
    runs of length ``glen``: ``1/n``, ``1/(n - ddof)``, ``n/(n - 1)``, ``1``."""
    single_mult = (1.0 / (1.0 + eps) if scale_std else 1.0) if singleton_raw else 0.0
    keep_mean_above = 1.0 if singleton_raw else 0.0
    factor = inv + U2 * glen if loo else ones
    for t in range(glen):
        n = scratch[t]
        cc = scratch[base + max_len + t]
        m0 = scratch[base + t]
        shift = cc * scratch[inv + t]
        f = scratch[factor + t]
        if scale_std:
            m2 = scratch[base + U2 * max_len + t] - cc * shift
            m2 = m2 if m2 > 0.0 else 0.0
            f = f / (np.sqrt(m2 * scratch[inv + glen + t]) + eps)
        scratch[base + max_len + t] = shift
        scratch[base + U2 * max_len + t] = f if n > 1.0 else single_mult
        scratch[base + t] = m0 if n > keep_mean_above else 0.0


@jit
def _count_table(max_count, ddof, table):
    for n in range(max_count + 1):
        x = float(n)
        table[3 * n] = 1.0 / x if n > 0 else 0.0
        table[3 * n + 1] = 1.0 / (x - ddof) if n > ddof else 0.0
        table[3 * n + 2] = x / (x - 1.0) if n > 1 else 1.0


@jit(inline=True)
def _traj(order, has_order, j):
    return U(order[j]) if has_order else j


@jit(inline=True)
def _outcome_stats(offsets, order, has_order, t0, t1, outcome, scratch, inv, ones, base,
                   max_len, glen, scope, loo, scale_std, eps, ddof, singleton_raw, batch_part,
                   part):
    """Statistics of the outcome ``R_i`` in a group (see ``_outcome_stats`` in _ext.pyx)."""
    p1 = base + max_len
    p2 = base + U2 * max_len
    if scope == SCOPE_TURN:
        for j in range(t0, t1):
            i = _traj(order, has_order, j)
            x = outcome[i]
            for t in range(U(offsets[i + U1] - offsets[i])):
                scratch[base + t] += x
        for t in range(glen):
            scratch[base + t] = scratch[base + t] * scratch[inv + t]
        for j in range(t0, t1):
            i = _traj(order, has_order, j)
            x = outcome[i]
            for t in range(U(offsets[i + U1] - offsets[i])):
                d = x - scratch[base + t]
                scratch[p1 + t] += d
                scratch[p2 + t] += d * d
        _turn_bucket_params(glen, scratch, inv, ones, base, max_len, loo, scale_std, eps,
                            singleton_raw)
        return
    n = 0.0
    s = 0.0
    for j in range(t0, t1):
        s = s + outcome[_traj(order, has_order, j)]
        n += 1.0
    m = s / n
    cc = 0.0
    qq = 0.0
    for j in range(t0, t1):
        d = outcome[_traj(order, has_order, j)] - m
        cc += d
        qq += d * d
    if scope == SCOPE_GROUP:
        scratch[base], scratch[p1], scratch[p2] = _bucket_params(n, m, cc, qq, loo, scale_std,
                                                                 ddof, eps, singleton_raw)
    else:
        batch_part[part] = n
        batch_part[part + U1] = s
        batch_part[part + U2] = cc
        batch_part[part + U3] = qq


@jit(inline=True)
def _dev_by_turn(x, scratch, base, max_len, offsets, order, has_order, t0, t1):
    for j in range(t0, t1):
        i = _traj(order, has_order, j)
        a = U(offsets[i])
        for k in range(a, U(offsets[i + U1])):
            t = base + k - a
            d = x[k] - scratch[t]
            scratch[t + max_len] += d
            scratch[t + U2 * max_len] += d * d


@jit(inline=True)
def _dev_flat(x, m, offsets, order, has_order, t0, t1):
    """``(sum(x - m), sum((x - m)^2))`` over the group's rows, four running sums each (one
    run of rows when the group's rollouts are adjacent)."""
    c0 = c1 = c2 = c3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    if has_order:
        nruns = t1 - t0
    else:
        nruns = U1
    for jj in range(nruns):
        if has_order:
            i = U(order[t0 + jj])
            a = U(offsets[i])
            b = U(offsets[i + U1])
        else:
            a = U(offsets[t0])
            b = U(offsets[t1])
        n4 = (b - a) // U4
        for kk in range(n4):
            k = a + U4 * kk
            d0 = x[k] - m
            d1 = x[k + U1] - m
            d2 = x[k + U2] - m
            d3 = x[k + U3] - m
            c0 += d0
            c1 += d1
            c2 += d2
            c3 += d3
            q0 += d0 * d0
            q1 += d1 * d1
            q2 += d2 * d2
            q3 += d3 * d3
        for k in range(a + U4 * n4, b):
            d0 = x[k] - m
            c0 += d0
            q0 += d0 * d0
    return (c0 + c1) + (c2 + c3), (q0 + q1) + (q2 + q3)


@jit(inline=True)
def _adv_flat(x, m, sh, f, w, assign, out_adv, offsets, order, has_order, t0, t1):
    """``out_adv (+)= w z`` over the group's rows for a component with one bucket."""
    if has_order:
        nruns = t1 - t0
    else:
        nruns = U1
    for jj in range(nruns):
        if has_order:
            i = U(order[t0 + jj])
            a = U(offsets[i])
            b = U(offsets[i + U1])
        else:
            a = U(offsets[t0])
            b = U(offsets[t1])
        if assign:
            for k in range(a, b):
                out_adv[k] = 0.0 + w * (((x[k] - m) - sh) * f)
        else:
            for k in range(a, b):
                out_adv[k] = out_adv[k] + w * (((x[k] - m) - sh) * f)


@jit(inline=True)
def _adv_turn_flat(xa, base, max_len, wa, xb, mb, sb, fb, wb, assign, scratch, out_adv, offsets,
                   order, has_order, t0, t1):
    """``out_adv (+)= wa z_a + wb z_b`` for a turn component and a group component."""
    for j in range(t0, t1):
        i = _traj(order, has_order, j)
        a = U(offsets[i])
        for k in range(a, U(offsets[i + U1])):
            t = base + k - a
            za = ((xa[k] - scratch[t]) - scratch[t + max_len]) * scratch[t + U2 * max_len]
            zb = ((xb[k] - mb) - sb) * fb
            out_adv[k] = ((0.0 if assign else out_adv[k]) + wa * za) + wb * zb


@jit(inline=True)
def _adv_turn_flat_dispatch(sa, sb, reward, ret, oret, base, max_len, wa, mb, sb_, fb, wb,
                            assign, scratch, out_adv, offsets, order, has_order, t0, t1):
    """:func:`_adv_turn_flat` with the signal arrays picked by code (branches around calls,
    so no array is re-bound)."""
    if sa == SIG_RETURN:
        if sb == SIG_RETURN:
            _adv_turn_flat(ret, base, max_len, wa, ret, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
        elif sb == SIG_OUTCOME_RETURN:
            _adv_turn_flat(ret, base, max_len, wa, oret, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
        else:
            _adv_turn_flat(ret, base, max_len, wa, reward, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
    elif sa == SIG_OUTCOME_RETURN:
        if sb == SIG_RETURN:
            _adv_turn_flat(oret, base, max_len, wa, ret, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
        elif sb == SIG_OUTCOME_RETURN:
            _adv_turn_flat(oret, base, max_len, wa, oret, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
        else:
            _adv_turn_flat(oret, base, max_len, wa, reward, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
    else:
        if sb == SIG_RETURN:
            _adv_turn_flat(reward, base, max_len, wa, ret, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
        elif sb == SIG_OUTCOME_RETURN:
            _adv_turn_flat(reward, base, max_len, wa, oret, mb, sb_, fb, wb, assign, scratch,
                           out_adv, offsets, order, has_order, t0, t1)
        else:
            _adv_turn_flat(reward, base, max_len, wa, reward, mb, sb_, fb, wb, assign,
                           scratch, out_adv, offsets, order, has_order, t0, t1)


@jit(inline=True)
def _adv_by_turn(x, scratch, base, max_len, w, assign, out_adv, offsets, order, has_order, t0,
                 t1):
    for j in range(t0, t1):
        i = _traj(order, has_order, j)
        a = U(offsets[i])
        b = U(offsets[i + U1])
        if assign:
            for k in range(a, b):
                t = base + k - a
                out_adv[k] = 0.0 + w * (((x[k] - scratch[t]) - scratch[t + max_len])
                                        * scratch[t + U2 * max_len])
        else:
            for k in range(a, b):
                t = base + k - a
                out_adv[k] = out_adv[k] + w * (((x[k] - scratch[t]) - scratch[t + max_len])
                                               * scratch[t + U2 * max_len])


@jit(inline=True)
def _segment(offsets, order, has_order, t0, t1, values, initial, reward_kind, returns_kind,
             gamma, spec, weight, eps, ddof, singleton_raw, out_reward, out_return, sig_return,
             need_return, sig_oret, need_oret, outcome, need_outcome, out_adv, batch_part, seg,
             scratch, table, slots, max_len):
    """One group: trajectories ``order[t0:t1]`` (or ``t0 .. t1-1``); see ``_segment`` in
    _ext.pyx, same scratch layout. The signal of a component is picked by branching around
    calls, never by binding an array to a new name."""
    ncomp = spec.shape[0]
    gamma2 = gamma * gamma
    glen = U0
    nrows = U0
    inv = max_len
    ones = max_len * U(8 + 3 * ncomp) + U(ncomp)

    # Which signals need per-turn sums (the first pass of every row component using them);
    # they live in scratch[sums:] (reward, return, outcome return) and start zeroed.
    sum_reward = False
    sum_return = False
    sum_oret = False
    for ci in range(ncomp):
        sig = spec[ci, SPEC_SIGNAL]
        if sig == SIG_REWARD:
            sum_reward = True
        elif sig == SIG_RETURN:
            sum_return = True
        elif sig == SIG_OUTCOME_RETURN:
            sum_oret = True
    sums_r = U5 * max_len
    sums_g = U6 * max_len
    sums_o = U7 * max_len

    # Signals: reward, outcome, discounted return, outcome return, and their per-turn sums
    # (accumulated in the latency-bound reverse recursions, where they cost nothing).
    for j in range(t0, t1):
        i = _traj(order, has_order, j)
        a = U(offsets[i])
        b = U(offsets[i + U1])
        nrows += b - a
        if b - a > glen:
            glen = b - a
        if reward_kind == REWARD_IDR:
            out_reward[a] = np.float64(initial[i]) - np.float64(values[a])
            for k in range(a + U1, b):
                out_reward[k] = np.float64(values[k - U1]) - np.float64(values[k])
        elif reward_kind == REWARD_ADR:
            for k in range(a, b):
                out_reward[k] = -np.float64(values[k])
        else:
            for k in range(a, b):
                out_reward[k] = np.float64(values[k])
        if sum_reward and not need_return:
            for k in range(a, b):
                scratch[sums_r + k - a] += out_reward[k]
        if need_outcome:
            acc = 0.0
            for k in range(a, b):
                acc = acc + out_reward[k]
            outcome[i] = acc
            if need_oret:
                ret = acc
                for kk in range(b - a):
                    sig_oret[b - U1 - kk] = ret
                    if sum_oret:
                        scratch[sums_o + b - U1 - kk - a] += ret
                    ret = gamma * ret
            if returns_kind == RETURNS_OUTCOME:
                for k in range(a, b):
                    out_return[k] = acc
        if need_return:
            # G_t = (r_t + gamma r_{t+1}) + gamma^2 G_{t+2}: two interleaved recursions.
            g1 = out_reward[b - U1]
            sig_return[b - U1] = g1
            if sum_reward:
                scratch[sums_r + b - U1 - a] += out_reward[b - U1]
            if sum_return:
                scratch[sums_g + b - U1 - a] += g1
            g2 = 0.0
            if b - a >= U2:
                g2 = g1
                g1 = out_reward[b - U2] + gamma * g2
                sig_return[b - U2] = g1
                if sum_reward:
                    scratch[sums_r + b - U2 - a] += out_reward[b - U2]
                if sum_return:
                    scratch[sums_g + b - U2 - a] += g1
                for kk in range(b - a - U2):
                    k = b - U3 - kk
                    ret = (out_reward[k] + gamma * out_reward[k + U1]) + gamma2 * g2
                    sig_return[k] = ret
                    if sum_reward:
                        scratch[sums_r + k - a] += out_reward[k]
                    if sum_return:
                        scratch[sums_g + k - a] += ret
                    g2 = g1
                    g1 = ret

    # cnt[t] (scratch[0:glen]): trajectories longer than t; inv: their table entries.
    for t in range(glen):
        scratch[t] = 0.0
    for j in range(t0, t1):
        i = _traj(order, has_order, j)
        scratch[U(offsets[i + U1] - offsets[i]) - U1] += 1.0
    acc = 0.0
    for tt in range(glen):
        t = glen - U1 - tt
        acc = acc + scratch[t]
        scratch[t] = acc
        k = U3 * U(acc)
        scratch[inv + t] = table[k]
        scratch[inv + glen + t] = table[k + U1]
        scratch[inv + U2 * glen + t] = table[k + U2]

    # Statistics of every component: the means (from the per-turn sums of the signal), the
    # sums of deviations and of their squares (per turn for turn buckets, in scalars for a
    # group's or the batch's one bucket), the parameters.
    for ci in range(ncomp):
        base = max_len * U(8 + 3 * ci)
        sig = spec[ci, SPEC_SIGNAL]
        scope = spec[ci, SPEC_SCOPE]
        loo = spec[ci, SPEC_LOO] != 0
        scale_std = spec[ci, SPEC_STD] != 0
        part = U((seg * ncomp + ci) * 4)
        if scope == SCOPE_TURN or sig == SIG_OUTCOME:
            for t in range(glen):
                scratch[base + max_len + t] = 0.0
                scratch[base + U2 * max_len + t] = 0.0
        if sig == SIG_OUTCOME:
            for t in range(glen):
                scratch[base + t] = 0.0
            _outcome_stats(offsets, order, has_order, t0, t1, outcome, scratch, inv, ones,
                           base, max_len, glen, scope, loo, scale_std, eps, ddof,
                           singleton_raw, batch_part, part)
            continue
        sums = sums_g if sig == SIG_RETURN else (sums_o if sig == SIG_OUTCOME_RETURN
                                                 else sums_r)
        if scope == SCOPE_TURN:
            for t in range(glen):
                scratch[base + t] = scratch[sums + t] * scratch[inv + t]
            if sig == SIG_RETURN:
                _dev_by_turn(sig_return, scratch, base, max_len, offsets, order, has_order, t0,
                             t1)
            elif sig == SIG_OUTCOME_RETURN:
                _dev_by_turn(sig_oret, scratch, base, max_len, offsets, order, has_order, t0,
                             t1)
            else:
                _dev_by_turn(out_reward, scratch, base, max_len, offsets, order, has_order, t0,
                             t1)
            _turn_bucket_params(glen, scratch, inv, ones, base, max_len, loo, scale_std, eps,
                                singleton_raw)
            continue
        total = 0.0
        for t in range(glen):
            total = total + scratch[sums + t]
        m = total / np.float64(nrows)
        if sig == SIG_RETURN:
            cc, qq = _dev_flat(sig_return, m, offsets, order, has_order, t0, t1)
        elif sig == SIG_OUTCOME_RETURN:
            cc, qq = _dev_flat(sig_oret, m, offsets, order, has_order, t0, t1)
        else:
            cc, qq = _dev_flat(out_reward, m, offsets, order, has_order, t0, t1)
        if scope == SCOPE_BATCH:
            batch_part[part] = np.float64(nrows)
            batch_part[part + U1] = total
            batch_part[part + U2] = cc
            batch_part[part + U3] = qq
            continue
        m, sh, f = _bucket_params(np.float64(nrows), m, cc, qq, loo, scale_std, ddof, eps,
                                  singleton_raw)
        scratch[base] = m
        scratch[base + max_len] = sh
        scratch[base + U2 * max_len] = f

    # The per-turn sums are consumed: leave them zeroed for the next group.
    if sum_reward:
        for t in range(glen):
            scratch[sums_r + t] = 0.0
    if sum_return:
        for t in range(glen):
            scratch[sums_g + t] = 0.0
    if sum_oret:
        for t in range(glen):
            scratch[sums_o + t] = 0.0

    # The advantage: weighted z of the turn and group components. Row components first,
    # turn ones before group ones; a turn and a group component share one loop (mica's
    # shape); then outcome components.
    nlocal = 0
    nturn = 0
    for ci in range(ncomp):
        if spec[ci, SPEC_SCOPE] == SCOPE_TURN and spec[ci, SPEC_SIGNAL] != SIG_OUTCOME:
            slots[nlocal] = ci
            nlocal += 1
    nturn = nlocal
    for ci in range(ncomp):
        if spec[ci, SPEC_SCOPE] == SCOPE_GROUP and spec[ci, SPEC_SIGNAL] != SIG_OUTCOME:
            slots[nlocal] = ci
            nlocal += 1
    assign = True
    u = 0
    while u < nlocal:
        ci = slots[u]
        base = max_len * U(8 + 3 * ci)
        w = weight[ci]
        sig = spec[ci, SPEC_SIGNAL]
        if u < nturn and u + 1 == nturn and u + 1 < nlocal:
            cj = slots[u + 1]
            bj = max_len * U(8 + 3 * cj)
            _adv_turn_flat_dispatch(sig, spec[cj, SPEC_SIGNAL], out_reward, sig_return,
                                    sig_oret, base, max_len, w, scratch[bj],
                                    scratch[bj + max_len], scratch[bj + U2 * max_len],
                                    weight[cj], assign, scratch, out_adv, offsets, order,
                                    has_order, t0, t1)
            u += 2
        elif u < nturn:
            if sig == SIG_RETURN:
                _adv_by_turn(sig_return, scratch, base, max_len, w, assign, out_adv, offsets,
                             order, has_order, t0, t1)
            elif sig == SIG_OUTCOME_RETURN:
                _adv_by_turn(sig_oret, scratch, base, max_len, w, assign, out_adv, offsets,
                             order, has_order, t0, t1)
            else:
                _adv_by_turn(out_reward, scratch, base, max_len, w, assign, out_adv, offsets,
                             order, has_order, t0, t1)
            u += 1
        else:
            m = scratch[base]
            sh = scratch[base + max_len]
            f = scratch[base + U2 * max_len]
            if sig == SIG_RETURN:
                _adv_flat(sig_return, m, sh, f, w, assign, out_adv, offsets, order, has_order,
                          t0, t1)
            elif sig == SIG_OUTCOME_RETURN:
                _adv_flat(sig_oret, m, sh, f, w, assign, out_adv, offsets, order, has_order,
                          t0, t1)
            else:
                _adv_flat(out_reward, m, sh, f, w, assign, out_adv, offsets, order, has_order,
                          t0, t1)
            u += 1
        assign = False
    for ci in range(ncomp):
        scope = spec[ci, SPEC_SCOPE]
        if scope == SCOPE_BATCH or spec[ci, SPEC_SIGNAL] != SIG_OUTCOME:
            continue
        base = max_len * U(8 + 3 * ci)
        w = weight[ci]
        for j in range(t0, t1):
            i = _traj(order, has_order, j)
            a = U(offsets[i])
            b = U(offsets[i + U1])
            x = outcome[i]
            if scope == SCOPE_TURN:
                for k in range(a, b):
                    t = base + k - a
                    z = ((x - scratch[t]) - scratch[t + max_len]) * scratch[t + U2 * max_len]
                    out_adv[k] = (0.0 if assign else out_adv[k]) + w * z
            else:
                d = w * (((x - scratch[base]) - scratch[base + max_len])
                         * scratch[base + U2 * max_len])
                for k in range(a, b):
                    out_adv[k] = (0.0 if assign else out_adv[k]) + d
        assign = False


@jit(parallel=True)
def fused_group_advantages(offsets, order, seg_start, values, initial_distance, reward_kind,
                           returns_kind, gamma, spec, weight, eps, ddof, singleton_raw,
                           max_len, out_reward, out_return, sig_return, sig_oret, outcome,
                           out_adv, batch_part):
    """The group pass (see ``fused_group_advantages`` in _ext.pyx), groups in parallel."""
    nseg = seg_start.shape[0] - 1
    if offsets.shape[0] <= 1:
        return
    ncomp = spec.shape[0]
    has_order = order.shape[0] > 0
    max_group = 0
    for s in range(nseg):
        if seg_start[s + 1] - seg_start[s] > max_group:
            max_group = seg_start[s + 1] - seg_start[s]
    table = np.empty(3 * (max_group + 1))
    _count_table(max_group, ddof, table)
    need_return = sig_return.shape[0] > 0
    need_oret = sig_oret.shape[0] > 0
    need_outcome = outcome.shape[0] > 0
    ulen = U(max_len)
    ntasks = (nseg + GROUPS_PER_TASK - 1) // GROUPS_PER_TASK
    for task in prange(ntasks):
        # Zeroed: the per-turn signal sums start (and are left) zeroed; then ``ones``.
        scratch = np.zeros(max_len * (9 + 3 * ncomp) + ncomp)
        scratch[max_len * (8 + 3 * ncomp) + ncomp:] = 1.0
        slots = np.empty(ncomp + 1, dtype=np.int64)
        s_end = min(nseg, (task + 1) * GROUPS_PER_TASK)
        for s in range(task * GROUPS_PER_TASK, s_end):
            _segment(offsets, order, has_order, U(seg_start[s]), U(seg_start[s + 1]), values,
                     initial_distance, reward_kind, returns_kind, gamma, spec, weight, eps,
                     ddof, singleton_raw, out_reward, out_return, sig_return, need_return,
                     sig_oret, need_oret, outcome, need_outcome, out_adv, batch_part, s,
                     scratch, table, slots, ulen)


@jit
def bucket_batch_moments(batch_part, spec, eps, ddof, singleton_raw, batch_params):
    """Merge the groups' partial moments of every batch component, in group order (see
    ``bucket_batch_moments`` in _ext.pyx)."""
    ncomp = spec.shape[0]
    nseg = batch_part.shape[0] // (4 * ncomp) if ncomp else 0
    for ci in range(ncomp):
        if spec[ci, SPEC_SCOPE] != SCOPE_BATCH:
            continue
        n = 0.0
        total = 0.0
        for s in range(nseg):
            n += batch_part[(s * ncomp + ci) * 4]
            total = total + batch_part[(s * ncomp + ci) * 4 + 1]
        mean0 = total / n if n > 0.0 else 0.0
        cc = 0.0
        m2 = 0.0
        for s in range(nseg):
            ns = batch_part[(s * ncomp + ci) * 4]
            if ns == 0.0:
                continue
            delta = batch_part[(s * ncomp + ci) * 4 + 1] / ns - mean0
            cs = batch_part[(s * ncomp + ci) * 4 + 2]
            cc += cs + ns * delta
            m2 += batch_part[(s * ncomp + ci) * 4 + 3] + 2.0 * delta * cs + ns * delta * delta
        m, sh, f = _bucket_params(n, mean0, cc, m2, spec[ci, SPEC_LOO] != 0,
                                  spec[ci, SPEC_STD] != 0, ddof, eps, singleton_raw)
        batch_params[3 * ci] = m
        batch_params[3 * ci + 1] = sh
        batch_params[3 * ci + 2] = f


@jit(inline=True)
def _batch_adv_rows(x, per_traj, m, sh, f, w, assign, out_adv, offsets, i0, i1):
    for i in range(i0, i1):
        a = U(offsets[i])
        b = U(offsets[i + U1])
        if per_traj:
            d = w * (((x[i] - m) - sh) * f)
            for k in range(a, b):
                out_adv[k] = (0.0 if assign else out_adv[k]) + d
        elif assign:
            for k in range(a, b):
                out_adv[k] = 0.0 + w * (((x[k] - m) - sh) * f)
        else:
            for k in range(a, b):
                out_adv[k] = out_adv[k] + w * (((x[k] - m) - sh) * f)


@jit(parallel=True)
def fused_batch_advantages(offsets, spec, weight, batch_params, out_reward, sig_return,
                           sig_oret, outcome, assign, out_adv):
    """The batch pass (see ``fused_batch_advantages`` in _ext.pyx), trajectories in
    parallel."""
    n_traj = offsets.shape[0] - 1
    ncomp = spec.shape[0]
    ntasks = (n_traj + TRAJ_PER_TASK - 1) // TRAJ_PER_TASK
    for task in prange(ntasks):
        i0 = U(task * TRAJ_PER_TASK)
        i1 = U(min(n_traj, (task + 1) * TRAJ_PER_TASK))
        first = assign
        for ci in range(ncomp):
            if spec[ci, SPEC_SCOPE] != SCOPE_BATCH:
                continue
            sig = spec[ci, SPEC_SIGNAL]
            m = batch_params[3 * ci]
            sh = batch_params[3 * ci + 1]
            f = batch_params[3 * ci + 2]
            w = weight[ci]
            if sig == SIG_OUTCOME:
                _batch_adv_rows(outcome, True, m, sh, f, w, first, out_adv, offsets, i0, i1)
            elif sig == SIG_RETURN:
                _batch_adv_rows(sig_return, False, m, sh, f, w, first, out_adv, offsets, i0, i1)
            elif sig == SIG_OUTCOME_RETURN:
                _batch_adv_rows(sig_oret, False, m, sh, f, w, first, out_adv, offsets, i0, i1)
            else:
                _batch_adv_rows(out_reward, False, m, sh, f, w, first, out_adv, offsets, i0, i1)
            first = False


# --------------------------------------------------------------------------- table reading


@jit
def ragged_run_codes(ids, codes, starts):
    """Run number of every row; see ``ragged_run_codes`` in _ext.pyx."""
    n = ids.shape[0]
    starts[0] = 0
    if n == 0:
        return 0, True
    run = 0
    increasing = True
    codes[0] = 0
    for k in range(1, n):
        if ids[k] != ids[k - 1]:
            if ids[k] < ids[k - 1]:
                increasing = False
            run += 1
            starts[run] = k
        codes[k] = run
    starts[run + 1] = n
    return run + 1, increasing


@jit
def ragged_check_turns(offsets, turn):
    """First row whose turn is not its position in its trajectory, or -1."""
    for i in range(offsets.shape[0] - 1):
        for k in range(offsets[i], offsets[i + 1]):
            if turn[k] != k - offsets[i]:
                return k
    return -1


@jit
def ragged_first_change(offsets, values):
    """First non-first row of a trajectory whose value differs from the row before, or -1."""
    for i in range(offsets.shape[0] - 1):
        for k in range(offsets[i] + 1, offsets[i + 1]):
            if values[k] != values[k - 1]:
                return k
    return -1


@jit
def ragged_place_rows(traj, turn, offsets, order):
    """Sort rows by (trajectory, turn) by placing each one; see ``ragged_place_rows`` in
    _ext.pyx."""
    for k in range(traj.shape[0]):
        t = traj[k]
        tn = turn[k]
        if tn < 0 or tn >= offsets[t + 1] - offsets[t]:
            return k
        p = offsets[t] + tn
        if order[p] >= 0:
            return k
        order[p] = k
    return -1
