# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -fno-math-errno -fno-trapping-math
"""Fused CPU kernels of mica_core (built ahead of time into ``mica_core._ext``).

One pass per rollout group computes the rewards, the returns, the bucket statistics of
every ``turn`` and ``group`` component and the mixed advantage; a group's rows are touched
while they sit in cache, and nothing per turn is allocated beyond the outputs. Components
with scope ``batch`` need batch-wide statistics: the group pass leaves per-group partial
moments, ``bucket_batch_moments`` merges them in group order, and
``fused_batch_advantages`` adds their terms in a second pass over the rows.

Conventions (``mica_core.layout``): trajectory ``i`` owns rows ``offsets[i]:offsets[i+1]``;
``group`` holds codes ``0 .. ngroups-1``. Groups are processed as *segments*: lists of
trajectories in ``seg_start[s]:seg_start[s+1]`` of ``order`` (or of ``0 .. n_traj-1`` when
``order`` is empty, the fast path for groups whose rollouts are adjacent). Kernels read
``const`` memoryviews, run without the GIL, write into caller-allocated outputs and trust
their input (validation happens once, at the boundary). ``mica_core._numba`` mirrors these
kernels with the same names and argument order.

Numerics (``mica_core.normalize``): every bucket uses the corrected two-pass scheme in float64
whatever the input dtype, ``mean0 = sum(x)/n``, ``c = sum(x - mean0)``,
``m2 = sum((x - mean0)^2) - c^2/n`` and ``z = ((x - mean0) - c/n) * mult`` with
``mult = [n/(n-1) for loo] / (std + eps)``. Batch buckets merge the groups' local two-pass
moments about the batch ``mean0`` exactly (``sum (x - M)^2 = m2_g + 2 (m_g - M) c_g +
n_g (m_g - M)^2``), so no sum ever rides on a large offset. Within a group, sums run in a
fixed order (per turn index, or in four interleaved running sums); across groups, in group
order: the result does not depend on how groups are spread over threads.

Speed (docs/performance.md): the per-turn sums of each signal are accumulated inside the
latency-bound return recursion; a turn bucket's ``1/n``, ``1/(n - ddof)`` and ``n/(n - 1)``
come from a table, so each bucket costs one division and one square root in a loop that
vectorizes (``restrict`` pointers, ``-fno-math-errno -fno-trapping-math``); a group's one
bucket uses scalar running sums over the group's rows.
"""

from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

ctypedef long long i64

