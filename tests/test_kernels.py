"""The compiled kernels themselves (Cython ``_ext`` and its Numba mirror): group segments,
reader checks, caller-owned outputs, the auto backend, and the Arrow reader's fast paths.

The backends' numbers against tests/naive.py are in tests/test_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mica_core as mc
from mica_core import _autoselect
from mica_core.estimators import resolve
from mica_core.options import BACKENDS
from mica_core.validate import make_ragged

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

# --------------------------------------------------------------------------- kernels


def _kernel_modules():
    from mica_core import _ext

    return [_ext]


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


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_run_plan_fills_caller_outputs_without_touching_inputs(backend):
    if backend == "numba" and not HAVE_NUMBA:
        pytest.skip("numba not installed")
    from mica_core.api import run_plan

    offsets = np.array([0, 3, 4, 6])
    ragged = make_ragged(offsets, np.array([1, 1, 0]))
    d = np.array([3.0, 2.0, 2.5, 1.0, 0.5, 0.0])
    d0 = np.array([4.0, 4.0, 2.0])
    d_before, d0_before = d.copy(), d0.copy()
    plan = resolve("mapo", reward_given=False)
    outs = tuple(np.full(6, np.nan) for _ in range(3))
    got = run_plan(plan, ragged, d, d0, None, backend, out=outs)
    assert all(a is b for a, b in zip(got, outs))  # filled in place, nothing allocated
    want = mc.estimate(offsets, [1, 1, 0], distance=d, initial_distance=d0, estimator="mapo",
                       backend="numpy")
    for o, w in zip(outs, want):
        np.testing.assert_allclose(o, w, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(d, d_before)
    np.testing.assert_array_equal(d0, d0_before)


# --------------------------------------------------------------------------- auto


def test_auto_runs_cython_on_one_thread_small_and_all_threads_large(monkeypatch):
    monkeypatch.delenv("MICA_PARALLEL_MIN_ROWS", raising=False)
    monkeypatch.delenv("MICA_NUM_THREADS", raising=False)
    big = _autoselect.PARALLEL_MIN_ROWS
    assert _autoselect.pick_backend(12_000) == _autoselect.pick_backend(10 * big) == "cython"
    assert _autoselect.threads_for(12_000) == 1
    assert _autoselect.threads_for(big) == _autoselect.available_threads() >= 1
    monkeypatch.setenv("MICA_NUM_THREADS", "1")
    assert _autoselect.threads_for(10 * big) == 1


def test_auto_thresholds_from_environment(monkeypatch):
    monkeypatch.setenv("MICA_PARALLEL_MIN_ROWS", "0")
    monkeypatch.setenv("MICA_NUM_THREADS", "2")
    assert _autoselect.threads_for(1) == min(2, len(__import__("os").sched_getaffinity(0)))
    monkeypatch.setenv("MICA_PARALLEL_MIN_ROWS", "many")
    with pytest.raises(ValueError, match="MICA_PARALLEL_MIN_ROWS"):
        _autoselect.threads_for(1)


def test_auto_matches_explicit_backends():
    offsets = np.array([0, 2, 3, 6])
    d = np.array([1.0, 0.5, 2.0, 1.5, 1.0, 0.25])
    d0 = np.array([2.0, 2.0, 3.0])
    auto = mc.estimate(offsets, [0, 0, 0], distance=d, initial_distance=d0)
    cy = mc.estimate(offsets, [0, 0, 0], distance=d, initial_distance=d0, backend="cython")
    for a, b in zip(auto, cy):
        np.testing.assert_array_equal(a, b)


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
        m.setattr(arrow, "_reader_kernels", lambda: None)
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
        m.setattr(arrow, "_reader_kernels", lambda: None)
        with pytest.raises(mc.MicaInputError) as slow:
            mc.compute_advantages(table)
    assert str(fast.value) == str(slow.value)
    assert (fast.value.column, fast.value.row, fast.value.rule) == \
        (slow.value.column, slow.value.row, slow.value.rule)


def test_reader_kernels_agree():
    rng = np.random.default_rng(4)
    ids = np.repeat(rng.permutation(50), rng.integers(1, 5, 50)).astype(np.int64)
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


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.integers(-2, 5), max_size=30), start=st.sampled_from([0, 0, 0, 1, -1]))
def test_offsets_check_finds_the_first_break(steps, start):
    from mica_core import _ext

    o = np.concatenate([[start], start + np.cumsum(steps)]).astype(np.int64)
    want = 0 if start != 0 else next((i + 1 for i, s in enumerate(steps) if s <= 0), -1)
    assert _ext.ragged_check_offsets(o) == want


@settings(max_examples=200, deadline=None)
@given(labels=st.lists(st.integers(-3, 60), max_size=40), limit=st.integers(1, 70))
def test_small_codes_rank_labels_in_value_order(labels, limit):
    from mica_core import _ext

    a = np.array(labels, dtype=np.int64)
    codes = np.full(len(a), -9, dtype=np.int64)
    n = _ext.small_codes(a, limit, codes)
    if len(a) and (a.min() < 0 or a.max() >= limit):
        assert n == -1
        return
    uniq = np.unique(a)
    assert n == len(uniq)
    np.testing.assert_array_equal(codes, np.searchsorted(uniq, a))


def test_plan_codes_come_from_the_kernels_and_name_every_estimator_part():
    from mica_core import _backend_cython, _compiled
    from mica_core.estimators import RETURNS, REWARDS, SCOPES, SIGNALS

    codes = _compiled.ext.plan_codes()
    assert set(codes["scope"]) == set(SCOPES) and set(codes["signal"]) == set(SIGNALS)
    assert set(codes["reward"]) == set(REWARDS) | {"given"}
    assert set(codes["returns"]) == set(RETURNS)
    for part in codes.values():  # codes are distinct within each part
        assert len(set(part.values())) == len(part)
    assert _backend_cython.plan_codes() == codes


def test_plan_codes_that_disagree_with_the_estimators_stop_the_import(monkeypatch):
    from mica_core import _backend_cython

    class Kernels:
        @staticmethod
        def plan_codes():
            codes = _backend_cython._compiled.ext.plan_codes()
            codes["scope"] = {k: v for k, v in codes["scope"].items() if k != "key"}
            return codes

    monkeypatch.setattr(_backend_cython._compiled, "require", lambda: Kernels)
    with pytest.raises(ImportError, match=r"scope names .* rebuild the kernels"):
        _backend_cython.plan_codes()
