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

from cython.parallel cimport parallel, prange
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

cdef extern from *:
    """
    #ifndef MICA_OPENMP
    #define MICA_OPENMP 0
    #endif
    """
    int MICA_OPENMP


def built_with_openmp():
    """Whether these kernels were compiled with OpenMP (else ``num_threads`` is ignored and
    every pass runs on the calling thread)."""
    return MICA_OPENMP == 1


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
    SCOPE_KEY = 3

cdef enum:
    REWARD_IDR = 0
    REWARD_ADR = 1
    REWARD_GIVEN = 2

cdef enum:
    RETURNS_DISCOUNTED = 0
    RETURNS_OUTCOME = 1
    RETURNS_OUTCOME_DISCOUNTED = 2

def plan_codes():
    """The integer codes these kernels read in a plan's encoding, by name:
    ``{"signal": {...}, "scope": {...}, "reward": {...}, "returns": {...}}``.

    ``mica_core._backend_cython`` encodes plans with these codes and checks at import that they
    name exactly the signals, scopes, reward kinds and return kinds of
    :mod:`mica_core.estimators`, so the two sides cannot drift apart."""
    return {
        "signal": {"reward": SIG_REWARD, "return": SIG_RETURN, "outcome": SIG_OUTCOME,
                   "outcome_return": SIG_OUTCOME_RETURN},
        "scope": {"turn": SCOPE_TURN, "group": SCOPE_GROUP, "batch": SCOPE_BATCH,
                  "key": SCOPE_KEY},
        "reward": {"idr": REWARD_IDR, "adr": REWARD_ADR, "given": REWARD_GIVEN},
        "returns": {"discounted": RETURNS_DISCOUNTED, "outcome": RETURNS_OUTCOME,
                    "outcome_discounted": RETURNS_OUTCOME_DISCOUNTED},
    }


# Groups per task of the parallel group pass: enough to amortize a task's scratch block, few
# enough to balance skewed groups over the threads.
cdef enum:
    SEGMENTS_PER_TASK = 64
    # Trajectories per task of the parallel batch pass.
    TRAJ_PER_TASK = 4096

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


cdef struct _GroupPass:
    # The arguments of fused_group_advantages that every group reads (see its docstring).
    const i64* offsets
    const i64* order
    bint has_order
    const i64* seg_start
    Py_ssize_t nseg
    int reward_kind
    int returns_kind
    double gamma
    const i64* spec
    const double* weight
    Py_ssize_t ncomp
    double eps
    int ddof
    bint singleton_raw
    i64 max_len
    double* out_reward
    double* out_return
    double* sig_return
    double* sig_oret
    double* outcome
    double* out_adv
    double* batch_part
    const double* table  # _count_table of the largest group
    const i64* key  # [n_rows] key bucket codes (NULL without a key component)
    i64 nkeys
    double* key_stats  # [C][4 nkeys] per key component: count, mean0, shift, mult


cdef struct _Scratch:
    # The one statement of a group pass's scratch layout: one block of doubles and one of
    # int64 per task (a run of groups), laid out by _scratch_layout; L = the longest
    # trajectory, C = the number of components.
    double* cnt  # [L] size of turn bucket t (trajectories of the group longer than t)
    double* inv  # [3 L] per turn: 1/n, 1/(n - ddof), n/(n - 1), from the count table
    double* sums  # [3 L] per-turn sums of reward, return, outcome return; zero between groups
    double* comp  # [C][3 L] per component: mean0, then shift, then mult (per turn, or in [0])
    double* ones  # [L] 1.0: the factor of a bucket without leave-one-out
    double* tot  # [C] the group's total of each row component's signal
    double* flat_c  # [C] sum(x - mean0) of a component with one bucket in the group
    double* flat_q  # [C] sum((x - mean0)^2) of the same
    i64* row_comps  # [C] components whose signal is per row
    i64* local_comps  # [C] turn and group components, in advantage order
    i64* turn_comps  # [C] components with scope turn
    i64* flat_local  # [C] components with scope group


cdef inline Py_ssize_t _scratch_doubles(i64 max_len, Py_ssize_t ncomp) noexcept nogil:
    return max_len * (8 + 3 * ncomp) + 3 * ncomp