# Pointers the compiler may assume do not alias (C99 restrict): the helpers below read and
# write distinct scratch arrays, and without the promise the compiler either checks overlaps
# at run time on every short loop or does not vectorize at all.
cdef extern from *:
    """
    typedef double *__restrict__ mica_dptr;
    typedef const double *__restrict__ mica_cdptr;
    """
    ctypedef double* dptr "mica_dptr"
    ctypedef const double* cdptr "mica_cdptr"

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define mica_prefetch_read(p) __builtin_prefetch((const void*)(p), 0, 3)
    #define mica_prefetch_write(p) __builtin_prefetch((const void*)(p), 1, 3)
    #else
    #define mica_prefetch_read(p) ((void)0)
    #define mica_prefetch_write(p) ((void)0)
    #endif
    """
    void mica_prefetch_read(const void* p) noexcept nogil
    void mica_prefetch_write(const void* p) noexcept nogil

ctypedef fused values_t:
    float
    double

ctypedef fused initial_t:
    float
    double

# Plan encoding, shared with mica_core._backend_cython.encode_plan and mica_core._numba.
cdef enum:
    SIG_REWARD = 0
    SIG_RETURN = 1
    SIG_OUTCOME = 2
    SIG_OUTCOME_RETURN = 3

cdef enum:
    SCOPE_TURN = 0
    SCOPE_GROUP = 1
    SCOPE_BATCH = 2

cdef enum:
    REWARD_IDR = 0
    REWARD_ADR = 1
    REWARD_GIVEN = 2

cdef enum:
    RETURNS_DISCOUNTED = 0
    RETURNS_OUTCOME = 1
    RETURNS_OUTCOME_DISCOUNTED = 2

# Columns of ``spec`` (int64 [ncomp, 4]) and slots of the per-bucket parameters.
cdef enum:
    SPEC_SIGNAL = 0
    SPEC_SCOPE = 1
    SPEC_LOO = 2
    SPEC_STD = 3
    SPEC_WIDTH = 4


def ragged_group_segments(const i64[::1] offsets, const i64[::1] group, Py_ssize_t ngroups,
                          i64[::1] order, i64[::1] seg_start):
    """Segments of trajectories, one per group, and the longest trajectory.

    When every group's trajectories are adjacent (``ngroups`` runs of equal codes), writes the
    run boundaries to ``seg_start`` [ngroups + 1] and leaves ``order`` alone. Otherwise a
    stable counting sort by group code writes ``order`` [n_traj] (trajectory indices, group
    after group, input order within a group) and ``seg_start`` (segment ``g`` is group ``g``).

    Returns ``(contiguous, max_len)``.
    """
    cdef Py_ssize_t i, g, n_traj = offsets.shape[0] - 1
    cdef i64 runs = 0, max_len = 0, length, pos, nxt
    cdef bint contiguous
    with nogil:
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
            # seg_start[g] is now the next free slot of group g; shift back afterwards.
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
    return bool(contiguous), max_len


cdef inline void _bucket_params(double n, double mean0, double c, double m2sum, bint loo,
                                bint scale_std, int ddof, double eps, bint singleton_raw,
                                double* mean_out, double* shift_out,
                                double* mult_out) noexcept nogil:
    """``(mean0, shift, mult)`` with ``z = ((x - mean0) - shift) * mult`` for one bucket.

    ``c`` and ``m2sum`` are ``sum(x - mean0)`` and ``sum((x - mean0)^2)``. A singleton gives
    0 (``mult = 0``, and ``x - mean0`` is exactly 0) or, with ``singleton_raw``, ``x`` scaled
    as if mean 0 and std 1.
    """
    cdef double m2, f
    if n > 1.0:
        m2 = m2sum - c * c / n
        if m2 < 0.0:
            m2 = 0.0
        f = n / (n - 1.0) if loo else 1.0
        if scale_std:
            f = f / (sqrt(m2 / (n - ddof)) + eps)
        mean_out[0] = mean0
        shift_out[0] = c / n
        mult_out[0] = f
    else:
        shift_out[0] = 0.0
        if singleton_raw:
            mean_out[0] = 0.0
            mult_out[0] = 1.0 / (1.0 + eps) if scale_std else 1.0
        else:
            mean_out[0] = mean0
            mult_out[0] = 0.0


cdef inline void _turn_bucket_params(i64 glen, cdptr cnt, cdptr inv, cdptr ones,
                                     dptr mean0, dptr c, dptr m2sum, bint loo,
                                     bint scale_std, double eps,
                                     bint singleton_raw) noexcept nogil:
    """:func:`_bucket_params` over the ``glen`` turn buckets of a group, in place (``c``
    becomes the shift, ``m2sum`` the multiplier).

    A turn bucket holds at most one value per trajectory, so its ``1/n``, ``1/(n - ddof)``
    and ``n/(n - 1)`` come from a table, laid out per turn in ``inv`` as three runs of length
    ``glen``; ``ones`` holds 1.0 (the factor without leave-one-out). One division and one
    square root per bucket and no branches in the loops, so they vectorize.
    """
    cdef i64 t
    cdef double n, cc, m0, shift, m2, f
    cdef const double* inv_dof = inv + glen
    cdef const double* factor = inv + 2 * glen if loo else ones
    cdef double single_mult = (1.0 / (1.0 + eps) if scale_std else 1.0) if singleton_raw else 0.0
    # A singleton keeps its mean (x - mean = 0 exactly), or takes mean 0 under "raw".
    cdef double keep_mean_above = 1.0 if singleton_raw else 0.0
    # (A singleton's sum of deviations is exactly 0, so its shift needs no select.)
    if scale_std:
        for t in range(glen):
            n = cnt[t]
            cc = c[t]
            m0 = mean0[t]
            shift = cc * inv[t]
            m2 = m2sum[t] - cc * shift
            m2 = m2 if m2 > 0.0 else 0.0
            f = factor[t] / (sqrt(m2 * inv_dof[t]) + eps)
            c[t] = shift
            m2sum[t] = f if n > 1.0 else single_mult
            mean0[t] = m0 if n > keep_mean_above else 0.0
    else:
        for t in range(glen):
            n = cnt[t]
            m0 = mean0[t]
            f = factor[t]
            c[t] = c[t] * inv[t]
            m2sum[t] = f if n > 1.0 else single_mult
            mean0[t] = m0 if n > keep_mean_above else 0.0


cdef void _count_table(i64 max_count, int ddof, double* table) noexcept nogil:
    """``table[3n : 3n + 3] = (1/n, 1/(n - ddof), n/(n - 1))`` for ``n = 2 .. max_count``,
    and ``1/n`` for ``n = 1``."""
    cdef i64 n
    cdef double x
    for n in range(max_count + 1):
        x = <double>n
        table[3 * n] = 1.0 / x if n > 0 else 0.0
        table[3 * n + 1] = 1.0 / (x - ddof) if n > ddof else 0.0
        table[3 * n + 2] = x / (x - 1.0) if n > 1 else 1.0


cdef inline double* _row_signal(int sig, double* reward, double* ret,
                                double* oret) noexcept nogil:
    if sig == SIG_RETURN:
        return ret
    if sig == SIG_OUTCOME_RETURN:
        return oret
    return reward


cdef inline void _sum_by_turn(cdptr x, dptr p, i64 a, i64 b) noexcept nogil:
    cdef i64 k
    for k in range(a, b):
        p[k - a] += x[k]


cdef inline void _dev_by_turn(cdptr x, cdptr mean, dptr c, dptr q,
                              i64 a, i64 b) noexcept nogil:
    cdef i64 k
    cdef double d
    for k in range(a, b):
        d = x[k] - mean[k - a]
        c[k - a] += d
        q[k - a] += d * d


cdef inline void _dev_flat(cdptr x, double m, i64 a, i64 b, double* acc) noexcept nogil:
    """``acc[0:4] += x - m`` and ``acc[4:8] += (x - m)^2`` over rows ``a:b``, four running
    sums each (breaking the add latency chain)."""
    cdef i64 k = a
    cdef double d0, d1, d2, d3
    while k + 4 <= b:
        d0 = x[k] - m
        d1 = x[k + 1] - m
        d2 = x[k + 2] - m
        d3 = x[k + 3] - m
        acc[0] += d0
        acc[1] += d1
        acc[2] += d2
        acc[3] += d3
        acc[4] += d0 * d0
        acc[5] += d1 * d1
        acc[6] += d2 * d2
        acc[7] += d3 * d3
        k += 4
    while k < b:
        d0 = x[k] - m
        acc[0] += d0
        acc[4] += d0 * d0
        k += 1


cdef inline void _dev_by_turn2(cdptr xa, cdptr ma, dptr ca, dptr qa,
                               cdptr xb, cdptr mb, dptr cb, dptr qb,
                               i64 a, i64 b) noexcept nogil:
    cdef i64 k
    cdef double d, e
    for k in range(a, b):
        d = xa[k] - ma[k - a]
        e = xb[k] - mb[k - a]
        ca[k - a] += d
        qa[k - a] += d * d
        cb[k - a] += e
        qb[k - a] += e * e


cdef inline void _adv_by_turn(bint assign, double w, cdptr x, cdptr mean,
                              cdptr shift, cdptr mult, dptr out, i64 a,
                              i64 b) noexcept nogil:
    cdef i64 k, t
    if assign:
        for k in range(a, b):
            t = k - a
            out[k] = 0.0 + w * (((x[k] - mean[t]) - shift[t]) * mult[t])
    else:
        for k in range(a, b):
            t = k - a
            out[k] = out[k] + w * (((x[k] - mean[t]) - shift[t]) * mult[t])


cdef inline void _adv_by_turn2(bint assign, double wa, cdptr xa, cdptr ma,
                               cdptr sa, cdptr fa, double wb, cdptr xb,
                               cdptr mb, cdptr sb, cdptr fb,
                               dptr out, i64 a, i64 b) noexcept nogil:
    cdef i64 k, t
    if assign:
        for k in range(a, b):
            t = k - a
            out[k] = (0.0 + wa * (((xa[k] - ma[t]) - sa[t]) * fa[t])) \
                + wb * (((xb[k] - mb[t]) - sb[t]) * fb[t])
    else:
        for k in range(a, b):
            t = k - a
            out[k] = (out[k] + wa * (((xa[k] - ma[t]) - sa[t]) * fa[t])) \
                + wb * (((xb[k] - mb[t]) - sb[t]) * fb[t])


cdef inline void _adv_turn_flat(bint assign, double wa, cdptr xa, cdptr ma, cdptr sa, cdptr fa,
                                double wb, cdptr xb, double mb, double sb, double fb,
                                dptr out, i64 a, i64 b) noexcept nogil:
    cdef i64 k, t
    if assign:
        for k in range(a, b):
            t = k - a
            out[k] = (0.0 + wa * (((xa[k] - ma[t]) - sa[t]) * fa[t])) \
                + wb * (((xb[k] - mb) - sb) * fb)
    else:
        for k in range(a, b):
            t = k - a
            out[k] = (out[k] + wa * (((xa[k] - ma[t]) - sa[t]) * fa[t])) \
                + wb * (((xb[k] - mb) - sb) * fb)


cdef inline void _adv_flat2(bint assign, double wa, cdptr xa, double ma, double sa, double fa,
                            double wb, cdptr xb, double mb, double sb, double fb, bint two,
                            dptr out, i64 a, i64 b) noexcept nogil:
    """Rows ``a:b`` of one group component (and a second one when ``two``)."""
    cdef i64 k
    if two:
        if assign:
            for k in range(a, b):
                out[k] = (0.0 + wa * (((xa[k] - ma) - sa) * fa)) + wb * (((xb[k] - mb) - sb) * fb)
        else:
            for k in range(a, b):
                out[k] = (out[k] + wa * (((xa[k] - ma) - sa) * fa)) \
                    + wb * (((xb[k] - mb) - sb) * fb)
    elif assign:
        for k in range(a, b):
            out[k] = 0.0 + wa * (((xa[k] - ma) - sa) * fa)
    else:
        for k in range(a, b):
            out[k] = out[k] + wa * (((xa[k] - ma) - sa) * fa)


cdef void _segment(const i64* offsets, const i64* order, bint has_order, i64 t0, i64 t1,
                   const values_t* values, const initial_t* initial, int reward_kind,
                   int returns_kind, double gamma, const i64* spec, const double* weight,
                   Py_ssize_t ncomp, double eps, int ddof, bint singleton_raw,
                   double* out_reward, double* out_return, double* sig_return,
                   bint need_return, double* sig_oret, bint need_oret, double* outcome,
                   bint need_outcome, double* out_adv, double* batch_part, Py_ssize_t seg,
                   double* scratch, const double* table, i64* slots,
                   i64 max_len) noexcept nogil:
    """One group: the trajectories ``order[t0:t1]`` (or ``t0 .. t1-1``).

    ``scratch`` holds ``cnt`` [max_len] (turn bucket sizes), ``inv`` [3 max_len] (their
    ``1/n``, ``1/(n - ddof)``, ``n/(n - 1)`` from ``table``), the per-turn sums of the
    reward, the return and the outcome return [3 max_len], then per component three per-turn
    arrays ``p0, p1, p2`` [max_len], and ``tot`` [ncomp]. A component whose signal is per row
    accumulates per turn index whatever its scope: for ``turn`` these are its buckets; for
    ``group`` and ``batch`` the per-turn partial sums add up to the one bucket, whose
    parameters are then broadcast over the turns. So all row components share the same
    loops, two components per loop.
    """
    cdef i64 j, i, k, a, b, t, glen = 0, nrows = 0
    cdef Py_ssize_t ci, cj, u, nrow = 0, nlocal = 0
    cdef int sig, scope
    cdef bint assign = True
    cdef double acc, ret, g1, g2, r, rn, c1, c2, d0, x, d, n, m, w, cc, qq
    cdef double gamma2 = gamma * gamma
    cdef double* cnt = scratch
    cdef double* inv = scratch + max_len
    cdef double* sums = scratch + 5 * max_len
    cdef double* sums_r = sums
    cdef double* sums_g = sums + max_len
    cdef double* sums_o = sums + 2 * max_len
    cdef bint sum_reward = False, sum_return = False, sum_oret = False
    cdef double* tot = scratch + max_len * (8 + 3 * ncomp)
    cdef double* p0
    cdef double* p1
    cdef double* p2
    cdef double* q0
    cdef double* xs
    cdef double* xt
    cdef i64* row_comps = slots
    cdef i64* local_comps = slots + ncomp
    cdef i64* turn_comps = slots + 2 * ncomp
    cdef Py_ssize_t nturn
    cdef double acc8[8]
    cdef double* flat_c = tot + ncomp
    cdef const double* ones = tot + 3 * ncomp
    cdef i64* flat_local = slots + 3 * ncomp
    cdef Py_ssize_t nflat = 0
    cdef double* flat_q = tot + 2 * ncomp

    # Which signals need per-turn sums (the first pass of every row component using them).
    for ci in range(ncomp):
        sig = <int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL]
        if sig == SIG_REWARD:
            sum_reward = True
        elif sig == SIG_RETURN:
            sum_return = True
        elif sig == SIG_OUTCOME_RETURN:
            sum_oret = True

    # Signals: reward, discounted return, outcome, outcome return, and their per-turn sums
    # (accumulated in the latency-bound reverse recursions, where they cost nothing).
    # r_t = c1 D_{t-1} + c2 D_t: IDR (1, -1), ADR (0, -1), given (0, 1); products with 0 and
    # +-1 are exact, so these equal D_{t-1} - D_t, -D_t and r_t.
    c1 = 1.0 if reward_kind == REWARD_IDR else 0.0
    c2 = 1.0 if reward_kind == REWARD_GIVEN else -1.0
    for j in range(t0, t1):
        i = order[j] if has_order else j
        a = offsets[i]
        b = offsets[i + 1]
        nrows += b - a
        if b - a > glen:
            glen = b - a
        d0 = <double>initial[i] if reward_kind == REWARD_IDR else 0.0
        if need_return:
            # One reverse pass for the reward and G_t = r_t + gamma G_{t+1}, unrolled by one
            # step into G_t = (r_t + gamma r_{t+1}) + gamma^2 G_{t+2}: two independent
            # recursions (even and odd t) halve the latency chain. No negative powers of gamma.
            k = b - 1
            r = c1 * (<double>values[k - 1] if k > a else d0) + c2 * <double>values[k]
            out_reward[k] = r
            g1 = r
            sig_return[k] = g1
            if sum_reward:
                sums_r[k - a] += r
            if sum_return:
                sums_g[k - a] += g1
            rn = r
            g2 = 0.0
            if k > a:
                k = b - 2
                r = c1 * (<double>values[k - 1] if k > a else d0) + c2 * <double>values[k]
                out_reward[k] = r
                g2 = g1
                g1 = r + gamma * g2
                sig_return[k] = g1
                if sum_reward:
                    sums_r[k - a] += r
                if sum_return:
                    sums_g[k - a] += g1
                rn = r
                for k in range(b - 3, a, -1):
                    r = c1 * <double>values[k - 1] + c2 * <double>values[k]
                    out_reward[k] = r
                    ret = (r + gamma * rn) + gamma2 * g2
                    sig_return[k] = ret
                    if sum_reward:
                        sums_r[k - a] += r
                    if sum_return:
                        sums_g[k - a] += ret
                    g2 = g1
                    g1 = ret
                    rn = r
                if b - 3 >= a:
                    r = c1 * d0 + c2 * <double>values[a]
                    out_reward[a] = r
                    ret = (r + gamma * rn) + gamma2 * g2
                    sig_return[a] = ret
                    if sum_reward:
                        sums_r[0] += r
                    if sum_return:
                        sums_g[0] += ret
        else:
            out_reward[a] = c1 * d0 + c2 * <double>values[a]
            for k in range(a + 1, b):
                out_reward[k] = c1 * <double>values[k - 1] + c2 * <double>values[k]
            if sum_reward:
                _sum_by_turn(out_reward, sums_r, a, b)
        if need_outcome:
            acc = 0.0
            for k in range(a, b):
                acc = acc + out_reward[k]
            outcome[i] = acc
            if need_oret:
                ret = acc
                for k in range(b - 1, a - 1, -1):
                    sig_oret[k] = ret
                    if sum_oret:
                        sums_o[k - a] += ret
                    ret = gamma * ret
            if returns_kind == RETURNS_OUTCOME:
                for k in range(a, b):
                    out_return[k] = acc

    # cnt[t]: trajectories of the group longer than t (the size of turn bucket t), and its
    # table entries (see _turn_bucket_params).
    for t in range(glen):
        cnt[t] = 0.0
    for j in range(t0, t1):
        i = order[j] if has_order else j
        cnt[offsets[i + 1] - offsets[i] - 1] += 1.0
    acc = 0.0
    for t in range(glen - 1, -1, -1):
        acc = acc + cnt[t]
        cnt[t] = acc
        k = 3 * <i64>acc
        inv[t] = table[k]
        inv[glen + t] = table[k + 1]
        inv[2 * glen + t] = table[k + 2]

    for ci in range(ncomp):
        p0 = scratch + max_len * (8 + 3 * ci)
        p1 = p0 + max_len
        p2 = p1 + max_len
        if spec[ci * SPEC_WIDTH + SPEC_SCOPE] == SCOPE_TURN or \
                spec[ci * SPEC_WIDTH + SPEC_SIGNAL] == SIG_OUTCOME:
            for t in range(glen):
                p1[t] = 0.0
                p2[t] = 0.0
        if spec[ci * SPEC_WIDTH + SPEC_SIGNAL] == SIG_OUTCOME:
            for t in range(glen):
                p0[t] = 0.0
            _outcome_stats(offsets, order, has_order, t0, t1, outcome, cnt, inv, ones, glen,
                           <int>spec[ci * SPEC_WIDTH + SPEC_SCOPE],
                           spec[ci * SPEC_WIDTH + SPEC_LOO], spec[ci * SPEC_WIDTH + SPEC_STD],
                           eps, ddof, singleton_raw, p0, p1, p2,
                           batch_part + (seg * ncomp + ci) * 4)
        else:
            row_comps[nrow] = ci
            nrow += 1

    # Row components: the means from the signal's per-turn sums.
    for u in range(nrow):
        ci = row_comps[u]
        p0 = scratch + max_len * (8 + 3 * ci)
        xs = _row_signal(<int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL], sums_r, sums_g, sums_o)
        if spec[ci * SPEC_WIDTH + SPEC_SCOPE] == SCOPE_TURN:
            for t in range(glen):
                p0[t] = xs[t] * inv[t]
        else:
            acc = 0.0
            for t in range(glen):
                acc = acc + xs[t]
            tot[ci] = acc
            p0[0] = acc / <double>nrows

    # The per-turn sums are consumed: leave them zeroed for the next group.
    if sum_reward:
        for t in range(glen):
            sums_r[t] = 0.0
    if sum_return:
        for t in range(glen):
            sums_g[t] = 0.0
    if sum_oret:
        for t in range(glen):
            sums_o[t] = 0.0
    # Second pass: sums of the deviations and of their squares; per turn for turn buckets
    # (two components per loop), in scalars for a group's or the batch's one bucket (over the
    # group's rows in one run when its rollouts are adjacent).
    nturn = 0
    for u in range(nrow):
        ci = row_comps[u]
        if spec[ci * SPEC_WIDTH + SPEC_SCOPE] == SCOPE_TURN:
            turn_comps[nturn] = ci
            nturn += 1
            continue
        xs = _row_signal(<int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL], out_reward, sig_return,
                         sig_oret)
        m = scratch[max_len * (8 + 3 * ci)]
        for t in range(8):
            acc8[t] = 0.0
        if has_order:
            for j in range(t0, t1):
                i = order[j]
                _dev_flat(xs, m, offsets[i], offsets[i + 1], acc8)
        else:
            _dev_flat(xs, m, offsets[t0], offsets[t1], acc8)
        flat_c[ci] = (acc8[0] + acc8[1]) + (acc8[2] + acc8[3])
        flat_q[ci] = (acc8[4] + acc8[5]) + (acc8[6] + acc8[7])
    u = 0
    while u < nturn:
        ci = turn_comps[u]
        p0 = scratch + max_len * (8 + 3 * ci)
        xs = _row_signal(<int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL], out_reward, sig_return,
                         sig_oret)
        if u + 1 < nturn:
            cj = turn_comps[u + 1]
            q0 = scratch + max_len * (8 + 3 * cj)
            xt = _row_signal(<int>spec[cj * SPEC_WIDTH + SPEC_SIGNAL], out_reward, sig_return,
                             sig_oret)
            for j in range(t0, t1):
                i = order[j] if has_order else j
                _dev_by_turn2(xs, p0, p0 + max_len, p0 + 2 * max_len, xt, q0, q0 + max_len,
                              q0 + 2 * max_len, offsets[i], offsets[i + 1])
            u += 2
        else:
            for j in range(t0, t1):
                i = order[j] if has_order else j
                _dev_by_turn(xs, p0, p0 + max_len, p0 + 2 * max_len, offsets[i],
                             offsets[i + 1])
            u += 1

    # Parameters (mean0, shift, mult) per turn; batch components leave their partials.
    for u in range(nrow):
        ci = row_comps[u]
        scope = <int>spec[ci * SPEC_WIDTH + SPEC_SCOPE]
        p0 = scratch + max_len * (8 + 3 * ci)
        p1 = p0 + max_len
        p2 = p1 + max_len
        if scope == SCOPE_TURN:
            _turn_bucket_params(glen, cnt, inv, ones, p0, p1, p2,
                                spec[ci * SPEC_WIDTH + SPEC_LOO],
                                spec[ci * SPEC_WIDTH + SPEC_STD], eps, singleton_raw)
            local_comps[nlocal] = ci
            nlocal += 1
            continue
        cc = flat_c[ci]
        qq = flat_q[ci]
        if scope == SCOPE_BATCH:
            batch_part[(seg * ncomp + ci) * 4 + 0] = <double>nrows
            batch_part[(seg * ncomp + ci) * 4 + 1] = tot[ci]
            batch_part[(seg * ncomp + ci) * 4 + 2] = cc
            batch_part[(seg * ncomp + ci) * 4 + 3] = qq
            continue
        _bucket_params(<double>nrows, p0[0], cc, qq, spec[ci * SPEC_WIDTH + SPEC_LOO],
                       spec[ci * SPEC_WIDTH + SPEC_STD], ddof, eps, singleton_raw, p0, p1, p2)
        flat_local[nflat] = ci
        nflat += 1

    # The advantage: weighted z of the turn and group components, two per loop: turn
    # components (per-turn parameters) first, then group components (one bucket: scalars).
    for u in range(nflat):
        local_comps[nlocal + u] = flat_local[u]
    u = 0
    while u < nlocal + nflat:
        ci = local_comps[u]
        p0 = scratch + max_len * (8 + 3 * ci)
        xs = _row_signal(<int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL], out_reward, sig_return,
                         sig_oret)
        cj = local_comps[u + 1] if u + 1 < nlocal + nflat else -1
        if cj >= 0:
            q0 = scratch + max_len * (8 + 3 * cj)
            xt = _row_signal(<int>spec[cj * SPEC_WIDTH + SPEC_SIGNAL], out_reward, sig_return,
                             sig_oret)
        if u + 1 < nlocal:  # turn + turn
            for j in range(t0, t1):
                i = order[j] if has_order else j
                _adv_by_turn2(assign, weight[ci], xs, p0, p0 + max_len, p0 + 2 * max_len,
                              weight[cj], xt, q0, q0 + max_len, q0 + 2 * max_len, out_adv,
                              offsets[i], offsets[i + 1])
            u += 2
        elif u < nlocal and cj >= 0:  # turn + group
            for j in range(t0, t1):
                i = order[j] if has_order else j
                _adv_turn_flat(assign, weight[ci], xs, p0, p0 + max_len, p0 + 2 * max_len,
                               weight[cj], xt, q0[0], q0[max_len], q0[2 * max_len], out_adv,
                               offsets[i], offsets[i + 1])
            u += 2
        elif u < nlocal:  # turn
            for j in range(t0, t1):
                i = order[j] if has_order else j
                _adv_by_turn(assign, weight[ci], xs, p0, p0 + max_len, p0 + 2 * max_len,
                             out_adv, offsets[i], offsets[i + 1])
            u += 1
        else:  # group (+ group)
            if has_order:
                for j in range(t0, t1):
                    i = order[j]
                    _adv_flat2(assign, weight[ci], xs, p0[0], p0[max_len], p0[2 * max_len],
                               weight[cj] if cj >= 0 else 0.0, xt if cj >= 0 else xs,
                               q0[0] if cj >= 0 else 0.0, q0[max_len] if cj >= 0 else 0.0,
                               q0[2 * max_len] if cj >= 0 else 0.0, cj >= 0, out_adv,
                               offsets[i], offsets[i + 1])
            else:
                _adv_flat2(assign, weight[ci], xs, p0[0], p0[max_len], p0[2 * max_len],
                           weight[cj] if cj >= 0 else 0.0, xt if cj >= 0 else xs,
                           q0[0] if cj >= 0 else 0.0, q0[max_len] if cj >= 0 else 0.0,
                           q0[2 * max_len] if cj >= 0 else 0.0, cj >= 0, out_adv,
                           offsets[t0], offsets[t1])
            u += 2 if cj >= 0 else 1
        assign = False
    for ci in range(ncomp):
        if spec[ci * SPEC_WIDTH + SPEC_SIGNAL] != SIG_OUTCOME:
            continue
        scope = <int>spec[ci * SPEC_WIDTH + SPEC_SCOPE]
        if scope == SCOPE_BATCH:
            continue
        p0 = scratch + max_len * (8 + 3 * ci)
        p1 = p0 + max_len
        p2 = p1 + max_len
        w = weight[ci]
        for j in range(t0, t1):
            i = order[j] if has_order else j
            a = offsets[i]
            b = offsets[i + 1]
            x = outcome[i]
            if scope == SCOPE_TURN:
                for k in range(a, b):
                    t = k - a
                    out_adv[k] = (0.0 if assign else out_adv[k]) \
                        + w * (((x - p0[t]) - p1[t]) * p2[t])
            else:
                d = w * (((x - p0[0]) - p1[0]) * p2[0])
                for k in range(a, b):
                    out_adv[k] = (0.0 if assign else out_adv[k]) + d
        assign = False


cdef void _outcome_stats(const i64* offsets, const i64* order, bint has_order, i64 t0, i64 t1,
                         const double* outcome, const double* cnt, const double* inv,
                         const double* ones,
                         i64 glen, int scope, bint loo, bint scale_std, double eps, int ddof,
                         bint singleton_raw, double* p0, double* p1, double* p2,
                         double* part) noexcept nogil:
    """Statistics of the outcome ``R_i`` (one value per trajectory) in a group: per turn
    index (``turn``: ``R_i`` counts once in every turn bucket its trajectory reaches), over
    the group's trajectories (``group``; parameters in ``p0[0], p1[0], p2[0]``), or the
    group's partial moments (``batch``, written to ``part``). ``p0..p2`` come zeroed."""
    cdef i64 j, i, t, length
    cdef double n = 0.0, s = 0.0, m, d, cc = 0.0, qq = 0.0
    if scope == SCOPE_TURN:
        for j in range(t0, t1):
            i = order[j] if has_order else j
            for t in range(offsets[i + 1] - offsets[i]):
                p0[t] += outcome[i]
        for t in range(glen):
            p0[t] = p0[t] * inv[t]
        for j in range(t0, t1):
            i = order[j] if has_order else j
            for t in range(offsets[i + 1] - offsets[i]):
                d = outcome[i] - p0[t]
                p1[t] += d
                p2[t] += d * d
        _turn_bucket_params(glen, cnt, inv, ones, p0, p1, p2, loo, scale_std, eps,
                            singleton_raw)
        return
    for j in range(t0, t1):
        i = order[j] if has_order else j
        s = s + outcome[i]
        n += 1.0
    m = s / n
    for j in range(t0, t1):
        i = order[j] if has_order else j
        d = outcome[i] - m
        cc += d
        qq += d * d
    if scope == SCOPE_GROUP:
        _bucket_params(n, m, cc, qq, loo, scale_std, ddof, eps, singleton_raw, p0, p1, p2)
    else:
        part[0] = n
        part[1] = s
        part[2] = cc
        part[3] = qq


