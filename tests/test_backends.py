"""Every backend against tests/naive.py on random ragged data (design: style habit 3).

Each test runs once per installed backend (the ``backend`` fixture in conftest.py): numpy,
cython, numba, torch on host arrays, torch tensors on the CPU, and on CUDA where present.
Every preset plus user estimators that reach the remaining signal/scope combinations, every
normalization option, float32 and float64, contiguous and interleaved groups, empty input,
one trajectory, length-1 trajectories and singleton buckets.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from naive import flat, naive_estimate
from strategies import ESTIMATORS, Batch, any_options, estimator_of, grid_options, ragged_batches

DTYPES = st.sampled_from([np.float64, np.float32])
HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_against_naive(backend, batch, estimator, dtype=np.float64, reward=None, **options):
    est, spec = estimator_of(estimator)
    if reward is not None:
        res = backend.estimate(batch.offsets, batch.group, reward=reward.astype(dtype),
                               estimator=est, key=batch.keys(), **options)
    else:
        res = backend.estimate(batch.offsets, batch.group,
                               distance=batch.distance.astype(dtype),
                               initial_distance=batch.initial_distance.astype(dtype),
                               estimator=est, key=batch.keys(), **options)
    ref = naive_estimate(batch.trajs(dtype, reward), estimator, spec=spec, **options)
    for k, got in enumerate(res):
        assert got.dtype == dtype
        want = np.array(flat(ref, k), dtype=np.float64)
        if dtype == np.float64:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=80, **HYPOTHESIS)
@given(batch=ragged_batches(), estimator=st.sampled_from(ESTIMATORS), opts=grid_options,
       dtype=DTYPES)
def test_matches_naive(backend, batch, estimator, opts, dtype):
    check_against_naive(backend, batch, estimator, dtype, **opts)


@settings(max_examples=50, **HYPOTHESIS)
@given(batch=ragged_batches(values="continuous"), estimator=st.sampled_from(ESTIMATORS),
       opts=any_options, dtype=DTYPES)
def test_matches_naive_on_continuous_values(backend, batch, estimator, opts, dtype):
    check_against_naive(backend, batch, estimator, dtype, **opts)


@settings(max_examples=40, **HYPOTHESIS)
@given(batch=ragged_batches(), estimator=st.sampled_from(ESTIMATORS), opts=grid_options,
       dtype=DTYPES)
def test_given_rewards_match_naive(backend, batch, estimator, opts, dtype):
    check_against_naive(backend, batch, estimator, dtype, reward=batch.distance - 5.0,
                        **opts)


@settings(max_examples=30, **HYPOTHESIS)
@given(batch=ragged_batches(allow_empty=False, values="continuous"),
       estimator=st.sampled_from(ESTIMATORS), seed=st.integers(0, 2**32 - 1))
def test_permuting_trajectories_permutes_outputs(backend, batch, estimator, seed):
    """Trajectories in another order (rows move with their trajectory, groups interleave
    differently): the same outputs, moved."""
    est, _ = estimator_of(estimator)
    offsets, n = batch.offsets, batch.n_traj
    perm = np.random.default_rng(seed).permutation(n)
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in perm])
    new_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[perm])])
    kw = dict(estimator=est, eps=1e-3)
    keys = np.asarray(batch.keys())
    a = backend.estimate(offsets, batch.group, distance=batch.distance,
                         initial_distance=batch.initial_distance, key=keys, **kw)
    b = backend.estimate(new_offsets, [batch.group[i] for i in perm],
                         distance=batch.distance[rows],
                         initial_distance=batch.initial_distance[perm], key=keys[rows], **kw)
    for x, y in zip(b, a):
        np.testing.assert_allclose(x, y[rows], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty_input(backend, estimator):
    est, _ = estimator_of(estimator)
    res = backend.estimate(np.array([0]), np.array([], dtype=np.int64),
                           distance=np.zeros(0), initial_distance=np.zeros(0), estimator=est,
                           key=[])
    for a in res:
        assert a.shape == (0,) and a.dtype == np.float64


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_one_trajectory(backend, estimator, singleton):
    batch = Batch(np.array([0, 4]), [7], np.array([3.0, 2.5, 2.75, 1.0]), np.array([4.0]),
                  ["x", "y", "x", "x"])
    check_against_naive(backend, batch, estimator, singleton=singleton)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_length_one_trajectories_and_singleton_buckets(backend, estimator, singleton):
    # Group 0: three length-1 rollouts; group 1: one rollout (singleton everywhere);
    # group 2: lengths 1 and 5 (turns 1..4 are singleton turn buckets).
    batch = Batch(np.array([0, 1, 2, 3, 6, 7, 12]), [0, 0, 0, 1, 2, 2],
                  np.array([1.0, 2.0, 0.5, 3.0, 2.0, 1.0, 4.0, 3.5, 3.0, 2.0, 1.0, 0.5]),
                  np.array([4.0, 4.0, 4.0, 5.0, 4.5, 4.5]), [0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 2, 2])
    check_against_naive(backend, batch, estimator, singleton=singleton)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_interleaved_groups_equal_contiguous(backend, estimator):
    """Many groups, stored interleaved (the kernels' counting-sort path) and contiguous."""
    rng = np.random.default_rng(3)
    n_groups, per = 37, 5
    lengths = rng.integers(1, 12, n_groups * per)
    group = np.repeat(np.arange(n_groups), per)
    perm = rng.permutation(len(group))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    d, d0 = rng.uniform(0, 5, offsets[-1]), rng.uniform(0, 5, len(group))
    key = rng.integers(0, 4, offsets[-1])
    est, _ = estimator_of(estimator)
    ref = backend.estimate(offsets, group, distance=d, initial_distance=d0, estimator=est,
                           key=key)
    new_off = np.concatenate([[0], np.cumsum(lengths[perm])])
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in perm])
    got = backend.estimate(new_off, group[perm], distance=d[rows], initial_distance=d0[perm],
                           estimator=est, key=key[rows])
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b[rows], rtol=1e-12, atol=1e-12)


def test_large_offsets_keep_their_digits(backend):
    """Values riding on 1e12 (pandas' regression pattern): the two-pass statistics, and the
    exact merge of group moments for batch scope, recover the small differences."""
    rng = np.random.default_rng(5)
    offsets = np.arange(0, 8 * 6 + 1, 6)
    group = np.repeat([0, 1], 4)
    small = rng.integers(0, 16, 48) / 4.0
    for estimator in ("mica_group", "reinforce_pp_idr"):
        got = backend.estimate(offsets, group, reward=1e12 + small, estimator=estimator)
        want = backend.estimate(offsets, group, reward=small, estimator=estimator)
        np.testing.assert_allclose(got.advantage, want.advantage, rtol=1e-9, atol=1e-9)


def test_float32_values_are_read_as_float32(backend):
    """float32 distances give float32 outputs computed from the float32 values (statistics in
    float64), not from a float64 copy made before rounding."""
    offsets = np.array([0, 2, 5])
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32)
    d0 = np.array([0.7, 0.9], dtype=np.float32)
    res = backend.estimate(offsets, [0, 0], distance=d, initial_distance=d0)
    d64, d064 = d.astype(np.float64), d0.astype(np.float64)
    want = np.concatenate([[d064[0] - d64[0]], d64[:1] - d64[1:2], [d064[1] - d64[2]],
                           d64[2:4] - d64[3:5]])
    assert res.reward.dtype == np.float32
    np.testing.assert_array_equal(res.reward, want.astype(np.float32))