cdef inline void _scratch_layout(double* d, i64* k, i64 max_len, Py_ssize_t ncomp,
                                 _Scratch* sc) noexcept nogil:
    """Point ``sc`` into the blocks ``d`` (:func:`_scratch_doubles` doubles) and ``k``
    (``4 C`` int64), and initialize what must start set: ``sums`` zero, ``ones`` one."""
    cdef i64 t
    sc.cnt = d
    sc.inv = d + max_len
    sc.sums = d + 4 * max_len
    sc.comp = d + 7 * max_len
    sc.ones = d + (7 + 3 * ncomp) * max_len
    sc.tot = d + (8 + 3 * ncomp) * max_len
    sc.flat_c = sc.tot + ncomp
    sc.flat_q = sc.tot + 2 * ncomp
    sc.row_comps = k
    sc.local_comps = k + ncomp
    sc.turn_comps = k + 2 * ncomp
    sc.flat_local = k + 3 * ncomp
    for t in range(3 * max_len):
        sc.sums[t] = 0.0
    for t in range(max_len):
        sc.ones[t] = 1.0


cdef void _segment(const _GroupPass* gp, const values_t* values, const initial_t* initial,
                   Py_ssize_t seg, const _Scratch* sc) noexcept nogil:
    """One group: the trajectories ``order[t0:t1]`` (or ``t0 .. t1-1``) of segment ``seg``.

    Scratch (:class:`_Scratch`): ``cnt`` and ``inv`` describe the turn buckets; ``sums``
    receives the per-turn sums of the reward, the return and the outcome return; each
    component has three per-turn arrays ``p0, p1, p2`` in ``comp``. A component whose signal
    is per row accumulates per turn index whatever its scope: for ``turn`` these are its
    buckets; for ``group`` and ``batch`` the per-turn partial sums add up to the one bucket,
    whose parameters are then broadcast over the turns. So all row components share the same
    loops, two components per loop.
    """
    cdef const i64* offsets = gp.offsets
    cdef const i64* order = gp.order
    cdef bint has_order = gp.has_order
    cdef i64 t0 = gp.seg_start[seg]
    cdef i64 t1 = gp.seg_start[seg + 1]
    cdef int reward_kind = gp.reward_kind
    cdef int returns_kind = gp.returns_kind
    cdef double gamma = gp.gamma
    cdef const i64* spec = gp.spec
    cdef const double* weight = gp.weight
    cdef Py_ssize_t ncomp = gp.ncomp
    cdef double eps = gp.eps
    cdef int ddof = gp.ddof
    cdef bint singleton_raw = gp.singleton_raw
    cdef double* out_reward = gp.out_reward
    cdef double* out_return = gp.out_return
    cdef double* sig_return = gp.sig_return
    cdef bint need_return = gp.sig_return != NULL
    cdef double* sig_oret = gp.sig_oret
    cdef bint need_oret = gp.sig_oret != NULL
    cdef double* outcome = gp.outcome
    cdef bint need_outcome = gp.outcome != NULL
    cdef double* out_adv = gp.out_adv
    cdef double* batch_part = gp.batch_part
    cdef const double* table = gp.table
    cdef i64 max_len = gp.max_len
    cdef i64 j, i, k, a, b, t, glen = 0, nrows = 0
    cdef Py_ssize_t ci, cj, u, nrow = 0, nlocal = 0
    cdef int sig, scope
    cdef bint assign = True
    cdef double acc, ret, g1, g2, r, rn, c1, c2, d0, x, d, n, m, w, cc, qq
    cdef double gamma2 = gamma * gamma
    cdef double* cnt = sc.cnt
    cdef double* inv = sc.inv
    cdef double* sums_r = sc.sums
    cdef double* sums_g = sc.sums + max_len
    cdef double* sums_o = sc.sums + 2 * max_len
    cdef bint sum_reward = False, sum_return = False, sum_oret = False
    cdef double* tot = sc.tot
    cdef double* comp = sc.comp
    cdef double* p0
    cdef double* p1
    cdef double* p2
    cdef double* q0
    cdef double* xs
    cdef double* xt
    cdef i64* row_comps = sc.row_comps
    cdef i64* local_comps = sc.local_comps
    cdef i64* turn_comps = sc.turn_comps
    cdef Py_ssize_t nturn
    cdef double acc8[8]
    cdef double* flat_c = sc.flat_c
    cdef const double* ones = sc.ones
    cdef i64* flat_local = sc.flat_local
    cdef Py_ssize_t nflat = 0
    cdef double* flat_q = sc.flat_q

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
        if spec[ci * SPEC_WIDTH + SPEC_SCOPE] == SCOPE_KEY:
            continue  # keyed buckets: _key_component, after the others
        p0 = comp + 3 * max_len * ci
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
        p0 = comp + 3 * max_len * ci
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
        m = comp[3 * max_len * ci]
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
        p0 = comp + 3 * max_len * ci
        xs = _row_signal(<int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL], out_reward, sig_return,
                         sig_oret)
        if u + 1 < nturn:
            cj = turn_comps[u + 1]
            q0 = comp + 3 * max_len * cj
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
        p0 = comp + 3 * max_len * ci
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
        p0 = comp + 3 * max_len * ci
        xs = _row_signal(<int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL], out_reward, sig_return,
                         sig_oret)
        cj = local_comps[u + 1] if u + 1 < nlocal + nflat else -1
        if cj >= 0:
            q0 = comp + 3 * max_len * cj
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
        if scope == SCOPE_BATCH or scope == SCOPE_KEY:
            continue
        p0 = comp + 3 * max_len * ci
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
    for ci in range(ncomp):
        if spec[ci * SPEC_WIDTH + SPEC_SCOPE] != SCOPE_KEY:
            continue
        sig = <int>spec[ci * SPEC_WIDTH + SPEC_SIGNAL]
        _key_component(offsets, order, has_order, t0, t1, sig == SIG_OUTCOME,
                       _row_signal(sig, out_reward, sig_return, sig_oret), outcome, gp.key,
                       gp.key_stats + ci * 4 * gp.nkeys, gp.nkeys,
                       spec[ci * SPEC_WIDTH + SPEC_LOO], spec[ci * SPEC_WIDTH + SPEC_STD], ddof,
                       eps, singleton_raw, weight[ci], assign, out_adv)
        assign = False


