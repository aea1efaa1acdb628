"""The fused compiled kernels (Cython and Numba) against tests/naive.py.

Every preset and a few user estimators that reach the remaining signal/scope combinations,
every normalization option, float32 and float64, contiguous and interleaved groups, empty
input, one trajectory, length-1 trajectories and singleton buckets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import PRESETS, flat, naive_estimate

import mica_core as mc
from mica_core import _autoselect
from mica_core.estimators import Component, Estimator, resolve
from mica_core.layout import make_ragged

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

BACKENDS = ["cython"] + (["numba"] if HAVE_NUMBA else [])
backend_param = pytest.mark.parametrize("backend", BACKENDS)

# User estimators covering what the presets do not: outcome at turn and batch scope,
# outcome_return at turn scope, return at group scope, reward at turn scope, three and four
# components, per-component baseline/scale overrides.
CUSTOM = {
    "t_outcome_turn": ("idr", 0.9, [(0.3, "outcome", "turn"),
                                    (0.7, "reward", "turn", "loo", "none")]),
    "t_mixed": ("idr", 0.7, [(0.2, "return", "group"), (0.3, "outcome_return", "turn"),
                             (0.5, "outcome", "batch")]),
    "t_four": ("adr", 0.95, [(0.25, "reward", "batch", "loo"), (0.25, "return", "turn"),
                             (0.25, "outcome", "group", None, "none"),
                             (0.25, "outcome_return", "batch")]),
    "t_batch_only": ("idr", 0.8, [(0.6, "return", "batch"), (0.4, "reward", "batch")]),
}


def _returns_kind(comps):
    signals = {c[1] for c in comps}
    return ("outcome_discounted" if "outcome_return" in signals
            else "outcome" if "outcome" in signals else "discounted")


def estimator_of(name):
    """(argument for mc.estimate, spec for naive_estimate or None)."""
    if name in PRESETS:
        return name, None
    reward, gamma, comps = CUSTOM[name]
    returns = _returns_kind(comps)
    est = Estimator(name, tuple(Component(*c) for c in comps), reward=reward, gamma=gamma,
                    returns=returns)
    spec = (reward, gamma, returns, [tuple(c) + (None,) * (5 - len(c)) for c in comps])
    return est, spec


ESTIMATORS = list(PRESETS) + list(CUSTOM)


def to_trajs(offsets, group, d, d0=None, reward=None):
    out = []
    for i in range(len(offsets) - 1):
        a, b = offsets[i], offsets[i + 1]
        t = {"group": int(group[i])}
        if reward is not None:
            t["rewards"] = [float(x) for x in reward[a:b]]
        else:
            t["distances"] = [float(x) for x in d[a:b]]
            t["initial_distance"] = float(d0[i])
        out.append(t)
    return out


def check_against_naive(offsets, group, d, d0, estimator, backend, dtype, reward=None,
                        **options):
    est, spec = estimator_of(estimator)
    if reward is not None:
        res = mc.estimate(offsets, group, reward=reward.astype(dtype), estimator=est,
                          backend=backend, **options)
        trajs = to_trajs(offsets, group, None, reward=reward.astype(dtype))
    else:
        res = mc.estimate(offsets, group, distance=d.astype(dtype),
                          initial_distance=d0.astype(dtype), estimator=est, backend=backend,
                          **options)
        trajs = to_trajs(offsets, group, d.astype(dtype), d0.astype(dtype))
    ref = naive_estimate(trajs, estimator, spec=spec, **options)
    for k, got in enumerate(res):
        assert got.dtype == dtype
        want = np.array(flat(ref, k), dtype=np.float64)
        if dtype == np.float64:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- strategies

# Distances on a 1/8 grid: exact rewards, so buckets whose values are mathematically equal
# are equal in floating point too (their z is 0 in both the reference and the kernels, not
# rounding noise divided by eps).
grid = st.integers(0, 80).map(lambda k: k / 8.0)


@st.composite
def ragged_batches(draw, max_traj=10, max_len=6, max_groups=4):
    n_traj = draw(st.integers(0, max_traj))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=n_traj, max_size=n_traj))
    labels = draw(st.lists(st.integers(0, max_groups - 1), min_size=n_traj,
                           max_size=n_traj))
    if draw(st.booleans()):
        labels = sorted(labels)  # contiguous groups (the fast path)
    offsets = np.zeros(n_traj + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    d = np.array(draw(st.lists(grid, min_size=n, max_size=n)), dtype=np.float64)
    d0 = np.array(draw(st.lists(grid, min_size=n_traj, max_size=n_traj)), dtype=np.float64)
    return offsets, np.array(labels, dtype=np.int64), d, d0


_OPTIONS = {
    "baseline": st.sampled_from(["mean", "loo"]),
    "scale": st.sampled_from(["std", "none"]),
    "ddof": st.sampled_from([0, 1]),
    "singleton": st.sampled_from(["zero", "raw"]),
    "eps": st.sampled_from([1e-6, 1e-3, 0.5]),
    "weight": st.sampled_from([0.0, 0.3, 0.5, 1.0]),
}
# Dyadic discounts keep every return on the grid exact, so the kernels and the reference
# agree to the last bit before normalizing: a bucket of mathematically equal returns is then
# exactly equal in both (its z is 0), instead of rounding noise divided by eps (which differs
# with the order of operations, e.g. a fused multiply-add, and says nothing about a bug).
options = st.fixed_dictionaries({"gamma": st.sampled_from([0.0, 0.5, 0.75, 1.0])},
                                optional=_OPTIONS)
any_gamma = st.fixed_dictionaries({}, optional=_OPTIONS | {
    "gamma": st.sampled_from([0.0, 0.3, 0.85, 0.99, 1.0])})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches(), estimator=st.sampled_from(ESTIMATORS), opts=options,
       backend=st.sampled_from(BACKENDS), dtype=st.sampled_from([np.float64, np.float32]))
def test_matches_naive(batch, estimator, opts, backend, dtype):
    offsets, group, d, d0 = batch
    check_against_naive(offsets, group, d, d0, estimator, backend, dtype, **opts)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches(), seed=st.integers(0, 2**32 - 1),
       estimator=st.sampled_from(ESTIMATORS), opts=any_gamma,
       backend=st.sampled_from(BACKENDS), dtype=st.sampled_from([np.float64, np.float32]))
def test_matches_naive_on_continuous_values(batch, seed, estimator, opts, backend, dtype):
    """Any discount (the presets' 0.85 included) on continuous random distances, where
    buckets of equal values have probability zero."""
    offsets, group, _, _ = batch
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.0, 10.0, int(offsets[-1]))
    d0 = rng.uniform(0.0, 10.0, len(group))
    check_against_naive(offsets, group, d, d0, estimator, backend, dtype, **opts)


@settings(max_examples=60, deadline=None)
@given(batch=ragged_batches(), estimator=st.sampled_from(ESTIMATORS), opts=options,
       backend=st.sampled_from(BACKENDS), dtype=st.sampled_from([np.float64, np.float32]))
def test_given_rewards_match_naive(batch, estimator, opts, backend, dtype):
    offsets, group, d, _ = batch
    reward = d - 5.0  # rewards of either sign
    check_against_naive(offsets, group, None, None, estimator, backend, dtype, reward=reward,
                        **opts)


# --------------------------------------------------------------------------- edge cases


@backend_param
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty_input(backend, estimator):
    est, _ = estimator_of(estimator)
    res = mc.estimate(np.array([0]), np.array([], dtype=np.int64), distance=np.zeros(0),
                      initial_distance=np.zeros(0), estimator=est, backend=backend)
    for a in res:
        assert a.shape == (0,) and a.dtype == np.float64


@backend_param
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_one_trajectory(backend, estimator, singleton):
    offsets = np.array([0, 4])
    d = np.array([3.0, 2.5, 2.75, 1.0])
    check_against_naive(offsets, np.array([7]), d, np.array([4.0]), estimator, backend,
                        np.float64, singleton=singleton)


@backend_param
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_length_one_trajectories_and_singleton_buckets(backend, estimator):
    # Group 0: three length-1 rollouts; group 1: one rollout (singleton everywhere);
    # group 2: lengths 1 and 5 (turns 1..4 are singleton turn buckets).
    offsets = np.array([0, 1, 2, 3, 6, 7, 12])
    group = np.array([0, 0, 0, 1, 2, 2])
    d = np.array([1.0, 2.0, 0.5, 3.0, 2.0, 1.0, 4.0, 3.5, 3.0, 2.0, 1.0, 0.5])
    d0 = np.array([4.0, 4.0, 4.0, 5.0, 4.5, 4.5])
    for singleton in ("zero", "raw"):
        check_against_naive(offsets, group, d, d0, estimator, backend, np.float64,
                            singleton=singleton)


@backend_param
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_interleaved_groups_equal_contiguous(backend, estimator):
    """The counting-sort path gives what the in-place path gives on the same rollouts."""
    rng = np.random.default_rng(3)
    n_groups, per = 37, 5
    lengths = rng.integers(1, 12, n_groups * per)
    group = np.repeat(np.arange(n_groups), per)
    perm = rng.permutation(len(group))
    offsets = np.zeros(len(group) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    d = rng.uniform(0, 5, offsets[-1])
    d0 = rng.uniform(0, 5, len(group))
    est, _ = estimator_of(estimator)
    ref = mc.estimate(offsets, group, distance=d, initial_distance=d0, estimator=est,
                      backend=backend)
    # The same trajectories in shuffled order (rows move with their trajectory).
    new_len = lengths[perm]
    new_off = np.zeros_like(offsets)
    np.cumsum(new_len, out=new_off[1:])
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in perm])
    got = mc.estimate(new_off, group[perm], distance=d[rows], initial_distance=d0[perm],
                      estimator=est, backend=backend)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b[rows], rtol=1e-12, atol=1e-12)


@backend_param
def test_large_offsets_keep_their_digits(backend):
    """Values riding on 1e12: the two-pass statistics (and the exact merge of group moments
    for batch scope) recover the small differences."""
    rng = np.random.default_rng(5)
    offsets = np.arange(0, 8 * 6 + 1, 6)
    group = np.repeat([0, 1], 4)
    reward = 1e12 + rng.integers(0, 16, 48) / 4.0
    small = reward - 1e12
    for estimator in ("mica_group", "reinforce_pp_idr"):
        got = mc.estimate(offsets, group, reward=reward, estimator=estimator,
                          backend=backend).advantage
        want = mc.estimate(offsets, group, reward=small, estimator=estimator,
                           backend=backend).advantage
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@backend_param
def test_float32_input_is_read_as_float32(backend):
    """float32 values are converted to float64 inside the kernel, not copied before."""
    offsets = np.array([0, 2, 5])
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32)
    d0 = np.array([0.7, 0.9], dtype=np.float32)
    res = mc.estimate(offsets, [0, 0], distance=d, initial_distance=d0, backend=backend)
    d64, d064 = d.astype(np.float64), d0.astype(np.float64)
    want = np.concatenate([[d064[0] - d64[0]], d64[:1] - d64[1:2], [d064[1] - d64[2]],
                           d64[2:4] - d64[3:5]])
    assert res.reward.dtype == np.float32
    np.testing.assert_array_equal(res.reward, want.astype(np.float32))


# --------------------------------------------------------------------------- kernels


def _kernel_modules():
    from mica_core import _ext

    mods = [_ext]
    if HAVE_NUMBA:
        from mica_core import _numba

        mods.append(_numba)
    return mods


@settings(max_examples=80, deadline=None)
@given(group=st.lists(st.integers(0, 5), max_size=40), data=st.data())
def test_ragged_group_segments(group, data):
    labels = np.array(group, dtype=np.int64)
    ragged = make_ragged(np.arange(len(labels) + 1), labels)
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=len(labels),
                                 max_size=len(labels)))
    offsets = np.zeros(len(labels) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    codes, ng = ragged.group, ragged.ngroups
    for mod in _kernel_modules():
        order = np.full(len(labels), -1, dtype=np.int64)
        seg = np.empty(ng + 1, dtype=np.int64)
        contiguous, max_len = mod.ragged_group_segments(offsets, codes, ng, order, seg)
        assert max_len == (max(lengths) if lengths else 0)
        runs = int(np.count_nonzero(np.diff(codes))) + 1 if len(codes) else 0
        assert bool(contiguous) == (runs == ng)
        trajs = np.arange(len(codes)) if contiguous else order
        assert seg[0] == 0 and seg[-1] == len(codes)
        covered = np.concatenate([trajs[seg[s]:seg[s + 1]] for s in range(ng)]) if ng else []
        assert sorted(covered) == list(range(len(codes)))
        for s in range(ng):
            members = trajs[seg[s]:seg[s + 1]]
            assert len(set(codes[members])) == 1
            assert list(members) == sorted(members)  # stable: input order within a group


def test_cython_and_numba_agree_on_a_large_batch():
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(11)
    n_traj = 3000
    lengths = rng.integers(1, 46, n_traj)
    offsets = np.zeros(n_traj + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    group = rng.integers(0, 400, n_traj)
    d = rng.uniform(0, 5, offsets[-1])
    d0 = rng.uniform(0, 5, n_traj)
    for estimator in ESTIMATORS:
        est, _ = estimator_of(estimator)
        a = mc.estimate(offsets, group, distance=d, initial_distance=d0, estimator=est,
                        backend="cython")
        b = mc.estimate(offsets, group, distance=d, initial_distance=d0, estimator=est,
                        backend="numba")
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_run_plan_fills_caller_outputs_without_touching_inputs():
    from mica_core import _backend_cython

    offsets = np.array([0, 3, 4, 6])
    ragged = make_ragged(offsets, np.array([1, 1, 0]))
    d = np.array([3.0, 2.0, 2.5, 1.0, 0.5, 0.0])
    d0 = np.array([4.0, 4.0, 2.0])
    d_before, d0_before = d.copy(), d0.copy()
    plan = resolve("mapo", reward_given=False)
    outs = [np.full(6, np.nan) for _ in range(3)]
    _backend_cython.run(plan, ragged, d, d0, None, *outs)
    assert all(np.isfinite(o).all() for o in outs)
    np.testing.assert_array_equal(d, d_before)
    np.testing.assert_array_equal(d0, d0_before)


# --------------------------------------------------------------------------- auto


def test_auto_picks_cython_small_and_numba_large(monkeypatch):
    monkeypatch.delenv("MICA_NUMBA_MIN_ROWS", raising=False)
    assert _autoselect.pick_backend(12_000) == "cython"
    big = _autoselect.NUMBA_MIN_ROWS
    assert _autoselect.pick_backend(big) == ("numba" if HAVE_NUMBA else "cython")
    monkeypatch.setattr(_autoselect, "numba_available", lambda: False)
    assert _autoselect.pick_backend(10 * big) == "cython"


def test_auto_threshold_from_environment(monkeypatch):
    monkeypatch.setenv("MICA_NUMBA_MIN_ROWS", "0")
    assert _autoselect.pick_backend(1) == ("numba" if HAVE_NUMBA else "cython")
    monkeypatch.setenv("MICA_NUMBA_MIN_ROWS", "many")
    with pytest.raises(ValueError, match="MICA_NUMBA_MIN_ROWS"):
        _autoselect.pick_backend(1)


def test_auto_matches_explicit_backends():
    offsets = np.array([0, 2, 3, 6])
    d = np.array([1.0, 0.5, 2.0, 1.5, 1.0, 0.25])
    d0 = np.array([2.0, 2.0, 3.0])
    auto = mc.estimate(offsets, [0, 0, 0], distance=d, initial_distance=d0)
    cy = mc.estimate(offsets, [0, 0, 0], distance=d, initial_distance=d0, backend="cython")
    for a, b in zip(auto, cy):
        np.testing.assert_array_equal(a, b)
    assert math.isfinite(float(auto.advantage.sum()))


# --------------------------------------------------------------------------- Arrow fast paths


def _table(rows, id_type=None):
    import pyarrow as pa

    g, tr, tu, d, d0 = (list(c) for c in zip(*rows))
    if id_type == "str":
        g, tr = [f"g{x}" for x in g], [f"t{x}" for x in tr]
    elif id_type == "uint":
        g = pa.array(g, pa.uint64())
        tr = pa.array(tr, pa.uint32())
    return pa.table({"group_id": g, "traj_id": tr, "turn": tu, "distance": d,
                     "initial_distance": d0})


def _rows(seed=0, n_groups=6, per=3):
    rng = np.random.default_rng(seed)
    rows, traj = [], 0
    for g in range(n_groups):
        for _ in range(per):
            d0 = float(rng.integers(8, 16)) / 4
            for t in range(int(rng.integers(1, 6))):
                rows.append((g * 7 % n_groups, traj * 5 % 101, t, float(rng.integers(0, 16)) / 4,
                             d0))
            traj += 1
    return rows


def _both_paths(monkeypatch, table):
    """compute_advantages with the compiled fast paths and without them."""
    from mica_core import arrow

    fast = mc.compute_advantages(table)
    with monkeypatch.context() as m:
        m.setattr(arrow, "_fast_kernels", lambda: None)
        slow = mc.compute_advantages(table)
    return fast, slow


@pytest.mark.parametrize("id_type", [None, "str", "uint"])
@pytest.mark.parametrize("layout", ["sorted", "reversed_runs", "shuffled"])
def test_arrow_fast_paths_match_general_path(monkeypatch, id_type, layout):
    rows = _rows()
    if layout == "reversed_runs":  # ids stored run by run, not increasing
        rows = sorted(rows, key=lambda r: (-r[1], r[2]))
    elif layout == "shuffled":
        rows = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    fast, slow = _both_paths(monkeypatch, _table(rows, id_type))
    assert fast.equals(slow)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("breakage", ["duplicate_turn", "missing_turn", "negative_turn",
                                      "two_groups", "initial_differs"])
def test_arrow_fast_paths_raise_the_same_errors(monkeypatch, breakage, shuffle):
    from mica_core import arrow

    rows = [list(r) for r in _rows(seed=3)]
    k = 7
    if breakage == "duplicate_turn":
        rows[k + 1][2] = rows[k][2] if rows[k + 1][1] == rows[k][1] else rows[k + 1][2]
        rows.insert(k, list(rows[k]))
    elif breakage == "missing_turn":
        rows[k][2] += 10
    elif breakage == "negative_turn":
        rows[k][2] = -1
    elif breakage == "two_groups":
        while rows[k + 1][1] != rows[k][1]:
            k += 1
        rows[k + 1][0] = (rows[k][0] + 1) % 6
    else:
        while rows[k + 1][1] != rows[k][1]:
            k += 1
        rows[k + 1][4] += 0.25
    if shuffle:
        rows = [rows[i] for i in np.random.default_rng(2).permutation(len(rows))]
    table = _table([tuple(r) for r in rows])
    with pytest.raises(mc.MicaInputError) as fast:
        mc.compute_advantages(table)
    with monkeypatch.context() as m:
        m.setattr(arrow, "_fast_kernels", lambda: None)
        with pytest.raises(mc.MicaInputError) as slow:
            mc.compute_advantages(table)
    assert str(fast.value) == str(slow.value)
    assert (fast.value.column, fast.value.row, fast.value.rule) == \
        (slow.value.column, slow.value.row, slow.value.rule)


def test_reader_kernels_agree():
    rng = np.random.default_rng(4)
    ids = np.repeat(rng.permutation(50), rng.integers(1, 5, 50)).astype(np.int64)
    lengths = np.bincount(np.unique(ids, return_inverse=True)[1])
    for mod in _kernel_modules():
        codes = np.empty(len(ids), dtype=np.int64)
        starts = np.empty(len(ids) + 1, dtype=np.int64)
        nruns, increasing = mod.ragged_run_codes(ids, codes, starts)
        assert nruns == 50 and not increasing
        np.testing.assert_array_equal(np.diff(starts[:51]), np.diff(
            np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]])))
        offsets = starts[:51].copy()
        turn = np.arange(len(ids)) - np.repeat(offsets[:-1], np.diff(offsets))
        assert mod.ragged_check_turns(offsets, turn) == -1
        bad = turn.copy()
        bad[9] += 1
        assert mod.ragged_check_turns(offsets, bad) == 9
        assert mod.ragged_first_change(offsets, codes) == -1
        first_long = int(np.flatnonzero(np.diff(offsets) > 1)[0])
        assert mod.ragged_first_change(offsets, np.arange(len(ids), dtype=np.float64)) == \
            offsets[first_long] + 1
        perm = rng.permutation(len(ids))
        order = np.full(len(ids), -1, dtype=np.int64)
        assert mod.ragged_place_rows(codes[perm], turn[perm], offsets, order) == -1
        np.testing.assert_array_equal(codes[perm][order], codes)
        np.testing.assert_array_equal(turn[perm][order], turn)
    assert len(lengths) == 50
