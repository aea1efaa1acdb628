"""Every CPU backend against tests/naive.py on random ragged batches, every preset, every option."""

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mica_core as mc
from naive import PRESETS, flat, naive_estimate
from strategies import options, ragged_batches

BACKENDS = ["numpy", "cython"]
if (importlib.util.find_spec("numba") is not None
        and importlib.util.find_spec("mica_core._backend_numba") is not None):
    BACKENDS.append("numba")

PRESET_NAMES = sorted(PRESETS)


def _close(got, want, *, rtol, atol):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want), rtol=rtol,
                               atol=atol)


def _tolerance(opts, dtype):
    """1e-12 in float64 (relative to the scale of the z-score); eps=0 divides by tiny stds,
    so compare those more loosely (the reference and kernels round differently)."""
    if dtype == np.float32:
        return dict(rtol=1e-5, atol=1e-5)
    if opts.get("eps", 1e-6) == 0.0:
        return dict(rtol=1e-9, atol=1e-9)
    return dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(batch=ragged_batches(), name=st.sampled_from(PRESET_NAMES), opts=options)
def test_backend_matches_naive_float64(backend, batch, name, opts):
    trajs, offsets, groups, dist, init = batch
    if opts.get("eps", 1e-6) == 0.0:
        opts = dict(opts, scale="none")  # z with eps=0 is undefined on zero-variance buckets
    res = mc.estimate(offsets, groups, distance=dist, initial_distance=init, estimator=name,
                      backend=backend, **opts)
    want = naive_estimate(trajs, name, **opts)
    scale = max(1.0, float(np.abs(flat(want, 1)).max(initial=0)))
    _close(res.reward, flat(want, 0), rtol=1e-12, atol=1e-12 * scale)
    _close(res.returns, flat(want, 1), rtol=1e-12, atol=1e-12 * scale)
    _close(res.advantage, flat(want, 2), **_tolerance(opts, np.float64))
    assert res.advantage.dtype == np.float64


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(batch=ragged_batches(), name=st.sampled_from(PRESET_NAMES))
def test_backend_matches_naive_float32(backend, batch, name):
    trajs, offsets, groups, dist, init = batch
    d32, i32 = dist.astype(np.float32), init.astype(np.float32)
    # The reference sees exactly the float32 values the backend sees.
    for t, lo, hi in zip(trajs, offsets[:-1], offsets[1:]):
        t["distances"] = [float(x) for x in d32[lo:hi]]
    for t, x in zip(trajs, i32):
        t["initial_distance"] = float(x)
    res = mc.estimate(offsets, groups, distance=d32, initial_distance=i32, estimator=name,
                      backend=backend, eps=1e-3)
    want = naive_estimate(trajs, name, eps=1e-3)
    assert res.advantage.dtype == np.float32
    _close(res.advantage, flat(want, 2), rtol=1e-5, atol=1e-5)
    _close(res.returns, flat(want, 1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(batch=ragged_batches(rewards=True), name=st.sampled_from(PRESET_NAMES), opts=options)
def test_given_rewards_match_naive(backend, batch, name, opts):
    trajs, offsets, groups, _, _ = batch
    reward = np.array([x for t in trajs for x in t["rewards"]], dtype=np.float64)
    opts = dict(opts, eps=1e-3)
    res = mc.estimate(offsets, groups, reward=reward, estimator=name, backend=backend, **opts)
    want = naive_estimate(trajs, name, **opts)
    _close(res.reward, reward, rtol=0, atol=0)
    _close(res.advantage, flat(want, 2), rtol=1e-11, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(batch=ragged_batches(allow_empty=False), name=st.sampled_from(PRESET_NAMES),
       seed=st.integers(0, 2**32 - 1))
def test_permuting_trajectories_permutes_outputs(batch, name, seed):
    trajs, offsets, groups, dist, init = batch
    perm = np.random.default_rng(seed).permutation(len(trajs))
    lengths = np.diff(offsets)
    rows = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(trajs))]
    new_rows = np.concatenate([rows[i] for i in perm])
    new_offsets = np.concatenate([[0], np.cumsum(lengths[perm])])
    a = mc.estimate(offsets, groups, distance=dist, initial_distance=init, estimator=name,
                    eps=1e-3)
    b = mc.estimate(new_offsets, [groups[i] for i in perm], distance=dist[new_rows],
                    initial_distance=init[perm], estimator=name, eps=1e-3)
    np.testing.assert_allclose(b.advantage, a.advantage[new_rows], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.returns, a.returns[new_rows], rtol=1e-12, atol=1e-12)