cdef void _key_component(const i64* offsets, const i64* order, bint has_order, i64 t0, i64 t1,
                         bint per_traj, const double* xs, const double* outcome,
                         const i64* key, double* stats, i64 nkeys, bint loo, bint scale_std,
                         int ddof, double eps, bint singleton_raw, double w, bint assign,
                         double* out_adv) noexcept nogil:
    """A component with scope ``key`` over one group: buckets are the group's key codes (each
    code belongs to one group, so groups on different threads never share a bucket).

    ``stats`` holds four arrays of ``nkeys``: count, mean0, shift, mult; they start at zero.
    Sums run in row order within the group (the order of ``numpy.bincount``); the values are
    the row signal ``xs`` or, with ``per_traj``, the trajectory's outcome on each of its rows.
    """
    cdef double* cnt = stats
    cdef double* mean0 = stats + nkeys
    cdef double* shift = stats + 2 * nkeys
    cdef double* mult = stats + 3 * nkeys
    cdef i64 j, i, k, kb
    cdef double x, d, n
    for j in range(t0, t1):  # counts, and sums in mean0
        i = order[j] if has_order else j
        for k in range(offsets[i], offsets[i + 1]):
            kb = key[k]
            cnt[kb] += 1.0
            mean0[kb] = mean0[kb] + (outcome[i] if per_traj else xs[k])
    for j in range(t0, t1):  # means, once per bucket (a negative count marks it done)
        i = order[j] if has_order else j
        for k in range(offsets[i], offsets[i + 1]):
            kb = key[k]
            if cnt[kb] > 0.0:
                mean0[kb] = mean0[kb] / cnt[kb]
                cnt[kb] = -cnt[kb]
    for j in range(t0, t1):  # sums of the deviations and their squares
        i = order[j] if has_order else j
        for k in range(offsets[i], offsets[i + 1]):
            kb = key[k]
            d = (outcome[i] if per_traj else xs[k]) - mean0[kb]
            shift[kb] += d
            mult[kb] += d * d
    for j in range(t0, t1):  # parameters, once per bucket
        i = order[j] if has_order else j
        for k in range(offsets[i], offsets[i + 1]):
            kb = key[k]
            if cnt[kb] < 0.0:
                n = -cnt[kb]
                _bucket_params(n, mean0[kb], shift[kb], mult[kb], loo, scale_std, ddof, eps,
                               singleton_raw, &mean0[kb], &shift[kb], &mult[kb])
                cnt[kb] = n
    for j in range(t0, t1):
        i = order[j] if has_order else j
        for k in range(offsets[i], offsets[i + 1]):
            kb = key[k]
            x = outcome[i] if per_traj else xs[k]
            out_adv[k] = (0.0 if assign else out_adv[k]) \
                + w * (((x - mean0[kb]) - shift[kb]) * mult[kb])


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