cdef double* _ptr(double[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] else NULL


def fused_group_advantages(const i64[::1] offsets, const i64[::1] order,
                           const i64[::1] seg_start, const values_t[::1] values,
                           const initial_t[::1] initial_distance, int reward_kind,
                           int returns_kind, double gamma, const i64[:, ::1] spec,
                           const double[::1] weight, double eps, int ddof, bint singleton_raw,
                           i64 max_len, double[::1] out_reward, double[::1] out_return,
                           double[::1] sig_return, double[::1] sig_oret, double[::1] outcome,
                           double[::1] out_adv, double[::1] batch_part):
    """The group pass: signals, turn/group statistics and advantages, batch partials.

    Args:
      offsets: int64 ``[n_traj + 1]``.
      order, seg_start: from :func:`ragged_group_segments` (``order`` empty: identity).
      values: ``[n_rows]`` float32/float64 distances (``reward_kind`` IDR/ADR) or rewards.
      initial_distance: ``[n_traj]`` ``D_{-1}`` (IDR only; empty otherwise).
      reward_kind: 0 IDR ``r_t = D_{t-1} - D_t``, 1 ADR ``r_t = -D_t``, 2 given.
      returns_kind: what ``out_return`` holds: 0 ``G_t`` (then ``sig_return`` is
        ``out_return``), 1 the outcome ``R_i`` on every turn, 2 ``gamma^(T-1-t) R_i`` (then
        ``sig_oret`` is ``out_return``).
      gamma: discount of ``G_t = r_t + gamma G_{t+1}`` and of the outcome return.
      spec: int64 ``[ncomp, 4]``: signal (0 reward, 1 return, 2 outcome, 3 outcome
        return), scope (0 turn, 1 group, 2 batch), leave-one-out, scale by std.
      weight: ``[ncomp]`` component weights.
      eps, ddof, singleton_raw: normalization options (``mica_core.normalize``).
      max_len: the longest trajectory.
      out_reward: ``[n_rows]`` rewards (float64).
      sig_return, sig_oret: ``[n_rows]`` buffers for ``G_t`` and ``gamma^(T-1-t) R_i``;
        empty when no component or output needs them.
      outcome: ``[n_traj]`` ``R_i``; empty when unused.
      out_adv: ``[n_rows]`` ``sum_c w_c z_c`` over turn and group components; left
        untouched when there are none.
      batch_part: ``[ngroups * ncomp * 4]`` per group and batch component: count, sum,
        ``sum(x - m_g)``, ``sum((x - m_g)^2)`` with ``m_g = sum/count``.
    """
    cdef Py_ssize_t nseg = seg_start.shape[0] - 1, ncomp = spec.shape[0], s, ci
    cdef bint has_order = order.shape[0] > 0
    cdef i64 max_group = 0, kk, k0, k1
    cdef i64* slots
    cdef double* scratch
    cdef double* table
    cdef double* sig_return_p = _ptr(sig_return)
    cdef double* sig_oret_p = _ptr(sig_oret)
    cdef double* outcome_p = _ptr(outcome)
    cdef double* batch_p = _ptr(batch_part)
    cdef const i64* order_p = &order[0] if has_order else NULL
    cdef const initial_t* init_p = &initial_distance[0] if initial_distance.shape[0] else NULL
    if offsets.shape[0] <= 1:
        return
    with nogil:
        for s in range(nseg):
            if seg_start[s + 1] - seg_start[s] > max_group:
                max_group = seg_start[s + 1] - seg_start[s]
        scratch = <double*>malloc((max_len * (9 + 3 * ncomp) + 3 * ncomp + 3 * (max_group + 1))
                                  * sizeof(double))
        slots = <i64*>malloc((4 * ncomp + 1) * sizeof(i64))
        if scratch == NULL or slots == NULL:
            free(scratch)
            free(slots)
            with gil:
                raise MemoryError()
        table = scratch + max_len * (9 + 3 * ncomp) + 3 * ncomp
        for kk in range(max_len):  # ``ones`` (see _segment)
            scratch[max_len * (8 + 3 * ncomp) + 3 * ncomp + kk] = 1.0
        for ci in range(3 * max_len):
            scratch[5 * max_len + ci] = 0.0  # per-turn signal sums start (and stay) zeroed
        _count_table(max_group, ddof, table)
        for s in range(nseg):
            if has_order and s + 1 < nseg:
                # Interleaved groups: the next group's rollouts lie anywhere in memory, so
                # ask for their rows now (the hardware prefetcher cannot guess them).
                for kk in range(seg_start[s + 1], seg_start[s + 2]):
                    k0 = offsets[order_p[kk]]
                    k1 = offsets[order_p[kk] + 1]
                    while k0 < k1:
                        mica_prefetch_read(&values[k0])
                        mica_prefetch_write(&out_reward[k0])
                        mica_prefetch_write(&out_return[k0])
                        mica_prefetch_write(&out_adv[k0])
                        k0 += 8
            _segment(&offsets[0], order_p, has_order, seg_start[s], seg_start[s + 1],
                     &values[0], init_p, reward_kind, returns_kind, gamma, &spec[0, 0],
                     &weight[0], ncomp, eps, ddof, singleton_raw, &out_reward[0],
                     &out_return[0], sig_return_p, sig_return_p != NULL, sig_oret_p,
                     sig_oret_p != NULL, outcome_p, outcome_p != NULL, &out_adv[0], batch_p,
                     s, scratch, table, slots, max_len)
        free(slots)
        free(scratch)


def bucket_batch_moments(const double[::1] batch_part, const i64[:, ::1] spec, double eps,
                         int ddof, bint singleton_raw, double[::1] batch_params):
    """Merge the groups' partial moments of every batch component, in group order.

    With ``M = sum(sums) / n`` and ``delta_g = m_g - M``::

        c  = sum_g c_g + n_g delta_g
        m2 = sum_g m2_g + 2 delta_g c_g + n_g delta_g^2

    then the corrected two-pass parameters as in every other bucket. Writes ``(mean0,
    shift, mult)`` of component ``c`` to ``batch_params[3c : 3c + 3]``.
    """
    cdef Py_ssize_t ncomp = spec.shape[0]
    cdef Py_ssize_t nseg = batch_part.shape[0] // (4 * ncomp) if ncomp else 0
    cdef Py_ssize_t ci, s
    cdef double n, total, mean0, cc, m2, ns, delta, cs
    with nogil:
        for ci in range(ncomp):
            if spec[ci, SPEC_SCOPE] != SCOPE_BATCH:
                continue
            n = 0.0
            total = 0.0
            for s in range(nseg):
                n += batch_part[(s * ncomp + ci) * 4 + 0]
                total = total + batch_part[(s * ncomp + ci) * 4 + 1]
            mean0 = total / n if n > 0.0 else 0.0
            cc = 0.0
            m2 = 0.0
            for s in range(nseg):
                ns = batch_part[(s * ncomp + ci) * 4 + 0]
                if ns == 0.0:
                    continue
                delta = batch_part[(s * ncomp + ci) * 4 + 1] / ns - mean0
                cs = batch_part[(s * ncomp + ci) * 4 + 2]
                cc += cs + ns * delta
                m2 += batch_part[(s * ncomp + ci) * 4 + 3] + 2.0 * delta * cs \
                    + ns * delta * delta
            _bucket_params(n, mean0, cc, m2, spec[ci, SPEC_LOO], spec[ci, SPEC_STD], ddof, eps,
                           singleton_raw, &batch_params[3 * ci], &batch_params[3 * ci + 1],
                           &batch_params[3 * ci + 2])


def fused_batch_advantages(const i64[::1] offsets, const i64[:, ::1] spec,
                           const double[::1] weight, const double[::1] batch_params,
                           double[::1] out_reward, double[::1] sig_return,
                           double[::1] sig_oret, double[::1] outcome, bint assign,
                           double[::1] out_adv):
    """The batch pass: ``out_adv += w_c z_c`` for every batch component (``=`` for the first
    when ``assign``, i.e. when the group pass wrote no advantage)."""
    cdef Py_ssize_t n_traj = offsets.shape[0] - 1, ncomp = spec.shape[0], ci
    cdef i64 i, k
    cdef int sig
    cdef bint first = assign
    cdef double m, sh, f, w, x
    cdef double* xs
    cdef double* reward_p = _ptr(out_reward)
    cdef double* sig_return_p = _ptr(sig_return)
    cdef double* sig_oret_p = _ptr(sig_oret)
    with nogil:
        for ci in range(ncomp):
            if spec[ci, SPEC_SCOPE] != SCOPE_BATCH:
                continue
            sig = <int>spec[ci, SPEC_SIGNAL]
            m = batch_params[3 * ci]
            sh = batch_params[3 * ci + 1]
            f = batch_params[3 * ci + 2]
            w = weight[ci]
            xs = _row_signal(sig, reward_p, sig_return_p, sig_oret_p)
            for i in range(n_traj):
                for k in range(offsets[i], offsets[i + 1]):
                    x = outcome[i] if sig == SIG_OUTCOME else xs[k]
                    if first:
                        out_adv[k] = 0.0 + w * (((x - m) - sh) * f)
                    else:
                        out_adv[k] = out_adv[k] + w * (((x - m) - sh) * f)
            first = False


# --------------------------------------------------------------------------- table reading
# Single-pass checks for mica_core.arrow's long-form reader (rows usually arrive sorted by
# trajectory and turn; these confirm it without sorting, hashing or temporaries).

ctypedef fused ids_t:
    long long
    double


def ragged_run_codes(const i64[::1] ids, i64[::1] codes, i64[::1] starts):
    """Run number of every row (a row with the previous row's id continues its run).

    Writes ``codes`` [n] and the first row of every run to ``starts[0:nruns]``, with
    ``starts[nruns] = n`` (``starts`` has room for ``n + 1``). Returns ``(nruns,
    increasing)``: ``increasing`` when the run ids strictly increase, so that no id has two
    runs and the run numbers are the ids' codes in order of first appearance.
    """
    cdef Py_ssize_t k, n = ids.shape[0]
    cdef i64 run = 0, change, decrease = 0
    cdef const i64* x
    cdef i64* c
    cdef i64* st
    if n == 0:
        starts[0] = 0
        return 0, True
    x = &ids[0]
    c = &codes[0]
    st = &starts[0]
    with nogil:
        st[0] = 0
        c[0] = 0
        # Branch-free: a run boundary every ~20 rows would mispredict a branch each time.
        # st[n] is a scratch slot for the rows that start no run.
        for k in range(1, n):
            change = x[k] != x[k - 1]
            decrease |= x[k] < x[k - 1]
            run += change
            c[k] = run
            st[run if change else n] = k
        st[run + 1] = n
    return run + 1, decrease == 0


def ragged_check_turns(const i64[::1] offsets, const i64[::1] turn):
    """First row whose turn is not its position in its trajectory (``row - offsets[i]``), or
    -1 when every trajectory's rows hold turns ``0 .. T-1`` in order."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    cdef i64 bad = -1
    with nogil:
        for i in range(n_traj):
            for k in range(offsets[i], offsets[i + 1]):
                if turn[k] != k - offsets[i]:
                    bad = k
                    break
            if bad >= 0:
                break
    return bad


def ragged_first_change(const i64[::1] offsets, const ids_t[::1] values):
    """First row that is not a trajectory's first row and whose value differs from the row
    before (so differs from the trajectory's first row), or -1: the check that a per-row
    column holds one value per trajectory."""
    cdef Py_ssize_t i, k, n_traj = offsets.shape[0] - 1
    cdef i64 bad = -1
    with nogil:
        for i in range(n_traj):
            for k in range(offsets[i] + 1, offsets[i + 1]):
                if values[k] != values[k - 1]:
                    bad = k
                    break
            if bad >= 0:
                break
    return bad


def ragged_place_rows(const i64[::1] traj, const i64[::1] turn, const i64[::1] offsets,
                      i64[::1] order):
    """Sort rows by (trajectory, turn) by placing each one: row ``k`` goes to position
    ``offsets[traj[k]] + turn[k]``. ``order`` [n] must come filled with -1; on success
    ``order[p]`` is the input row at sorted position ``p`` and the result is -1. Returns the
    first row whose turn is out of ``0 .. T-1`` for its trajectory or repeats a turn
    (``order`` is then incomplete; sort the general way to name the error)."""
    cdef Py_ssize_t k, n = traj.shape[0]
    cdef i64 t, tn, p, bad = -1
    with nogil:
        for k in range(n):
            t = traj[k]
            tn = turn[k]
            if tn < 0 or tn >= offsets[t + 1] - offsets[t]:
                bad = k
                break
            p = offsets[t] + tn
            if order[p] >= 0:
                bad = k
                break
            order[p] = k
    return bad