cdef void _group_pass_range(const _GroupPass* gp, const values_t* values,
                            const initial_t* initial, Py_ssize_t s0, Py_ssize_t s1,
                            int* failed) noexcept nogil:
    """Segments ``s0 .. s1-1``, one after the other, with a scratch block of their own (one
    task of the parallel group pass, or the whole pass on one thread)."""
    cdef _Scratch sc
    cdef Py_ssize_t s, kk
    cdef i64 k0, k1
    cdef double* d = <double*>malloc(_scratch_doubles(gp.max_len, gp.ncomp) * sizeof(double))
    cdef i64* k = <i64*>malloc((4 * gp.ncomp + 1) * sizeof(i64))
    if d == NULL or k == NULL:
        free(d)
        free(k)
        failed[0] = 1
        return
    _scratch_layout(d, k, gp.max_len, gp.ncomp, &sc)
    for s in range(s0, s1):
        if gp.has_order and s + 1 < s1:
            # Interleaved groups: the next group's rollouts lie anywhere in memory, so ask
            # for their rows now (the hardware prefetcher cannot guess them).
            for kk in range(gp.seg_start[s + 1], gp.seg_start[s + 2]):
                k0 = gp.offsets[gp.order[kk]]
                k1 = gp.offsets[gp.order[kk] + 1]
                while k0 < k1:
                    mica_prefetch_read(&values[k0])
                    mica_prefetch_write(&gp.out_reward[k0])
                    mica_prefetch_write(&gp.out_return[k0])
                    mica_prefetch_write(&gp.out_adv[k0])
                    k0 += 8
        _segment(gp, values, initial, s, &sc)
    free(k)
    free(d)


def fused_group_advantages(const i64[::1] offsets, const i64[::1] order,
                           const i64[::1] seg_start, const values_t[::1] values,
                           const initial_t[::1] initial_distance, int reward_kind,
                           int returns_kind, double gamma, const i64[:, ::1] spec,
                           const double[::1] weight, double eps, int ddof, bint singleton_raw,
                           i64 max_len, double[::1] out_reward, double[::1] out_return,
                           double[::1] sig_return, double[::1] sig_oret, double[::1] outcome,
                           double[::1] out_adv, double[::1] batch_part, int num_threads=1,
                           const i64[::1] key=None, double[::1] key_stats=None):
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
      key: ``[n_rows]`` key bucket codes (one per (group, key) pair) for components with
        scope ``key`` (3); ``key_stats``: zeros ``[ncomp * 4 * nkeys]``, their statistics.
      num_threads: groups are spread over this many OpenMP threads (1: no thread is
        started). A group is computed by one thread, in the same order of operations
        whatever the thread count, so the result is bit-identical for every ``num_threads``.
    """
    cdef Py_ssize_t nseg = seg_start.shape[0] - 1, ncomp = spec.shape[0], s
    cdef bint has_order = order.shape[0] > 0
    cdef i64 max_group = 0
    cdef double* table
    cdef int failed[1]
    cdef _GroupPass gp
    cdef const values_t* vals
    cdef const initial_t* init
    if offsets.shape[0] <= 1:
        return
    vals = &values[0]
    init = &initial_distance[0] if initial_distance.shape[0] else NULL
    failed[0] = 0
    gp.offsets = &offsets[0]
    gp.order = &order[0] if has_order else NULL
    gp.has_order = has_order
    gp.seg_start = &seg_start[0]
    gp.nseg = nseg
    gp.reward_kind = reward_kind
    gp.returns_kind = returns_kind
    gp.gamma = gamma
    gp.spec = &spec[0, 0]
    gp.weight = &weight[0]
    gp.ncomp = ncomp
    gp.eps = eps
    gp.ddof = ddof
    gp.singleton_raw = singleton_raw
    gp.max_len = max_len
    gp.out_reward = &out_reward[0]
    gp.out_return = &out_return[0]
    gp.sig_return = _ptr(sig_return)
    gp.sig_oret = _ptr(sig_oret)
    gp.outcome = _ptr(outcome)
    gp.out_adv = &out_adv[0]
    gp.batch_part = _ptr(batch_part)
    gp.key = &key[0] if key is not None and key.shape[0] else NULL
    gp.key_stats = _ptr(key_stats) if key_stats is not None else NULL
    gp.nkeys = key_stats.shape[0] // (4 * ncomp) if key_stats is not None and ncomp else 0
    for s in range(nseg):
        if seg_start[s + 1] - seg_start[s] > max_group:
            max_group = seg_start[s + 1] - seg_start[s]
    table = <double*>malloc(3 * (max_group + 1) * sizeof(double))
    if table == NULL:
        raise MemoryError()
    with nogil:
        _count_table(max_group, ddof, table)
        gp.table = table
        if num_threads <= 1 or nseg <= SEGMENTS_PER_TASK:
            _group_pass_range(&gp, vals, init, 0, nseg, failed)
        else:
            for s in prange(0, nseg, SEGMENTS_PER_TASK, schedule="dynamic",
                            num_threads=num_threads):
                _group_pass_range(&gp, vals, init, s, min(s + SEGMENTS_PER_TASK, nseg),
                                  failed)
        free(table)
    if failed[0]:
        raise MemoryError()


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


cdef void _batch_rows(const i64* offsets, i64 i0, i64 i1, int sig, const double* xs,
                      const double* outcome, double m, double sh, double f, double w,
                      bint first, double* out_adv) noexcept nogil:
    """``out_adv += w z`` (``=`` when ``first``) for the rows of trajectories ``i0 .. i1-1``."""
    cdef i64 i, k
    cdef double x
    for i in range(i0, i1):
        for k in range(offsets[i], offsets[i + 1]):
            x = outcome[i] if sig == SIG_OUTCOME else xs[k]
            if first:
                out_adv[k] = 0.0 + w * (((x - m) - sh) * f)
            else:
                out_adv[k] = out_adv[k] + w * (((x - m) - sh) * f)


def fused_batch_advantages(const i64[::1] offsets, const i64[:, ::1] spec,
                           const double[::1] weight, const double[::1] batch_params,
                           double[::1] out_reward, double[::1] sig_return,
                           double[::1] sig_oret, double[::1] outcome, bint assign,
                           double[::1] out_adv, int num_threads=1):
    """The batch pass: ``out_adv += w_c z_c`` for every batch component (``=`` for the first
    when ``assign``, i.e. when the group pass wrote no advantage). Rows are independent:
    ``num_threads`` OpenMP threads split the trajectories (bit-identical for any count)."""
    cdef Py_ssize_t n_traj = offsets.shape[0] - 1, ncomp = spec.shape[0], ci, i
    cdef int sig
    cdef bint first = assign
    cdef double m, sh, f, w
    cdef double* xs
    cdef double* reward_p = _ptr(out_reward)
    cdef double* sig_return_p = _ptr(sig_return)
    cdef double* sig_oret_p = _ptr(sig_oret)
    cdef double* outcome_p = _ptr(outcome)
    cdef const i64* off = &offsets[0]
    cdef double* adv = _ptr(out_adv)
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
            if num_threads <= 1 or n_traj <= TRAJ_PER_TASK:
                _batch_rows(off, 0, n_traj, sig, xs, outcome_p, m, sh, f, w, first, adv)
            else:
                for i in prange(0, n_traj, TRAJ_PER_TASK, schedule="static",
                                num_threads=num_threads):
                    _batch_rows(off, i, min(i + TRAJ_PER_TASK, n_traj), sig, xs, outcome_p,
                                m, sh, f, w, first, adv)
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


# --------------------------------------------------------------------------- array checks
# Single-pass checks for mica_core.validate (arrays from numpy, the training-loop case): what
# numpy does in several passes and temporaries, in one pass and none.


def ragged_check_offsets(const i64[::1] offsets):
    """First position that breaks "starts at 0, strictly increasing" (0 for a non-zero start,
    ``i + 1`` when ``offsets[i + 1] <= offsets[i]``), or -1."""
    cdef Py_ssize_t i, n = offsets.shape[0]
    cdef i64 bad = -1
    if n and offsets[0] != 0:
        return 0
    with nogil:
        for i in range(1, n):
            if offsets[i] <= offsets[i - 1]:
                bad = i
                break
    return bad


def small_codes(const i64[::1] labels, i64 limit, i64[::1] codes):
    """Compact small non-negative integer labels: ``codes[i]`` = the rank of ``labels[i]``
    among the distinct labels present (in value order). Returns the number of distinct labels,
    or -1 when some label is negative or at least ``limit`` (then ``codes`` is not written)."""
    cdef Py_ssize_t i, n = labels.shape[0]
    cdef i64 v, top = -1, k = 0
    cdef bint outside = False
    cdef i64* rank
    with nogil:
        for i in range(n):
            v = labels[i]
            if v < 0 or v >= limit:
                outside = True
                break
            if v > top:
                top = v
    if outside:
        return -1
    rank = <i64*>malloc((top + 1) * sizeof(i64) + 1)
    if rank == NULL:
        raise MemoryError()
    with nogil:
        for v in range(top + 1):
            rank[v] = 0
        for i in range(n):
            rank[labels[i]] = 1
        for v in range(top + 1):
            if rank[v]:
                rank[v] = k
                k += 1
            else:
                rank[v] = -1
        for i in range(n):
            codes[i] = rank[labels[i]]
    free(rank)
    return k
